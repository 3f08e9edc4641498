"""Wan, beyond the LoRA layouts of test_wan.py: the modulation parameters as targets (ComfyUI's
``blocks.N.modulation.diff``, lightx2v's ``blocks.N.diff_m``), the second Wan 2.2 expert (``transformer_2``) in the
diffusers adapter, and the UMT5 text encoder as a component.

Expected values are computed here independently (``param + s·diff``) or come from diffusers/PEFT."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_compat
from lora_compat.archs import ModuleIndex
from lora_compat.models import resolve_patchset

diffusers = pytest.importorskip("diffusers")

from test_wan import TINY, _diffusers_file, _diffusers_fused, _model, _native_file  # noqa: E402

DIM = TINY["num_attention_heads"] * TINY["attention_head_dim"]


def _modulation_file(path, lightx2v: bool, seed: int = 11) -> tuple:
    """Modulation deltas on every block and the head, as ComfyUI (``modulation.diff``) or lightx2v (``diff_m``)
    name them, beside one LoRA module."""
    g = torch.Generator().manual_seed(seed)
    deltas = {f"blocks.{i}": torch.randn(1, 6, DIM, generator=g) for i in range(TINY["num_layers"])}
    deltas["head"] = torch.randn(1, 2, DIM, generator=g)
    tensors = {f"diffusion_model.{m}.{'diff_m' if lightx2v else 'modulation.diff'}": d for m, d in deltas.items()}
    down, up = torch.randn(2, DIM, generator=g), torch.randn(DIM, 2, generator=g)
    tensors.update({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": down,
                    "diffusion_model.blocks.0.self_attn.q.lora_up.weight": up,
                    "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(1.0)})
    save_file(tensors, str(path))
    return deltas, up @ down / 2


def _expected(model, deltas, lora, strength) -> dict[str, torch.Tensor]:
    expected = {f"transformer.blocks.{i}.scale_shift_table":
                model.blocks[i].scale_shift_table.detach() + strength * deltas[f"blocks.{i}"]
                for i in range(TINY["num_layers"])}
    expected["transformer.scale_shift_table"] = model.scale_shift_table.detach() + strength * deltas["head"]
    expected["transformer.blocks.0.attn1.to_q.weight"] = model.blocks[0].attn1.to_q.weight.detach() + strength * lora
    return expected


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.mark.parametrize("lightx2v", [False, True], ids=["comfyui", "lightx2v"])
@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_modulation_deltas_apply_to_scale_shift_table(model, tmp_path, lightx2v, strength):
    path = tmp_path / "mod.safetensors"
    deltas, lora = _modulation_file(path, lightx2v)
    patchset = resolve_patchset(path, ModuleIndex.from_modules({"transformer": model}))
    assert patchset.dialect == "native" and patchset.unmatched == {} and patchset.misfits == {}
    got = lora_compat.patched_weights(path, {"transformer": model}, strength)
    expected = _expected(model, deltas, lora, strength)
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6)


def test_patcher_sets_and_restores_modulation(model, tmp_path):
    path = tmp_path / "mod.safetensors"
    deltas, lora = _modulation_file(path, lightx2v=True)
    live = copy.deepcopy(model)
    before = {k: v.clone() for k, v in live.state_dict().items()}
    patcher = lora_compat.Patcher(live)
    patcher.set([(path, 0.5)])
    state = live.state_dict()
    for name, value in _expected(model, deltas, lora, 0.5).items():
        torch.testing.assert_close(state[name.removeprefix("transformer.")], value, rtol=0, atol=1e-6)
    patcher.set([])
    assert all(torch.equal(v, before[k]) for k, v in live.state_dict().items())


def test_modulation_shape_must_fit(model, tmp_path):
    """A modulation delta of another width is a misfit, listed by key, never applied."""
    save_file({"diffusion_model.blocks.0.diff_m": torch.zeros(1, 6, DIM + 1)}, str(tmp_path / "bad.safetensors"))
    patchset = resolve_patchset(tmp_path / "bad.safetensors", ModuleIndex.from_modules({"transformer": model}))
    assert list(patchset.unmatched) == ["diffusion_model.blocks.0.diff_m"]
    assert "scale_shift_table" in patchset.unmatched["diffusion_model.blocks.0.diff_m"]


@pytest.mark.parametrize("target, prefix", [("native", "diffusion_model.blocks.0.modulation.diff"),
                                            ("kohya", "lora_unet_blocks_0_modulation.diff")])
def test_modulation_survives_convert(model, tmp_path, target, prefix):
    """lightx2v ``diff_m`` → ``convert --to native`` writes ComfyUI's ``modulation.diff`` (which ComfyUI's generic
    key map loads), ``--to kohya`` musubi's flat name; both read back to the same weights."""
    path = tmp_path / "mod.safetensors"
    _modulation_file(path, lightx2v=True)
    out = tmp_path / f"mod_{target}.safetensors"
    lora_compat.convert(path, target, out, base="wan")
    keys = load_file(str(out))
    assert prefix in keys and ("diffusion_model.head.modulation.diff" in keys or "lora_unet_head_modulation.diff" in keys)
    want = lora_compat.patched_weights(path, {"transformer": model}, 0.8)
    got = lora_compat.patched_weights(out, {"transformer": model}, 0.8)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_full_size_modulation_maps_with_nothing_unmatched(tmp_path):
    """Header only, Wan 14B shapes: every block's ``diff_m``, the head's, and the ``diff``/``diff_b`` of a LoRA file
    (lightx2v) map to base ``wan``."""
    tensors = {f"diffusion_model.blocks.{i}.diff_m": torch.zeros(1, 6, 5120, dtype=torch.float16) for i in range(40)}
    tensors["diffusion_model.head.diff_m"] = torch.zeros(1, 2, 5120, dtype=torch.float16)
    tensors["diffusion_model.blocks.0.ffn.0.lora_down.weight"] = torch.zeros(1, 5120, dtype=torch.float16)
    tensors["diffusion_model.blocks.0.ffn.0.lora_up.weight"] = torch.zeros(13824, 1, dtype=torch.float16)
    save_file(tensors, str(tmp_path / "full.safetensors"))
    result = lora_compat.inspect(tmp_path / "full.safetensors")
    assert (result.base, result.dialect, result.unmatched, result.targets) == ("wan", "native", [], 42)


