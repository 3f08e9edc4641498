"""Chroma: exact application of its layouts on a tiny ``ChromaTransformer2DModel`` (random weights, no hub).

Oracles: diffusers' ``ChromaPipeline.load_lora_weights`` + ``fuse_lora`` (its Flux loader mixin) for the diffusers
layout (transformer and T5 text encoder) and for sd-scripts' kohya layout (diffusers' kohya Flux converter, sized
for the tiny model as in test_flux_parity); for the approximator under BFL names, which no diffusers converter
reads, ``W + scale * up @ down`` computed here from the file's tensors.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_compat

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

# the kohya converter sized for H=64, MLP=256, and its output with the top-level modules' prefix restored
from test_flux_parity import kohya_state_dict, tiny_converters  # noqa: E402
# BFL module → the diffusers modules it stacks by rows (diffusers' chroma single-file converter read backwards)
from test_chroma_mapping import DOUBLE, SINGLE  # noqa: E402
from family_tests import assert_close, assert_matches as _assert_matches, linears as _linears, split_merge, \
    random_model  # noqa: E402
from family_parity import assert_patcher_matches, trained_lora as _randomised  # noqa: E402

#: H = 4 heads x 16 = 64, MLP 256: the widths test_flux_parity's tiny converters are sized for
TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=32, axes_dims_rope=(4, 6, 6), approximator_num_channels=8,
            approximator_hidden_dim=32, approximator_layers=2)
T5 = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
          is_encoder_decoder=False)
RANK, ALPHA = 4, 2.0
TOP = {"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out"}
APPROXIMATOR = {"distilled_guidance_layer.in_proj": "distilled_guidance_layer.in_proj",
                "distilled_guidance_layer.out_proj": "distilled_guidance_layer.out_proj",
                **{f"distilled_guidance_layer.layers.{n}.{b}": f"distilled_guidance_layer.layers.{n}.{d}"
                   for n in range(2) for b, d in (("in_layer", "linear_1"), ("out_layer", "linear_2"))}}


def bfl_parts() -> dict[str, tuple[str, ...]]:
    parts = {f"double_blocks.{i}.{k}": tuple(f"transformer_blocks.{i}.{p}" for p in v)
             for i in range(2) for k, v in DOUBLE.items()}
    parts.update({f"single_blocks.{i}.{k}": tuple(f"single_transformer_blocks.{i}.{p}" for p in v)
                  for i in range(2) for k, v in SINGLE.items()})
    parts.update({k: (v,) for k, v in {**TOP, **APPROXIMATOR}.items()})
    return parts


def _model(seed: int = 0) -> torch.nn.Module:
    return random_model(lambda: diffusers.ChromaTransformer2DModel(**TINY), seed)


def _t5(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return transformers.T5EncoderModel(transformers.T5Config(**T5)).eval()


def _pipeline(transformer: torch.nn.Module, text_encoder: torch.nn.Module | None = None):
    return diffusers.ChromaPipeline(scheduler=None, vae=None, text_encoder=text_encoder, tokenizer=None,
                                    transformer=transformer)


def _diffusers_file(model, path: Path, text_encoder=None, modules: list[str] | None = None, seed: int = 1) -> Path:
    """peft + ``ChromaPipeline.save_lora_weights`` (scales in ``lora_adapter_metadata``)."""
    from peft import LoraConfig

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=modules or _linears(model), init_lora_weights=False)
    kwargs = dict(transformer_lora_layers=_randomised(model, config, seed),
                  transformer_lora_adapter_metadata=config.to_dict())
    if text_encoder is not None:
        te_config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
                               init_lora_weights=False)
        kwargs.update(text_encoder_lora_layers=_randomised(text_encoder, te_config, seed + 100),
                      text_encoder_lora_adapter_metadata=te_config.to_dict())
    diffusers.ChromaPipeline.save_lora_weights(str(path.parent), weight_name=path.name, **kwargs)
    return path


def _kohya_file(model, path: Path, seed: int = 2, approximator: bool = False) -> Path:
    """sd-scripts' layout: ``lora_unet_<flat BFL>`` + lora_down/lora_up/alpha on every fused and plain module."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for bfl, parts in bfl_parts().items():
        if bfl.startswith("distilled") and not approximator:
            continue
        weights = [model.get_submodule(p).weight for p in parts]
        out, inp = sum(w.shape[0] for w in weights), weights[0].shape[1]
        key = "lora_unet_" + bfl.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = torch.randn(RANK, inp, generator=g) * 0.3
        tensors[f"{key}.lora_up.weight"] = torch.randn(out, RANK, generator=g) * 0.3
        # diffusers 0.42 drops the final layer's alpha (test_flux_parity): alpha = rank there
        tensors[f"{key}.alpha"] = torch.tensor(float(RANK) if bfl.startswith("final_layer") else ALPHA)
    save_file(tensors, str(path), {"ss_base_model_version": "chroma"})
    return path


