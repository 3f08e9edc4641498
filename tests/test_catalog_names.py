"""Civitai's ``baseModel`` names (its enums, as of 2026) name the registered families: a library entry whose sidecar
says "Flux.2 Klein 9B-base" or "Wan Video 2.2 T2V-A14B" is filtered by the right base."""
from __future__ import annotations

import pytest

from lora_compat.tools.library.entries import catalog_base

CIVITAI = {
    "SD 1.5": "sd15", "SD 2.1": "sd2", "SDXL 1.0": "sdxl", "Pony": "sdxl", "Illustrious": "sdxl",
    "SD 1.5 LCM": "sd15", "SD 1.5 Hyper": "sd15", "SDXL Lightning": "sdxl", "SDXL Hyper": "sdxl", "NoobAI": "sdxl",
    "Flux.1 D": "flux1", "Flux.1 S": "flux1", "Flux.1 Krea": "flux1", "Flux.1 Kontext": "flux1",
    "Flux.2 D": "flux2", "Flux.2 Klein 4B": "flux2", "Flux.2 Klein 9B": "flux2", "Flux.2 Klein 4B-base": "flux2",
    "Flux.2 Klein 9B-base": "flux2",
    "Qwen": "qwen-image", "ZImageTurbo": "z-image", "ZImageBase": "z-image", "Lumina": "lumina2", "Chroma": "chroma",
    "SD 3": "sd3", "SD 3.5": "sd3", "SD 3.5 Medium": "sd3", "SD 3.5 Large": "sd3", "SD 3.5 Large Turbo": "sd3",
    "Wan Video": "wan", "Wan Video 1.3B t2v": "wan", "Wan Video 14B t2v": "wan", "Wan Video 14B i2v 480p": "wan",
    "Wan Video 14B i2v 720p": "wan", "Wan Video 2.2 TI2V-5B": "wan", "Wan Video 2.2 T2V-A14B": "wan",
    "Wan Video 2.2 I2V-A14B": "wan",
}


@pytest.mark.parametrize("name", sorted(CIVITAI))
def test_civitai_base_model_names(name):
    assert catalog_base(name) == CIVITAI[name]


@pytest.mark.parametrize("name", ["Hunyuan Video", "HiDream", "Anima", "LTXV", "Pony V7", "Kolors"])
def test_families_not_supported_yet_name_no_base(name):
    assert catalog_base(name) is None
