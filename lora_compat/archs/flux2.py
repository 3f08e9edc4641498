"""FLUX.2 (dev, Klein 4B / 9B): diffusers' ``Flux2Transformer2DModel``, its BFL (original / ComfyUI) names and the
text encoders (Mistral 3 for dev, Qwen3 for Klein).

The BFL layout is FLUX.1's machinery (:class:`~lora_compat.archs.flux.BflNames`) with FLUX.2's tables: the double
blocks' ``img_attn.qkv`` / ``txt_attn.qkv`` are fused (split into ``to_q/k/v`` / ``add_{q,k,v}_proj`` in
diffusers); a single block's ``linear1`` is fused in both layouts (``attn.to_qkv_mlp_proj``: q, k, v and the SwiGLU
input rows), so it maps one-to-one; the modulation is shared across blocks (``double_stream_modulation_img.lin``
...) instead of FLUX.1's per-block ``img_mod``/``modulation``. Maps from diffusers 0.42.1's
``convert_flux2_transformer_checkpoint_to_diffusers`` and ``_convert_non_diffusers_flux2_lora_to_diffusers``.
"""
from __future__ import annotations

from functools import partial
from typing import Iterable, Mapping

from .base import Arch
from .flux import BflNames, bfl_parts, canonical_from_bfl, rows_from_file
from .names import HostNames
from .routes import FusedLayout, ModuleTable

#: BFL module in ``double_blocks.N`` → the canonical modules in ``transformer_blocks.N``, in row order
DOUBLE_BLOCK = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.linear_in",),
    "img_mlp.2": ("ff.linear_out",),
    "txt_mlp.0": ("ff_context.linear_in",),
    "txt_mlp.2": ("ff_context.linear_out",),
    "img_attn.norm.query_norm": ("attn.norm_q",),
    "img_attn.norm.key_norm": ("attn.norm_k",),
    "txt_attn.norm.query_norm": ("attn.norm_added_q",),
    "txt_attn.norm.key_norm": ("attn.norm_added_k",),
}
#: BFL module in ``single_blocks.N`` → canonical modules in ``single_transformer_blocks.N``
SINGLE_BLOCK = {
    "linear1": ("attn.to_qkv_mlp_proj",),
    "linear2": ("attn.to_out",),
    "norm.query_norm": ("attn.norm_q",),
    "norm.key_norm": ("attn.norm_k",),
}
TOP_LEVEL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
    "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
    "single_stream_modulation.lin": "single_stream_modulation.linear",
    "final_layer.linear": "proj_out",
    # BFL chunks it (shift, scale), diffusers (scale, shift), as in FLUX.1
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
FLUX2_BFL = BflNames(DOUBLE_BLOCK, SINGLE_BLOCK, TOP_LEVEL)


def is_flux2_transformer(modules: ModuleTable | Mapping[str, object]) -> bool:
    """diffusers ``Flux2Transformer2DModel`` module names (the shared modulation, or the fused single block)."""
    return "double_stream_modulation_img.linear" in modules or "single_transformer_blocks.0.attn.to_qkv_mlp_proj" \
        in modules


def is_bfl_flux2(modules: ModuleTable | Mapping[str, object]) -> bool:
    """FLUX.2 under its BFL / ComfyUI names (the shared modulation names only FLUX.2 has)."""
    return "double_stream_modulation_img.lin" in modules or "single_stream_modulation.lin" in modules


def _flux2_hint(metadata: Mapping[str, str]) -> bool:
    version = metadata.get("ss_base_model_version", "").lower()
    arch = metadata.get("modelspec.architecture", "").lower()
    return any(v.replace("_", "-").replace(".", "-").startswith(("flux-2", "flux2")) for v in (version, arch))


#: Klein's sizes, each with a table of its own (the main table is FLUX.2-dev with its Mistral 3 text encoder)
VARIANT_TABLES = {"flux2-klein-4b": "flux2-klein-4b.json.gz", "flux2-klein-9b": "flux2-klein-9b.json.gz"}