def _to_bfl(kohya: Path, path: Path) -> Path:
    """The kohya file under ai-toolkit's BFL names: ``diffusion_model.<dotted BFL>.lora_A/lora_B``, alpha/rank
    folded into lora_A (ai-toolkit saves no alpha)."""
    dotted = {"lora_unet_" + bfl.replace(".", "_"): bfl for bfl in bfl_parts()}
    tensors, out = load_file(str(kohya)), {}
    for key, value in tensors.items():
        module, _, suffix = key.partition(".")
        if suffix == "lora_down.weight":
            out[f"diffusion_model.{dotted[module]}.lora_A.weight"] = value * (tensors[f"{module}.alpha"] / RANK)
        elif suffix == "lora_up.weight":
            out[f"diffusion_model.{dotted[module]}.lora_B.weight"] = value
    save_file(out, str(path))
    return path


def _diffusers_fused(model, path_or_dict, strength: float = 1.0, text_encoder=None) -> dict[str, torch.Tensor]:
    fused, te = copy.deepcopy(model), copy.deepcopy(text_encoder) if text_encoder is not None else None
    pipe = _pipeline(fused, te)
    if isinstance(path_or_dict, str) and any(k.endswith(".lora_down.weight") for k in load_file(path_or_dict)):
        path_or_dict = kohya_state_dict(Path(path_or_dict))
    with tiny_converters():
        pipe.load_lora_weights(path_or_dict)
    pipe.fuse_lora(lora_scale=strength, components=["transformer"] + (["text_encoder"] if te is not None else []))
    pipe.unload_lora_weights()
    state = {f"transformer.{k}": v.detach() for k, v in fused.state_dict().items()}
    if te is not None:
        state.update({f"text_encoder.{k}": v.detach() for k, v in te.state_dict().items()})
    return state


def _base(model, text_encoder=None) -> dict[str, torch.Tensor]:
    state = {f"transformer.{k}": v for k, v in model.state_dict().items()}
    if text_encoder is not None:
        state.update({f"text_encoder.{k}": v for k, v in text_encoder.state_dict().items()})
    return state


def _independent(model, bfl_file: Path, strength: float) -> dict[str, torch.Tensor]:
    """``W + strength * B @ A`` per BFL module (scale 1: ai-toolkit), split into its parts' rows here."""
    tensors = load_file(str(bfl_file))
    expected = {}
    for bfl, parts in bfl_parts().items():
        key = f"diffusion_model.{bfl}"
        if f"{key}.lora_A.weight" not in tensors:
            continue
        delta = tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"]
        expected.update(split_merge(model, parts, delta, strength))
    return expected


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def t5():
    return _t5()


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_diffusers_file_equals_diffusers(model, tmp_path, strength):
    """Every Linear of the transformer (the approximator too), as ChromaPipeline saves them."""
    path = _diffusers_file(model, tmp_path / "chroma.safetensors")
    detection = lora_compat.detect(path)
    assert detection.dialect.id == "diffusers" and not detection.patchset.unmatched
    expected = _diffusers_fused(model, str(path), strength)
    got = lora_compat.patched_weights(path, {"transformer": model}, strength)
    _assert_matches(got, expected, _base(model))


def test_t5_keys_apply_to_the_text_encoder(model, t5, tmp_path):
    """``text_encoder.`` keys on T5 names apply to Chroma's T5 (``W + alpha/r * B @ A``, computed here). diffusers
    0.42 cannot load them: its text-encoder path converts only CLIP names (``convert_state_dict_to_peft`` raises
    "Could not automatically infer state dict type")."""
    path = _diffusers_file(model, tmp_path / "chroma_t5.safetensors", t5)
    tensors = load_file(str(path))
    with pytest.raises(ValueError, match="infer state dict type"):
        _diffusers_fused(model, str(path), 1.0, t5)
    got = lora_compat.patched_weights(path, {"transformer": model, "text_encoder": t5}, 0.7, base="chroma")
    te = {k: v for k, v in got.items() if k.startswith("text_encoder.")}
    assert len(te) == 2 * 7  # two blocks, q k v o wi_0 wi_1 wo
    for name, value in te.items():
        module = name.removeprefix("text_encoder.").removesuffix(".weight")
        delta = tensors[f"text_encoder.{module}.lora_B.weight"] @ tensors[f"text_encoder.{module}.lora_A.weight"]
        want = t5.get_submodule(module).weight + 0.7 * ALPHA / RANK * delta
        assert (value - want).norm() / want.norm() < 1e-6, name


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_kohya_file_equals_diffusers(model, tmp_path, strength):
    """sd-scripts' BFL names (fused qkv/linear1), through diffusers' own kohya Flux converter."""
    path = _kohya_file(model, tmp_path / "kohya.safetensors")
    expected = _diffusers_fused(model, str(path), strength)
    got = lora_compat.patched_weights(path, {"transformer": model}, strength)
    _assert_matches(got, expected, _base(model))


