"""Access to ../shared/corpus: real key/shape layouts as header-only LoraFiles, and meta-device models."""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import torch

from lora_compat.files import Header, LoraFile

CORPUS = Path(os.environ.get("LORA_COMPAT_CORPUS", Path(__file__).resolve().parents[2] / "shared" / "corpus"))

#: corpus dialect labels → our stable dialect ids
DIALECT_IDS = {
    "kohya_lora": "kohya", "diffusers_lora": "diffusers", "peft_lora": "peft",
    "lycoris_boft": "lycoris", "lycoris_oft": "lycoris", "lycoris_dora": "lycoris", "lycoris_full": "lycoris",
    "lycoris_glora": "lycoris", "lycoris_ia3": "lycoris", "lycoris_loha": "lycoris", "lycoris_lokr": "lycoris",
    "lycoris_norm": "lycoris", "sai_control_lora": "control-lora",
    "not_lora:controlnet_diffusers": "controlnet", "not_lora:controlnet_ldm": "controlnet",
    "not_lora:t2i_adapter_diffusers": "t2i-adapter", "not_lora:t2i_adapter_original": "t2i-adapter",
    "not_lora:textual_inversion_a1111": "textual-inversion",
}
SD_BASES = {"sd15", "sd2", "sdxl"}


def load(name: str) -> dict:
    return json.loads((CORPUS / name).read_text())


def header_only_file(name: str) -> LoraFile:
    """A LoraFile with the layout's names and shapes whose tensor reads fail the test."""
    data = load(name)
    shapes = {k: tuple(v) for k, v in data["keys"].items()}

    def no_reads(key: str) -> torch.Tensor:
        raise AssertionError(f"tensor data of {key!r} read during header-only work")

    header = Header(shapes, {k: "F32" for k in shapes}, data.get("metadata") or {}, None)
    return LoraFile(header, no_reads, "memory")


def sd_layouts() -> list[str]:
    """Every SD-family layout in the corpus (Flux arrives with its own issue)."""
    names = []
    for entry in json.loads((CORPUS / "INDEX.json").read_text()):
        if entry["base"] in SD_BASES:
            names.append(entry["file"])
    return sorted(names)


def _unet(config: dict) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    return UNet2DConditionModel.from_config(config)


def _clip(config: dict, with_projection: bool) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = {k: v for k, v in config.items() if k not in ("transformers_version", "architectures", "dtype")}
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(CLIPTextConfig(**config))


@lru_cache(maxsize=None)
def meta_components(name: str) -> dict[str, torch.nn.Module]:
    """The layout's own model on the meta device: its ``base_config`` (generated files) or official configs."""
    data = load(name)
    if "base_config" not in data:
        from lora_compat.archs.generate_tables import build_components

        return build_components(data["base"])
    with torch.device("meta"):
        built = {}
        for component, config in data["base_config"].items():
            if not isinstance(config, dict):
                continue
            if component == "unet":
                built[component] = _unet(config)
            elif component.startswith("text_encoder"):
                built[component] = _clip(config, with_projection=component == "text_encoder_2")
        return built


def expected_targets(name: str) -> dict[str, str]:
    """kohya module name → diffusers target as the corpus records it (``module_map`` / ``modules``)."""
    data = load(name)
    out = {}
    for module, info in (data.get("module_map") or data.get("modules") or {}).items():
        target = info.get("module") or info.get("diffusers")
        if target is None and "hf" in info:
            component = "text_encoder_2" if module.startswith("lora_te2_") else "text_encoder"
            target = f"{component}.{info['hf']}"
        out[module] = target
    return out
