"""Qwen-Image (20B; Edit, Edit-2509/2511, Layered share its transformer) and Qwen-Image-2.1 (7.1B): diffusers'
``QwenImageTransformer2DModel`` / ``QwenImage21Transformer2DModel`` and the Qwen2.5-VL-7B text encoder.

The original (Qwen / ComfyUI) module names of the transformer are diffusers' own
(``transformer_blocks.N.attn.to_q``, ``img_mod.1``, ``img_mlp.net.0.proj``): no rename. kohya / musubi names
(``lora_unet_transformer_blocks_0_img_mlp_net_0_proj``) resolve against the module list itself. One fused layer:
ComfyUI's Qwen-Image-2.1 stacks each block's SwiGLU ``img_mlp.gate_layer`` and ``img_mlp.proj`` by rows (gate
first) in ``img_mlp.gate_up`` (diffusers' ``convert_qwen_image21_transformer_checkpoint_to_diffusers`` read
backwards): the family's :class:`~lora_compat.archs.routes.FusedLayout`, row ranges from the model's shapes.
The text encoder's modules are transformers 5's (``model.language_model.layers.N...``); the names of older
transformers and of the checkpoint (``model.layers.N...``, ``visual.blocks.N...``) are its aliases.
"""
from __future__ import annotations

import re
from functools import partial
from typing import Iterable, Mapping

from .base import Arch
from .flux import rows_from_file
from .names import HostNames
from .routes import FusedLayout, ModuleTable, ParamShapes, Part, Route, stacked_parts

#: first name part of every Qwen-Image transformer module (20B and 2.1): what a bare (unprefixed) key starts with
TRANSFORMER_HEADS = ("transformer_blocks.", "img_in.", "txt_in.", "txt_norm.", "time_text_embed.", "norm_out.",
                     "proj_out.", "modulation.")
#: transformers 5 module prefix → the name older transformers and the published checkpoint give it
_TE_RENAMES = (("model.language_model.", "model."), ("model.visual.", "visual."))


def is_qwen_image_transformer(modules: ModuleTable | Mapping[str, object]) -> bool:
    """diffusers ``QwenImageTransformer2DModel`` or ``QwenImage21Transformer2DModel`` module names."""
    return "img_in" in modules and "transformer_blocks.0.attn.to_q" in modules and (
        "txt_norm" in modules or "txt_in.text_norm" in modules)


#: Qwen-Image-2.1's fused SwiGLU input (ComfyUI) → the diffusers modules it stacks, in row order
GATE_UP = ("img_mlp.gate_layer", "img_mlp.proj")
_GATE_UP = re.compile(r"^(transformer_blocks\.\d+)\.img_mlp\.gate_up$")
_BLOCK = re.compile(r"^(transformer_blocks\.\d+)\.img_mlp\.(?:gate_layer|proj)$")


def is_qwen_image21_split(modules: ModuleTable | Mapping[str, object]) -> bool:
    """diffusers ``QwenImage21Transformer2DModel`` module names (``gate_layer`` and ``proj`` apart)."""
    return is_qwen_image_transformer(modules) and all(f"transformer_blocks.0.{p}" in modules for p in GATE_UP)


def is_qwen_image21_fused(modules: ModuleTable | Mapping[str, object]) -> bool:
    """ComfyUI's Qwen-Image-2.1 module names (``img_mlp.gate_up``)."""
    return "transformer_blocks.0.img_mlp.gate_up" in modules and "transformer_blocks.0.attn.to_q" in modules


