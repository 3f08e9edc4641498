"""Qwen-Image-2.1's fused ``img_mlp.gate_up`` (ComfyUI; gate rows first, as diffusers'
``convert_qwen_image21_transformer_checkpoint_to_diffusers`` chunks it) on a tiny ``QwenImage21Transformer2DModel``
(random weights, no hub). Oracle: ``W + strength * alpha/r * up @ down`` computed here from the file's tensors, the
fused module's rows split by hand."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_compat

diffusers = pytest.importorskip("diffusers")

from family_tests import assert_close, linears as _linears, random_model, split_merge  # noqa: E402

TINY = dict(patch_size=1, in_channels=8, out_channels=8, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            context_in_dim=16, mlp_ratio=3, axes_dims_rope=(4, 6, 6))
RANK, ALPHA = 4, 2.0
GATE, UP = "img_mlp.gate_layer", "img_mlp.proj"


def _model() -> torch.nn.Module:
    return random_model(lambda: diffusers.QwenImage21Transformer2DModel(**TINY), 0)


def comfy_parts(model) -> dict[str, tuple[str, ...]]:
    """ComfyUI module name → the diffusers modules it stacks by rows (the gate first)."""
    parts = {}
    for name in _linears(model):
        if name.endswith(GATE):
            parts[name.replace(GATE, "img_mlp.gate_up")] = (name, name.replace(GATE, UP))
        elif not name.endswith(UP):
            parts[name] = (name,)
    return parts


def _comfy_file(model, path: Path, seed: int = 3) -> Path:
    """ComfyUI's layout: ``diffusion_model.<ComfyUI name>`` with lora_down/lora_up/alpha on every Linear."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, parts in comfy_parts(model).items():
        weights = [model.get_submodule(p).weight for p in parts]
        key = f"diffusion_model.{name}"
        tensors[f"{key}.lora_down.weight"] = torch.randn(RANK, weights[0].shape[1], generator=g) * 0.3
        tensors[f"{key}.lora_up.weight"] = torch.randn(sum(w.shape[0] for w in weights), RANK, generator=g) * 0.3
        tensors[f"{key}.alpha"] = torch.tensor(ALPHA)
    save_file(tensors, str(path))
    return path


def _independent(model, path: Path, strength: float) -> dict[str, torch.Tensor]:
    tensors, expected = load_file(str(path)), {}
    for name, parts in comfy_parts(model).items():
        key = f"diffusion_model.{name}"
        delta = ALPHA / RANK * tensors[f"{key}.lora_up.weight"] @ tensors[f"{key}.lora_down.weight"]
        expected.update(split_merge(model, parts, delta, strength))
    return expected


def comfy_state_dict(model) -> dict[str, torch.Tensor]:
    """A ComfyUI single-file 2.1 transformer: ``model.diffusion_model.<name>``, ``gate_up`` = [gate; up]."""
    state = {}
    for key, value in model.state_dict().items():
        if f".{UP}." in key:
            continue
        if f".{GATE}." in key:
            value = torch.cat([value, model.state_dict()[key.replace(GATE, UP)]])
            key = key.replace(GATE, "img_mlp.gate_up")
        state[f"model.diffusion_model.{key}"] = value.contiguous()
    return state


@pytest.fixture(scope="module")
def model():
    return _model()


def test_gate_up_applies_to_gate_and_up_exactly(model, tmp_path):
    path = _comfy_file(model, tmp_path / "comfy.safetensors")
    from lora_compat.archs import ModuleIndex
    from lora_compat.models import resolve_patchset

    patchset = resolve_patchset(path, ModuleIndex.from_modules({"transformer": model}))
    assert patchset.dialect == "native" and not patchset.unmatched
    expected = _independent(model, path, 0.8)
    assert len(expected) == len(_linears(model))
    assert_close(lora_compat.patched_weights(path, {"transformer": model}, 0.8, strict=True), expected)


def test_patcher_on_a_comfyui_layout_model(model, tmp_path):
    """A module tree under ComfyUI's names (``gate_up`` itself): the file patches its rows; ``set([])``
    restores it bit for bit."""
    path = _comfy_file(model, tmp_path / "comfy.safetensors")

    fused_state = comfy_state_dict(model)
    live = torch.nn.Module()
    for key, value in fused_state.items():
        owner, _, param = key.removeprefix("model.diffusion_model.").rpartition(".")
        module = live
        for part in owner.split("."):
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(param, torch.nn.Parameter(value.clone(), requires_grad=False))
    before = {k: v.clone() for k, v in live.state_dict().items()}
    patcher = lora_compat.Patcher({"transformer": live})
    patcher.set([(path, 0.8)])
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for name, value in _independent(model, path, 0.8).items():
            merged.get_parameter(name.removeprefix("transformer.")).copy_(value)
    want = {k.removeprefix("model.diffusion_model."): v for k, v in comfy_state_dict(merged).items()}
    assert_close({k: v for k, v in live.state_dict().items() if k.endswith(".weight")},
                 {k: v for k, v in want.items() if k.endswith(".weight")})
    patcher.set([])
    assert all(torch.equal(v, before[k]) for k, v in live.state_dict().items())


