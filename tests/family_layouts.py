"""Header layouts (names and full-size shapes, no tensor data) of the newer families' model files and LoRAs, written
from families.md (sections 2.1-2.11) and the families' published checkpoints: what detection sees of them."""
from __future__ import annotations

from typing import Iterable

import torch

from lora_compat import corpus
from lora_compat.files import LoraFile

Layout = dict[str, list[int]]


def header_file(keys: Layout, metadata: dict[str, str] | None = None) -> LoraFile:
    """A LoraFile of the layout whose tensor reads fail the test."""
    def no_reads(key: str) -> torch.Tensor:
        raise AssertionError(f"tensor data of {key!r} read during header-only work")

    return corpus.header_file({"keys": keys, "metadata": metadata or {}}, dtype="BF16", read=no_reads)


def prefixed(keys: Layout, prefix: str) -> Layout:
    return {prefix + k: v for k, v in keys.items()}


class _Builder:
    def __init__(self, bias: bool = True):
        self.keys: Layout = {}
        self.bias = bias

    def linear(self, name: str, out: int, inp: int) -> None:
        self.keys[f"{name}.weight"] = [out, inp]
        if self.bias:
            self.keys[f"{name}.bias"] = [out]

    def param(self, name: str, *shape: int) -> None:
        self.keys[name] = list(shape)


# -- transformers ---------------------------------------------------------------------------------------------
FLUX2 = {"dev": (6144, 8, 48, 15360, True), "klein-4b": (3072, 5, 20, 7680, False),
         "klein-9b": (4096, 8, 24, 12288, False)}


def flux2_transformer(variant: str = "dev") -> Layout:
    """BFL names (ComfyUI ``diffusion_models/``): shared modulation, SwiGLU mlp (2 x 3 x width rows), no biases."""
    width, double, single, joint, guidance = FLUX2[variant]
    mlp = 3 * width
    b = _Builder(bias=False)
    b.linear("img_in", width, 128)
    b.linear("txt_in", width, joint)
    for group in ("time_in", *(("guidance_in",) if guidance else ())):
        b.linear(f"{group}.in_layer", width, 256)
        b.linear(f"{group}.out_layer", width, width)
    b.linear("double_stream_modulation_img.lin", 6 * width, width)
    b.linear("double_stream_modulation_txt.lin", 6 * width, width)
    b.linear("single_stream_modulation.lin", 3 * width, width)
    for n in range(double):
        for s in ("img", "txt"):
            b.linear(f"double_blocks.{n}.{s}_attn.qkv", 3 * width, width)
            b.linear(f"double_blocks.{n}.{s}_attn.proj", width, width)
            b.param(f"double_blocks.{n}.{s}_attn.norm.query_norm.scale", 128)
            b.param(f"double_blocks.{n}.{s}_attn.norm.key_norm.scale", 128)
            b.linear(f"double_blocks.{n}.{s}_mlp.0", 2 * mlp, width)
            b.linear(f"double_blocks.{n}.{s}_mlp.2", width, mlp)
    for n in range(single):
        b.linear(f"single_blocks.{n}.linear1", 3 * width + 2 * mlp, width)
        b.linear(f"single_blocks.{n}.linear2", width, width + mlp)
        b.param(f"single_blocks.{n}.norm.query_norm.scale", 128)
        b.param(f"single_blocks.{n}.norm.key_norm.scale", 128)
    b.linear("final_layer.linear", 128, width)
    b.linear("final_layer.adaLN_modulation.1", 2 * width, width)
    return b.keys


def fp8_scaled(keys: Layout, every: str = ".weight", names: Iterable[str] = ("weight_scale", "input_scale")
               ) -> Layout:
    """ComfyUI's fp8 layout: scalar scales beside each 2-D weight."""
    out = dict(keys)
    for key, shape in keys.items():
        if key.endswith(every) and len(shape) == 2:
            for name in names:
                out[key[: -len(every)] + "." + name] = []
    return out


