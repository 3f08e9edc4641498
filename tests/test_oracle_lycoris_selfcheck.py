"""Self-checks of the LyCORIS oracle (lora_compat/oracles/lycoris_oracle.py): files are real and `expected` is right."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from lora_compat.oracles.lycoris_oracle import ALGOS, write_lycoris_file
from lora_compat.oracles.models import make_sd15_components, make_sdxl_components


@pytest.fixture(scope="module")
def sd15() -> dict[str, nn.Module]:
    return make_sd15_components(0)


@pytest.fixture(scope="module")
def sdxl() -> dict[str, nn.Module]:
    return make_sdxl_components(0)


def _params(components: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Detached clones of every parameter, keyed "<component>.<name>"."""
    return {f"{c}.{n}": p.detach().clone() for c, m in components.items() for n, p in m.named_parameters()}


def _kohya_modules(components: dict[str, nn.Module]) -> dict[str, tuple[str, str]]:
    """kohya module name (lora_unet_..., lora_te_... / lora_te1_..., lora_te2_...) -> (component, module path)."""
    prefixes = {"unet": "lora_unet", "text_encoder": "lora_te"}
    if "text_encoder_2" in components:
        prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    return {f"{prefix}_{name.replace('.', '_')}": (comp, name)
            for comp, prefix in prefixes.items() for name, _ in components[comp].named_modules() if name}


@pytest.mark.parametrize("multiplier", [1.0, 0.5])
def test_lora_expected_matches_closed_form(sd15: dict[str, nn.Module], tmp_path: Path, multiplier: float) -> None:
    path, expected = write_lycoris_file(tmp_path, sd15, "lora", seed=3, multiplier=multiplier)
    sd = load_file(path)
    modules = _kohya_modules(sd15)
    closed: dict[str, torch.Tensor] = {}
    for lora_name in {key.split(".", 1)[0] for key in sd}:
        comp, name = modules[lora_name]
        weight = sd15[comp].get_parameter(f"{name}.weight").detach().float()
        up, down = sd[f"{lora_name}.lora_up.weight"].float(), sd[f"{lora_name}.lora_down.weight"].float()
        scale = sd[f"{lora_name}.alpha"].item() / down.shape[0]
        assert scale != 1.0
        delta = (up.flatten(1) @ down.flatten(1)).view_as(weight)
        closed[f"{comp}.{name}.weight"] = weight + multiplier * scale * delta
    assert set(expected) == set(closed)
    for key, value in closed.items():
        torch.testing.assert_close(expected[key], value, rtol=1e-5, atol=1e-6, msg=key)


def _check_variant(components: dict[str, nn.Module], tmp_path: Path, variant: str) -> None:
    before = _params(components)
    base_model = "sdxl_base_v1-0" if "text_encoder_2" in components else "sd_v1"
    path, expected = write_lycoris_file(tmp_path, components, variant, seed=1)

    assert path == tmp_path / f"{variant}.safetensors" and path.is_file()
    assert load_file(path)
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_module"] == "lycoris.kohya" and metadata["ss_base_model_version"] == base_model

    assert expected
    for key, value in expected.items():
        assert key in before, key
        assert value.dtype == torch.float32 and value.shape == before[key].shape, key
        assert torch.isfinite(value).all(), key
        assert (value - before[key]).abs().max() > 1e-6, f"{key} unchanged"
    after = _params(components)
    assert all(torch.equal(before[key], after[key]) for key in before), "components were modified"


@pytest.mark.parametrize("variant", ALGOS)
def test_variant_sd15(sd15: dict[str, nn.Module], tmp_path: Path, variant: str) -> None:
    _check_variant(sd15, tmp_path, variant)


@pytest.mark.parametrize("variant", ["lora", "loha"])
def test_variant_sdxl(sdxl: dict[str, nn.Module], tmp_path: Path, variant: str) -> None:
    _check_variant(sdxl, tmp_path, variant)
