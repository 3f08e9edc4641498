"""BFL-named Flux LoRAs: ``diffusion_model.double_blocks...`` (ai-toolkit, ComfyUI-saved) with lora_A/lora_B,
lora_down/lora_up(+alpha) or LyCORIS kinds (``lokr_*``, ``hada_*``); ComfyUI text-encoder names too."""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from ..archs import ModuleIndex
from ..archs.names import HostName
from ..errors import LoraCompatError
from ..files import Header, LoraFile
from ..patches.build import split_key
from ..patchset import PatchSet
from .base import Dialect, Match, ModuleReader, claimed_fraction
from .flux_names import (BFL_HEADS, BFL_TEXT_ENCODERS, DIFFUSERS_FLUX_HEADS, FLUX2_ONLY_HEADS, resolve_bfl,
                         widen_inputs)

if TYPE_CHECKING:
    from ..deltas import BaseWeights
    from .writing import Written

#: ``base_model.model.``: PEFT's prefix on BFL names (diffusers reads it as ``diffusion_model.`` for FLUX.2)
PREFIXES = ("diffusion_model.", "model.diffusion_model.", "base_model.model.")
#: the diffusers block names some FLUX.2 files hold under ``diffusion_model.`` (diffusers' converter takes them),
#: with the ``sformer_blocks.`` spelling of a broken export; claimed only beside a module only Flux has
EXPANDED_HEADS = (*DIFFUSERS_FLUX_HEADS, "sformer_blocks.")
_FLUX_ONLY = ("single_transformer_blocks.", "sformer_blocks.", *FLUX2_ONLY_HEADS)
_TEXT_ENCODER_PREFIXES = tuple(BFL_TEXT_ENCODERS)
#: every BFL key starts with one of these (one call rejects the rest)
_HEADS = (*PREFIXES, *BFL_HEADS, *_TEXT_ENCODER_PREFIXES)
#: the component ``resolve_bfl`` reads BFL module names into, and the base whose ComfyUI text-encoder names
#: (``BFL_TEXT_ENCODERS``) it reads
_TRANSFORMER, _BASE = "transformer", "flux1"
#: kohya suffix → the one BFL files carry
_SUFFIXES = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}


def strip_prefix(key: str) -> str:
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def is_bfl_key(key: str, expanded: bool = False) -> bool:
    """A LoRA key on a BFL name (``expanded``: or on a prefixed diffusers Flux name, :data:`EXPANDED_HEADS`)."""
    if not key.startswith(_HEADS):
        return False
    name = strip_prefix(key)
    if not name.startswith(BFL_HEADS) and not name.startswith(_TEXT_ENCODER_PREFIXES) and \
            not (expanded and name != key and name.startswith(EXPANDED_HEADS)):
        return False
    return split_key(name, True) is not None


class BflDialect(Dialect):
    id = "bfl"
    description = "Flux LoRAs on BFL module names (diffusion_model.double_blocks...: ai-toolkit, ComfyUI)"
    bases = ("flux1", "flux2", "chroma")
    #: ``diffusion_model.<BFL name>``, fused modules assembled exactly; every LyCORIS kind keeps its tensors
    writes = ("bfl",)

    def detect(self, header: Header) -> Match | None:
        expanded = any(strip_prefix(k).startswith(_FLUX_ONLY) for k in header.keys() if k.startswith(PREFIXES))
        fraction = claimed_fraction(header, partial(is_bfl_key, expanded=expanded))
        if fraction == 0:
            return None
        # bare BFL names with control markers are bfl-control's; they still parse here, with less confidence
        prefixed = any(k.startswith(PREFIXES) for k in header.keys())
        return Match(self.id, fraction if prefixed else fraction * 0.9,
                     (f"{fraction:.0%} of keys are LoRA tensors on BFL Flux module names",))

    def read(self, file: LoraFile, index: ModuleIndex) -> PatchSet:
        reader = ModuleReader(lambda module: resolve_bfl(index, module))
        return widen_inputs(reader.read(file, index, self.id, dotted=True, rename=strip_prefix), index)

    def write(self, patchset: PatchSet, index: ModuleIndex, *, target: str | None = None, base: str | None = None,
              rank: int | None = None, weights: "BaseWeights | None" = None) -> "Written":
        """``diffusion_model.<BFL name>`` (parts of a fused module assembled into one exact LoRA) and ComfyUI's
        text-encoder names; every kind keeps its own tensors (``lora_A``/``lora_B`` for LoRA)."""
        from .kohya_write import KohyaWriter  # torch: not imported for header work

        target = self.write_target(target)
        if not index.fused_modules(_TRANSFORMER):
            raise LoraCompatError(f"the bfl dialect names Flux modules; this LoRA is for {base}")
        return KohyaWriter(patchset, index, target, weights, _SUFFIXES).write(bfl_names(index, list(patchset)))


def bfl_names(index: ModuleIndex, targets: list[str]) -> dict[str, HostName]:
    """Canonical target → its BFL name: the inverse of :func:`resolve_bfl` by construction. A transformer module
    is named by the fused module of ``index`` it is part of (with its rows, unless it is the whole module), a text
    encoder by the ComfyUI name ``BFL_TEXT_ENCODERS`` reads."""
    from .kohya_names import kohya_names

    others = [t for t in targets if t.partition(".")[0] != _TRANSFORMER]
    base = index.family.id if index.family is not None else _BASE  # Chroma's T5 is its text_encoder
    # a family without ComfyUI text-encoder names (FLUX.2's LLM encoders): sd-scripts' lora_te_ names
    own = index.family is not None and not index.family.comfy_text_encoders
    names = {t: n for t, n in kohya_names(index, others, comfy=True, base=base).items()
             if n.name.startswith(_TEXT_ENCODER_PREFIXES) or own}
    transformer: dict[str, HostName] = {}
    for module, parts in index.fused_modules(_TRANSFORMER).items():
        whole = len(parts) == 1 and not parts[0].swap
        for part in parts:
            transformer[f"{_TRANSFORMER}.{part.target}"] = HostName(
                PREFIXES[0] + module, None if whole else (part.start, part.stop), part.swap)
    for target in targets:
        found = transformer.get(target.removesuffix(".base_layer"))  # a module PEFT wraps: the wrapper's name
        if found is not None:
            names[target] = found
    return names
