"""SD3 / SD3.5: exact application of its layouts on a tiny ``SD3Transformer2DModel`` (qk-norm, dual attention in
blocks 0-1, the last block ``context_pre_only``) and tiny CLIP-L / CLIP-G / T5 encoders (random weights, no hub).

Oracles:
* diffusers ``StableDiffusion3Pipeline.load_lora_weights`` + ``fuse_lora`` for the layout it reads (diffusers /
  PEFT ``transformer.`` + ``text_encoder(_2).``), files written by peft + ``save_lora_weights``; OneTrainer's
  ``lora_transformer_`` is the same file renamed.
* for the native layouts (sd-scripts ``lora_unet_joint_blocks_N_x_block_attn_qkv``, ComfyUI ``diffusion_model.``),
  which diffusers 0.42 loads as a silent no-op (pinned below), ``W + scale * up @ down`` computed here, with the
  fused rows split and the (shift, scale) halves of the AdaLayerNormContinuous modulations swapped by the
  hand-written map of diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``.
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

# the native map (diffusers' converter read backwards) and the shared helpers
from test_sd3_mapping import CONTEXT_BLOCK, TOP, X_BLOCK  # noqa: E402
from family_tests import assert_close, assert_matches as _assert_matches, linears as _linears, random_model, \
    swap_halves as _swap  # noqa: E402
from family_parity import trained_lora as _randomised  # noqa: E402

W = 32  # 4 heads x 8
TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=4,
            joint_attention_dim=16, caption_projection_dim=W, pooled_projection_dim=24, out_channels=4,
            pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0, 1))
LAST = TINY["num_layers"] - 1
RANK, ALPHA = 4, 2.0
#: (shift, scale) natively, (scale, shift) in diffusers (``swap_scale_shift`` in diffusers' converter)
SWAPPED = {"final_layer.adaLN_modulation.1", f"joint_blocks.{LAST}.context_block.adaLN_modulation.1"}


def native_parts(model) -> dict[str, tuple[str, ...]]:
    modules = dict(model.named_modules())
    parts = {n: (p,) for n, p in TOP.items()}
    for i in range(TINY["num_layers"]):
        for stream, table in (("x_block", X_BLOCK), ("context_block", CONTEXT_BLOCK)):
            for native, canonical in table.items():
                paths = tuple(f"transformer_blocks.{i}.{c}" for c in canonical)
                if all(p in modules for p in paths):
                    parts[f"joint_blocks.{i}.{stream}.{native}"] = paths
    return parts


def _model(seed: int = 0) -> torch.nn.Module:
    return random_model(lambda: diffusers.SD3Transformer2DModel(**TINY), seed)


def _clip(hidden: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden,
                                         num_hidden_layers=2, num_attention_heads=4, projection_dim=hidden,
                                         max_position_embeddings=16)
    return transformers.CLIPTextModelWithProjection(config).eval()


def _t5(seed: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    return transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
        is_encoder_decoder=False)).eval()


CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def _diffusers_file(path: Path, model, encoders=None, modules: list[str] | None = None, seed: int = 1) -> Path:
    """peft + ``StableDiffusion3Pipeline.save_lora_weights`` (scales in ``lora_adapter_metadata``)."""
    from peft import LoraConfig

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=modules or _linears(model), init_lora_weights=False)
    kwargs = dict(transformer_lora_layers=_randomised(model, config, seed),
                  transformer_lora_adapter_metadata=config.to_dict())
    for n, (name, encoder) in enumerate((encoders or {}).items()):
        te = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=CLIP_TARGETS, init_lora_weights=False)
        kwargs[f"{name}_lora_layers"] = _randomised(encoder, te, seed + 10 + n)
        kwargs[f"{name}_lora_adapter_metadata"] = te.to_dict()
    diffusers.StableDiffusion3Pipeline.save_lora_weights(str(path.parent), weight_name=path.name, **kwargs)
    return path


def _pipeline(model, te=None, te2=None, te3=None):
    return diffusers.StableDiffusion3Pipeline(transformer=model, scheduler=None, vae=None, text_encoder=te,
                                              tokenizer=None, text_encoder_2=te2, tokenizer_2=None,
                                              text_encoder_3=te3, tokenizer_3=None)


def _state(components: dict) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.detach().clone() for c, m in components.items() for k, v in m.state_dict().items()}


def _diffusers_fused(path: Path, components: dict, strength: float = 1.0) -> dict[str, torch.Tensor]:
    copies = {c: copy.deepcopy(m) for c, m in components.items()}
    pipe = _pipeline(copies["transformer"], copies.get("text_encoder"), copies.get("text_encoder_2"))
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=strength, components=list(copies))
    pipe.unload_lora_weights()
    return _state(copies)


def _kohya_file(path: Path, model, encoders: dict | None = None, seed: int = 2, modules=None) -> Path:
    """sd-scripts' SD3 layout: ``lora_unet_<native flat>`` (qkv fused) and ``lora_te1_/2_/3_`` (CLIP-L, CLIP-G, T5)
    with lora_down/lora_up/alpha."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}

    def add(key: str, out: int, inp: int) -> None:
        tensors[f"{key}.lora_down.weight"] = torch.randn(RANK, inp, generator=g) * 0.3
        tensors[f"{key}.lora_up.weight"] = torch.randn(out, RANK, generator=g) * 0.3
        tensors[f"{key}.alpha"] = torch.tensor(ALPHA)

    for native, parts in native_parts(model).items():
        if modules is None or native in modules:
            weights = [model.get_submodule(p).weight for p in parts]
            add("lora_unet_" + native.replace(".", "_"), sum(w.shape[0] for w in weights), weights[0].shape[1])
    for prefix, encoder in ((f"lora_te{n + 1}_", e) for n, e in enumerate((encoders or {}).values())):
        for name, module in encoder.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(("q_proj", "v_proj", "fc2", ".q", ".wo")):
                add(prefix + name.replace(".", "_"), *module.weight.shape)
    save_file(tensors, str(path), {"ss_base_model_version": "sd3"})
    return path