@pytest.mark.parametrize("checkpoint", ["comfy-file", "diffusers-folder"])
def test_bake(model, tmp_path, checkpoint):
    """A ComfyUI single file (``gate_up`` fused) and a ``save_pretrained`` folder, baked with the ComfyUI-named
    file: the independent merge; the rest bit-identical."""
    from lora_compat.tools.bake import bake

    lora = _comfy_file(model, tmp_path / "comfy.safetensors")
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for name, value in _independent(model, lora, 0.8).items():
            merged.get_parameter(name.removeprefix("transformer.")).copy_(value)
    if checkpoint == "comfy-file":
        save_file(comfy_state_dict(model), str(tmp_path / "ckpt.safetensors"))
        bake(tmp_path / "ckpt.safetensors", [(lora, 0.8)], tmp_path / "baked.safetensors", progress=False)
        got, want, base = load_file(str(tmp_path / "baked.safetensors")), comfy_state_dict(merged), \
            comfy_state_dict(model)
    else:
        model.save_pretrained(tmp_path / "ckpt" / "transformer")
        (tmp_path / "ckpt" / "model_index.json").write_text("{}")
        bake(tmp_path / "ckpt", [(lora, 0.8)], tmp_path / "baked", progress=False)
        got = diffusers.QwenImage21Transformer2DModel.from_pretrained(tmp_path / "baked" / "transformer").state_dict()
        want, base = merged.state_dict(), model.state_dict()
    assert sorted(got) == sorted(want)
    changed = {k for k in want if not torch.equal(want[k], base[k])}
    # every Linear: the file holds gate_up whole, the folder gate and up apart
    assert len(changed) == len(comfy_parts(model)) + (0 if checkpoint == "comfy-file" else 2)
    assert_close({k: got[k] for k in changed}, {k: want[k] for k in changed})
    assert all(torch.equal(got[k], base[k]) for k in want if k not in changed)


@pytest.mark.parametrize("target", ["native", "kohya"])
def test_convert_names_gate_up_and_round_trips(tmp_path, target):
    """A full-size 2.1 diffusers file (rank 1) converted to ComfyUI's / ``lora_unet_`` names: ``gate_layer`` and
    ``proj`` go into ``gate_up`` (zero rows for a part the file leaves out); converted back, every delta is the
    original's and the left-out part's is zero."""
    g = torch.Generator().manual_seed(0)
    shapes = {"transformer_blocks.0.img_mlp.gate_layer": (12288, 4096), "transformer_blocks.1.img_mlp.gate_layer":
              (12288, 4096), "transformer_blocks.1.img_mlp.proj": (12288, 4096), "transformer_blocks.1.attn.to_q":
              (4096, 4096)}
    tensors = {}
    for name, (out, inp) in shapes.items():
        tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(1, inp, generator=g)
        tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(out, 1, generator=g)
    save_file(tensors, str(tmp_path / "d.safetensors"))
    lora_compat.convert(tmp_path / "d.safetensors", target, tmp_path / "c.safetensors")
    written = load_file(str(tmp_path / "c.safetensors"))
    fused = ("diffusion_model.transformer_blocks.{}.img_mlp.gate_up" if target == "native"
             else "lora_unet_transformer_blocks_{}_img_mlp_gate_up")
    assert {tuple(written[f"{fused.format(n)}.lora_up.weight"].shape) for n in (0, 1)} == {(24576, 1), (24576, 2)}
    lora_compat.convert(tmp_path / "c.safetensors", "diffusers", tmp_path / "back.safetensors")
    back = load_file(str(tmp_path / "back.safetensors"))

    def delta(state, name):
        return state[f"transformer.{name}.lora_B.weight"].float() @ state[f"transformer.{name}.lora_A.weight"].float()

    for name in shapes:
        want = delta(tensors, name)
        assert (delta(back, name) - want).abs().max() <= 1e-6 * want.abs().max(), name
    assert not delta(back, "transformer_blocks.0.img_mlp.proj").any()
