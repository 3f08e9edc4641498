"""More Wan layouts and tools on Wan names: DiffSynth-Studio's PEFT dumps (``lora_A.default.weight`` on native
names), SimpleTuner's ``lycoris_`` names, and ``bake`` into a Wan single-file checkpoint (``model.diffusion_model.``
native names) and a diffusers folder. Expected weights: diffusers' own loader, or ``W + s·scale·B@A`` computed
here."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_compat
from lora_compat.archs import ModuleIndex
from lora_compat.models import resolve_patchset

diffusers = pytest.importorskip("diffusers")

from test_wan import BLOCK_NATIVE, TINY, _diffusers_file, _diffusers_fused, _model, _native_file  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture
def diffusers_file(model, tmp_path):
    return _diffusers_file(model, tmp_path / "wan_diffusers.safetensors")


def _factors(diffusers_path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """diffusers module path → (A, B) of the diffusers file."""
    out: dict[str, list] = {}
    for key, value in load_file(str(diffusers_path)).items():
        module, _, suffix = key.removeprefix("transformer.").rpartition(".lora_")
        out.setdefault(module, [None, None])["B" in suffix] = value
    return {m: (a, b) for m, (a, b) in out.items()}


def _assert_unscaled(model, path: Path, factors, strength: float) -> None:
    """No alpha in the file: ``W + s·B@A`` on every trained module, nothing else."""
    patchset = resolve_patchset(path, ModuleIndex.from_modules({"transformer": model}))
    assert patchset.unmatched == {} and len(patchset) == len(factors)
    got = lora_compat.patched_weights(path, {"transformer": model}, strength)
    assert sorted(got) == sorted(f"transformer.{m}.weight" for m in factors)
    for module, (a, b) in factors.items():
        expected = model.get_submodule(module).weight.detach() + strength * (b @ a)
        torch.testing.assert_close(got[f"transformer.{module}.weight"], expected, rtol=0, atol=1e-5)


def _native(module: str) -> str:
    _, block, rest = module.split(".", 2)
    return f"blocks.{block}.{BLOCK_NATIVE[rest]}"


@pytest.mark.parametrize("prefix", ["", "diffusion_model."])
def test_diffsynth_default_infix(model, diffusers_file, tmp_path, prefix):
    """DiffSynth-Studio saves PEFT's state dict of its Wan model (native names) with PEFT's adapter name left in."""
    factors = _factors(diffusers_file)
    tensors = {}
    for module, (a, b) in factors.items():
        tensors[f"{prefix}{_native(module)}.lora_A.default.weight"] = a
        tensors[f"{prefix}{_native(module)}.lora_B.default.weight"] = b
    save_file(tensors, str(tmp_path / "diffsynth.safetensors"))
    assert lora_compat.detect(tmp_path / "diffsynth.safetensors").dialect.id == "native"
    _assert_unscaled(model, tmp_path / "diffsynth.safetensors", factors, 0.8)


def test_simpletuner_lycoris_prefix(model, diffusers_file, tmp_path):
    """SimpleTuner's LyCORIS files: ``lycoris_`` + the diffusers path, flattened (ComfyUI maps the same)."""
    factors = _factors(diffusers_file)
    tensors = {}
    for module, (a, b) in factors.items():
        name = "lycoris_" + module.replace(".", "_")
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = a, b
    save_file(tensors, str(tmp_path / "st.safetensors"))
    assert lora_compat.detect(tmp_path / "st.safetensors").dialect.id == "lycoris"
    _assert_unscaled(model, tmp_path / "st.safetensors", factors, 0.6)


def native_state(model, prefix: str) -> dict[str, torch.Tensor]:
    """The model's weights under ``prefix`` + native names, as Wan / ComfyUI hold them (``blocks.N.modulation`` and
    ``head.modulation`` parameters included)."""
    from lora_compat.archs.wan import native_name

    tensors = {}
    for key, value in model.state_dict().items():
        module, _, param = key.rpartition(".")
        if param == "scale_shift_table":
            name = f"blocks.{module.split('.')[1]}.modulation" if module else "head.modulation"
        else:
            native = native_name(module)
            name = f"{native}.{param}" if native else key
        tensors[prefix + name] = value.detach().clone().contiguous()
    return tensors


def _single_file(model, path: Path) -> Path:
    """The model as a Wan / ComfyUI single-file checkpoint: ``model.diffusion_model.`` + native names."""
    save_file(native_state(model, "model.diffusion_model."), str(path))
    return path