# -- Wan 2.2's second expert ----------------------------------------------------------------------------------------
def _two_experts(model):
    second = _model(7)
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None,
                                 transformer=copy.deepcopy(model), transformer_2=copy.deepcopy(second))
    return pipe, second


def _state(module) -> dict[str, torch.Tensor]:
    """The module's weights by their plain names (PEFT's ``base_layer`` level dropped, adapter weights left out)."""
    return {k.replace(".base_layer.", "."): v.detach().clone() for k, v in module.state_dict().items()
            if ".lora_" not in k}


def _assert_close_states(got, expected, base):
    for name, value in expected.items():
        if torch.equal(value, base[name]):
            assert torch.equal(got[name], value), name
        else:
            err = (got[name] - value).norm() / (value - base[name]).norm()
            assert err < 1e-5, (name, float(err))


@pytest.mark.parametrize("layout", ["diffusers", "native"])
def test_adapter_loads_into_transformer_2(model, tmp_path, layout):
    """``load(pipe, file, into="transformer_2")``: the second expert gets what diffusers gives a pipeline holding
    that expert (diffusers' own route, ``load_into_transformer_2``), the first is untouched; ``set_strength`` and
    ``unload`` (bit-exact) act on it."""
    from lora_compat.adapters import diffusers as adapter

    path = _diffusers_file(model, tmp_path / "wan_diffusers.safetensors")
    if layout == "native":
        path = _native_file(path, tmp_path / "wan_comfy.safetensors")
    pipe, second = _two_experts(model)
    first, base_2 = _state(pipe.transformer), _state(pipe.transformer_2)
    loaded = adapter.load(pipe, path, strength=0.8, into="transformer_2")
    assert loaded.route == "diffusers" and loaded.unmatched == []
    pipe.fuse_lora(components=["transformer_2"], lora_scale=1.0)
    expected = {k.removeprefix("transformer."): v for k, v in _diffusers_fused(second, path, 0.8).items()}
    _assert_close_states(_state(pipe.transformer_2), expected, base_2)
    pipe.unfuse_lora(components=["transformer_2"])
    assert all(torch.equal(v, first[k]) for k, v in _state(pipe.transformer).items())
    adapter.set_strength(pipe, loaded, 0.0)
    adapter.unload(pipe, loaded)
    assert all(torch.equal(v, base_2[k]) for k, v in _state(pipe.transformer_2).items())
    assert all(torch.equal(v, first[k]) for k, v in _state(pipe.transformer).items())


