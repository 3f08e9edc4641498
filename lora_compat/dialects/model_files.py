"""Model files (transformers, VAEs, text encoders) of the families people train LoRAs for now, named from a few
parameters only that model has. Each is looked up by its exact name under the prefixes files carry, so telling
what a file is costs a few dictionary look-ups, never a pass over its keys.

FLUX.1 transformers are not listed: what a FLUX.1 checkpoint gives today is kept (see the notes of issue 14)."""
from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat
from typing import Callable, Mapping

from ..files import Header

Shapes = Mapping[str, tuple[int, ...]]
#: prefixes a transformer's parameters carry: bare (diffusers component, ComfyUI ``diffusion_models/``),
#: ComfyUI/ldm single files, Cosmos-style ``net.``
TRANSFORMER_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.", "model.")
#: prefixes of a stand-alone VAE or text encoder (bare, or the model's own wrapper names)
VAE_PREFIXES = ("", "vae.")
LLM_PREFIXES = ("model.", "model.language_model.", "language_model.model.", "")
#: key endings only adapter files carry (``.scale``/``.alpha`` are model parameters too: RMSNorm scales, Snake)
ADAPTER_ENDINGS = (".lora_A.weight", ".lora_B.weight", ".lora_down.weight", ".lora_up.weight", ".lora.down.weight",
                   ".lora.up.weight", ".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w2_a", ".hada_w1_a", ".hada_w2_a",
                   ".oft_blocks", ".oft_diag", ".dora_scale", ".lora_magnitude_vector", ".diff", ".diff_b",
                   ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight")
#: ComfyUI's fp8-scaled files: one of these beside each quantised weight (or a ``scaled_fp8`` marker tensor)
FP8_SCALES = ("scale_weight", "weight_scale")
#: the DiT ControlNets (diffusers ``SD3ControlNetModel``, ``QwenImageControlNetModel``...) copy the transformer's
#: blocks: not named as the transformer
CONTROLNET_MARKERS = ("controlnet_blocks.0.weight", "controlnet_x_embedder.weight", "controlnet_blocks.0.linear.weight")


@dataclass(frozen=True)
class Signature:
    """A model whose files hold every one of ``markers`` (module parameter names) under one prefix;
    ``name(shapes, prefix)`` says what the file is, with the variant where its shapes tell it."""

    markers: tuple[str, ...]
    name: Callable[[Shapes, str], str | None]
    prefixes: tuple[str, ...] = TRANSFORMER_PREFIXES


def _fixed(text: str) -> Callable[[Shapes, str], str]:
    return lambda shapes, prefix: text


def _flux2(shapes: Shapes, prefix: str) -> str:
    key = next(k for k in (f"{prefix}double_stream_modulation_img.lin.weight",
                           f"{prefix}double_stream_modulation_img.linear.weight") if k in shapes)
    width = shapes[key][-1]
    variant = {6144: "FLUX.2 [dev]", 3072: "FLUX.2 [klein] 4B", 4096: "FLUX.2 [klein] 9B"}.get(width)
    return f"a FLUX.2 transformer checkpoint ({variant or f'width {width}'})"


def _wan(shapes: Shapes, prefix: str) -> str:
    q = shapes.get(f"{prefix}blocks.0.self_attn.q.weight") or shapes.get(f"{prefix}blocks.0.attn1.to_q.weight")
    width = q[0] if q else None
    image_attention = (f"{prefix}blocks.0.cross_attn.k_img.weight" in shapes
                       or f"{prefix}blocks.0.attn2.add_k_proj.weight" in shapes)
    channels = shapes[f"{prefix}patch_embedding.weight"][1]
    variant = {1536: "Wan 2.1 T2V 1.3B", 3072: "Wan 2.2 TI2V 5B"}.get(width) if width else None
    if width == 5120:
        variant = ("Wan 2.1 I2V/FLF2V 14B" if image_attention else
                   "Wan 2.2 I2V A14B expert" if channels == 36 else "Wan 14B T2V: 2.1, or a 2.2 A14B expert")
    return f"a Wan transformer checkpoint ({variant or f'width {width}'})"


def _nextdit(shapes: Shapes, prefix: str) -> str:
    rows, columns = shapes[f"{prefix}layers.0.attention.qkv.weight"][:2]
    # Z-Image: q, k and v of the full width; Lumina-Image 2.0 (GQA): k and v narrower
    return ("a Z-Image transformer checkpoint" if rows == 3 * columns
            else f"a Lumina-Image 2.0 transformer checkpoint (q/k/v rows {rows} at width {columns})")


def _sd3(shapes: Shapes, prefix: str) -> str:
    depth = 0
    while f"{prefix}joint_blocks.{depth}.x_block.attn.qkv.weight" in shapes:
        depth += 1
    if f"{prefix}joint_blocks.0.x_block.attn2.qkv.weight" in shapes:
        variant = "SD3.5 Medium"
    elif depth >= 38:
        variant = "SD3.5 Large"
    elif f"{prefix}joint_blocks.0.x_block.attn.ln_q.weight" not in shapes and depth == 24:
        variant = "SD3 Medium"
    else:
        variant = None
    return f"an SD3 transformer checkpoint{f' ({variant})' if variant else ''}"


def _ltx(shapes: Shapes, prefix: str) -> str:
    audio = f"{prefix}audio_patchify_proj.weight" in shapes or f"{prefix}audio_proj_in.weight" in shapes
    return f"an {'LTX-2' if audio else 'LTX-Video'} transformer checkpoint"


def _video_vae(shapes: Shapes, prefix: str) -> str:
    key = f"{prefix}conv2.weight" if f"{prefix}conv2.weight" in shapes else f"{prefix}post_quant_conv.weight"
    latent = shapes[key][0] if key in shapes else None
    if latent == 48:
        return "a Wan 2.2 VAE checkpoint"
    return "a Wan 2.1 / Qwen-Image VAE checkpoint"


def _image_vae(shapes: Shapes, prefix: str) -> str | None:
    latent = shapes[f"{prefix}decoder.conv_in.weight"][1]
    if latent == 16 and len(shapes[f"{prefix}decoder.conv_in.weight"]) == 4:
        return ("a VAE checkpoint with 16 latent channels (the FLUX.1 / SD3 autoencoder, also used by Chroma, "
                "HiDream, Lumina 2 and Z-Image)")
    if latent == 32 and f"{prefix}bn.running_mean" in shapes:
        return "a FLUX.2 VAE checkpoint"
    return None  # an SD VAE, or one of a family named nowhere here: the generic message


def _llm(shapes: Shapes, prefix: str) -> str | None:
    layer = f"{prefix}layers.0."
    width = shapes[f"{layer}self_attn.q_proj.weight"][1]
    vision = any(k in shapes for k in ("visual.blocks.0.attn.qkv.weight", "model.visual.blocks.0.attn.qkv.weight"))
    if f"{layer}pre_feedforward_layernorm.weight" in shapes:
        name = ("a Gemma 3 text encoder" if f"{layer}self_attn.q_norm.weight" in shapes
                else "a Gemma 2 text encoder (Lumina 2's)")
    elif f"{layer}self_attn.q_norm.weight" in shapes:
        users = {1024: "Anima's", 2560: "Z-Image's, FLUX.2 [klein] 4B's", 4096: "FLUX.2 [klein] 9B's"}.get(width)
        name = f"a Qwen3 text encoder (width {width}{f': {users}' if users else ''})"
    elif f"{layer}self_attn.q_proj.bias" in shapes:
        name = ("a Qwen2.5-VL text encoder (Qwen-Image's)" if vision or width == 3584
                else f"a Qwen2/2.5 text encoder (width {width})")
    elif width == 5120:
        name = "a Mistral Small 3 text encoder (FLUX.2 [dev]'s)"
    else:
        name = f"a Llama-style text encoder (width {width})"
    return name


def _t5(shapes: Shapes, prefix: str) -> str | None:
    # UMT5 keeps a relative position bias in every block; T5 only in the first
    if f"{prefix}encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in shapes:
        return "a UMT5 text encoder (Wan's)"
    return None


SIGNATURES: tuple[Signature, ...] = (
    Signature(("double_stream_modulation_img.lin.weight",), _flux2),
    Signature(("double_stream_modulation_img.linear.weight",), _flux2),
    Signature(("distilled_guidance_layer.in_proj.weight",), _fixed("a Chroma transformer checkpoint")),
    Signature(("double_blocks.0.img_mod.lin.weight", "single_blocks.0.modulation.lin.weight"),
              _fixed("a FLUX.1 transformer checkpoint")),
    Signature(("transformer_blocks.0.img_mod.1.weight", "transformer_blocks.0.img_mlp.net.0.proj.weight"),
              _fixed("a Qwen-Image transformer checkpoint")),
    Signature(("patch_embedding.weight", "blocks.0.self_attn.q.weight"), _wan),
    Signature(("patch_embedding.weight", "blocks.0.attn1.to_q.weight"), _wan),
    Signature(("layers.0.attention.qkv.weight", "cap_embedder.1.weight"), _nextdit),
    Signature(("all_x_embedder.2-1.weight",), _fixed("a Z-Image transformer checkpoint (diffusers names)")),
    Signature(("layers.0.attn.to_q.weight", "time_caption_embed.timestep_embedder.linear_1.weight"),
              _fixed("a Lumina-Image 2.0 transformer checkpoint (diffusers names)")),
    Signature(("joint_blocks.0.x_block.attn.qkv.weight",), _sd3),
    Signature(("transformer_blocks.0.norm1_context.linear.weight", "pos_embed.proj.weight"),
              _fixed("an SD3 transformer checkpoint (diffusers names)")),
    Signature(("double_blocks.0.img_attn_qkv.weight", "double_blocks.0.img_mod.linear.weight"),
              _fixed("a HunyuanVideo transformer checkpoint")),
    Signature(("context_embedder.token_refiner.refiner_blocks.0.attn.to_q.weight",),
              _fixed("a HunyuanVideo transformer checkpoint (diffusers names)")),
    Signature(("patchify_proj.weight", "transformer_blocks.0.attn1.to_q.weight"), _ltx),
    Signature(("proj_in.weight", "time_embed.emb.timestep_embedder.linear_1.weight",
               "transformer_blocks.0.attn1.to_q.weight"), _ltx),
    Signature(("double_stream_blocks.0.block.attn1.to_q.weight",), _fixed("a HiDream-I1 transformer checkpoint")),
    Signature(("decoder.middle.0.residual.0.gamma",), _video_vae, VAE_PREFIXES),
    Signature(("decoder.mid_block.resnets.0.norm1.gamma",), _video_vae, VAE_PREFIXES),
    Signature(("per_channel_statistics.mean-of-means",), _fixed("an LTX-Video VAE checkpoint"), VAE_PREFIXES),
    Signature(("decoder.conv_in.conv.weight", "encoder.conv_in.conv.weight"),
              _fixed("a causal 3D video VAE checkpoint (HunyuanVideo or LTX-Video)"), VAE_PREFIXES),
    Signature(("decoder.conv_in.weight",), _image_vae, VAE_PREFIXES),
    Signature(("layers.0.self_attn.q_proj.weight", "layers.0.mlp.gate_proj.weight"), _llm, LLM_PREFIXES),
    Signature(("encoder.block.0.layer.0.SelfAttention.q.weight",), _t5, ("",)),
    Signature(("token_embedding.weight", "blocks.0.pos_embedding.embedding.weight"),
              _fixed("a UMT5 text encoder (Wan's, in Wan's own names)"), ("",)),
)


def has_adapter_tensors(header: Header) -> bool:
    """Whether any key is a LoRA/LyCORIS tensor (one walk over the keys, in C)."""
    return any(map(str.endswith, header.keys(), repeat(ADAPTER_ENDINGS)))


def fp8_scaled(header: Header, key: str) -> bool:
    """ComfyUI's fp8-scaled layout: a ``scaled_fp8`` marker, or a scale beside the weight ``key``."""
    module = key.removesuffix(".weight")
    return "scaled_fp8" in header or any(f"{module}.{scale}" in header for scale in FP8_SCALES)


def identify(header: Header) -> str | None:
    """What a model file of a family listed in :data:`SIGNATURES` is (``"a FLUX.2 transformer checkpoint
    (FLUX.2 [dev])"``), or ``None``: another model, or a file with adapter tensors."""
    shapes = header.shapes
    for signature in SIGNATURES:
        for prefix in signature.prefixes:
            if all(prefix + marker in shapes for marker in signature.markers):
                if has_adapter_tensors(header) or any(prefix + m in shapes for m in CONTROLNET_MARKERS):
                    return None
                name = signature.name(shapes, prefix)
                if name is None:
                    break
                marker = prefix + signature.markers[0]
                return f"{name}, ComfyUI fp8-scaled" if fp8_scaled(header, marker) else name
    return None