def _mmdit_blocks(b: _Builder, width: int, depths: tuple[int, int], names: tuple[str, ...]) -> None:
    """FLUX.1-style double blocks (img/txt streams, fused qkv, 4x mlp) and single blocks (fused linear1 of q, k, v
    and the mlp), under each family's names: modulation, qkv, proj, mlp in, mlp out, single-block modulation."""
    modulation, qkv, proj, mlp_in, mlp_out, single_modulation = names
    for n in range(depths[0]):
        for s in ("img", "txt"):
            b.linear(f"double_blocks.{n}.{s}{modulation}", 6 * width, width)
            b.linear(f"double_blocks.{n}.{s}{qkv}", 3 * width, width)
            b.linear(f"double_blocks.{n}.{s}{proj}", width, width)
            b.linear(f"double_blocks.{n}.{s}{mlp_in}", 4 * width, width)
            b.linear(f"double_blocks.{n}.{s}{mlp_out}", width, 4 * width)
    for n in range(depths[1]):
        b.linear(f"single_blocks.{n}.linear1", 7 * width, width)
        b.linear(f"single_blocks.{n}.linear2", width, 5 * width)
        b.linear(f"single_blocks.{n}.{single_modulation}", 3 * width, width)


def flux1_transformer() -> Layout:
    width = 3072
    b = _Builder()
    b.linear("img_in", width, 64)
    b.linear("txt_in", width, 4096)
    for group, inp in (("time_in", 256), ("vector_in", 768), ("guidance_in", 256)):
        b.linear(f"{group}.in_layer", width, inp)
        b.linear(f"{group}.out_layer", width, width)
    _mmdit_blocks(b, width, (19, 38), ("_mod.lin", "_attn.qkv", "_attn.proj", "_mlp.0", "_mlp.2", "modulation.lin"))
    for n in range(19):
        for s in ("img", "txt"):
            b.param(f"double_blocks.{n}.{s}_attn.norm.query_norm.scale", 128)
            b.param(f"double_blocks.{n}.{s}_attn.norm.key_norm.scale", 128)
    for n in range(38):
        b.param(f"single_blocks.{n}.norm.query_norm.scale", 128)
        b.param(f"single_blocks.{n}.norm.key_norm.scale", 128)
    b.linear("final_layer.linear", 64, width)
    b.linear("final_layer.adaLN_modulation.1", 2 * width, width)
    return b.keys


def chroma_transformer() -> Layout:
    """FLUX.1's blocks without their modulation, and the distilled guidance layer (the approximator)."""
    keys = {k: v for k, v in flux1_transformer().items()
            if "_mod." not in k and ".modulation." not in k and not k.startswith(("vector_in", "guidance_in"))}
    b = _Builder()
    b.linear("distilled_guidance_layer.in_proj", 5120, 64)
    for n in range(5):
        b.linear(f"distilled_guidance_layer.layers.{n}.in_layer", 5120, 5120)
        b.linear(f"distilled_guidance_layer.layers.{n}.out_layer", 5120, 5120)
        b.param(f"distilled_guidance_layer.norms.{n}.scale", 5120)
    b.linear("distilled_guidance_layer.out_proj", 3072, 5120)
    return {**keys, **b.keys}


def qwen_image_transformer(depth: int = 60) -> Layout:
    """Qwen-Image 20B (diffusers names, which are its native ones)."""
    width = 3072
    b = _Builder()
    b.linear("img_in", width, 64)
    b.param("txt_norm.weight", 3584)
    b.linear("txt_in", width, 3584)
    b.linear("time_text_embed.timestep_embedder.linear_1", width, 256)
    b.linear("time_text_embed.timestep_embedder.linear_2", width, width)
    for n in range(depth):
        p = f"transformer_blocks.{n}"
        for s in ("img", "txt"):
            b.linear(f"{p}.{s}_mod.1", 6 * width, width)
            b.linear(f"{p}.{s}_mlp.net.0.proj", 4 * width, width)
            b.linear(f"{p}.{s}_mlp.net.2", width, 4 * width)
        for m in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            b.linear(f"{p}.attn.{m}", width, width)
        for m in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            b.param(f"{p}.attn.{m}.weight", 128)
    b.linear("norm_out.linear", 2 * width, width)
    b.linear("proj_out", 64, width)
    return b.keys