def _comfy_file(kohya: Path, path: Path) -> Path:
    """The kohya file as ComfyUI-style ``diffusion_model.<native>.lora_A/lora_B`` (alpha/rank folded into A)."""
    tensors, out = load_file(str(kohya)), {}
    flat = {"lora_unet_" + n.replace(".", "_"): n for n in native_parts(_model())}
    for key, value in tensors.items():
        module, _, suffix = key.partition(".")
        if module in flat and suffix == "lora_down.weight":
            out[f"diffusion_model.{flat[module]}.lora_A.weight"] = value * (tensors[f"{module}.alpha"] / RANK)
        elif module in flat and suffix == "lora_up.weight":
            out[f"diffusion_model.{flat[module]}.lora_B.weight"] = value
    save_file(out, str(path))
    return path


def _independent(kohya: Path, components: dict, strength: float) -> dict[str, torch.Tensor]:
    """``W + strength * alpha/r * up @ down`` from the kohya file, fused rows split and swapped halves swapped."""
    tensors = load_file(str(kohya))
    model = components["transformer"]
    expected = {}
    for native, parts in native_parts(model).items():
        key = "lora_unet_" + native.replace(".", "_")
        if f"{key}.lora_up.weight" not in tensors:
            continue
        delta = tensors[f"{key}.lora_up.weight"] @ tensors[f"{key}.lora_down.weight"] * (ALPHA / RANK)
        row = 0
        for part in parts:
            weight = model.get_submodule(part).weight
            piece = delta[row:row + weight.shape[0]]
            expected[f"transformer.{part}.weight"] = weight + strength * (_swap(piece) if native in SWAPPED else piece)
            row += weight.shape[0]
    for n, (component, encoder) in enumerate((c, e) for c, e in components.items() if c != "transformer"):
        prefix = f"lora_te{n + 1}_"
        for name, module in encoder.named_modules():
            key = prefix + name.replace(".", "_")
            if f"{key}.lora_up.weight" in tensors:
                delta = tensors[f"{key}.lora_up.weight"] @ tensors[f"{key}.lora_down.weight"] * (ALPHA / RANK)
                expected[f"{component}.{name}.weight"] = module.weight + strength * delta
    return expected


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def encoders():
    return {"text_encoder": _clip(16, 1), "text_encoder_2": _clip(24, 2)}


