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


# -- the UMT5 text encoder and OneTrainer's names ---------------------------------------------------------------------
#: a tiny UMT5 encoder (the real one is google/umt5-xxl: 24 blocks at width 4096)
TINY_UMT5 = dict(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                 feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True)
TE_MODULES = ("encoder.block.0.layer.0.SelfAttention.q", "encoder.block.1.layer.1.DenseReluDense.wi_0",
              "encoder.block.1.layer.1.DenseReluDense.wo")


def _umt5(seed: int = 3):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    return UMT5EncoderModel(UMT5Config(**TINY_UMT5)).eval()


def _kohya_te_file(path, model, te, transformer_prefix: str, seed: int = 5):
    """LoRAs (``lora_down``/``lora_up`` + ``alpha``) on two transformer modules, named under ``transformer_prefix``
    (musubi's ``lora_unet_`` + native names, OneTrainer's ``lora_transformer_`` + diffusers names), and on UMT5
    modules under ``lora_te_`` (transformers names, flattened). Returns {weight name: expected ΔW at strength 1}."""
    g = torch.Generator().manual_seed(seed)
    names = {"lora_unet_": {"blocks.0.attn1.to_q": "blocks_0_self_attn_q", "blocks.1.ffn.net.2": "blocks_1_ffn_2"},
             "lora_transformer_": {"blocks.0.attn1.to_q": "blocks_0_attn1_to_q",
                                   "blocks.1.ffn.net.2": "blocks_1_ffn_net_2"}}[transformer_prefix]
    modules = {f"transformer.{p}": (transformer_prefix + n, model.get_submodule(p)) for p, n in names.items()}
    modules.update({f"text_encoder.{p}": ("lora_te_" + p.replace(".", "_"), te.get_submodule(p)) for p in TE_MODULES})
    tensors, deltas = {}, {}
    for target, (name, module) in modules.items():
        out, inp = module.weight.shape
        down, up = torch.randn(3, inp, generator=g), torch.randn(out, 3, generator=g)
        tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                        f"{name}.alpha": torch.tensor(1.5)})
        deltas[f"{target}.weight"] = up @ down * (1.5 / 3)
    save_file(tensors, str(path))
    return deltas


@pytest.mark.parametrize("prefix, dialect", [("lora_unet_", "kohya"), ("lora_transformer_", "onetrainer")],
                         ids=["musubi", "onetrainer"])
def test_umt5_keys_apply_when_the_host_has_the_encoder(model, tmp_path, prefix, dialect):
    te = _umt5()
    path = tmp_path / "te.safetensors"
    deltas = _kohya_te_file(path, model, te, prefix)
    components = {"transformer": model, "text_encoder": te}
    patchset = resolve_patchset(path, ModuleIndex.from_modules(components))
    assert patchset.dialect == dialect and patchset.unmatched == {}
    got = lora_compat.patched_weights(path, components, 0.6)
    assert sorted(got) == sorted(deltas)
    for name, delta in deltas.items():
        component, _, param = name.partition(".")
        base = components[component].get_parameter(param).detach()
        torch.testing.assert_close(got[name], base + 0.6 * delta, rtol=0, atol=1e-6)
    # a bare transformer: the encoder's keys are listed unmatched, the rest applies
    alone = resolve_patchset(path, ModuleIndex.from_modules({"transformer": model}))
    assert sorted(alone.unmatched) == sorted(f"lora_te_{m.replace('.', '_')}.{s}" for m in TE_MODULES
                                             for s in ("lora_down.weight", "lora_up.weight", "alpha"))
    assert sorted(alone) == ["transformer.blocks.0.attn1.to_q", "transformer.blocks.1.ffn.net.2"]


def test_adapter_on_a_wan_pipeline_with_its_text_encoder(model, tmp_path):
    """diffusers' Wan loader loads no text encoder: a file with UMT5 keys goes through the patcher, exact on both
    components; ``unload`` is bit-exact."""
    from lora_compat.adapters import diffusers as adapter

    te = _umt5()
    path = tmp_path / "te.safetensors"
    deltas = _kohya_te_file(path, model, te, "lora_transformer_")
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=copy.deepcopy(te), vae=None, scheduler=None,
                                 transformer=copy.deepcopy(model))
    before = {c: _state(getattr(pipe, c)) for c in ("transformer", "text_encoder")}
    loaded = adapter.load(pipe, path, strength=0.5)
    assert loaded.route == "patcher" and loaded.unmatched == []
    for name, delta in deltas.items():
        component, _, param = name.partition(".")
        base = before[component][param]
        torch.testing.assert_close(getattr(pipe, component).get_parameter(param).detach(), base + 0.5 * delta,
                                   rtol=0, atol=1e-6)
    adapter.unload(pipe, loaded)
    for c in before:
        assert all(torch.equal(v, before[c][k]) for k, v in _state(getattr(pipe, c)).items())


