"""Stable Diffusion 1.x, 2.x and SDXL: UNet + CLIP text encoders."""
from __future__ import annotations

import re
from typing import Iterable, Mapping

from .base import Arch, ModuleIndex
from .names import HostNames
from .routes import BlockLayout, ModuleTable

RESNET_TO_SGM = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
TOP_LEVEL_TO_SGM = {
    "conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2",
}
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$")


def _resnet_rest(rest: str | None) -> str | None:
    if not rest:
        return rest
    head, _, tail = rest.partition(".")
    mapped = RESNET_TO_SGM.get(head, head)
    return f"{mapped}.{tail}" if tail else mapped


def sgm_aliases(unet_paths: Iterable[str]) -> dict[str, str]:
    """SGM/LDM names (``input_blocks.4.1...``, ``middle_block.1...``) for a diffusers UNet's module paths.

    The layout (layers per block, which up blocks have attentions) is read from the paths themselves,
    so the same rule serves SD1.x, SD2.x, SDXL and tiny test models.
    """
    paths = list(unet_paths)
    layers = 1 + max((int(m.group(4)) for p in paths if (m := _BLOCK.match(p))
                      and m.group(1) == "down_blocks" and m.group(3) == "resnets"), default=1)
    up_with_attn = {int(m.group(2)) for p in paths if (m := _BLOCK.match(p))
                    and m.group(1) == "up_blocks" and m.group(3) == "attentions"}
    aliases: dict[str, str] = {}
    for path in paths:
        sgm = _to_sgm(path, layers, up_with_attn)
        if sgm is not None:
            aliases[sgm] = path
    return aliases


def _to_sgm(path: str, layers: int, up_with_attn: set[int]) -> str | None:
    for prefix, sgm in TOP_LEVEL_TO_SGM.items():
        if path == prefix:
            return sgm
    stride = layers + 1
    if m := _BLOCK.match(path):
        side, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if side == "down_blocks":
            if kind == "downsamplers":
                head = f"input_blocks.{stride * (i + 1)}.0"
                return f"{head}.op" if rest == "conv" else None
            head = f"input_blocks.{stride * i + j + 1}.{0 if kind == 'resnets' else 1}"
        else:
            if kind == "upsamplers":
                head = f"output_blocks.{stride * i + layers}.{2 if i in up_with_attn else 1}"
                return f"{head}.conv" if rest == "conv" else None
            head = f"output_blocks.{stride * i + j}.{0 if kind == 'resnets' else 1}"
        rest = _resnet_rest(rest) if kind == "resnets" else rest
        return f"{head}.{rest}" if rest else head
    if m := _MID.match(path):
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        head = f"middle_block.{1 if kind == 'attentions' else 2 * j}"
        rest = _resnet_rest(rest) if kind == "resnets" else rest
        return f"{head}.{rest}" if rest else head
    return None


_SGM_BLOCK = re.compile(r"^(input_blocks|middle_block|output_blocks)\.?(\d+)?")


def lbw_block(component: str, path: str, index: ModuleIndex) -> str | None:
    """LoRA Block Weight block: ``BASE`` for the text encoders; ``IN00``-``IN11``, ``M00``, ``OUT00``-``OUT11``
    from the UNet's SGM (compvis) block index; UNet ``conv_in``/``time_embed``/``out`` are in no block."""
    if component.startswith("text_encoder"):
        return "BASE"
    if component != "unet":
        return None
    sgm = _sgm_names(index).get(path)
    if sgm and (m := _SGM_BLOCK.match(sgm)):
        kind, number = m.group(1), m.group(2)
        if kind == "middle_block":
            return "M00"
        return f"{'IN' if kind == 'input_blocks' else 'OUT'}{int(number):02}"
    return None


def _sgm_names(index: ModuleIndex) -> dict[str, str]:
    cached = index.__dict__.get("_lbw_sgm")
    if cached is None:
        cached = {path: sgm for sgm, path in sgm_aliases(index.components.get("unet", {})).items()}
        index.__dict__["_lbw_sgm"] = cached
    return cached


def _hint(values: set[str], architecture_prefixes: tuple[str, ...]):
    def hint(metadata: Mapping[str, str]) -> bool:
        if metadata.get("ss_base_model_version", "") in values:
            return True
        arch = metadata.get("modelspec.architecture", "")
        return any(arch.startswith(p) for p in architecture_prefixes)
    return hint


SD_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                     "lora_te2_": "text_encoder_2"}

SD_CLASSES = {"unet": ("UNet2DConditionModel",), "text_encoder": ("CLIPTextModel",),
              "text_encoder_2": ("CLIPTextModelWithProjection",)}
#: the UNet under its SGM (compvis) names; one CLIP encoder under lora_te_, SDXL's two under lora_te1_/lora_te2_
_UNET_NAMES = HostNames("lora_unet_", aliases=sgm_aliases)
SD_NAMES = {"unet": _UNET_NAMES, "text_encoder": HostNames("lora_te_", encoder="clip")}
SDXL_NAMES = {"unet": _UNET_NAMES, "text_encoder": HostNames("lora_te1_", encoder="clip"),
              "text_encoder_2": HostNames("lora_te2_", encoder="clip")}