def test_tiny_model_shapes(model):
    """The tiny config keeps the full-size structure: dual attention, qk-norm, a context_pre_only last block."""
    modules = dict(model.named_modules())
    assert f"transformer_blocks.{LAST}.attn.to_add_out" not in modules
    assert modules[f"transformer_blocks.{LAST}.norm1_context.linear"].weight.shape == (2 * W, W)
    assert "transformer_blocks.1.attn2.to_q" in modules and "transformer_blocks.2.attn2.to_q" not in modules


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_diffusers_file_with_text_encoders_equals_diffusers(model, encoders, tmp_path, strength):
    components = {"transformer": model, **encoders}
    path = _diffusers_file(tmp_path / "sd3.safetensors", model, encoders)
    assert lora_compat.detect(path).dialect.id == "diffusers"
    expected = _diffusers_fused(path, components, strength)
    got = lora_compat.patched_weights(path, components, strength, strict=True)
    _assert_matches(got, expected, _state(components))


def test_onetrainer_names_equal_diffusers(model, tmp_path):
    """OneTrainer's ``lora_transformer_<diffusers path flat>`` with lora_down/lora_up/alpha: the diffusers file
    renamed (A → down, B → up, alpha from the metadata)."""
    path = _diffusers_file(tmp_path / "sd3.safetensors", model)
    renamed = {}
    for key, value in load_file(str(path)).items():
        module, _, suffix = key.removeprefix("transformer.").rpartition(".lora_")
        name = "lora_transformer_" + module.replace(".", "_")
        renamed[f"{name}.{'lora_down' if suffix.startswith('A') else 'lora_up'}.weight"] = value
        renamed[f"{name}.alpha"] = torch.tensor(ALPHA)
    onetrainer = tmp_path / "onetrainer.safetensors"
    save_file(renamed, str(onetrainer))
    assert lora_compat.detect(onetrainer).dialect.id == "onetrainer"
    expected = _diffusers_fused(path, {"transformer": model}, 0.8)
    _assert_matches(lora_compat.patched_weights(onetrainer, {"transformer": model}, 0.8, strict=True), expected,
                    _state({"transformer": model}))


def test_diffusers_loads_nothing_from_a_kohya_sd3_file(model, tmp_path):
    """diffusers 0.42 ``SD3LoraLoaderMixin`` converts nothing: a kohya SD3 file changes no weight (sd-scripts #1743)."""
    path = _kohya_file(tmp_path / "kohya.safetensors", model)
    base = _state({"transformer": model})
    fused = _diffusers_fused(path, {"transformer": model})
    assert all(torch.equal(fused[k], base[k]) for k in base)


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_kohya_file_with_three_text_encoders(model, encoders, tmp_path, strength):
    components = {"transformer": model, **encoders, "text_encoder_3": _t5()}
    path = _kohya_file(tmp_path / "kohya.safetensors", model, {k: v for k, v in components.items()
                                                                if k != "transformer"})
    detection = lora_compat.detect(path)
    assert (detection.dialect.id, detection.base_candidates) == ("kohya", ["sd3"])
    got = lora_compat.patched_weights(path, components, strength, strict=True)
    expected = _independent(path, components, strength)
    assert {k.partition(".")[0] for k in got} == set(components)
    assert_close(got, expected)