def gate_up_groups(paths: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """Every ComfyUI module name of a diffusers-layout 2.1 transformer → its diffusers modules (row order): each
    ``img_mlp.gate_up`` the block's gate and up projections, every other module itself."""
    groups: dict[str, tuple[str, ...]] = {}
    for path in paths:
        m = _BLOCK.match(path)
        if m is None:
            groups[path] = (path,)
        else:
            groups[f"{m.group(1)}.img_mlp.gate_up"] = tuple(f"{m.group(1)}.{p}" for p in GATE_UP)
    return groups


def gate_up_parts(modules: Mapping[str, ParamShapes]) -> dict[str, list[Part]]:
    return stacked_parts(modules, gate_up_groups(modules))


def canonical_from_gate_up(host: Mapping[str, ParamShapes]) -> tuple[dict[str, ParamShapes], dict[str, Route]]:
    """A ComfyUI 2.1 host → its diffusers table and routes: ``gate_up`` in halves (gate, then up), the rest
    itself."""
    table: dict[str, ParamShapes] = {}
    routes: dict[str, Route] = {}
    for path, shapes in host.items():
        rows = (shapes.get("weight") or next(iter(shapes.values()), (0,)) or (0,))[0]
        m = _GATE_UP.match(path)
        parts = [f"{m.group(1)}.{p}" for p in GATE_UP] if m else [path]
        size = rows // len(parts)
        for n, target in enumerate(parts):
            table[target] = {p: (size, *s[1:]) if s else s for p, s in shapes.items()} if m else dict(shapes)
            routes[target] = Route(path, n * size, (n + 1) * size)
    return table, routes


def _structure(components: Mapping[str, ModuleTable]) -> bool:
    return any(is_qwen_image_transformer(m) or is_qwen_image21_fused(m) for m in components.values())


def text_encoder_aliases(paths: Iterable[str]) -> dict[str, str]:
    """``{checkpoint name: module path}`` for a transformers 5 Qwen2.5-VL model (``model.layers.0.self_attn.q_proj``
    is ``model.language_model.layers.0.self_attn.q_proj``, ``lm_head`` is itself); other models' modules get
    none."""
    paths = list(paths)
    if "model.visual.merger.mlp.0" not in paths:
        return {}  # not a Qwen-VL model
    aliases: dict[str, str] = {}
    for path in paths:
        renamed = next((old + path[len(new):] for new, old in _TE_RENAMES if path.startswith(new)), path)
        aliases[renamed] = path
    return aliases


def _hint(metadata: Mapping[str, str]) -> bool:
    version = metadata.get("ss_base_model_version", "").lower()
    arch = metadata.get("modelspec.architecture", "").lower()
    return version.startswith("qwen_image") or version.startswith("qwen-image") or arch.startswith("qwen-image")


#: the other model with these names: Qwen-Image-2.1 (32 blocks x 4096, single-stream)
VARIANT_TABLES = {"qwen-image-2.1": "qwen-image-2.1.json.gz"}


def variant_of(targets: Iterable[str], table: str | None) -> str | None:
    """The shapes always tell: the 20B table (Qwen-Image and its Edit/Layered models) or 2.1's."""
    return "qwen-image-20b" if table is None else table


QWEN_IMAGE = Arch(
    id="qwen-image", title="Qwen-Image / Qwen-Image-Edit (20B), Qwen-Image-2.1", table_file="qwen-image.json.gz",
    kohya_prefixes={"lora_unet_": "transformer", "lora_te_": "text_encoder"},
    metadata_hint=_hint,
    alias_makers={"text_encoder": text_encoder_aliases},
    component_classes={"transformer": ("QwenImageTransformer2DModel", "QwenImage21Transformer2DModel"),
                       "text_encoder": ("Qwen2_5_VLForConditionalGeneration",)},
    model_hint=_structure,
    fused_layout=FusedLayout(is_qwen_image21_split, is_qwen_image21_fused, gate_up_parts, canonical_from_gate_up,
                             partial(rows_from_file, groups=gate_up_groups)),
    # musubi-tuner / ComfyUI's generic map: lora_unet_<diffusers name>; the encoder under its checkpoint names
    host_names={"transformer": HostNames("lora_unet_"),
                "text_encoder": HostNames("lora_te_", aliases=text_encoder_aliases)},
    checkpoint_prefixes={"model.diffusion_model.": "transformer"},
    # ComfyUI's generic text-encoder key map (comfy/lora.py model_lora_keys_clip): its checkpoint names
    comfy_text_encoders={"text_encoder": "text_encoders.qwen25_7b.transformer."},
    comfy_classes=("QwenImage", "QwenImageTEModel"),  # ComfyUI's model config and its text-encoder model
    variant_tables=VARIANT_TABLES, variant_of=variant_of,
    catalog_names=("qwen", "qwen image", "qwen-image"),
)

#: the official 20B config (= ``QwenImageTransformer2DModel``'s defaults; Qwen/Qwen-Image transformer/config.json)
QWEN_IMAGE_20B = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                      num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                      axes_dims_rope=(16, 56, 56))
#: Qwen-Image-Layered: the same transformer plus an embedding of its extra timestep condition
QWEN_IMAGE_LAYERED = dict(QWEN_IMAGE_20B, use_additional_t_cond=True, use_layer3d_rope=True)
#: Qwen-Image-2.1 (= ``QwenImage21Transformer2DModel``'s defaults)
QWEN_IMAGE_21 = dict(patch_size=1, in_channels=64, out_channels=64, num_layers=32, attention_head_dim=128,
                     num_attention_heads=32, context_in_dim=4096, mlp_ratio=3, axes_dims_rope=(16, 56, 56))
#: Qwen/Qwen2.5-VL-7B-Instruct's config.json (Qwen-Image's text_encoder/): 8,292,166,656 parameters
QWEN25_VL_7B = dict(
    text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31]),
    tie_word_embeddings=False)
QWEN_IMAGE_CONFIGS = {
    "qwen-image": {"transformer": ("QwenImageTransformer2DModel", QWEN_IMAGE_20B, QWEN_IMAGE_LAYERED),
                   "text_encoder": ("Qwen2_5_VLForConditionalGeneration", QWEN25_VL_7B)},
    "qwen-image-2.1": {"transformer": ("QwenImage21Transformer2DModel", QWEN_IMAGE_21)},
}