#: sd-scripts writes SD1/SD2 UNets under their diffusers names (SDXL's under SGM names, as the hosts)
SD_TRAINER_NAMES = {"unet": HostNames("lora_unet_")}
STRUCTURE_TITLE = "a Stable Diffusion UNet model"
SD_BLOCKS = BlockLayout("sd", lbw_block)
#: where a single-file SD checkpoint holds its components (SD1/SD2 CLIP, SDXL's CLIP-L)
SD_CHECKPOINT_PREFIXES = {"model.diffusion_model.": "unet", "cond_stage_model.transformer.": "text_encoder",
                          "conditioner.embedders.0.transformer.": "text_encoder"}


def _structure(two_text_encoders: bool):
    """A model with a UNet is a Stable Diffusion one; SDXL's has a second text encoder."""
    def hint(components: Mapping[str, ModuleTable]) -> bool:
        return "unet" in components and ("text_encoder_2" in components) == two_text_encoders
    return hint


SD15 = Arch(
    id="sd15", title="Stable Diffusion 1.x", table_file="sd15.json.gz",
    kohya_prefixes=SD_KOHYA_PREFIXES,
    metadata_hint=_hint({"sd_v1"}, ("stable-diffusion-v1",)),
    alias_makers={"unet": sgm_aliases}, component_classes=SD_CLASSES,
    host_names=SD_NAMES, trainer_names=SD_TRAINER_NAMES, model_hint=_structure(False),
    structure_title=STRUCTURE_TITLE,
    blocks=SD_BLOCKS, checkpoint_prefixes=SD_CHECKPOINT_PREFIXES, comfy_classes=("SD15", "SD1ClipModel"),
    catalog_names=("sd 1.5", "sd 1.4", "sd1", "sd 1.5 lcm", "sd 1.5 hyper"),
    comfy_text_encoders={"text_encoder": "text_encoders.clip_l.transformer."},
)
SD2 = Arch(
    id="sd2", title="Stable Diffusion 2.x", table_file="sd2.json.gz",
    kohya_prefixes=SD_KOHYA_PREFIXES,
    metadata_hint=_hint({"sd_v2", "sd_v2_v"}, ("stable-diffusion-v2",)),
    alias_makers={"unet": sgm_aliases}, component_classes=SD_CLASSES,
    host_names=SD_NAMES, trainer_names=SD_TRAINER_NAMES, model_hint=_structure(False),
    structure_title=STRUCTURE_TITLE,
    blocks=SD_BLOCKS, checkpoint_prefixes=SD_CHECKPOINT_PREFIXES, comfy_classes=("SD20", "SD2ClipModel"),
    catalog_names=("sd 2.0", "sd 2.1", "sd2"),
    comfy_text_encoders={"text_encoder": "text_encoders.clip_h.transformer."},  # OpenCLIP-H
)
SDXL = Arch(
    id="sdxl", title="Stable Diffusion XL", table_file="sdxl.json.gz",
    kohya_prefixes=SD_KOHYA_PREFIXES,
    metadata_hint=_hint({"sdxl_base_v1-0", "sdxl_base_v0-9"}, ("stable-diffusion-xl",)),
    alias_makers={"unet": sgm_aliases}, component_classes=SD_CLASSES,
    host_names=SDXL_NAMES, model_hint=_structure(True), structure_title=STRUCTURE_TITLE,
    blocks=SD_BLOCKS, checkpoint_prefixes=SD_CHECKPOINT_PREFIXES, comfy_classes=("SDXL", "SDXLClipModel"),
    catalog_names=("sdxl 1.0", "sdxl 0.9", "pony", "illustrious", "sdxl", "sdxl lightning", "sdxl hyper",
                   "noobai"),
    comfy_text_encoders={"text_encoder": "text_encoders.clip_l.transformer.", "text_encoder_2": "text_encoders.clip_g.transformer."},
)

# Official configs (the published model_index/unet/text_encoder config.json values that matter for shapes).
OFFICIAL_CONFIGS = {
    "sd15": {
        "unet": dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                     cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
        "text_encoder": ("CLIPTextModel", dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                               num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu")),
    },
    "sd2": {
        "unet": dict(sample_size=96, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                     cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
        "text_encoder": ("CLIPTextModel", dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                               num_attention_heads=16, projection_dim=512, hidden_act="gelu")),
    },
    "sdxl": {
        "unet": dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                     transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                     cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                     addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
        "text_encoder": ("CLIPTextModel", dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                               num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu")),
        "text_encoder_2": ("CLIPTextModelWithProjection",
                           dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                num_attention_heads=20, projection_dim=1280, hidden_act="gelu")),
    },
}