def test_comfy_native_file(model, tmp_path):
    kohya = _kohya_file(tmp_path / "kohya.safetensors", model)
    path = _comfy_file(kohya, tmp_path / "comfy.safetensors")
    assert lora_compat.detect(path).dialect.id == "native"
    got = lora_compat.patched_weights(path, {"transformer": model}, 0.9, strict=True)
    assert_close(got, _independent(kohya, {"transformer": model}, 0.9))


def test_patcher_on_the_bare_transformer(model, tmp_path):
    path = _kohya_file(tmp_path / "kohya.safetensors", model)
    expected = _independent(path, {"transformer": model}, 0.8)
    live = copy.deepcopy(model)
    before = {k: v.clone() for k, v in live.state_dict().items()}
    patcher = lora_compat.Patcher(live)  # the component comes from the family's class names
    patcher.set([(path, 0.8)])
    changed = {f"transformer.{k}": v for k, v in live.state_dict().items() if not torch.equal(v, before[k])}
    assert_close(changed, expected)
    patcher.set([])
    assert all(torch.equal(v, before[k]) for k, v in live.state_dict().items())


PARTIAL = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v", "transformer_blocks.1.attn2.to_k",
           f"transformer_blocks.{LAST}.attn.add_k_proj", f"transformer_blocks.{LAST}.norm1_context.linear",
           "transformer_blocks.0.norm1_context.linear", "norm_out.linear", "context_embedder"]


@pytest.mark.parametrize("chain", [("native", "diffusers"), ("kohya", "native", "diffusers"), ("kohya", "peft")])
def test_convert_round_trips_partial_qkv_exactly(model, tmp_path, chain):
    """A diffusers file on parts of fused qkv (q and v; one attn2 part; the last block's context k) and on the
    swapped modulations: through the native layouts and back, the weights stay diffusers' fused weights."""
    path = _diffusers_file(tmp_path / "partial.safetensors", model, modules=PARTIAL)
    expected = _diffusers_fused(path, {"transformer": model})
    source = path
    for step, target in enumerate(chain):
        out = tmp_path / f"step{step}_{target}.safetensors"
        out = Path(lora_compat.convert(source, target, out, base="sd3", components={"transformer": model}).path)
        keys = load_file(str(out))
        if target == "native":
            assert "diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_down.weight" in keys
            assert "diffusion_model.final_layer.adaLN_modulation.1.lora_down.weight" in keys
        if target == "kohya":
            assert f"lora_unet_joint_blocks_{LAST}_context_block_adaLN_modulation_1.lora_down.weight" in keys
        source = out
    got = lora_compat.patched_weights(source, {"transformer": model}, base="sd3", strict=True)
    _assert_matches(got, expected, _state({"transformer": model}), fused_rows=True)


