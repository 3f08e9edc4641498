"""Never confidently wrong on the newer families (issue 14), header only: their model files (transformers, VAEs, text
encoders, ComfyUI fp8-scaled files) are refused as NotALoraError naming what they are, and their LoRAs, whose
names and shapes partly fit FLUX.1, get no base instead of a confident ``flux1``."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

import lora_compat
from lora_compat.errors import NotALoraError

from corpus import header_only_file, load
from family_layouts import (Layout, chroma_transformer, comfy_fp8_scaled, flux1_transformer, flux2_transformer,
                            fp8_scaled, header_file, hidream_transformer, hunyuan_video_transformer,
                            hunyuan_video_vae, image_vae, llm, lora, ltx_transformer, ltx_vae, lumina2_transformer,
                            modules_of, prefixed, qwen_image_transformer, qwen_image_vae, sd3_transformer, t5_encoder,
                            wan_diffusers_transformer, wan_transformer, wan_vae)

TRANSFORMERS: dict[str, tuple[Callable[[], Layout], str]] = {
    "flux2-dev": (lambda: flux2_transformer("dev"), "a FLUX.2 transformer checkpoint (FLUX.2 [dev])"),
    "flux2-klein-4b": (lambda: flux2_transformer("klein-4b"), "a FLUX.2 transformer checkpoint (FLUX.2 [klein] 4B)"),
    "flux2-klein-9b": (lambda: flux2_transformer("klein-9b"), "a FLUX.2 transformer checkpoint (FLUX.2 [klein] 9B)"),
    "qwen-image": (qwen_image_transformer, "a Qwen-Image transformer checkpoint"),
    "wan21-t2v-1.3b": (lambda: wan_transformer("t2v-1.3b"), "a Wan transformer checkpoint (Wan 2.1 T2V 1.3B)"),
    "wan-t2v-14b": (lambda: wan_transformer("t2v-14b"),
                    "a Wan transformer checkpoint (Wan 14B T2V: 2.1, or a 2.2 A14B expert)"),
    "wan21-i2v-14b": (lambda: wan_transformer("i2v-14b"), "a Wan transformer checkpoint (Wan 2.1 I2V/FLF2V 14B)"),
    "wan22-ti2v-5b": (lambda: wan_transformer("ti2v-5b"), "a Wan transformer checkpoint (Wan 2.2 TI2V 5B)"),
    "wan-diffusers": (wan_diffusers_transformer, "a Wan transformer checkpoint (Wan 2.1 T2V 1.3B)"),
    "lumina2": (lumina2_transformer,
                "a Lumina-Image 2.0 transformer checkpoint (q/k/v rows 3840 at width 2304)"),
    "chroma": (chroma_transformer, "a Chroma transformer checkpoint"),
    "sd3-medium": (sd3_transformer, "an SD3 transformer checkpoint (SD3 Medium)"),
    "sd3.5-large": (lambda: sd3_transformer("sd3.5-large"), "an SD3 transformer checkpoint (SD3.5 Large)"),
    "sd3.5-medium": (lambda: sd3_transformer("sd3.5-medium"), "an SD3 transformer checkpoint (SD3.5 Medium)"),
    "hunyuan-video": (hunyuan_video_transformer, "a HunyuanVideo transformer checkpoint"),
    "ltx-video": (ltx_transformer, "an LTX-Video transformer checkpoint"),
    "ltx-2": (lambda: ltx_transformer(audio=True), "an LTX-2 transformer checkpoint"),
    "hidream": (hidream_transformer, "a HiDream-I1 transformer checkpoint"),
}

OTHER_MODEL_FILES: dict[str, tuple[Callable[[], Layout], str]] = {
    "wan21-vae": (wan_vae, "a Wan 2.1 / Qwen-Image VAE checkpoint"),
    "wan22-vae": (lambda: wan_vae(48), "a Wan 2.2 VAE checkpoint"),
    "qwen-image-vae-diffusers": (qwen_image_vae, "a Wan 2.1 / Qwen-Image VAE checkpoint"),
    "flux1-sd3-vae": (lambda: image_vae(16), "a VAE checkpoint with 16 latent channels (the FLUX.1 / SD3 autoencoder, "
                                             "also used by Chroma, HiDream, Lumina 2 and Z-Image)"),
    "flux2-vae": (lambda: image_vae(32, batch_norm=True), "a FLUX.2 VAE checkpoint"),
    "ltx-vae": (ltx_vae, "an LTX-Video VAE checkpoint"),
    "hunyuan-video-vae": (hunyuan_video_vae, "a causal 3D video VAE checkpoint (HunyuanVideo or LTX-Video)"),
    "umt5": (lambda: t5_encoder(umt5=True), "a UMT5 text encoder (Wan's)"),
    "umt5-fp8-scaled": (lambda: comfy_fp8_scaled(t5_encoder(umt5=True)),
                        "a UMT5 text encoder (Wan's), ComfyUI fp8-scaled"),
    "qwen2.5-vl": (lambda: llm("qwen2.5-vl"), "a Qwen2.5-VL text encoder (Qwen-Image's)"),
    "qwen2.5-vl-fp8-scaled": (lambda: comfy_fp8_scaled(llm("qwen2.5-vl")),
                              "a Qwen2.5-VL text encoder (Qwen-Image's), ComfyUI fp8-scaled"),
    "qwen3-4b": (lambda: llm("qwen3-4b"), "a Qwen3 text encoder (width 2560: Z-Image's, FLUX.2 [klein] 4B's)"),
    "qwen3-8b": (lambda: llm("qwen3-8b"), "a Qwen3 text encoder (width 4096: FLUX.2 [klein] 9B's)"),
    "mistral3": (lambda: llm("mistral3"), "a Mistral Small 3 text encoder (FLUX.2 [dev]'s)"),
    "gemma2": (lambda: llm("gemma2"), "a Gemma 2 text encoder (Lumina 2's)"),
    "flux2-fp8-mixed": (lambda: fp8_scaled(flux2_transformer("dev")),
                        "a FLUX.2 transformer checkpoint (FLUX.2 [dev]), ComfyUI fp8-scaled"),
    # a family named nowhere, in ComfyUI's fp8-scaled layout: refused all the same
    "t5-fp8-scaled": (lambda: comfy_fp8_scaled(t5_encoder(umt5=False)), "a ComfyUI fp8-scaled model checkpoint"),
}


def refusal(what: str, keys: Layout) -> str:
    return f"<state dict>: is {what}, not a LoRA ({len(keys)} model tensors, no LoRA tensors); load it as a model"


def assert_refused(keys: Layout, what: str) -> None:
    with pytest.raises(NotALoraError) as info:
        lora_compat.inspect(header_file(keys))
    assert str(info.value) == refusal(what, keys)
    assert info.value.kind == "checkpoint"


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "diffusion_model."])
@pytest.mark.parametrize("name", TRANSFORMERS)
def test_transformer_checkpoints_are_refused_naming_the_family(name, prefix):
    build, what = TRANSFORMERS[name]
    assert_refused(prefixed(build(), prefix), what)


@pytest.mark.parametrize("name", OTHER_MODEL_FILES)
def test_vaes_text_encoders_and_fp8_files_are_refused_naming_what_they_are(name):
    build, what = OTHER_MODEL_FILES[name]
    assert_refused(build(), what)


def test_the_z_image_corpus_checkpoint_is_named():
    with pytest.raises(NotALoraError) as info:
        lora_compat.inspect(header_only_file("invokeai_z_image_transformer_comfyui_keys.json"))
    assert str(info.value) == refusal("a Z-Image transformer checkpoint",
                                      load("invokeai_z_image_transformer_comfyui_keys.json")["keys"])


def test_a_flux2_checkpoint_on_disk_is_refused_reading_no_tensor(tmp_path: Path, monkeypatch):
    """A tiny FLUX.2 layout (width 64) written by safetensors: the width names no variant; nothing is read."""
    shapes = {k: [64 if d in (3072, 9216) else d for d in v] for k, v in flux2_transformer("klein-4b").items()
              if k.startswith(("double_stream", "double_blocks.0.img_attn.qkv", "img_in"))}
    path = tmp_path / "flux2.safetensors"
    save_file({k: torch.zeros(v[0], min(v[-1], 64)) for k, v in shapes.items()}, str(path))
    monkeypatch.setattr("lora_compat.files._read_span", lambda *a: pytest.fail("tensor data read"))
    with pytest.raises(NotALoraError, match=r"^.*flux2\.safetensors: is a FLUX\.2 transformer checkpoint "
                                            r"\(width 64\), not a LoRA \(4 model tensors"):
        lora_compat.inspect(path)


def test_a_dit_controlnet_is_not_named_as_its_transformer():
    """diffusers' SD3 ControlNet copies the transformer's blocks and adds ``controlnet_blocks``: refused as before,
    as a full model checkpoint, not named an SD3 transformer."""
    width = 1536
    keys: Layout = {"pos_embed.proj.weight": [width, 16, 2, 2], "pos_embed.proj.bias": [width]}
    for n in range(12):
        modules = {f"transformer_blocks.{n}.{m}": (width, width) for m in (
            "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
            "attn.add_v_proj", "attn.to_add_out")}
        modules[f"transformer_blocks.{n}.norm1.linear"] = modules[f"transformer_blocks.{n}.norm1_context.linear"] = \
            (6 * width, width)
        modules[f"controlnet_blocks.{n}"] = (width, width)
        for name, (out, inp) in modules.items():
            keys[f"{name}.weight"], keys[f"{name}.bias"] = [out, inp], [out]
    with pytest.raises(NotALoraError) as info:
        lora_compat.inspect(header_file(keys))
    assert str(info.value) == (f"<state dict>: is a full model checkpoint ({len(keys)} plain parameters, no LoRA "
                               "tensors), not a LoRA; load it as a model")


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "diffusion_model."])
def test_flux1_checkpoints_are_refused_as_flux1_not_flux2(prefix):
    """A FLUX.1 transformer checkpoint is a model file: refused, named FLUX.1 (before issue 14 the BFL dialect read
    its norm scales as a LoRA of kind ``set``)."""
    assert_refused(prefixed(flux1_transformer(), prefix), "a FLUX.1 transformer checkpoint")


# -- LoRAs whose names fit FLUX.1 ---------------------------------------------------------------------------------
def assert_no_base(keys: Layout, metadata: dict[str, str] | None = None) -> lora_compat.InspectResult:
    """No base, no candidate, nothing mapped: every key listed as unmatched."""
    result = lora_compat.inspect(header_file(keys, metadata))
    assert (result.base, result.base_candidates, result.targets) == (None, [], 0)
    assert sorted(result.unmatched) == sorted(keys)
    return result


QWEN_2 = qwen_image_transformer(depth=2)
KLEIN_4B = flux2_transformer("klein-4b")


def test_a_qwen_image_diffusers_lora_is_not_a_flux1_lora():
    """Its attention fits FLUX.1's transformer_blocks by name and shape; its img_mlp/img_mod/txt_mlp do not: with
    Qwen-Image supported (issue 14), the file is a Qwen-Image 20B LoRA, every key mapped."""
    keys = lora(modules_of(QWEN_2, ("transformer_blocks.",)), "transformer.")
    result = lora_compat.inspect(header_file(keys))
    assert (result.base, result.base_candidates, result.variant, result.unmatched) == \
        ("qwen-image", ["qwen-image"], "qwen-image-20b", [])
    assert result.targets == len(keys) // 2


def test_a_qwen_image_attention_lora_deeper_than_flux1_is_not_a_flux1_lora():
    keys = lora(modules_of(qwen_image_transformer(), (".attn.",)), "transformer.")
    result = lora_compat.inspect(header_file(keys))
    assert (result.base, result.base_candidates, result.variant, result.unmatched) == \
        ("qwen-image", ["qwen-image"], "qwen-image-20b", [])


def test_metadata_naming_qwen_image_rules_out_flux1():
    """Two blocks of attention only: names and shapes are FLUX.1's, FLUX.2 Klein 4B's and Qwen-Image's; no base
    without the trainer's metadata, which then names Qwen-Image."""
    keys = lora(modules_of(QWEN_2, (".attn.",)), "transformer.")
    result = lora_compat.inspect(header_file(keys))
    assert (result.base, result.base_candidates, result.base_reason) == \
        (None, ["flux1", "flux2", "qwen-image"], "shapes fit flux1, flux2, qwen-image equally")
    result = lora_compat.inspect(header_file(keys, {"ss_base_model_version": "qwen_image"}))
    assert (result.base, result.base_reason, result.unmatched) == \
        ("qwen-image", "shapes fit several bases; metadata names this one", [])