def test_adapter_patcher_route_into_transformer_2(model, tmp_path):
    """A file diffusers' loader cannot hold (modulation deltas) goes into ``transformer_2`` through the patcher:
    exact (independent computation), ``transformer`` untouched, ``unload`` bit-exact."""
    from lora_compat.adapters import diffusers as adapter

    path = tmp_path / "mod.safetensors"
    pipe, second = _two_experts(model)
    deltas, lora = _modulation_file(path, lightx2v=True)
    first, base_2 = _state(pipe.transformer), _state(pipe.transformer_2)
    loaded = adapter.load(pipe, path, strength=0.6, into="transformer_2")
    assert loaded.route == "patcher"
    got = _state(pipe.transformer_2)
    for name, value in _expected(second, deltas, lora, 0.6).items():
        torch.testing.assert_close(got[name.removeprefix("transformer.")], value, rtol=0, atol=1e-6)
    assert all(torch.equal(v, first[k]) for k, v in _state(pipe.transformer).items())
    adapter.unload(pipe, loaded)
    assert all(torch.equal(v, base_2[k]) for k, v in _state(pipe.transformer_2).items())


def test_enabled_load_lora_weights_honours_load_into_transformer_2(model, tmp_path):
    """With ``enable()``, ``pipe.load_lora_weights(comfy_file, load_into_transformer_2=True)`` converts the file and
    lets diffusers load it into the second expert, as it does for its own files."""
    from lora_compat.adapters import diffusers as adapter

    path = _native_file(_diffusers_file(model, tmp_path / "d.safetensors"), tmp_path / "wan_comfy.safetensors")
    pipe, second = _two_experts(model)
    first, base_2 = _state(pipe.transformer), _state(pipe.transformer_2)
    adapter.enable()
    try:
        pipe.load_lora_weights(str(path), adapter_name="low", load_into_transformer_2=True)
        pipe.fuse_lora(components=["transformer_2"])
        expected = {k.removeprefix("transformer."): v for k, v in _diffusers_fused(second, path).items()}
        _assert_close_states(_state(pipe.transformer_2), expected, base_2)
        assert all(torch.equal(v, first[k]) for k, v in _state(pipe.transformer).items())
        pipe.unfuse_lora(components=["transformer_2"])
        pipe.unload_lora_weights()
    finally:
        adapter.disable()


def test_into_needs_the_component(model, tmp_path):
    from lora_compat.adapters import diffusers as adapter

    path = _native_file(_diffusers_file(model, tmp_path / "d.safetensors"), tmp_path / "wan_comfy.safetensors")
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None,
                                 transformer=copy.deepcopy(model))
    with pytest.raises(lora_compat.LoraCompatError, match="no transformer_2 component"):
        adapter.load(pipe, path, into="transformer_2")
