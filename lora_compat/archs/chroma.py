"""Chroma (Chroma1-HD / -Base / -Flash): diffusers' ``ChromaTransformer2DModel``, a FLUX.1-schnell derivative.

Its modules are FLUX.1's without the per-block modulation (``norm1.linear``, ``norm1_context.linear``, the single
blocks' ``norm.linear``, ``norm_out.linear``) and without the time/text/guidance embedders; the modulation comes
from one ``distilled_guidance_layer`` (the approximator). The BFL (ComfyUI / ai-toolkit) layout and its fused
``qkv``/``linear1`` are FLUX.1's (:mod:`.flux`'s fused layout, which also names the approximator's BFL modules).
Its one text encoder is T5-XXL (``text_encoder`` in ``ChromaPipeline``).

Chroma files are FLUX.1 files by names and shapes unless they patch the approximator or their metadata says
Chroma: the family :attr:`~lora_compat.archs.base.Arch.derives_from` FLUX.1, so such a tie stays ``flux1``.
"""
from __future__ import annotations

from typing import Mapping

from .base import Arch
from .flux import FLUX1, FLUX1_CONFIGS
from .names import HostNames
from .routes import ModuleTable

#: the approximator's first module, named alike in both layouts
APPROXIMATOR = "distilled_guidance_layer.in_proj"


def _structure(components: Mapping[str, ModuleTable]) -> bool:
    layout = FLUX1.fused_layout
    return layout is not None and any(APPROXIMATOR in m and (layout.is_split(m) or layout.is_fused(m))
                                      for m in components.values())


def _chroma_hint(metadata: Mapping[str, str]) -> bool:
    return any("chroma" in str(metadata.get(k, "")).lower() for k in ("ss_base_model_version",
                                                                       "modelspec.architecture"))


CHROMA = Arch(
    id="chroma", title="Chroma (FLUX.1-schnell derivative)", table_file="chroma.json.gz",
    # sd-scripts writes the transformer under lora_unet_ (BFL names), T5 under lora_te3_; OneTrainer
    # lora_transformer_ (diffusers names) and T5 under lora_te2_ as for FLUX.1
    kohya_prefixes={"lora_unet_": "transformer", "lora_transformer_": "transformer", "lora_te2_": "text_encoder",
                    "lora_te3_": "text_encoder"},
    metadata_hint=_chroma_hint, derives_from="flux1",
    component_classes={"transformer": ("ChromaTransformer2DModel",)},
    fused_layout=FLUX1.fused_layout, model_hint=_structure,
    host_names={"transformer": HostNames("lora_unet_"), "text_encoder": HostNames("lora_te3_", encoder="t5")},
    checkpoint_prefixes={"model.diffusion_model.": "transformer"}, comfy_classes=("Chroma",),
    catalog_names=("chroma",),
    comfy_text_encoders={"text_encoder": "text_encoders.t5xxl.transformer."},
    blocks=FLUX1.blocks,
)

#: Chroma1's config (diffusers' defaults: 19 double + 38 single blocks, 24 heads of 128, T5-XXL at 4096) and T5-XXL
CHROMA_CONFIGS = {
    "transformer": ("ChromaTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, axes_dims_rope=(16, 56, 56), approximator_num_channels=64,
        approximator_hidden_dim=5120, approximator_layers=5)),
    "text_encoder": FLUX1_CONFIGS["text_encoder_2"],
}