@pytest.mark.parametrize("layout", ["single-file", "diffusers-folder"])
def test_bake_into_wan_checkpoints(model, diffusers_file, tmp_path, layout):
    """``bake`` a ComfyUI-named file into a Wan checkpoint: every trained weight equals diffusers' fused model,
    every other tensor is copied bit for bit."""
    from lora_compat.archs.wan import native_name
    from lora_compat.tools.bake import bake

    native = _native_file(diffusers_file, tmp_path / "wan_comfy.safetensors")
    expected = {k.removeprefix("transformer."): v for k, v in _diffusers_fused(model, native, 0.7).items()}
    if layout == "single-file":
        checkpoint, out = _single_file(model, tmp_path / "wan.safetensors"), tmp_path / "baked.safetensors"
    else:
        checkpoint, out = tmp_path / "wan_folder", tmp_path / "baked_folder"
        (checkpoint / "transformer").mkdir(parents=True)
        save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
                  str(checkpoint / "transformer" / "diffusion_pytorch_model.safetensors"))
        (checkpoint / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    report = bake(checkpoint, [(native, 0.7)], out, progress=False)
    assert report.unmatched == {}
    if layout == "single-file":
        before, after = load_file(str(checkpoint)), load_file(str(out))
        names = {}
        for key in expected:
            module, _, param = key.rpartition(".")
            if (n := native_name(module)) is not None and "modulation" not in n:
                names[key] = f"model.diffusion_model.{n}.{param}"
    else:
        assert (out / "model_index.json").read_text() == '{"_class_name": "WanPipeline"}'
        name = "transformer/diffusion_pytorch_model.safetensors"
        before, after = load_file(str(checkpoint / name)), load_file(str(out / name))
        names = {k: k for k in expected}
    assert sorted(after) == sorted(before)
    changed = 0
    for key, stored in names.items():
        base = model.state_dict()[key]
        if torch.equal(expected[key], base):
            assert torch.equal(after[stored], before[stored]), key
        else:
            changed += 1
            err = (after[stored] - expected[key]).norm() / (expected[key] - base).norm()
            assert err < 1e-5, (key, float(err))
    assert changed == TINY["num_layers"] * len(BLOCK_NATIVE)
    untouched = set(before) - {names[k] for k in names if not torch.equal(expected[k], model.state_dict()[k])}
    assert all(torch.equal(after[k], before[k]) for k in untouched)


@pytest.mark.parametrize("naming", ["lycoris_", "diffusion_model.", "lora_unet_"])
@pytest.mark.parametrize("algo", ["lokr", "loha"])
def test_lycoris_lokr_loha_on_wan_names_match_lycoris_forward(model, tmp_path, algo, naming):
    """lycoris-lora's LoKr/LoHa over every Linear of the Wan model, as saved (SimpleTuner's ``lycoris_`` + diffusers
    path) and renamed to ComfyUI's native names (``diffusion_model.blocks.0.self_attn.q.lokr_w1``) and musubi's
    (``lora_unet_blocks_0_self_attn_q``): the weights lycoris' forward pass implies, at strength 0.6."""
    pytest.importorskip("lycoris")
    from test_flux_parity import _expected_from_implied, assert_same, write_lycoris

    from lora_compat.archs.wan import native_name

    path, implied = write_lycoris(tmp_path / f"{algo}.safetensors", model, algo, multiplier=0.6)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(implied) == sorted(linears)
    if naming != "lycoris_":
        flat = {"lycoris_" + p.replace(".", "_"): p for p in linears}
        tensors = {}
        for key, value in load_file(str(path)).items():
            module, _, suffix = key.partition(".")
            native = native_name(flat[module])
            name = f"diffusion_model.{native}" if naming == "diffusion_model." else "lora_unet_" + native.replace(".", "_")
            tensors[f"{name}.{suffix}"] = value
        path = tmp_path / f"{algo}_{naming.strip('._')}.safetensors"
        save_file(tensors, str(path))
    patchset = resolve_patchset(path, ModuleIndex.from_modules({"transformer": model}))
    assert patchset.unmatched == {} and len(patchset) == len(linears)
    got = lora_compat.patched_weights(path, {"transformer": model}, 0.6)
    assert_same(got, _expected_from_implied(model, implied))