def test_ai_toolkit_bfl_file_with_the_approximator(model, tmp_path):
    path = _to_bfl(_kohya_file(model, tmp_path / "k.safetensors", approximator=True), tmp_path / "bfl.safetensors")
    detection = lora_compat.detect(path)
    assert detection.dialect.id == "bfl" and not detection.patchset.unmatched
    expected = _independent(model, path, 0.8)
    assert_close(lora_compat.patched_weights(path, {"transformer": model}, 0.8), expected)


def test_a_flux1_files_modulation_is_unmatched_on_chroma(model, tmp_path):
    """A FLUX.1 LoRA with img_mod / modulation / adaLN keys on a Chroma model: those keys are listed, the rest
    applies exactly as the same file without them."""
    kohya = _kohya_file(model, tmp_path / "k.safetensors")
    tensors = load_file(str(kohya))
    g = torch.Generator().manual_seed(9)
    extra = {"lora_unet_double_blocks_0_img_mod_lin": (6 * 64, 64), "lora_unet_single_blocks_1_modulation_lin":
             (3 * 64, 64), "lora_unet_final_layer_adaLN_modulation_1": (2 * 64, 64)}
    for name, (out, inp) in extra.items():
        tensors.update({f"{name}.lora_down.weight": torch.randn(RANK, inp, generator=g),
                        f"{name}.lora_up.weight": torch.randn(out, RANK, generator=g),
                        f"{name}.alpha": torch.tensor(1.)})
    path = tmp_path / "flux1_with_modulation.safetensors"
    save_file(tensors, str(path))
    from lora_compat.archs import ModuleIndex
    from lora_compat.models import resolve_patchset

    patchset = resolve_patchset(path, ModuleIndex.from_modules({"transformer": model}))
    assert sorted(patchset.unmatched) == sorted(f"{n}.{s}" for n in extra for s in
                                                ("lora_down.weight", "lora_up.weight", "alpha"))
    with pytest.warns(lora_compat.LoraCompatWarning, match="3 keys map to no module|9 keys map to no module"):
        got = lora_compat.patched_weights(path, {"transformer": model})
    expected = lora_compat.patched_weights(kohya, {"transformer": model})
    assert sorted(got) == sorted(expected) and all(torch.equal(got[k], expected[k]) for k in got)


def test_patcher_on_the_bare_transformer(model, tmp_path):
    path = _kohya_file(model, tmp_path / "kohya.safetensors")
    expected = _diffusers_fused(model, str(path), 0.8)
    live = copy.deepcopy(model)
    before = {k: v.clone() for k, v in live.state_dict().items()}
    patcher = lora_compat.Patcher(live)  # the component comes from the family's class names
    patcher.set([(path, 0.8)])
    _assert_matches({f"transformer.{k}": v for k, v in live.state_dict().items() if not torch.equal(v, before[k])},
                    expected, _base(model))
    patcher.set([])
    assert all(torch.equal(v, before[k]) for k, v in live.state_dict().items())


PARTIAL = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v", "transformer_blocks.1.attn.add_k_proj",
           "single_transformer_blocks.1.attn.to_k", "single_transformer_blocks.1.proj_mlp",
           "distilled_guidance_layer.layers.1.linear_1", "proj_out"]


@pytest.mark.parametrize("chain", [("bfl", "diffusers"), ("kohya", "bfl", "diffusers")])
def test_convert_round_trips_partial_qkv_exactly(model, tmp_path, chain):
    """A diffusers file on parts of fused modules (q and v of a qkv, k and the MLP rows of a linear1) and the
    approximator: converted to the fused layouts and back, the weights stay diffusers' fused weights."""
    path = _diffusers_file(model, tmp_path / "partial.safetensors", modules=PARTIAL)
    expected = _diffusers_fused(model, str(path))
    source = path
    for step, target in enumerate(chain):
        out = tmp_path / f"step{step}_{target}.safetensors"
        lora_compat.convert(source, target, out, base="chroma")
        source = out
        keys = load_file(str(out))
        if target == "bfl":
            assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight" in keys
            assert "diffusion_model.distilled_guidance_layer.layers.1.in_layer.lora_A.weight" in keys
    _assert_matches(lora_compat.patched_weights(source, {"transformer": model}, base="chroma", strict=True), expected,
                    _base(model), fused_rows=True)


