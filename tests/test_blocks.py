"""Per-block weights (LoRA Block Weight syntax): presets and vectors scale exactly the blocks they name."""
from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import pytest
import torch

import lora_compat
from lora_compat import Entry, LoraCompatError, Patcher
from lora_compat.tools.block_weights import BLOCKID26, parse

from lora_compat.oracles.lycoris_oracle import write_lycoris_file
from lora_compat.oracles.models import make_sd15_components, make_sdxl_components
from flux_models import kohya_flux_file, make_flux

warnings.filterwarnings("ignore", category=lora_compat.LoraCompatWarning)

#: LBW's block ids (hako-mikan/sd-webui-lora-block-weight README): 26 for LyCORIS, 17 for SD1 LoRA, 12 for SDXL
LBW_26 = ["BASE", *[f"IN{i:02}" for i in range(12)], "M00", *[f"OUT{i:02}" for i in range(12)]]
LBW_LAYOUTS = {17: ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
                    *[f"OUT{i:02}" for i in range(3, 12)]],
               12: ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", *[f"OUT{i:02}" for i in range(6)]]}
#: LBW's own presets (scripts/lora_block_weight.py, DEF_WEIGHT_PRESET)
LBW_PRESETS = {"INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0", "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
               "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0"}


def lbw_factors(spec: str | list[float]) -> dict[str, float]:
    """Block id → factor, as LBW reads a preset or a vector (blocks its layout does not list get 0)."""
    values = [float(v) for v in LBW_PRESETS.get(spec, spec).split(",")] if isinstance(spec, str) else spec
    return {**{b: 0.0 for b in LBW_26}, **dict(zip(LBW_LAYOUTS[len(values)], values))}


def lbw_block(key: str, layers: int = 2) -> str | None:
    """The test's own diffusers parameter name → LBW block id (compvis input/output block numbering)."""
    component, _, path = key.partition(".")
    if component.startswith("text_encoder"):
        return "BASE"
    if path.startswith("conv_in."):  # input_blocks.0.0
        return "IN00"
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.", path):
        return f"IN{(layers + 1) * int(m.group(1)) + int(m.group(3)) + 1:02}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.", path):
        return f"IN{(layers + 1) * (int(m.group(1)) + 1):02}"
    if path.startswith("mid_block."):
        return "M00"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.", path):
        return f"OUT{(layers + 1) * int(m.group(1)) + int(m.group(3)):02}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.", path):
        return f"OUT{(layers + 1) * int(m.group(1)) + layers:02}"
    return None


def test_parse_presets_and_vectors() -> None:
    ins = parse("INS")
    # INS = BASE, IN01, IN02, IN04 at 1; IN00 and IN03 are not in the 17-value layout and get 0
    assert [ins[b] for b in BLOCKID26] == [1, 0, 1, 1, 0, 1] + [0] * 20
    assert parse("0.5," * 11 + "0.5") == {**{b: 0.0 for b in BLOCKID26},
                                          **{b: 0.5 for b in ("BASE", "IN04", "IN05", "IN07", "IN08", "M00",
                                                              "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05")}}
    assert len(parse("FLUXALL")) == 61
    with pytest.raises(LoraCompatError, match="need 12, 17, 20, 26 or 61 values, got 3"):
        parse("1,0,1")
    with pytest.raises(LoraCompatError, match="random R/U/X values are not supported"):
        parse("R," * 16 + "R")


@pytest.mark.parametrize("preset", ["INS", "OUTD", "MIDD", "0,1,0.5,0,1,0.25,1,2,0,1,0,1,0,1,0,1,0"])
def test_sd1_presets_scale_exactly_the_blocks_they_name(tmp_path: Path, preset: str) -> None:
    components = make_sd15_components(seed=100)
    path, _ = write_lycoris_file(tmp_path, components, "lora", seed=1)
    weights = lbw_factors(preset)
    copies = {k: copy.deepcopy(m) for k, m in components.items()}
    Patcher(copies).set([Entry(path, 0.8, blocks=preset)])
    got = {f"{c}.{n}": p for c, m in copies.items() for n, p in m.named_parameters()}
    base = {f"{c}.{n}": p for c, m in components.items() for n, p in m.named_parameters()}
    touched = lora_compat.patched_weights(path, components, 0.8)
    for key in touched:
        block = lbw_block(key)
        factor = weights[block] if block is not None else 1.0
        want = base[key] if factor == 0 else lora_compat.patched_weights(path, components, 0.8 * factor)[key] \
            if factor != 1 else touched[key]
        assert torch.equal(got[key], want), (key, block, factor)
    untouched = set(base) - set(touched)
    assert all(torch.equal(got[k], base[k]) for k in untouched)


def test_sdxl_vector_of_12(tmp_path: Path) -> None:
    components = make_sdxl_components(seed=3)
    path, _ = write_lycoris_file(tmp_path, components, "lora", seed=2)
    vector = [1, 0, 0.5, 1, 0, 0.25, 1, 0, 1, 0, 1, 0]
    copies = {k: copy.deepcopy(m) for k, m in components.items()}
    Patcher(copies).set([Entry(path, 1.0, blocks=vector)])
    weights = lbw_factors(vector)
    got = {f"{c}.{n}": p for c, m in copies.items() for n, p in m.named_parameters()}
    base = {f"{c}.{n}": p for c, m in components.items() for n, p in m.named_parameters()}
    for key, value in lora_compat.patched_weights(path, components, 1.0).items():
        block = lbw_block(key)
        factor = weights[block] if block is not None else 1.0
        want = lora_compat.patched_weights(path, components, factor)[key] if factor not in (0, 1) else \
            (base[key] if factor == 0 else value)
        assert torch.equal(got[key], want), (key, block)


def test_flux_61_blocks(tmp_path: Path) -> None:
    model = make_flux()
    path = kohya_flux_file(tmp_path / "f.safetensors", model)
    spec = {"D00": 0.0, "D01": 0.5, "S00": 0.0, "S01": 2.0, "IN": 0.0, "OUT": 1.0}
    copy_model = copy.deepcopy(model)
    Patcher({"transformer": copy_model}).set([Entry(path, 1.0, blocks=spec)])
    got = dict(copy_model.named_parameters())
    base = dict(model.named_parameters())
    full = lora_compat.patched_weights(path, {"transformer": model}, 1.0)
    for key in full:
        name = key[len("transformer."):]
        if name.startswith(("transformer_blocks.0.", "single_transformer_blocks.0.", "x_embedder",
                            "context_embedder", "time_text_embed")):
            assert torch.equal(got[name], base[name]), name
        elif name.startswith("transformer_blocks.1."):
            assert torch.equal(got[name], lora_compat.patched_weights(path, {"transformer": model}, 0.5)[key])
        elif name.startswith("single_transformer_blocks.1."):
            assert torch.equal(got[name], lora_compat.patched_weights(path, {"transformer": model}, 2.0)[key])
        else:
            assert torch.equal(got[name], full[key]), name
    with pytest.raises(LoraCompatError, match=r"block weights for SD \(12-26 values\) given to a Flux model"):
        Patcher({"transformer": copy.deepcopy(model)}).set([Entry(path, 1.0, blocks="INS")])
