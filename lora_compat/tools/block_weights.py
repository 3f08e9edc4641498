"""Per-block LoRA weights in the webui "LoRA Block Weight" syntax (hako-mikan/sd-webui-lora-block-weight).

A vector of 17 (SD1/SD2 LoRA), 12 (SDXL), 20 (SDXL LyCORIS) or 26 (LyCORIS, every block) values, or 61 for
Flux, or one of its named presets. Shorter vectors name a subset of the 26 blocks; the blocks they do not name
get 0, as LBW's ``to26`` does. Block of a module: ``BASE`` for the text encoders; ``IN00``-``IN11``,
``M00``, ``OUT00``-``OUT11`` from the UNet's SGM (compvis) block index; Flux: ``CLIP``, ``T5``, ``IN`` (the
input embedders), ``D00``-``D18``, ``S00``-``S37``, ``OUT`` (the final layer). Modules in no block (UNet
``conv_in``/``time_embed``/``out``) keep weight 1, as in LBW.
"""
from __future__ import annotations

from typing import Mapping, Sequence, Union

from ..archs import ModuleIndex
from ..errors import LoraCompatError

BLOCKID26 = ["BASE", *[f"IN{i:02}" for i in range(12)], "M00", *[f"OUT{i:02}" for i in range(12)]]
BLOCKID17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05", "OUT06",
             "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"]
BLOCKID12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"]
BLOCKID20 = ["BASE", *[f"IN{i:02}" for i in range(9)], "M00", *[f"OUT{i:02}" for i in range(9)]]
BLOCKID_FLUX = ["CLIP", "T5", "IN", *[f"D{i:02}" for i in range(19)], *[f"S{i:02}" for i in range(38)], "OUT"]
LAYOUTS = {12: BLOCKID12, 17: BLOCKID17, 20: BLOCKID20, 26: BLOCKID26, 61: BLOCKID_FLUX}
#: LBW's built-in presets (17 values; FLUXALL 61)
PRESETS: dict[str, list[float]] = {
    "NONE": [0.0] * 17,
    "ALL": [1.0] * 17,
    "INS": [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    "IND": [1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    "INALL": [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    "MIDD": [1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    "OUTD": [1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    "OUTS": [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
    "OUTALL": [1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    "ALL0.5": [0.5] * 17,
    "FLUXALL": [1.0] * 61,
}
BlockSpec = Union[str, Sequence[float], Mapping[str, float]]


def parse(spec: BlockSpec) -> dict[str, float]:
    """Block id → weight from a preset name, a comma-separated string or a list (12/17/20/26/61 values), or a
    mapping of block ids."""
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - set(BLOCKID26) - set(BLOCKID_FLUX))
        if unknown:
            raise LoraCompatError(f"unknown block ids {unknown}; use {', '.join(BLOCKID26)} or the Flux ids")
        return {k: float(v) for k, v in spec.items()}
    if isinstance(spec, str):
        spec = spec.strip()
        values = PRESETS.get(spec)
        if values is None:
            try:
                values = [float(v) for v in spec.split(",")]
            except ValueError:
                raise LoraCompatError(f"block weights {spec!r}: not a preset ({', '.join(PRESETS)}) nor a list of "
                                      "numbers (LBW's random R/U/X values are not supported)") from None
    else:
        values = [float(v) for v in spec]
    layout = LAYOUTS.get(len(values))
    if layout is None:
        raise LoraCompatError(f"block weights need 12, 17, 20, 26 or 61 values, got {len(values)}")
    weights = {block: 0.0 for block in (BLOCKID_FLUX if layout is BLOCKID_FLUX else BLOCKID26)}
    weights.update(zip(layout, values))
    return weights


def block_of(target: str, index: ModuleIndex) -> str | None:
    """The LBW block of a canonical target (``None``: in no block), as the model's family places it
    (:attr:`Arch.blocks`)."""
    component, _, path = target.partition(".")
    layout = index.family.blocks if index.family is not None else None
    if layout is None:
        return "BASE" if component.startswith("text_encoder") else None
    return layout.block_of(component, path.removesuffix(".base_layer"), index)


def factors(targets, index: ModuleIndex, spec: BlockSpec) -> dict[str, float]:
    """Target → weight multiplier (targets in no block, or in a block the spec does not give, keep 1)."""
    weights = parse(spec)
    layout = index.family.blocks if index.family is not None else None
    flux = layout is not None and layout.vector == "flux"
    if flux != ("D00" in weights) and not isinstance(spec, Mapping):
        raise LoraCompatError(f"block weights for {'Flux (61 values)' if 'D00' in weights else 'SD (12-26 values)'} "
                              f"given to a {'Flux' if flux else 'UNet'} model")
    out = {}
    for target in targets:
        block = block_of(target, index)
        out[target] = weights.get(block, 1.0) if block is not None else 1.0
    return out
