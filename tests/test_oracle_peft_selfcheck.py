"""Self-checks of `lora_compat.oracles.peft_oracle`: the files are what their variants claim, and `expected` is what they mean.

`_reference_merge` re-derives every merged weight from the written file alone (tensors + header / adapter_config /
kohya alphas), independently of PEFT, and must agree with the merge PEFT computed.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from lora_compat.oracles.models import make_sd15_components, make_sdxl_components
from lora_compat.oracles.peft_oracle import VARIANTS, write_peft_file

MODELS = {"sd15": make_sd15_components, "sdxl": make_sdxl_components}
LAYOUTS = {"peft_raw": "peft", "peft_raw_rslora": "peft", "peft_raw_dora": "peft",
           "kohya_from_diffusers": "kohya", "diffusers_legacy": "legacy"}
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
ROLE_RE = re.compile(r"^(?P<module>.+?)\.(?P<role>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_magnitude_vector"
                     r"|lora\.down\.weight|lora\.up\.weight|lora_linear_layer\.down\.weight"
                     r"|lora_linear_layer\.up\.weight|lora_down\.weight|lora_up\.weight|alpha)$")
DOWN = {"lora_A.weight", "lora.down.weight", "lora_linear_layer.down.weight", "lora_down.weight"}
UP = {"lora_B.weight", "lora.up.weight", "lora_linear_layer.up.weight", "lora_up.weight"}


@dataclass
class _Adapter:
    """One adapted layer as a file describes it."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float
    bias: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None


def _layout(variant: str) -> str:
    """"peft" / "kohya" / "legacy" / "diffusers": how the variant's file is keyed."""
    return LAYOUTS.get(variant, "diffusers")


