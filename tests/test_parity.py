"""Numerical parity with the real libraries: files written by lycoris-lora, peft and diffusers on tiny
random SD1.5 / SDXL models; ``patched_weights`` must equal the library's own merged weights (fp32,
relative error < 1e-5), every module matched (``strict=True``)."""
from __future__ import annotations

import pytest
import torch

import lora_compat

from lora_compat.oracles.lycoris_oracle import ALGOS, write_lycoris_file
from lora_compat.oracles.models import make_sd15_components, make_sdxl_components
from lora_compat.oracles.peft_oracle import VARIANTS, write_peft_file

MAKERS = {"sd15": make_sd15_components, "sdxl": make_sdxl_components}
_components: dict[str, dict[str, torch.nn.Module]] = {}


def components(base: str) -> dict[str, torch.nn.Module]:
    if base not in _components:
        _components[base] = MAKERS[base]()
    return _components[base]


def assert_matches(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        error = (got[key].float() - value.float()).norm() / value.float().norm().clamp_min(1e-12)
        assert error < 1e-5, f"{key}: relative error {error:.2e}"


@pytest.mark.parametrize("base", MAKERS)
@pytest.mark.parametrize("variant", ALGOS)
def test_lycoris_file_matches_lycoris_forward(tmp_path, base, variant):
    path, expected = write_lycoris_file(tmp_path, components(base), variant)
    assert lora_compat.inspect(path).dialect in ("kohya", "lycoris")
    assert_matches(lora_compat.patched_weights(path, components(base), strict=True), expected)


@pytest.mark.parametrize("variant", ["lora", "ia3", "diag_oft", "boft", "dora_out", "dora_in", "loha_dora", "glora"])
@pytest.mark.parametrize("strength", [0.5, -0.7])
def test_lycoris_strength_matches_lycoris_multiplier(tmp_path, variant, strength):
    """OFT/BOFT/DoRA are not linear in strength: the multiplier must follow LyCORIS exactly (DoRA with
    ``dora_strength="library"``; the default reads it as the hosts do, see test_dora_strength.py)."""
    path, expected = write_lycoris_file(tmp_path, components("sd15"), variant, multiplier=strength)
    got = lora_compat.patched_weights(path, components("sd15"), strength=strength, strict=True,
                                      dora_strength="library")
    assert_matches(got, expected)


@pytest.mark.parametrize("base", MAKERS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_peft_and_diffusers_files_match_peft_merge(tmp_path, base, variant):
    path, expected = write_peft_file(tmp_path, components(base), variant)
    assert_matches(lora_compat.patched_weights(path, components(base), strict=True), expected)


def test_patched_weights_modifies_nothing_and_keeps_dtype(tmp_path):
    half = make_sd15_components(dtype=torch.float16)
    before = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in half.items()}
    path, _ = write_lycoris_file(tmp_path, components("sd15"), "loha")
    new = lora_compat.patched_weights(path, half)
    assert all(v.dtype == torch.float16 for v in new.values())
    for c, module in half.items():
        for k, v in module.state_dict().items():
            assert torch.equal(v, before[c][k])


def test_base_mismatch_is_an_error(tmp_path):
    path, _ = write_lycoris_file(tmp_path, components("sdxl"), "lora")
    with pytest.raises(lora_compat.BaseMismatchError, match="do not fit"):
        lora_compat.patched_weights(path, components("sd15"))