@pytest.mark.parametrize("suffixes", [("lora_B.weight", "lora_A.weight"), ("lora_up.weight", "lora_down.weight")])
def test_a_flux2_klein_bfl_lora_is_not_a_flux1_lora(suffixes):
    """Klein 4B has FLUX.1's width: its qkv/proj fit FLUX.1; its mlp, linear1 and shared modulation layers fit only
    FLUX.2 (registered since: the file is a ``flux2`` one, before it got no base)."""
    keys = lora(modules_of(KLEIN_4B, ("blocks.", "modulation")), "diffusion_model.", up=suffixes[0], down=suffixes[1])
    result = lora_compat.inspect(header_file(keys))
    assert (result.dialect, result.base, result.variant, result.unmatched) == ("bfl", "flux2", "flux2-klein-4b", [])


@pytest.mark.parametrize("with_modulation", [True, False])
def test_a_flux2_dev_bfl_lora_gets_no_base(with_modulation):
    """(Named before ``flux2`` was registered: FLUX.2-dev files now get their own base, never ``flux1``.)"""
    keys = lora(modules_of(flux2_transformer("dev"), ("blocks.", "modulation") if with_modulation else ("blocks.",)),
                "diffusion_model.")
    result = lora_compat.inspect(header_file(keys))
    assert (result.dialect, result.base, result.variant, result.unmatched) == ("bfl", "flux2", "flux2-dev", [])


