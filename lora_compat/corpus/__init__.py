"""The corpus of LoRA key layouts that ships with the package: names, shapes and metadata of real, derived and
generated files (README.md here says where each comes from), one gzipped JSON per layout plus ``INDEX.json``.

``lora-compat matrix`` runs every layout of it, and the tests read the same copy. A folder of plain ``*.json``
layouts with its own ``INDEX.json`` (``lora-compat matrix --corpus DIR``) is read the same way.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

    from ..files import LoraFile

BUNDLED = Path(__file__).resolve().parent


def has_index(folder: Path) -> bool:
    return (Path(folder) / "INDEX.json").is_file()


def index(folder: Path = BUNDLED) -> list[dict]:
    """The entries of ``INDEX.json``: ``file``, ``dialect``, ``base``, ``provenance``, ``is_lora`` ..."""
    return json.loads((Path(folder) / "INDEX.json").read_text())


def load(name: str, folder: Path = BUNDLED) -> dict:
    """One layout by its ``INDEX.json`` file name (``x.json``), stored as ``x.json`` or ``x.json.gz``."""
    path = Path(folder) / name
    if path.is_file():
        return json.loads(path.read_text())
    with gzip.open(path.with_name(path.name + ".gz"), "rt") as f:
        return json.load(f)


def _no_reads(key: str) -> "torch.Tensor":
    from ..errors import LoraCompatError

    raise LoraCompatError(f"{key}: a corpus layout has names and shapes only, no tensor data")


def header_file(data: dict, dtype: str = "F16", read: Callable[[str], "torch.Tensor"] = _no_reads) -> "LoraFile":
    """A header-only LoraFile with the layout's names, shapes and metadata; tensor reads call ``read``."""
    from ..files import Header, LoraFile

    shapes = {k: tuple(v) for k, v in data["keys"].items()}
    return LoraFile(Header(shapes, {k: dtype for k in shapes}, data.get("metadata") or {}, None), read, "memory")


def generating_model(data: dict) -> "dict[str, torch.nn.Module] | None":
    """The tiny model a ``generated-real-library`` layout was written on, built on the meta device from its
    ``base_config`` (``None`` without a config; needs diffusers and transformers)."""
    configs = data.get("base_config")
    if not isinstance(configs, dict):
        return None
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    built = {}
    with torch.device("meta"):
        for component, config in configs.items():
            if not isinstance(config, dict):
                continue
            clean = {k: v for k, v in config.items()
                     if not k.startswith("_") and k not in ("transformers_version", "architectures", "dtype")}
            if component == "unet":
                built[component] = UNet2DConditionModel.from_config(clean)
            elif component.startswith("text_encoder"):
                cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
                built[component] = cls(CLIPTextConfig(**clean))
    return built or None
