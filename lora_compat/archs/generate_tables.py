"""Build the module tables shipped in ``tables/`` from the official configs, on the ``meta`` device.

Needs diffusers + transformers (the ``[diffusers]`` extra); the package itself reads only the tables.
Run ``python -m lora_compat.archs.generate_tables`` after changing a config; a test checks they agree.
"""
from __future__ import annotations

import gzip
import json

import torch

from .base import TABLES
from .chroma import CHROMA_CONFIGS
from .flux import FLUX1_CONFIGS
from .flux2 import FLUX2_CONFIGS, FLUX2_VARIANT_CONFIGS
from .qwen_image import QWEN_IMAGE_CONFIGS
from .sd import OFFICIAL_CONFIGS
from .sd3 import SD3_CONFIGS, SD3_VARIANT_CONFIGS
from .wan import WAN_CONFIGS, WAN_VARIANT_CONFIGS
from .nextdit import LUMINA2_CONFIGS, Z_IMAGE_CONFIGS

#: table name → {component: config}; a family adds its own line
CONFIGS = {
    **OFFICIAL_CONFIGS,
    "flux1": FLUX1_CONFIGS,
    "wan": WAN_CONFIGS, **WAN_VARIANT_CONFIGS,
    "flux2": FLUX2_CONFIGS, **FLUX2_VARIANT_CONFIGS,
    **QWEN_IMAGE_CONFIGS,
    "z-image": Z_IMAGE_CONFIGS, "lumina2": LUMINA2_CONFIGS,
    "chroma": CHROMA_CONFIGS,
    "sd3": SD3_CONFIGS, **SD3_VARIANT_CONFIGS,
}


def build_components(base: str) -> dict[str, torch.nn.Module]:
    import diffusers
    import transformers

    modules: dict[str, torch.nn.Module] = {}
    with torch.device("meta"):
        for component, config in CONFIGS[base].items():
            if component == "unet":
                modules[component] = diffusers.UNet2DConditionModel(**config)
            elif component == "transformer" and isinstance(config, dict):
                modules[component] = diffusers.FluxTransformer2DModel(**config)
            elif config[0] == "T5EncoderModel":
                modules[component] = transformers.T5EncoderModel(transformers.T5Config(**config[1]))
            elif config[0].startswith("CLIPText"):
                cls_name, kwargs = config
                cfg = transformers.CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **kwargs)
                modules[component] = getattr(transformers, cls_name)(cfg)
            else:
                modules[component] = _build(config[0], config[1:], diffusers, transformers)
    return modules


def _build(cls_name: str, configs: tuple[dict, ...], diffusers, transformers) -> torch.nn.Module:
    """``(class name, config, *more configs)``: a diffusers class built from its keyword config, or a transformers
    class from its ``config_class``; with several configs, the union of their modules (:class:`_Union`)."""
    if hasattr(diffusers, cls_name):
        models = [getattr(diffusers, cls_name)(**c) for c in configs]
    else:
        cls = getattr(transformers, cls_name)
        models = [cls(cls.config_class(**c)) for c in configs]
    return models[0] if len(models) == 1 else _Union(*models)


class _Union(torch.nn.Module):
    """The modules of several variants as one table: the first variant's, plus the modules only the others have
    (Wan: the I2V image cross-attention and image embedder)."""

    def __init__(self, first: torch.nn.Module, *others: torch.nn.Module):
        super().__init__()
        self.first, self.others = first, others

    def named_modules(self, *args, **kwargs):  # type: ignore[override]
        seen = set()
        for model in (self.first, *self.others):
            for path, sub in model.named_modules():
                if path not in seen:
                    seen.add(path)
                    yield path, sub


def table_for(base: str) -> dict:
    components = build_components(base)
    return {
        "base": base,
        "components": {
            name: {
                path: {p: list(t.shape) for p, t in sub.named_parameters(recurse=False)}
                for path, sub in module.named_modules()
                if any(True for _ in sub.parameters(recurse=False))
            }
            for name, module in components.items()
        },
    }


def write_tables(bases: "list[str] | None" = None) -> None:
    TABLES.mkdir(exist_ok=True)
    for base in bases or CONFIGS:
        data = json.dumps(table_for(base), sort_keys=True, separators=(",", ":")).encode()
        with open(TABLES / f"{base}.json.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            f.write(data)


if __name__ == "__main__":
    import sys

    write_tables(sys.argv[1:] or None)
