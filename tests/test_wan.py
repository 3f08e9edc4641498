"""Wan 2.1/2.2: detection as base ``wan`` and exact application of its layouts, against diffusers' own loader.

The expected weights come from diffusers (``WanPipeline.load_lora_weights`` + ``fuse_lora``, its own converters for
the native and musubi layouts) on a tiny ``WanTransformer3DModel`` with random weights; the files are written by
diffusers/peft (``get_peft_model_state_dict`` + ``save_lora_weights``) and, for the native layouts, renamed by the
hand-written table below (diffusers' converter read backwards).
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_compat
from family_parity import assert_matches, diffusers_fused, peft_lora_file

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

#: a tiny Wan 2.1 I2V-style config (image cross-attention included)
TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=8, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=12, added_kv_proj_dim=16, rope_max_seq_len=32)
#: the modules a LoRA trains, diffusers names → native (Wan / ComfyUI) names, per block
BLOCK_NATIVE = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
                "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
                "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o",
                "attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",
                "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}
RANK, ALPHA = 4, 2.0


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = diffusers.WanTransformer3DModel(**TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.eval()


def _targets(model: torch.nn.Module) -> list[str]:
    return [f"blocks.{i}.{m}" for i in range(TINY["num_layers"]) for m in BLOCK_NATIVE]


def _diffusers_file(model: torch.nn.Module, path: Path, seed: int = 1) -> Path:
    """A LoRA written by peft + ``WanPipeline.save_lora_weights`` (scales in ``lora_adapter_metadata``)."""
    return peft_lora_file(model, path, diffusers.WanPipeline, _targets(model), RANK, ALPHA, seed)


def _native_file(diffusers_path: Path, path: Path, prefix: str = "diffusion_model.", kohya: bool = False) -> Path:
    """The same LoRA under native names with ``lora_down``/``lora_up`` + ``alpha`` (ComfyUI / musubi)."""
    tensors = load_file(str(diffusers_path))
    out = {}
    for key, value in tensors.items():
        module, _, suffix = key.removeprefix("transformer.").rpartition(".lora_")
        block, _, rest = module.partition(".")[2].partition(".")
        native = f"blocks.{block}.{BLOCK_NATIVE[rest]}"
        name = prefix + (native.replace(".", "_") if kohya else native)
        out[f"{name}.{'lora_down' if suffix.startswith('A') else 'lora_up'}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(ALPHA)
    save_file(out, str(path))
    return path


def _diffusers_fused(model: torch.nn.Module, path: Path, strength: float = 1.0) -> dict[str, torch.Tensor]:
    """The weights diffusers gives: ``load_lora_weights`` + ``fuse_lora`` on a pipeline holding the model."""
    return diffusers_fused(model, path, lambda t: diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None,
                                                                      scheduler=None, transformer=t), strength)


_assert_matches = assert_matches


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture
def files(model, tmp_path):
    path = _diffusers_file(model, tmp_path / "wan_diffusers.safetensors")
    return {"diffusers": path,
            "native": _native_file(path, tmp_path / "wan_comfy.safetensors"),
            "musubi": _native_file(path, tmp_path / "wan_musubi.safetensors", "lora_unet_", kohya=True)}


@pytest.mark.parametrize("layout, dialect", [("diffusers", "diffusers"), ("native", "native"), ("musubi", "kohya")])
def test_named_as_wan(files, layout, dialect):
    """Tiny shapes fit no full-size base: the names alone make ``wan`` the only candidate (test_wan_mapping.py
    checks the full-size shapes)."""
    detection = lora_compat.detect(files[layout])
    assert (detection.dialect.id, detection.base, detection.base_candidates) == (dialect, None, ["wan"])
    assert not detection.patchset.unmatched
    assert len(detection.patchset.patches) == TINY["num_layers"] * len(BLOCK_NATIVE)


@pytest.mark.parametrize("layout", ["diffusers", "native", "musubi"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_patched_weights_equal_diffusers(model, files, layout, strength):
    expected = _diffusers_fused(model, files[layout], strength)
    got = lora_compat.patched_weights(files[layout], {"transformer": model}, strength)
    _assert_matches(got, expected, model)


def test_patcher_equals_diffusers_and_restores(model, files):
    expected = _diffusers_fused(model, files["native"], 0.8)
    live = copy.deepcopy(model)
    before = {k: v.clone() for k, v in live.state_dict().items()}
    patcher = lora_compat.Patcher(live)  # the component comes from the family's class names
    patcher.set([(files["native"], 0.8)])
    _assert_matches({f"transformer.{k}": v for k, v in live.state_dict().items()
                     if not torch.equal(v, before[k])}, expected, model)
    patcher.set([])
    assert all(torch.equal(v, before[k]) for k, v in live.state_dict().items())


def test_i2v_file_on_a_t2v_model_applies_the_rest(model, files):
    """A Wan 2.1 I2V LoRA on a T2V model: the image cross-attention is reported unmatched, the rest applies."""
    from lora_compat.archs import ModuleIndex
    from lora_compat.models import resolve_patchset

    torch.manual_seed(0)
    t2v = diffusers.WanTransformer3DModel(**{**TINY, "image_dim": None, "added_kv_proj_dim": None})
    t2v.load_state_dict(model.state_dict(), strict=False)
    image = [f"blocks.{i}.cross_attn.{m}" for i in range(TINY["num_layers"]) for m in ("k_img", "v_img")]
    patchset = resolve_patchset(files["native"], ModuleIndex.from_modules({"transformer": t2v}))
    assert sorted(patchset.unmatched) == sorted(f"diffusion_model.{m}.{s}" for m in image
                                                 for s in ("lora_down.weight", "lora_up.weight", "alpha"))
    with pytest.warns(lora_compat.LoraCompatWarning, match="12 keys map to no module"):
        got = lora_compat.patched_weights(files["native"], {"transformer": t2v})
    expected = _diffusers_fused(model, files["native"])
    skip = ("attn2.add_k_proj", "attn2.add_v_proj")
    for name, value in got.items():
        assert not any(s in name for s in skip)
        err = (value - expected[name]).norm() / expected[name].norm()
        assert err < 1e-6, name
    assert len(got) == TINY["num_layers"] * (len(BLOCK_NATIVE) - 2)  # the LoRA changes weights only


def _lightx2v_file(diffusers_path: Path, path: Path, model: torch.nn.Module, seed: int = 3) -> Path:
    """A lightx2v / CausVid-style distillation LoRA: the LoRA in native names, ``diff_b`` bias deltas on the same
    modules, and ``head.head`` as a full ``diff`` + ``diff_b``."""
    _native_file(diffusers_path, path)
    tensors = load_file(str(path))
    g = torch.Generator().manual_seed(seed)
    for key in [k for k in tensors if k.endswith(".lora_up.weight")]:
        tensors[key.replace(".lora_up.weight", ".diff_b")] = torch.randn(tensors[key].shape[0], generator=g) * 0.1
    head = model.proj_out.weight
    tensors["diffusion_model.head.head.diff"] = torch.randn(head.shape, generator=g) * 0.1
    tensors["diffusion_model.head.head.diff_b"] = torch.randn(head.shape[0], generator=g) * 0.1
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_lightx2v_diff_b_and_head_diff_equal_diffusers(model, files, tmp_path, strength):
    path = _lightx2v_file(files["diffusers"], tmp_path / "wan_lightx2v.safetensors", model)
    detection = lora_compat.detect(path)
    assert detection.dialect.id == "native" and not detection.patchset.unmatched
    expected = _diffusers_fused(model, path, strength)
    got = lora_compat.patched_weights(path, {"transformer": model}, strength)
    assert "transformer.blocks.0.attn1.to_q.bias" in got and "transformer.proj_out.weight" in got
    _assert_matches(got, expected, model)


def test_norm_diff_and_unknown_modules_are_not_dropped(model, tmp_path):
    """Norm ``diff`` (diffusers drops it) is applied as ``W + s·diff``, a ``modulation.diff`` to the block's
    ``scale_shift_table`` likewise; UMT5 text-encoder keys, which a bare transformer has no module for, are listed
    unmatched."""
    g = torch.Generator().manual_seed(4)
    norm = torch.randn(model.blocks[0].norm2.weight.shape, generator=g)
    tensors = {"diffusion_model.blocks.0.norm3.diff": norm,
               "diffusion_model.blocks.0.modulation.diff": (modulation := torch.randn(1, 6, 16, generator=g)),
               "lora_te_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.randn(1, 8, generator=g)}
    save_file(tensors, str(tmp_path / "wan_norm.safetensors"))
    from lora_compat.archs import ModuleIndex
    from lora_compat.models import resolve_patchset

    patchset = resolve_patchset(tmp_path / "wan_norm.safetensors", ModuleIndex.from_modules({"transformer": model}))
    assert sorted(patchset.unmatched) == ["lora_te_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"]
    with pytest.warns(lora_compat.LoraCompatWarning):
        got = lora_compat.patched_weights(tmp_path / "wan_norm.safetensors", {"transformer": model}, 0.5)
    # diffusers' norm2 is Wan's norm3
    assert sorted(got) == ["transformer.blocks.0.norm2.weight", "transformer.blocks.0.scale_shift_table"]
    torch.testing.assert_close(got["transformer.blocks.0.scale_shift_table"],
                               model.blocks[0].scale_shift_table.detach() + 0.5 * modulation, rtol=0, atol=1e-6)
    torch.testing.assert_close(got["transformer.blocks.0.norm2.weight"],
                               model.blocks[0].norm2.weight.detach() + 0.5 * norm, rtol=0, atol=1e-6)


def test_peft_save_pretrained_equals_peft_merge(model, tmp_path):
    """A PEFT ``save_pretrained`` folder (``base_model.model.blocks...`` + adapter_config.json) against PEFT's own
    ``merge_and_unload``."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=_targets(model), init_lora_weights=False)
    torch.manual_seed(5)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    assert lora_compat.detect(path).base_candidates == ["wan"]
    expected = {f"transformer.{k}": v for k, v in peft_model.merge_and_unload().state_dict().items()}
    got = lora_compat.patched_weights(path, {"transformer": model})
    _assert_matches(got, expected, model)


