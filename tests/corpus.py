"""The corpus of key layouts shipped in the package (lora_compat/corpus): header-only LoraFiles and
meta-device models of each layout."""
from __future__ import annotations

from functools import lru_cache

import torch

from lora_compat import corpus
from lora_compat.files import LoraFile

#: corpus dialect labels → our stable dialect ids
DIALECT_IDS = {
    "kohya_lora": "kohya", "diffusers_lora": "diffusers", "peft_lora": "peft",
    "lycoris_boft": "lycoris", "lycoris_oft": "lycoris", "lycoris_dora": "lycoris", "lycoris_full": "lycoris",
    "lycoris_glora": "lycoris", "lycoris_ia3": "lycoris", "lycoris_loha": "lycoris", "lycoris_lokr": "lycoris",
    "lycoris_norm": "lycoris", "sai_control_lora": "control-lora",
    "not_lora:controlnet_diffusers": "controlnet", "not_lora:controlnet_ldm": "controlnet",
    "not_lora:t2i_adapter_diffusers": "t2i-adapter", "not_lora:t2i_adapter_original": "t2i-adapter",
    "not_lora:textual_inversion_a1111": "textual-inversion", "not_lora:base_checkpoint": "checkpoint",
}
SD_BASES = {"sd15", "sd2", "sdxl"}


def load(name: str) -> dict:
    return corpus.load(name)


def index() -> list[dict]:
    return corpus.index()


def header_only_file(name: str) -> LoraFile:
    """A LoraFile with the layout's names and shapes whose tensor reads fail the test."""
    def no_reads(key: str) -> torch.Tensor:
        raise AssertionError(f"tensor data of {key!r} read during header-only work")

    return corpus.header_file(load(name), dtype="F32", read=no_reads)


def sd_layouts() -> list[str]:
    """Every SD-family layout in the corpus (Flux arrives with its own issue)."""
    return sorted(entry["file"] for entry in index() if entry["base"] in SD_BASES)


@lru_cache(maxsize=None)
def meta_components(name: str) -> dict[str, torch.nn.Module]:
    """The layout's own model on the meta device: its ``base_config`` (generated files) or official configs."""
    data = load(name)
    built = corpus.generating_model(data)
    if built is None:
        from lora_compat.archs.generate_tables import build_components

        return build_components(data["base"])
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