WAN = {"t2v-1.3b": (1536, 8960, 16, 30, False), "t2v-14b": (5120, 13824, 16, 40, False),
       "i2v-14b": (5120, 13824, 36, 40, True), "ti2v-5b": (3072, 14336, 48, 30, False)}


def wan_transformer(variant: str = "t2v-14b") -> Layout:
    """Wan's own names (ComfyUI ``diffusion_models/``)."""
    width, ffn, channels, depth, image = WAN[variant]
    b = _Builder()
    b.param("patch_embedding.weight", width, channels, 1, 2, 2)
    b.param("patch_embedding.bias", width)
    b.linear("text_embedding.0", width, 4096)
    b.linear("text_embedding.2", width, width)
    b.linear("time_embedding.0", width, 256)
    b.linear("time_embedding.2", width, width)
    b.linear("time_projection.1", 6 * width, width)
    for n in range(depth):
        p = f"blocks.{n}"
        for attn in ("self_attn", "cross_attn"):
            for m in ("q", "k", "v", "o"):
                b.linear(f"{p}.{attn}.{m}", width, width)
            b.param(f"{p}.{attn}.norm_q.weight", width)
            b.param(f"{p}.{attn}.norm_k.weight", width)
        if image:
            b.linear(f"{p}.cross_attn.k_img", width, width)
            b.linear(f"{p}.cross_attn.v_img", width, width)
            b.param(f"{p}.cross_attn.norm_k_img.weight", width)
        b.param(f"{p}.norm3.weight", width)
        b.param(f"{p}.norm3.bias", width)
        b.linear(f"{p}.ffn.0", ffn, width)
        b.linear(f"{p}.ffn.2", width, ffn)
        b.param(f"{p}.modulation", 1, 6, width)
    b.linear("head.head", 4 * (48 if channels == 48 else 16), width)  # latent channels x the 1x2x2 patch
    b.param("head.modulation", 1, 2, width)
    if image:
        b.linear("img_emb.proj.1", 1280, 1280)
        b.linear("img_emb.proj.3", width, 1280)
    return b.keys


def wan_diffusers_transformer() -> Layout:
    width = 1536
    b = _Builder()
    b.param("patch_embedding.weight", width, 16, 1, 2, 2)
    b.linear("condition_embedder.time_embedder.linear_1", width, 256)
    for n in range(30):
        for attn in ("attn1", "attn2"):
            for m in ("to_q", "to_k", "to_v", "to_out.0"):
                b.linear(f"blocks.{n}.{attn}.{m}", width, width)
        b.linear(f"blocks.{n}.ffn.net.0.proj", 8960, width)
        b.linear(f"blocks.{n}.ffn.net.2", width, 8960)
        b.param(f"blocks.{n}.scale_shift_table", 1, 6, width)
    b.linear("proj_out", 64, width)
    return b.keys


def lumina2_transformer() -> Layout:
    """Lumina-Image 2.0 in NextDiT names: GQA q/k/v fused as 2304 + 768 + 768 rows."""
    width = 2304
    b = _Builder(bias=False)
    b.linear("x_embedder", width, 64)
    b.param("cap_embedder.0.weight", 2304)
    b.linear("cap_embedder.1", width, 2304)
    for n in range(26):
        b.linear(f"layers.{n}.attention.qkv", 3840, width)
        b.linear(f"layers.{n}.attention.out", width, width)
        for m in ("w1", "w3"):
            b.linear(f"layers.{n}.feed_forward.{m}", 6144, width)
        b.linear(f"layers.{n}.feed_forward.w2", width, 6144)
        b.linear(f"layers.{n}.adaLN_modulation.1", 4 * width, 1024)
    return b.keys