def test_diffusers_adapter_on_an_sd3_pipeline(model, encoders, tmp_path):
    """``adapters.diffusers.load`` of a kohya file with CLIP text-encoder keys: the transformer and encoders equal
    the independent merge; ``set_strength`` follows; ``unload`` restores every weight bit for bit."""
    from lora_compat.adapters import diffusers as adapter

    components = {"transformer": model, **encoders}
    path = _kohya_file(tmp_path / "kohya.safetensors", model, encoders)
    pipe = _pipeline(copy.deepcopy(model), copy.deepcopy(encoders["text_encoder"]),
                     copy.deepcopy(encoders["text_encoder_2"]))
    live = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    before = _state(live)
    loaded = adapter.load(pipe, path, strength=0.8)
    assert loaded.route == "diffusers"  # diffusers' SD3 mixin loads the transformer and both CLIP encoders
    for strength in (0.8, 0.3):
        if strength != 0.8:
            adapter.set_strength(pipe, loaded, strength)
        expected = _independent(path, components, strength)
        with torch.no_grad():
            for name, value in expected.items():
                component, _, param = name.partition(".")
                module = live[component].get_submodule(param.removesuffix(".weight"))
                x = torch.randn(3, value.shape[1], generator=torch.Generator().manual_seed(1))
                want = x @ value.T + (module.bias if getattr(module, "bias", None) is not None else 0)
                assert (module(x) - want).norm() / want.norm() < 1e-5, name
    adapter.unload(pipe, loaded)
    after = _state(live)
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_comfyui_names(model, encoders, tmp_path):
    """``convert_for_host(..., "comfy")`` names what ComfyUI's SD3 key map takes: ``lora_unet_<native flat>`` (its
    generic map over ``diffusion_model.`` names: fused qkv whole) and ``text_encoders.clip_l|clip_g.transformer.``;
    the converted tensors, read back, give the same weights."""
    from lora_compat.archs import ModuleIndex
    from lora_compat.hosts.convert import convert_for_host

    components = {"transformer": model, **encoders}
    path = _kohya_file(tmp_path / "kohya.safetensors", model, encoders)
    conversion = convert_for_host(str(path), "comfy", index=ModuleIndex.from_modules(components))
    assert conversion.unmatched == []
    comfy_keys = {"lora_unet_" + n.replace(".", "_") for n in native_parts(model)}
    for prefix, encoder in (("text_encoders.clip_l.transformer.", encoders["text_encoder"]),
                            ("text_encoders.clip_g.transformer.", encoders["text_encoder_2"])):
        comfy_keys |= {prefix + name for name, m in encoder.named_modules() if isinstance(m, torch.nn.Linear)}
    modules = {key.rsplit(".", 2 if key.endswith(".weight") else 1)[0] for key in conversion.tensors}
    assert modules <= comfy_keys and "lora_unet_joint_blocks_0_x_block_attn_qkv" in modules
    assert any(m.startswith("text_encoders.clip_g.transformer.text_model.") for m in modules)
    written = tmp_path / "comfy_named.safetensors"  # the transformer's part, read back as a kohya file
    save_file({k: v.contiguous() for k, v in conversion.tensors.items() if k.startswith("lora_unet_")}, str(written))
    got = lora_compat.patched_weights(written, {"transformer": model}, 0.7, base="sd3", strict=True)
    expected = _independent(path, {"transformer": model}, 0.7)
    # the swapped (shift, scale) modulations have no tensors a host's own loader could add: the adapters apply
    # lora_compat's patch for them (as for FLUX.1's final_layer)
    swapped = {"lora_unet_" + n.replace(".", "_") for n in SWAPPED}
    assert swapped <= set(conversion.patches) and not any(k.partition(".")[0] in swapped for k in conversion.tensors)
    expected = {k: v for k, v in expected.items() if not k.endswith(("norm_out.linear.weight",
                                                                       f"{LAST}.norm1_context.linear.weight"))}
    assert_close(got, expected)


def native_state_dict(components: dict) -> dict[str, torch.Tensor]:
    """An SD3 single-file checkpoint of ``components``: the transformer under ``model.diffusion_model.<native>``
    (diffusers' converter read backwards: q, k, v concatenated, the swapped modulations' halves swapped back),
    CLIP-L under ``text_encoders.clip_l.transformer.``."""
    model = components["transformer"]
    state = {}
    for native, parts in native_parts(model).items():
        for param in ("weight", "bias"):
            pieces = [getattr(model.get_submodule(p), param) for p in parts]
            if any(t is None for t in pieces):
                continue
            tensor = torch.cat([t.detach() for t in pieces])
            state[f"model.diffusion_model.{native}.{param}"] = _swap(tensor) if native in SWAPPED else tensor
    if "text_encoder" in components:
        state.update({f"text_encoders.clip_l.transformer.{k}": v.detach()
                      for k, v in components["text_encoder"].state_dict().items()})
    return {k: v.contiguous() for k, v in state.items()}