def _header(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def _pattern(patterns: dict[str, int], module: str, default: int) -> int:
    """PEFT's rank_pattern / alpha_pattern lookup: first key (a regex) matching the end of the module name."""
    return next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", module)), default)


def _config_scale(cfg: dict, module: str, rank: int) -> float:
    """alpha / r (or alpha / sqrt(r) for rsLoRA) from a LoraConfig dict, patterns honoured."""
    assert rank == _pattern(cfg["rank_pattern"], module, cfg["r"]), module
    alpha = _pattern(cfg["alpha_pattern"], module, cfg["lora_alpha"])
    return alpha / math.sqrt(rank) if cfg["use_rslora"] else alpha / rank


def _module_of(variant: str, components: dict[str, nn.Module]) -> Callable[[str], tuple[str, str]]:
    """Maps the module part of a file key to (component, module name)."""
    layout = _layout(variant)
    if layout == "peft":
        return lambda key: ("unet", key.removeprefix("base_model.model."))
    if layout == "kohya":
        flat = {p + n.replace(".", "_"): (c, n) for p, c in KOHYA_PREFIXES.items() if c in components
                for n, _ in components[c].named_modules()}
        return flat.__getitem__
    return lambda key: tuple(key.split(".", 1))


def _file_adapters(path: Path, variant: str, components: dict[str, nn.Module]) -> dict[tuple[str, str], _Adapter]:
    """Parse a written file into {(component, module): _Adapter} using only the file (and its adapter_config)."""
    module_of = _module_of(variant, components)
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in load_file(path).items():
        m = ROLE_RE.match(key)
        assert m, key
        groups.setdefault(module_of(m["module"]), {})[m["role"]] = value
    meta = json.loads(_header(path).get("lora_adapter_metadata", "null"))
    peft_cfg = json.loads((path.parent / "adapter_config.json").read_text()) if _layout(variant) == "peft" else None
    adapters = {}
    for (comp, module), roles in groups.items():
        down = next(v for r, v in roles.items() if r in DOWN)
        up = next(v for r, v in roles.items() if r in UP)
        rank = down.shape[0]
        if peft_cfg is not None:
            scale = _config_scale(peft_cfg, module, rank)
        elif meta is not None:
            cfg = {k.split(".", 1)[1]: v for k, v in meta.items() if k.startswith(f"{comp}.")}
            scale = _config_scale(cfg, module, rank)
        elif "alpha" in roles:
            scale = float(roles["alpha"]) / rank
        else:
            scale = 1.0
        adapters[comp, module] = _Adapter(down, up, scale, roles.get("lora_B.bias"), roles.get("lora_magnitude_vector"))
    return adapters


def _reference_merge(components: dict[str, nn.Module], adapters: dict[tuple[str, str], _Adapter]
                     ) -> dict[str, torch.Tensor]:
    """W + scale * up @ down (DoRA: rescaled row-wise to the magnitude; LoRA bias: b + scale * bias)."""
    out = {}
    params_of = {c: dict(m.named_parameters()) for c, m in components.items()}
    for (comp, module), ad in adapters.items():
        params = params_of[comp]
        w = params[f"{module}.weight"].detach().float()
        new = w + ad.scale * (ad.up.flatten(1) @ ad.down.flatten(1)).reshape(w.shape)
        if ad.magnitude is not None:
            assert ad.magnitude.numel() == w.shape[0]
            new = new * (ad.magnitude.flatten() / new.flatten(1).norm(dim=1)).view(-1, *[1] * (w.dim() - 1))
        out[f"{comp}.{module}.weight"] = new
        if ad.bias is not None:
            out[f"{comp}.{module}.bias"] = params[f"{module}.bias"].detach().float() + ad.scale * ad.bias
    return out


@pytest.fixture(scope="module")
def models() -> dict[str, tuple[dict[str, nn.Module], dict[str, torch.Tensor]]]:
    """Components per model, with a snapshot of their original state."""
    out = {}
    for name, make in MODELS.items():
        comps = make(0)
        out[name] = comps, {f"{c}.{k}": v.clone() for c, m in comps.items() for k, v in m.state_dict().items()}
    return out


@pytest.fixture(scope="module")
def written(models, tmp_path_factory) -> Callable[[str, str], tuple[Path, dict[str, torch.Tensor]]]:
    """Cached `write_peft_file(model, variant)`."""
    cache: dict[tuple[str, str], tuple[Path, dict[str, torch.Tensor]]] = {}
    root = tmp_path_factory.mktemp("oracle")

    def get(model: str, variant: str) -> tuple[Path, dict[str, torch.Tensor]]:
        if (model, variant) not in cache:
            cache[model, variant] = write_peft_file(root / model, models[model][0], variant, seed=0)
        return cache[model, variant]

    return get


# SDXL adds a second text encoder (with `text_model.`) and Linear proj_in/proj_out; the UNet-only PEFT variants and
# rsLoRA (a pure scale change) are covered on SD1.5.
SDXL_SKIP = {"diffusers_rslora", "peft_raw_rslora", "peft_raw_dora"}
CASES = [("sd15", v) for v in VARIANTS] + [("sdxl", v) for v in VARIANTS if v not in SDXL_SKIP]


@pytest.mark.parametrize(("model", "variant"), CASES)
def test_file_structure(models, written, model: str, variant: str) -> None:
    components, snapshot = models[model]
    path, expected = written(model, variant)
    assert path.is_file()
    keys = list(load_file(path))
    layout = _layout(variant)
    if layout == "peft":
        assert path.name == "adapter_model.safetensors" and (path.parent / "adapter_config.json").is_file()
        assert all(k.startswith("base_model.model.") for k in keys)
    elif layout == "kohya":
        prefixes = {p for p, c in KOHYA_PREFIXES.items() if c in components}
        assert {next(p for p in prefixes if k.startswith(p)) for k in keys} == prefixes
        assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    else:
        assert path.name == "pytorch_lora_weights.safetensors"
        assert {k.split(".", 1)[0] for k in keys} == set(components)
        assert ("lora_adapter_metadata" in _header(path)) == (variant not in ("diffusers_no_metadata", "diffusers_legacy"))
    if layout == "legacy":
        assert all(".lora.down." in k or ".lora.up." in k or ".lora_linear_layer." in k for k in keys)
    assert expected
    comps_in_expected = {k.split(".", 1)[0] for k in expected}
    assert comps_in_expected == ({"unet"} if layout == "peft" else set(components))
    params = {f"{c}.{n}": p for c, m in components.items() for n, p in m.named_parameters()}
    for key, value in expected.items():
        assert value.dtype == torch.float32 and value.shape == params[key].shape, key
        assert not torch.allclose(value, params[key].float()), key
    state = {f"{c}.{k}": v for c, m in components.items() for k, v in m.state_dict().items()}
    assert state.keys() == snapshot.keys()
    assert all(torch.equal(state[k], v) for k, v in snapshot.items())


@pytest.mark.parametrize(("model", "variant"), CASES)
def test_expected_is_the_file_meaning(models, written, model: str, variant: str) -> None:
    components = models[model][0]
    path, expected = written(model, variant)
    reference = _reference_merge(components, _file_adapters(path, variant, components))
    assert set(reference) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-6, msg=key)


def test_diffusers_sd15_per_module_scales(models, written) -> None:
    """The plain variant really exercises alpha != r and the rank / alpha patterns (in the UNet and the TE)."""
    components = models["sd15"][0]
    path, _ = written("sd15", "diffusers")
    meta = json.loads(_header(path)["lora_adapter_metadata"])
    assert meta["unet.r"] != meta["unet.lora_alpha"] and meta["unet.rank_pattern"] and meta["unet.alpha_pattern"]
    adapters = _file_adapters(path, "diffusers", components)
    for comp in components:
        assert len({a.scale for (c, _), a in adapters.items() if c == comp}) >= 2, comp
    to_k = [a for (c, m), a in adapters.items() if m.endswith(".to_k")]
    assert to_k and all(a.down.shape[0] == 2 and a.scale == 1.5 for a in to_k)


def test_seeded(models, written, tmp_path) -> None:
    components = models["sd15"][0]
    path, expected = written("sd15", "diffusers_legacy")
    again_path, again = write_peft_file(tmp_path, components, "diffusers_legacy", seed=0)
    assert load_file(again_path).keys() == load_file(path).keys()
    assert all(torch.equal(again[k], v) for k, v in expected.items())
    _, other = write_peft_file(tmp_path / "other", components, "diffusers_legacy", seed=1)
    assert not torch.equal(other[next(iter(expected))], next(iter(expected.values())))


def test_unknown_variant(models, tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown variant"):
        write_peft_file(tmp_path, models["sd15"][0], "lycoris")