def sd3_transformer(variant: str = "sd3-medium") -> Layout:
    """SAI MMDiT names (``joint_blocks``), as the single files hold them under ``model.diffusion_model.``."""
    depth = 38 if variant == "sd3.5-large" else 24
    width = 64 * depth
    b = _Builder()
    b.param("pos_embed", 1, 36864, width)
    b.param("x_embedder.proj.weight", width, 16, 2, 2)
    b.linear("context_embedder", width, 4096)
    b.linear("t_embedder.mlp.0", width, 256)
    b.linear("y_embedder.mlp.0", width, 2048)
    for n in range(depth):
        for block in ("x_block", "context_block"):
            p = f"joint_blocks.{n}.{block}"
            b.linear(f"{p}.attn.qkv", 3 * width, width)
            b.linear(f"{p}.attn.proj", width, width)
            b.linear(f"{p}.adaLN_modulation.1", 6 * width, width)
            b.linear(f"{p}.mlp.fc1", 4 * width, width)
            b.linear(f"{p}.mlp.fc2", width, 4 * width)
            if variant != "sd3-medium":
                b.param(f"{p}.attn.ln_q.weight", 64)
                b.param(f"{p}.attn.ln_k.weight", 64)
        if variant == "sd3.5-medium" and n < 13:
            b.linear(f"joint_blocks.{n}.x_block.attn2.qkv", 3 * width, width)
            b.linear(f"joint_blocks.{n}.x_block.attn2.proj", width, width)
    b.linear("final_layer.linear", 64, width)
    return b.keys


def hunyuan_video_transformer() -> Layout:
    width = 3072
    b = _Builder()
    b.param("img_in.proj.weight", width, 16, 1, 2, 2)
    b.linear("txt_in.individual_token_refiner.blocks.0.self_attn_qkv", 3 * width, width)
    _mmdit_blocks(b, width, (20, 40),
                  ("_mod.linear", "_attn_qkv", "_attn_proj", "_mlp.fc1", "_mlp.fc2", "modulation.linear"))
    return b.keys


def ltx_transformer(audio: bool = False) -> Layout:
    """LTX-Video in its own names (ComfyUI); ``audio``: LTX-2's audio stream too."""
    width = 4096 if audio else 2048
    b = _Builder()
    b.linear("patchify_proj", width, 128)
    b.linear("adaln_single.linear", 6 * width, width)
    b.linear("adaln_single.emb.timestep_embedder.linear_1", width, 256)
    b.linear("caption_projection.linear_1", width, 3840 if audio else 4096)
    b.param("scale_shift_table", 2, width)
    for n in range(48 if audio else 28):
        for attn in ("attn1", "attn2"):
            for m in ("to_q", "to_k", "to_v", "to_out.0"):
                b.linear(f"transformer_blocks.{n}.{attn}.{m}", width, width)
        b.linear(f"transformer_blocks.{n}.ff.net.0.proj", 4 * width, width)
        b.linear(f"transformer_blocks.{n}.ff.net.2", width, 4 * width)
        if audio:
            b.linear(f"transformer_blocks.{n}.audio_attn1.to_q", 2048, 2048)
    if audio:
        b.linear("audio_patchify_proj", 2048, 128)
    b.linear("proj_out", 128, width)
    return b.keys


def hidream_transformer() -> Layout:
    width = 2560
    b = _Builder()
    for n in range(16):
        p = f"double_stream_blocks.{n}.block"
        for m in ("to_q", "to_k", "to_v", "to_out", "to_q_t", "to_k_t", "to_v_t", "to_out_t"):
            b.linear(f"{p}.attn1.{m}", width, width)
        b.linear(f"{p}.adaLN_modulation.1", 12 * width, width)
        for e in range(4):
            b.linear(f"{p}.ff_i.experts.{e}.w1", 6912, width)
    for n in range(32):
        b.linear(f"single_stream_blocks.{n}.block.attn1.to_q", width, width)
    for n in range(49):
        b.linear(f"caption_projection.{n}.linear", width, 4096)
    return b.keys


