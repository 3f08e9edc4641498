"""Stable Diffusion 3 / 3.5: diffusers' ``SD3Transformer2DModel`` and the native (SAI MMDiT / ComfyUI / sd-scripts)
names of its modules, with CLIP-L, CLIP-G and T5-XXL as ``text_encoder``, ``text_encoder_2``, ``text_encoder_3``.

Canonical targets are the diffusers names. The native layout fuses q, k, v: ``joint_blocks.N.x_block.attn.qkv``
stacks ``attn.to_q/to_k/to_v`` by rows (``context_block.attn.qkv``: ``add_q/k/v_proj``; SD3.5-Medium's
``x_block.attn2.qkv``: ``attn2.to_q/k/v``), with the row ranges from the model's own shapes, as FLUX.1's BFL layout
(:class:`~lora_compat.archs.routes.FusedLayout`). The AdaLayerNormContinuous modulations (``final_layer`` and the
last block's context ``adaLN_modulation.1``; the last block is ``context_pre_only``: no context proj/mlp) are chunked
(shift, scale) natively and (scale, shift) in diffusers: their output halves swap. The map is diffusers'
``convert_sd3_transformer_checkpoint_to_diffusers`` (single_file_utils) read backwards.
"""
from __future__ import annotations

import re
from functools import partial
from typing import Iterable, Mapping

from .base import Arch
from .flux import FLUX1_CONFIGS, rows_from_file
from .names import HostNames
from .routes import FusedLayout, ModuleTable, ParamShapes, Part, Route, stacked_parts
from .sd import OFFICIAL_CONFIGS

#: native module in ``joint_blocks.N.x_block`` → the canonical modules in ``transformer_blocks.N``, in row order
X_BLOCK = {
    "attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "attn.proj": ("attn.to_out.0",),
    "attn.ln_q": ("attn.norm_q",), "attn.ln_k": ("attn.norm_k",),
    "attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"), "attn2.proj": ("attn2.to_out.0",),
    "attn2.ln_q": ("attn2.norm_q",), "attn2.ln_k": ("attn2.norm_k",),
    "mlp.fc1": ("ff.net.0.proj",), "mlp.fc2": ("ff.net.2",), "adaLN_modulation.1": ("norm1.linear",),
}
#: native module in ``joint_blocks.N.context_block`` → canonical modules in ``transformer_blocks.N``
CONTEXT_BLOCK = {
    "attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "attn.proj": ("attn.to_add_out",),
    "attn.ln_q": ("attn.norm_added_q",), "attn.ln_k": ("attn.norm_added_k",),
    "mlp.fc1": ("ff_context.net.0.proj",), "mlp.fc2": ("ff_context.net.2",),
    "adaLN_modulation.1": ("norm1_context.linear",),
}
TOP_LEVEL = {
    "x_embedder.proj": "pos_embed.proj", "context_embedder": "context_embedder",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear",
}
_FINAL_ADALN = "final_layer.adaLN_modulation.1"
_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.")
_NATIVE_BLOCK = re.compile(r"^joint_blocks\.(\d+)\.(x_block|context_block)\.(.+)$")


def is_sd3_transformer(modules: ModuleTable | Mapping[str, object]) -> bool:
    """diffusers ``SD3Transformer2DModel`` module names (split layout)."""
    return "pos_embed.proj" in modules and "transformer_blocks.0.attn.add_q_proj" in modules


def is_mmdit(modules: ModuleTable | Mapping[str, object]) -> bool:
    """SAI MMDiT / ComfyUI module names (fused layout)."""
    return "x_embedder.proj" in modules and "joint_blocks.0.x_block.attn.qkv" in modules


def _pre_only(block: int, modules: Iterable[str], native: bool) -> bool:
    """Block ``block`` is ``context_pre_only`` (the last: its context stream has no proj and no mlp)."""
    probe = f"joint_blocks.{block}.context_block.mlp.fc2" if native else f"transformer_blocks.{block}.ff_context.net.2"
    return probe not in modules