def test_bake_a_single_file_checkpoint(model, encoders, tmp_path):
    """The native (fused, swapped) single file baked with a kohya LoRA equals the independent merge, written back
    under the same names; the keys the LoRA does not touch are the checkpoint's."""
    from lora_compat.tools.bake import bake

    components = {"transformer": model, "text_encoder": encoders["text_encoder"]}
    checkpoint = native_state_dict(components)
    save_file(checkpoint, str(tmp_path / "sd3.safetensors"))
    lora = _kohya_file(tmp_path / "kohya.safetensors", model, {"text_encoder": encoders["text_encoder"]})
    bake(tmp_path / "sd3.safetensors", [(lora, 0.8)], tmp_path / "baked.safetensors", progress=False)
    baked = load_file(str(tmp_path / "baked.safetensors"))
    merged = {c: copy.deepcopy(m) for c, m in components.items()}
    with torch.no_grad():
        for name, value in _independent(lora, components, 0.8).items():
            component, _, param = name.partition(".")
            merged[component].get_parameter(param).copy_(value)
    want = native_state_dict(merged)
    changed = [k for k in want if not torch.equal(want[k], checkpoint[k])]
    assert "model.diffusion_model.final_layer.adaLN_modulation.1.weight" in changed
    assert any(k.startswith("text_encoders.clip_l.") for k in changed)
    assert_close(baked, want)


def test_bake_a_diffusers_folder(model, tmp_path):
    from lora_compat.tools.bake import bake

    model.save_pretrained(tmp_path / "checkpoint" / "transformer")
    (tmp_path / "checkpoint" / "model_index.json").write_text("{}")
    lora = _kohya_file(tmp_path / "kohya.safetensors", model)
    bake(tmp_path / "checkpoint", [(lora, 0.8)], tmp_path / "baked", progress=False)
    baked = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "baked" / "transformer")
    expected = {k.removeprefix("transformer."): v for k, v in _independent(lora, {"transformer": model}, 0.8).items()}
    for key, value in baked.state_dict().items():
        want = expected.get(key, model.state_dict()[key])
        assert (value - want).norm() <= 1e-6 * want.norm(), key


@pytest.mark.parametrize("algo", ["lokr", "loha"])
def test_simpletuner_lycoris_matches_lycoris_forward(model, tmp_path, algo):
    """SimpleTuner's ``lycoris_transformer_blocks_0_attn_to_q.lokr_w1`` (lycoris-lora over every Linear of the
    diffusers model): the weights lycoris' own forward implies, at multiplier and strength 0.6."""
    pytest.importorskip("lycoris")
    from test_flux_parity import _expected_from_implied, assert_same, write_lycoris

    path, implied = write_lycoris(tmp_path / f"{algo}.safetensors", model, algo, multiplier=0.6)
    assert len(implied) == len(_linears(model))
    detection = lora_compat.detect(path)
    assert detection.dialect.id == "lycoris" and detection.base_candidates == ["sd3"]
    assert_same(lora_compat.patched_weights(path, {"transformer": model}, 0.6, strict=True),
                _expected_from_implied(model, implied))


def test_diffusers_adapter_with_t5_keys_takes_the_patcher_route(model, encoders, tmp_path):
    """diffusers' SD3 mixin does not list ``text_encoder_3``: it would drop a T5 LoRA in silence. The adapter
    applies such a file through the patcher, exactly (T5 included), and unloads it bit for bit."""
    from lora_compat.adapters import diffusers as adapter

    components = {"transformer": model, **encoders, "text_encoder_3": _t5()}
    path = _kohya_file(tmp_path / "kohya.safetensors", model, {k: v for k, v in components.items()
                                                                if k != "transformer"})
    copies = {c: copy.deepcopy(m) for c, m in components.items()}
    pipe = _pipeline(copies["transformer"], copies["text_encoder"], copies["text_encoder_2"], copies["text_encoder_3"])
    before = _state(copies)
    loaded = adapter.load(pipe, path, strength=0.7)
    assert loaded.route == "patcher"
    assert_close({k: v for k, v in _state(copies).items() if not torch.equal(v, before[k])},
                 _independent(path, components, 0.7))
    adapter.unload(pipe, loaded)
    after = _state(copies)
    assert all(torch.equal(after[k], before[k]) for k in before)