def variant_of(targets: Iterable[str], table: str | None) -> str | None:
    """The variant whose table the file's shapes fit: a Klein table by name, else FLUX.2-dev (width 6144 is
    dev's alone)."""
    return table if table is not None else "flux2-dev"


FLUX2 = Arch(
    id="flux2", title="FLUX.2 (dev, Klein 4B/9B)", table_file="flux2.json.gz",
    kohya_prefixes={"lora_unet_": "transformer", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"},
    metadata_hint=_flux2_hint,
    component_classes={"transformer": ("Flux2Transformer2DModel",),
                       "text_encoder": ("Mistral3ForConditionalGeneration", "Qwen3ForCausalLM")},
    fused_layout=FusedLayout(is_flux2_transformer, is_bfl_flux2, partial(bfl_parts, names=FLUX2_BFL),
                             partial(canonical_from_bfl, names=FLUX2_BFL), partial(rows_from_file, names=FLUX2_BFL)),
    # the transformer under its BFL names (ComfyUI runs FLUX.2 under them; musubi-tuner writes them flattened);
    # the LLM encoder under sd-scripts' lora_te_ with its transformers paths
    host_names={"transformer": HostNames("lora_unet_"), "text_encoder": HostNames("lora_te_")},
    checkpoint_prefixes={"model.diffusion_model.": "transformer"},
    comfy_classes=("Flux2",),
    catalog_names=("flux.2 d", "flux.2 klein 4b", "flux.2 klein 9b", "flux.2 klein 4b-base", "flux.2 klein 9b-base"),
    variant_tables=VARIANT_TABLES, variant_of=variant_of,
)

_TRANSFORMER = dict(patch_size=1, in_channels=128, attention_head_dim=128, timestep_guidance_channels=256,
                    mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6)
#: the official configs (diffusers ``scripts/convert_flux2_to_diffusers.py``)
TRANSFORMERS = {
    "flux2-dev": dict(_TRANSFORMER, num_layers=8, num_single_layers=48, num_attention_heads=48,
                      joint_attention_dim=15360),
    "flux2-klein-4b": dict(_TRANSFORMER, num_layers=5, num_single_layers=20, num_attention_heads=24,
                           joint_attention_dim=7680, guidance_embeds=False),
    "flux2-klein-9b": dict(_TRANSFORMER, num_layers=8, num_single_layers=24, num_attention_heads=32,
                           joint_attention_dim=12288, guidance_embeds=False),
}
#: FLUX.2-dev's encoder: Mistral-Small-3.2-24B-Instruct-2506 (its published config)
MISTRAL3 = dict(
    text_config=dict(model_type="mistral", hidden_size=5120, intermediate_size=32768, num_hidden_layers=40,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=131072,
                     max_position_embeddings=131072, rms_norm_eps=1e-5),
    vision_config=dict(model_type="pixtral", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                       num_attention_heads=16, head_dim=64, patch_size=14, image_size=1540, num_channels=3),
    spatial_merge_size=2, multimodal_projector_bias=False, projector_hidden_act="gelu", vision_feature_layer=-1)
_QWEN3 = dict(num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936)
#: Klein's encoders (joint_attention_dim = 3 x their hidden size): Qwen3-4B and Qwen3-8B, their published configs
QWEN3 = {"flux2-klein-4b": dict(_QWEN3, hidden_size=2560, intermediate_size=9728, tie_word_embeddings=True),
         "flux2-klein-9b": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, tie_word_embeddings=False)}

FLUX2_CONFIGS = {"transformer": ("Flux2Transformer2DModel", TRANSFORMERS["flux2-dev"]),
                 "text_encoder": ("Mistral3ForConditionalGeneration", MISTRAL3)}
#: table name → configs, for ``generate_tables``
FLUX2_VARIANT_CONFIGS = {name: {"transformer": ("Flux2Transformer2DModel", TRANSFORMERS[name]),
                                "text_encoder": ("Qwen3ForCausalLM", QWEN3[name])} for name in VARIANT_TABLES}