# -- VAEs -----------------------------------------------------------------------------------------------------
def wan_vae(latent: int = 16) -> Layout:
    """Wan's own VAE names (``wan_2.1_vae``, Wan 2.2's 48-channel one)."""
    dim = 96 if latent == 16 else 160
    b = _Builder()
    b.param("encoder.conv1.weight", dim, 3 if latent == 16 else 12, 3, 3, 3)
    for part in ("encoder", "decoder"):
        b.param(f"{part}.middle.0.residual.0.gamma", 4 * dim, 1, 1, 1)
        b.param(f"{part}.middle.0.residual.2.weight", 4 * dim, 4 * dim, 3, 3, 3)
    b.param("encoder.downsamples.0.residual.0.gamma", dim, 1, 1, 1)
    b.param("decoder.conv1.weight", 4 * dim, latent, 3, 3, 3)
    b.param("decoder.head.0.gamma", dim, 1, 1, 1)
    b.param("conv1.weight", 2 * latent, 2 * latent, 1, 1, 1)
    b.param("conv2.weight", latent, latent, 1, 1, 1)
    return b.keys


def qwen_image_vae() -> Layout:
    """diffusers ``AutoencoderKLQwenImage`` (Wan 2.1's VAE architecture) in diffusers names."""
    b = _Builder()
    b.param("encoder.conv_in.weight", 96, 3, 3, 3, 3)
    b.param("encoder.down_blocks.0.resnets.0.norm1.gamma", 96, 1, 1, 1)
    b.param("encoder.mid_block.resnets.0.norm1.gamma", 384, 1, 1, 1)
    b.param("decoder.conv_in.weight", 384, 16, 3, 3, 3)
    b.param("decoder.mid_block.resnets.0.norm1.gamma", 384, 1, 1, 1)
    b.param("quant_conv.weight", 32, 32, 1, 1, 1)
    b.param("post_quant_conv.weight", 16, 16, 1, 1, 1)
    return b.keys


def image_vae(latent: int, batch_norm: bool = False) -> Layout:
    """The LDM/BFL autoencoder (``ae.safetensors``): 16 latent channels for FLUX.1/SD3, 32 and a batch norm for
    FLUX.2."""
    b = _Builder()
    b.param("encoder.conv_in.weight", 128, 3, 3, 3)
    b.param("encoder.down.0.block.0.conv1.weight", 128, 128, 3, 3)
    b.param("encoder.conv_out.weight", 2 * latent, 512, 3, 3)
    b.param("decoder.conv_in.weight", 512, latent, 3, 3)
    b.param("decoder.up.0.block.0.conv1.weight", 128, 256, 3, 3)
    b.param("decoder.conv_out.weight", 3, 128, 3, 3)
    if batch_norm:
        b.param("bn.running_mean", 4 * latent)
        b.param("bn.running_var", 4 * latent)
    return b.keys


def ltx_vae() -> Layout:
    b = _Builder()
    b.param("per_channel_statistics.mean-of-means", 128)
    b.param("per_channel_statistics.std-of-means", 128)
    b.param("encoder.conv_in.conv.weight", 128, 3, 3, 3, 3)
    b.param("decoder.conv_in.conv.weight", 1024, 128, 3, 3, 3)
    return b.keys


def hunyuan_video_vae() -> Layout:
    b = _Builder()
    b.param("encoder.conv_in.conv.weight", 128, 3, 3, 3, 3)
    b.param("encoder.down_blocks.0.resnets.0.conv1.conv.weight", 128, 128, 3, 3, 3)
    b.param("decoder.conv_in.conv.weight", 512, 16, 3, 3, 3)
    b.param("decoder.mid_block.resnets.0.conv1.conv.weight", 512, 512, 3, 3, 3)
    return b.keys