def test_a_chroma_lora_with_its_approximator_is_not_a_flux1_lora():
    """Since the chroma base is registered, the approximator decides for it (it was base null, naming Chroma)."""
    keys = lora(modules_of(chroma_transformer(), ("double_blocks.0.", "distilled_guidance_layer.")), "diffusion_model.")
    result = lora_compat.inspect(header_file(keys))
    assert (result.base, result.base_candidates, result.unmatched, result.warnings) == ("chroma", ["chroma"], [], [])


def test_a_hunyuan_video_diffusers_lora_is_not_a_flux1_lora():
    """HunyuanVideo's diffusers blocks have FLUX.1's names and widths; its token refiner is its own."""
    modules = {"transformer_blocks.0.attn.to_q": (3072, 3072), "transformer_blocks.0.norm1.linear": (18432, 3072),
               "context_embedder.token_refiner.refiner_blocks.0.attn.to_q": (3072, 3072)}
    result = assert_no_base(lora(modules, "transformer."))
    assert result.base_reason.startswith("it has HunyuanVideo modules (e.g. transformer.context_embedder.token_refiner")


def test_flux1_loras_keep_their_base():
    keys = lora(modules_of(flux1_transformer(), ("blocks.",)), "diffusion_model.")
    result = lora_compat.inspect(header_file(keys))
    assert (result.dialect, result.base, result.unmatched, result.warnings) == ("bfl", "flux1", [], [])


def test_the_qwen_image_corpus_lora_says_which_family_it_is_for():
    """Its LoKr factors are synthetic (no full-size shape fits): no base, Qwen-Image the only candidate
    (tests/test_corpus.py)."""
    result = lora_compat.inspect(header_only_file("invokeai_qwen_image_lora_kohya_format.json"))
    assert (result.base, result.base_candidates) == (None, ["qwen-image"])
    assert result.base_reason == "names match but shapes fit no full-size base and metadata names none"