def test_onetrainer_second_expert_names_load_into_transformer_2(model, tmp_path):
    """OneTrainer names Wan 2.2's second expert ``lora_transformer_2_``: it goes to ``transformer_2`` when the host
    has it, and is listed unmatched when not."""
    second = _model(7)
    te = _umt5()
    path = tmp_path / "ot.safetensors"
    deltas = _kohya_te_file(path, model, te, "lora_transformer_")
    tensors = load_file(str(path))
    tensors = {k.replace("lora_transformer_", "lora_transformer_2_"): v for k, v in tensors.items()
               if k.startswith("lora_transformer_")}
    save_file(tensors, str(path))
    got = lora_compat.patched_weights(path, {"transformer": model, "transformer_2": second})
    assert sorted(got) == ["transformer_2.blocks.0.attn1.to_q.weight", "transformer_2.blocks.1.ffn.net.2.weight"]
    for name, value in got.items():
        param = name.partition(".")[2]
        torch.testing.assert_close(value, second.get_parameter(param).detach() + deltas[f"transformer.{param}"],
                                   rtol=0, atol=1e-6)
    alone = resolve_patchset(path, ModuleIndex.from_modules({"transformer": model}))
    assert len(alone.unmatched) == 6 and not alone


def test_full_size_onetrainer_file_with_every_umt5_linear_maps(tmp_path):
    """Header only: a rank-1 OneTrainer file on every Linear of the Wan 14B transformer and of UMT5-XXL maps to base
    ``wan`` with nothing unmatched."""
    from lora_compat.archs.wan import WAN

    tensors = {}
    for component, prefix in (("transformer", "lora_transformer_"), ("text_encoder", "lora_te_")):
        for path, shapes in WAN.index.components[component].items():
            weight = shapes.get("weight", ())
            if len(weight) != 2 or path in ("shared", "encoder.embed_tokens") or "relative_attention_bias" in path:
                continue
            name = prefix + path.replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = torch.zeros(1, weight[1], dtype=torch.float16)
            tensors[f"{name}.lora_up.weight"] = torch.zeros(weight[0], 1, dtype=torch.float16)
    save_file(tensors, str(tmp_path / "full_ot.safetensors"))
    result = lora_compat.inspect(tmp_path / "full_ot.safetensors")
    assert (result.base, result.dialect, result.unmatched) == ("wan", "onetrainer", [])
    assert result.components == {"transformer": 488, "text_encoder": 24 * 7}


def test_native_convert_names_umt5_as_comfyui(model, tmp_path):
    """``convert --to native``: the transformer under ``diffusion_model.`` native names, UMT5 under ComfyUI's
    ``text_encoders.umt5xxl.transformer.`` (its generic key map); read back, the same weights."""
    te = _umt5()
    path = tmp_path / "ot.safetensors"
    _kohya_te_file(path, model, te, "lora_transformer_")
    out = tmp_path / "native.safetensors"
    lora_compat.convert(path, "native", out, base="wan")
    modules = sorted({k.removesuffix(".weight").removesuffix(".alpha").removesuffix(".lora_down")
                      .removesuffix(".lora_up") for k in load_file(str(out))})
    assert modules == sorted(["diffusion_model.blocks.0.self_attn.q", "diffusion_model.blocks.1.ffn.2"]
                             + [f"text_encoders.umt5xxl.transformer.{m}" for m in TE_MODULES])
    components = {"transformer": model, "text_encoder": te}
    want, got = (lora_compat.patched_weights(p, components, 0.9) for p in (path, out))
    assert lora_compat.detect(out).dialect.id == "native"
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_comfyui_wan_model_classes_are_wan():
    """ComfyUI's Wan model configs (comfy/supported_models.py: all subclass WAN21_T2V) and its Wan text encoder
    (comfy/text_encoders/wan.py: te()'s class subclasses WanT5Model) name base ``wan``."""
    from types import SimpleNamespace

    from lora_compat.adapters.comfyui import loaded_base

    WAN21_T2V = type("WAN21_T2V", (), {})
    configs = [type(name, (WAN21_T2V,), {}) for name in ("WAN21_I2V", "WAN21_Vace", "WAN22_S2V", "WAN22_T2V")]
    for config in [WAN21_T2V, *configs]:
        assert loaded_base(SimpleNamespace(model=SimpleNamespace(model_config=config())), None) == "wan"
    WanTEModel = type("WanTEModel", (type("WanT5Model", (), {}),), {})
    assert loaded_base(None, SimpleNamespace(cond_stage_model=WanTEModel())) == "wan"