# -- text encoders --------------------------------------------------------------------------------------------
def t5_encoder(umt5: bool, depth: int = 24) -> Layout:
    """transformers names of a T5/UMT5 encoder: UMT5 has a relative position bias in every block."""
    b = _Builder(bias=False)
    b.param("shared.weight", 256384 if umt5 else 32128, 4096)
    for n in range(depth):
        p = f"encoder.block.{n}.layer"
        for m in ("q", "k", "v", "o"):
            b.linear(f"{p}.0.SelfAttention.{m}", 4096, 4096)
        if umt5 or n == 0:
            b.param(f"{p}.0.SelfAttention.relative_attention_bias.weight", 32, 64)
        b.linear(f"{p}.1.DenseReluDense.wi_0", 10240, 4096)
        b.linear(f"{p}.1.DenseReluDense.wo", 4096, 10240)
    b.param("encoder.final_layer_norm.weight", 4096)
    return b.keys


def llm(kind: str, depth: int = 4) -> Layout:
    """A decoder-only language model in transformers names (``model.layers.N...``)."""
    width, ffn = {"qwen2.5-vl": (3584, 18944), "qwen3-4b": (2560, 9728), "qwen3-8b": (4096, 12288),
                  "mistral3": (5120, 32768), "gemma2": (2304, 9216)}[kind]
    b = _Builder(bias=False)
    b.param("model.embed_tokens.weight", 151936, width)
    for n in range(depth):
        p = f"model.layers.{n}"
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            b.linear(f"{p}.self_attn.{m}", width, width)
            if kind == "qwen2.5-vl" and m != "o_proj":
                b.param(f"{p}.self_attn.{m}.bias", width)
        if kind.startswith("qwen3"):
            b.param(f"{p}.self_attn.q_norm.weight", 128)
            b.param(f"{p}.self_attn.k_norm.weight", 128)
        for m in ("gate_proj", "up_proj"):
            b.linear(f"{p}.mlp.{m}", ffn, width)
        b.linear(f"{p}.mlp.down_proj", width, ffn)
        b.param(f"{p}.input_layernorm.weight", width)
        if kind == "gemma2":
            b.param(f"{p}.pre_feedforward_layernorm.weight", width)
            b.param(f"{p}.post_feedforward_layernorm.weight", width)
    if kind == "qwen2.5-vl":
        b.linear("visual.blocks.0.attn.qkv", 3840, 1280)
    return b.keys


def comfy_fp8_scaled(keys: Layout) -> Layout:
    """ComfyUI's older fp8-scaled text encoders: ``scale_weight``/``scale_input`` per Linear, a ``scaled_fp8``
    marker tensor."""
    return {**fp8_scaled(keys, names=("scale_weight", "scale_input")), "scaled_fp8": [0]}


# -- LoRAs ----------------------------------------------------------------------------------------------------
def lora(modules: dict[str, tuple[int, int]], prefix: str, rank: int = 16, up: str = "lora_B.weight",
         down: str = "lora_A.weight") -> Layout:
    """A LoRA on ``modules`` (name → (out, in) of the module)."""
    keys: Layout = {}
    for name, (out, inp) in modules.items():
        keys[f"{prefix}{name}.{down}"] = [rank, inp]
        keys[f"{prefix}{name}.{up}"] = [out, rank]
    return keys


def modules_of(model: Layout, keep: Iterable[str] = ("",)) -> dict[str, tuple[int, int]]:
    """The Linear modules (2-D ``.weight``) of a model layout whose names contain one of ``keep``."""
    keep = tuple(keep)
    return {k.removesuffix(".weight"): (v[0], v[1]) for k, v in model.items()
            if k.endswith(".weight") and len(v) == 2 and any(s in k for s in keep)}