def test_diffusers_adapter_on_a_chroma_pipeline(model, t5, tmp_path):
    """``adapters.diffusers.load`` of a ComfyUI-named (BFL) file: the transformer equals the independent merge;
    ``set_strength`` then ``unload`` restore the weights bit for bit."""
    from lora_compat.adapters import diffusers as adapter

    path = _to_bfl(_kohya_file(model, tmp_path / "k.safetensors", approximator=True), tmp_path / "bfl.safetensors")
    pipe = _pipeline(copy.deepcopy(model), copy.deepcopy(t5))
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    loaded = adapter.load(pipe, path, strength=0.8)
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 4, 16, generator=g),
                  encoder_hidden_states=torch.randn(1, 3, 32, generator=g),
                  timestep=torch.tensor([0.5]), img_ids=torch.zeros(4, 3), txt_ids=torch.zeros(3, 3), return_dict=False)

    def reference(strength: float) -> torch.Tensor:
        merged = copy.deepcopy(model)
        merged.load_state_dict({**model.state_dict(), **{k.removeprefix("transformer."): v
                                                         for k, v in _independent(model, path, strength).items()}})
        with torch.no_grad():
            return merged(**inputs)[0]

    for strength in (0.8, 0.3):
        if strength != 0.8:
            adapter.set_strength(pipe, loaded, strength)
        with torch.no_grad():
            got = pipe.transformer(**inputs)[0]
        want = reference(strength)
        assert (got - want).norm() / want.norm() < 1e-5
    adapter.unload(pipe, loaded)
    assert sorted(pipe.transformer.state_dict()) == sorted(before)
    assert all(torch.equal(v, before[k]) for k, v in pipe.transformer.state_dict().items())


def bfl_state_dict(model) -> dict[str, torch.Tensor]:
    """A ComfyUI/BFL single-file Chroma transformer: ``model.diffusion_model.<BFL name>``, parts concatenated."""
    state = {}
    for bfl, parts in bfl_parts().items():
        for param in ("weight", "bias"):
            state[f"model.diffusion_model.{bfl}.{param}"] = torch.cat(
                [getattr(model.get_submodule(p), param).detach() for p in parts]).contiguous()
    return state


def test_bake_a_single_file_checkpoint(model, tmp_path):
    """A BFL-named Chroma single file (fused qkv/linear1, the approximator's in_layer/out_layer) baked with an
    ai-toolkit file equals the independent merge under the same names."""
    from lora_compat.tools.bake import bake

    save_file(bfl_state_dict(model), str(tmp_path / "chroma.safetensors"))
    lora = _to_bfl(_kohya_file(model, tmp_path / "k.safetensors", approximator=True), tmp_path / "bfl.safetensors")
    bake(tmp_path / "chroma.safetensors", [(lora, 0.8)], tmp_path / "baked.safetensors", progress=False)
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for name, value in _independent(model, lora, 0.8).items():
            merged.get_parameter(name.removeprefix("transformer.")).copy_(value)
    want, baked = bfl_state_dict(merged), load_file(str(tmp_path / "baked.safetensors"))
    assert_close(baked, want)


def _independent_diffusers(model, path: Path, strength: float) -> dict[str, torch.Tensor]:
    """``W + strength * alpha/r * B @ A`` per diffusers module of a ``transformer.<name>.lora_A/lora_B`` file."""
    tensors = load_file(str(path))
    expected = {}
    for key, down in tensors.items():
        if key.startswith("transformer.") and key.endswith(".lora_A.weight"):
            module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            up = tensors[f"transformer.{module}.lora_B.weight"]
            weight = model.get_submodule(module).weight
            expected[f"transformer.{module}.weight"] = weight + strength * ALPHA / RANK * up @ down
    return expected