def mmdit_groups(paths: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """Every native module name of a diffusers-layout SD3 transformer → its canonical modules (row order)."""
    blocks = sorted({int(m.group(1)) for p in paths if (m := _BLOCK.match(p))})
    groups: dict[str, tuple[str, ...]] = {}
    for i in blocks:
        for stream, table in (("x_block", X_BLOCK), ("context_block", CONTEXT_BLOCK)):
            for native, parts in table.items():
                groups[f"joint_blocks.{i}.{stream}.{native}"] = tuple(f"transformer_blocks.{i}.{p}" for p in parts)
    groups.update({native: (canonical,) for native, canonical in TOP_LEVEL.items()})
    return groups


def _swapped(native: str, modules: Iterable[str], native_names: bool) -> bool:
    if native == _FINAL_ADALN:
        return True
    m = _NATIVE_BLOCK.match(native)
    return m is not None and m.group(2) == "context_block" and m.group(3) == "adaLN_modulation.1" \
        and _pre_only(int(m.group(1)), modules, native_names)


def mmdit_parts(modules: Mapping[str, ParamShapes]) -> dict[str, list[Part]]:
    """Native module name → the canonical modules it fuses, with row ranges from the model's shapes."""
    return stacked_parts(modules, mmdit_groups(modules), lambda native, rows: _swapped(native, modules, False))


def canonical_from_mmdit(host: Mapping[str, ParamShapes]) -> tuple[dict[str, ParamShapes], dict[str, Route]]:
    """For a native-layout host (ComfyUI's MMDiT): the canonical table it is equivalent to and where each canonical
    module lives in it. ``qkv`` is three equal thirds of its rows."""
    table: dict[str, ParamShapes] = {}
    routes: dict[str, Route] = {}
    for path, shapes in host.items():
        canonical = _canonical_parts(path)
        if canonical is None:
            continue
        rows = (shapes.get("weight") or next(iter(shapes.values())))[0]
        size = rows // len(canonical)
        swap = _swapped(path, host, True)
        for n, target in enumerate(canonical):
            start, stop = n * size, (n + 1) * size
            table[target] = {p: (stop - start, *s[1:]) for p, s in shapes.items() if p in ("weight", "bias")}
            routes[target] = Route(path, start, stop, swap)
    return table, routes


def _canonical_parts(path: str) -> tuple[str, ...] | None:
    if path in TOP_LEVEL:
        return (TOP_LEVEL[path],)
    m = _NATIVE_BLOCK.match(path)
    if m is None:
        return None
    parts = (X_BLOCK if m.group(2) == "x_block" else CONTEXT_BLOCK).get(m.group(3))
    return tuple(f"transformer_blocks.{m.group(1)}.{p}" for p in parts) if parts else None


def _structure(components: Mapping[str, ModuleTable]) -> bool:
    return any(is_sd3_transformer(m) or is_mmdit(m) for m in components.values())


def _sd3_hint(metadata: Mapping[str, str]) -> bool:
    version = str(metadata.get("ss_base_model_version", "")).lower()
    arch = str(metadata.get("modelspec.architecture", "")).lower()
    return version.startswith("sd3") or arch.startswith("stable-diffusion-v3")


#: the 24-layer table: SD3-Medium and SD3.5-Medium (the latter's qk-norm and dual attention in layers 0-12)
MEDIUM = "sd3-medium"
VARIANT_TABLES = {MEDIUM: "sd3-medium.json.gz"}
#: modules only SD3.5-Medium has at 24 layers (SD3-Medium has no qk-norm and no second attention)
SD35_MEDIUM_MODULES = (".attn2.", ".attn.norm_q", ".attn.norm_k", ".attn.norm_added_q", ".attn.norm_added_k")


def variant_of(targets: Iterable[str], table: str | None) -> str | None:
    """``sd3.5-large`` on the main (38-layer) table (SD3.5-Large-Turbo has its shapes); on the 24-layer table
    ``sd3.5-medium`` when the file patches a module only it has (attn2, qk-norm), else ``None``."""
    if table is None:
        return "sd3.5-large"
    return "sd3.5-medium" if any(m in t for t in targets for m in SD35_MEDIUM_MODULES) else None


SD3 = Arch(
    id="sd3", title="Stable Diffusion 3 / 3.5", table_file="sd3.json.gz",
    # sd-scripts: the transformer under lora_unet_ (native names), CLIP-L/G/T5 under lora_te1_/2_/3_; OneTrainer:
    # lora_transformer_ (diffusers names)
    kohya_prefixes={"lora_unet_": "transformer", "lora_transformer_": "transformer", "lora_te1_": "text_encoder",
                    "lora_te2_": "text_encoder_2", "lora_te3_": "text_encoder_3"},
    metadata_hint=_sd3_hint,
    component_classes={"transformer": ("SD3Transformer2DModel",)},
    fused_layout=FusedLayout(is_sd3_transformer, is_mmdit, mmdit_parts, canonical_from_mmdit,
                             partial(rows_from_file, groups=mmdit_groups)),
    model_hint=_structure,
    host_names={"transformer": HostNames("lora_unet_"), "text_encoder": HostNames("lora_te1_", encoder="clip"),
                "text_encoder_2": HostNames("lora_te2_", encoder="clip"),
                "text_encoder_3": HostNames("lora_te3_", encoder="t5")},
    # single files (sd3.5_large.safetensors): the transformer under model.diffusion_model. (native names), the
    # encoders under ComfyUI's names when the file bundles them
    checkpoint_prefixes={"model.diffusion_model.": "transformer", "text_encoders.clip_l.transformer.": "text_encoder",
                         "text_encoders.clip_g.transformer.": "text_encoder_2",
                         "text_encoders.t5xxl.transformer.": "text_encoder_3"},
    comfy_classes=("SD3",),
    comfy_text_encoders={"text_encoder": "text_encoders.clip_l.transformer.",
                         "text_encoder_2": "text_encoders.clip_g.transformer.",
                         "text_encoder_3": "text_encoders.t5xxl.transformer."},
    variant_tables=VARIANT_TABLES, variant_of=variant_of,
    catalog_names=("sd 3", "sd 3.5", "sd 3.5 large", "sd 3.5 medium", "sd 3.5 large turbo"),
)


def _transformer(layers: int, **extra) -> dict:
    """diffusers ``scripts/convert_sd3_to_diffusers.py``: heads = layers, caption projection = 64 x layers."""
    return dict(dict(sample_size=128, patch_size=2, in_channels=16, num_layers=layers, attention_head_dim=64,
                     num_attention_heads=layers, joint_attention_dim=4096, caption_projection_dim=64 * layers,
                     pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192), **extra)


SD3_VARIANTS = {
    "sd3-medium": _transformer(24),
    "sd3.5-large": _transformer(38, qk_norm="rms_norm"),
    "sd3.5-medium": _transformer(24, qk_norm="rms_norm", pos_embed_max_size=384,
                                 dual_attention_layers=tuple(range(13))),
}
_CLIP_L = ("CLIPTextModelWithProjection", dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                               num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu"))
ENCODERS = {"text_encoder": _CLIP_L, "text_encoder_2": OFFICIAL_CONFIGS["sdxl"]["text_encoder_2"],
            "text_encoder_3": FLUX1_CONFIGS["text_encoder_2"]}
#: the main table is SD3.5-Large (= Large-Turbo); the 24-layer variant table is SD3.5-Medium's modules, which
#: include every SD3-Medium module
SD3_CONFIGS = {"transformer": ("SD3Transformer2DModel", SD3_VARIANTS["sd3.5-large"]), **ENCODERS}
SD3_VARIANT_CONFIGS = {MEDIUM: {"transformer": ("SD3Transformer2DModel", SD3_VARIANTS["sd3.5-medium"],
                                                SD3_VARIANTS["sd3-medium"]), **ENCODERS}}
