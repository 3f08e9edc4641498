"""Wan 2.1 / 2.2 (video): diffusers' ``WanTransformer3DModel`` and the native (Wan / ComfyUI / musubi) names of
its modules.

The native layout is a one-to-one rename of the diffusers modules (no fused layers): ``blocks.N.self_attn.q`` is
``blocks.N.attn1.to_q``, ``cross_attn.k_img`` is ``attn2.add_k_proj`` (the I2V image cross-attention),
``ffn.0`` is ``ffn.net.0.proj``, ``head.head`` is ``proj_out``. The map is diffusers'
``_convert_non_diffusers_wan_lora_to_diffusers`` and ``scripts/convert_wan_to_diffusers.py`` read backwards.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

from .base import Arch
from .names import HostNames
from .routes import ModuleTable

#: diffusers module in ``blocks.N`` → its native name
BLOCK_TO_NATIVE = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o", "attn1.norm_q": "self_attn.norm_q", "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o", "attn2.norm_q": "cross_attn.norm_q", "attn2.norm_k": "cross_attn.norm_k",
    "attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",
    "attn2.norm_added_k": "cross_attn.norm_k_img",
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
    # diffusers swapped the names of Wan's norm2/norm3: its cross-attention norm (the affine one) is native norm3
    "norm2": "norm3",
}
#: diffusers top-level module → its native name
TOP_TO_NATIVE = {
    "patch_embedding": "patch_embedding",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
    "proj_out": "head.head",
}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
#: a block itself: its one parameter, diffusers' ``scale_shift_table``, is native ``blocks.N.modulation``
_BLOCK_ROOT = re.compile(r"^blocks\.\d+$")


def native_name(path: str) -> str | None:
    """The native (Wan/ComfyUI) name of a diffusers Wan transformer module path, or ``None``. A module whose one
    parameter is a native parameter is named by that parameter: ``blocks.N`` (its ``scale_shift_table``) is
    ``blocks.N.modulation``, the model itself (the head's ``scale_shift_table``) ``head.modulation``."""
    if path in TOP_TO_NATIVE:
        return TOP_TO_NATIVE[path]
    if path == "":
        return "head.modulation"
    if _BLOCK_ROOT.match(path):
        return f"{path}.modulation"
    m = _BLOCK.match(path)
    if m and m.group(2) in BLOCK_TO_NATIVE:
        return f"blocks.{m.group(1)}.{BLOCK_TO_NATIVE[m.group(2)]}"
    return None


def native_aliases(paths: Iterable[str]) -> dict[str, str]:
    """``{native name: module path}`` for a diffusers Wan transformer's module paths; other models' modules get
    none (a FLUX.1 ``proj_out`` is no ``head.head``)."""
    paths = list(paths)
    if not is_wan_transformer(dict.fromkeys(paths)):
        return {}
    return {native: path for path in paths if (native := native_name(path)) is not None}


def is_wan_transformer(modules: ModuleTable | Mapping[str, object]) -> bool:
    """diffusers ``WanTransformer3DModel`` module names."""
    return "condition_embedder.time_proj" in modules and "blocks.0.attn1.to_q" in modules


def _structure(components: Mapping[str, ModuleTable]) -> bool:
    return any(is_wan_transformer(m) for m in components.values())


def _wan_hint(metadata: Mapping[str, str]) -> bool:
    version = metadata.get("ss_base_model_version", "").lower()
    arch = metadata.get("modelspec.architecture", "").lower()
    return version.startswith("wan") or arch.startswith("wan")


#: the other sizes, each with a table of its own (the 14B table covers Wan 2.1 T2V/I2V-14B and the 2.2 A14B experts)
VARIANT_TABLES = {"wan21-t2v-1.3b": "wan21-t2v-1.3b.json.gz", "wan22-ti2v-5b": "wan22-ti2v-5b.json.gz"}
#: modules only Wan 2.1 I2V-14B / FLF2V-14B have (Wan 2.2's I2V-A14B has no image branch)
IMAGE_MODULES = ("attn2.add_k_proj", "attn2.add_v_proj", "condition_embedder.image_embedder.")


def variant_of(targets: Iterable[str], table: str | None) -> str | None:
    """The variant the shapes tell: the size whose table the file fits; at 14B, ``wan21-i2v-14b`` when the file
    patches the image cross-attention, else ``None`` (2.1 T2V-14B and each 2.2 A14B expert share every shape)."""
    if table is not None:
        return table
    return "wan21-i2v-14b" if any(m in t for t in targets for m in IMAGE_MODULES) else None


WAN = Arch(
    id="wan", title="Wan 2.1 / 2.2 (video)", table_file="wan.json.gz",
    # musubi-tuner writes the transformer under lora_unet_ with native names, flattened; OneTrainer under
    # lora_transformer_ (lora_transformer_2_: the second Wan 2.2 expert) with diffusers names, and the UMT5 text
    # encoder under lora_te_ with transformers names
    kohya_prefixes={"lora_unet_": "transformer", "lora_transformer_": "transformer",
                    "lora_transformer_2_": "transformer_2", "lora_te_": "text_encoder"},
    metadata_hint=_wan_hint,
    alias_makers={"transformer": native_aliases},
    component_classes={"transformer": ("WanTransformer3DModel",), "text_encoder": ("UMT5EncoderModel",)},
    model_hint=_structure,
    host_names={"transformer": HostNames("lora_unet_", aliases=native_aliases),
                "text_encoder": HostNames("lora_te_", encoder="t5")},
    # ComfyUI's Wan text encoder (comfy/text_encoders/wan.py: WanT5Model, name="umt5xxl")
    comfy_text_encoders={"text_encoder": "text_encoders.umt5xxl.transformer."},
    checkpoint_prefixes={"model.diffusion_model.": "transformer"},
    # ComfyUI a125cd84 comfy/supported_models.py: every Wan model config (I2V, FunControl, Camera, Vace, HuMo, S2V,
    # Animate, WAN22_T2V) subclasses WAN21_T2V, and the lookup walks the class's MRO; the text encoder is
    # comfy/text_encoders/wan.py's WanT5Model (its te() closure class subclasses it)
    comfy_classes=("WAN21_T2V", "WAN22_T2V", "WanT5Model"),
    variant_tables=VARIANT_TABLES, variant_of=variant_of,
    catalog_names=("wan video", "wan video 14b t2v", "wan video 14b i2v 480p", "wan video 14b i2v 720p",
                   "wan video 1.3b t2v", "wan video 2.2 t2v-a14b", "wan video 2.2 i2v-a14b",
                   "wan video 2.2 ti2v-5b"),
)

_COMMON = dict(patch_size=(1, 2, 2), attention_head_dim=128, out_channels=16, text_dim=4096, freq_dim=256,
               cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
#: the official configs (diffusers ``scripts/convert_wan_to_diffusers.py``); the table is Wan 2.1 T2V-14B (= each
#: Wan 2.2 A14B expert) plus the I2V-14B image cross-attention and image embedder, so that I2V files map
WAN_VARIANTS = {
    "wan21-t2v-14b": dict(_COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=16),
    "wan21-i2v-14b": dict(_COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=36,
                          image_dim=1280, added_kv_proj_dim=5120),
    "wan21-t2v-1.3b": dict(_COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30, in_channels=16),
    "wan22-ti2v-5b": dict(_COMMON, num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48,
                          out_channels=48),
}
#: google/umt5-xxl, the text encoder of every Wan 2.1 / 2.2 model (diffusers' ``WanPipeline.text_encoder``)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True, tie_word_embeddings=False)
TEXT_ENCODER = ("UMT5EncoderModel", UMT5_XXL)
WAN_CONFIGS = {"transformer": ("WanTransformer3DModel", WAN_VARIANTS["wan21-t2v-14b"],
                               WAN_VARIANTS["wan21-i2v-14b"]),
               "text_encoder": TEXT_ENCODER}
#: table name (``VARIANT_TABLES``) → configs, for ``generate_tables``
WAN_VARIANT_CONFIGS = {name: {"transformer": ("WanTransformer3DModel", WAN_VARIANTS[name]),
                              "text_encoder": TEXT_ENCODER} for name in VARIANT_TABLES}