@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_bake_a_diffusers_folder(model, tmp_path, layout):
    """A ``save_pretrained`` Chroma folder baked with an ai-toolkit BFL file (fused qkv/linear1 rows split here by
    hand, the approximator too) or a diffusers file: the baked transformer equals the independent merge; every
    weight the file does not touch is bit-identical."""
    from lora_compat.tools.bake import bake

    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint / "transformer")
    (checkpoint / "model_index.json").write_text("{}")
    if layout == "bfl":
        lora = _to_bfl(_kohya_file(model, tmp_path / "k.safetensors", approximator=True), tmp_path / "l.safetensors")
        expected = _independent(model, lora, 0.8)
    else:
        lora = _diffusers_file(model, tmp_path / "chroma.safetensors")
        expected = _independent_diffusers(model, lora, 0.8)
    bake(checkpoint, [(lora, 0.8)], tmp_path / "baked", progress=False)
    baked = diffusers.ChromaTransformer2DModel.from_pretrained(tmp_path / "baked" / "transformer").state_dict()
    base = model.state_dict()
    assert sorted(baked) == sorted(base)
    assert len(expected) == len(_linears(model))  # every Linear, the approximator's included
    touched = {k: v for k, v in baked.items() if f"transformer.{k}" in expected}
    assert_close({f"transformer.{k}": v for k, v in touched.items()}, expected)
    assert all(torch.equal(v, base[k]) for k, v in baked.items() if k not in touched)


def test_comfyui_names(model, tmp_path):
    """``convert_for_host(..., "comfy")`` names what ComfyUI's generic map takes for its Chroma model (BFL names
    under ``lora_unet_``: the fused qkv/linear1 whole, the approximator as ``in_layer``/``out_layer``); read back,
    the tensors give the same weights."""
    from lora_compat.archs import ModuleIndex
    from lora_compat.hosts.convert import convert_for_host

    path = _to_bfl(_kohya_file(model, tmp_path / "k.safetensors", approximator=True), tmp_path / "bfl.safetensors")
    conversion = convert_for_host(str(path), "comfy", index=ModuleIndex.from_modules({"transformer": model}))
    assert conversion.unmatched == []
    modules = {key.partition(".")[0] for key in conversion.tensors}
    assert modules == {"lora_unet_" + bfl.replace(".", "_") for bfl in bfl_parts()}
    written = tmp_path / "comfy_named.safetensors"
    save_file({k: v.contiguous() for k, v in conversion.tensors.items()}, str(written))
    assert_close(lora_compat.patched_weights(written, {"transformer": model}, 0.8, strict=True),
                 _independent(model, path, 0.8))


def test_diffusers_adapter_with_t5_keys_takes_the_patcher_route(model, t5, tmp_path):
    """diffusers' loader raises on a T5 text-encoder LoRA (see test_t5_keys_apply_to_the_text_encoder): the
    adapter applies such a file through the patcher, exactly, and unloads it bit for bit."""
    from lora_compat.adapters import diffusers as adapter

    path = _diffusers_file(model, tmp_path / "chroma_t5.safetensors", t5)
    pipe = _pipeline(copy.deepcopy(model), copy.deepcopy(t5))
    live = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder}
    before = {f"{c}.{k}": v.clone() for c, m in live.items() for k, v in m.state_dict().items()}
    loaded = adapter.load(pipe, path, strength=0.7)
    assert loaded.route == "patcher"
    expected = lora_compat.patched_weights(path, {"transformer": model, "text_encoder": t5}, 0.7, base="chroma")
    assert any(k.startswith("text_encoder.") for k in expected)
    state = {f"{c}.{k}": v for c, m in live.items() for k, v in m.state_dict().items()}
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    adapter.unload(pipe, loaded)
    state = {f"{c}.{k}": v for c, m in live.items() for k, v in m.state_dict().items()}
    assert sorted(state) == sorted(before) and all(torch.equal(state[k], before[k]) for k in before)


@pytest.mark.parametrize("algo", ["lokr", "loha"])
def test_simpletuner_lycoris_matches_lycoris_forward(model, tmp_path, algo):
    """SimpleTuner's ``lycoris_<diffusers name>`` LoKr/LoHa (lycoris-lora over every Linear, the approximator
    too): the weights lycoris' own forward implies, at multiplier and strength 0.6; the Patcher (its base from the
    class name) sets them and restores every weight bit for bit."""
    pytest.importorskip("lycoris")
    from test_flux_parity import _expected_from_implied, assert_same, write_lycoris

    path, implied = write_lycoris(tmp_path / f"{algo}.safetensors", model, algo, multiplier=0.6)
    assert len(implied) == len(_linears(model))
    assert lora_compat.detect(path, base="chroma").dialect.id == "lycoris"
    expected = _expected_from_implied(model, implied)
    assert_same(lora_compat.patched_weights(path, {"transformer": model}, 0.6, base="chroma", strict=True), expected)
    assert_patcher_matches(model, path, 0.6, {f"transformer.{k}": v for k, v in expected.items()})