@pytest.mark.parametrize("chain", [("diffusers", "native"), ("kohya", "diffusers"), ("native", "kohya")])
def test_convert_round_trips_stay_exact(model, files, tmp_path, chain):
    """musubi/ComfyUI -> each target and on: every file still equals diffusers' fused weights."""
    expected = _diffusers_fused(model, files["native"])
    source = files["native"]
    for step, target in enumerate(chain):
        out = tmp_path / f"step{step}_{target}.safetensors"
        lora_compat.convert(source, target, out, base="wan")
        source = out
    keys = sorted(load_file(str(source)))
    prefix = {"native": "diffusion_model.blocks.0.", "kohya": "lora_unet_blocks_0_",
              "diffusers": "transformer.blocks.0."}[chain[-1]]
    assert all(k.startswith((prefix, prefix.replace(".0.", ".1.").replace("_0_", "_1_"))) for k in keys), keys[:3]
    _assert_matches(lora_compat.patched_weights(source, {"transformer": model}), expected, model)


def test_diffusers_adapter_on_a_wan22_pipeline(model, files):
    """``adapters.diffusers.load`` of a ComfyUI-named file into a Wan pipeline with two experts: the output equals
    diffusers' fused model, ``transformer_2`` is untouched (diffusers too loads into ``transformer`` unless told),
    and ``unload`` restores the output bit for bit."""
    from lora_compat.adapters import diffusers as adapter

    expected = _diffusers_fused(model, files["native"], 0.8)
    reference = copy.deepcopy(model)
    reference.load_state_dict({k.removeprefix("transformer."): v for k, v in expected.items()})
    second = _model(7)
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None,
                                 transformer=copy.deepcopy(model), transformer_2=copy.deepcopy(second))
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 4, 1, 4, 4, generator=g), torch.tensor([500]), torch.randn(1, 5, 16, generator=g))
    image = torch.randn(1, 3, 12, generator=g)

    def run(transformer):
        with torch.no_grad():
            return transformer(*inputs, encoder_hidden_states_image=image, return_dict=False)[0]

    before, before_2 = run(pipe.transformer), {k: v.clone() for k, v in pipe.transformer_2.state_dict().items()}
    loaded = adapter.load(pipe, files["native"], strength=0.8)
    want = run(reference)
    assert (run(pipe.transformer) - want).norm() / want.norm() < 1e-5
    assert all(torch.equal(v, before_2[k]) for k, v in pipe.transformer_2.state_dict().items())
    adapter.unload(pipe, loaded)
    assert torch.equal(run(pipe.transformer), before)
