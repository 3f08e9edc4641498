"""PEFT's LoraConfig scaling rules (rank_pattern, alpha_pattern, rsLoRA), shared by diffusers and PEFT files."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Mapping

from ..files import Header
from ..patches import Scale


def pattern_value(patterns: Mapping[str, Any], module_path: str, default: Any) -> Any:
    """PEFT ``get_pattern_key``: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", path)`` wins."""
    for key, value in patterns.items():
        if _pattern(key).match(module_path):
            return value
    return default


# a file with a pattern per module (what convert writes) has more than ``re``'s 512 cached patterns: without this
# cache every lookup compiled them all again (a full-size SDXL file: ~50 s to read instead of 0.3 s)
@lru_cache(maxsize=1 << 14)
def _pattern(key: str) -> re.Pattern:
    return re.compile(rf"(.*\.)?({key})$")


@dataclass(frozen=True)
class PeftScaling:
    r: int
    lora_alpha: float
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    use_rslora: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "PeftScaling":
        r = int(config.get("r", 8))
        return cls(r=r, lora_alpha=float(config.get("lora_alpha", r)),
                   rank_pattern=dict(config.get("rank_pattern") or {}),
                   alpha_pattern=dict(config.get("alpha_pattern") or {}),
                   use_rslora=bool(config.get("use_rslora", False)))

    def scale(self, module_path: str) -> Scale:
        rank = int(pattern_value(self.rank_pattern, module_path, self.r))
        alpha = float(pattern_value(self.alpha_pattern, module_path, self.lora_alpha))
        return Scale(alpha, rank, self.use_rslora)


def metadata_configs(header: Header) -> dict[str, dict[str, Any]]:
    """Per-component configs from diffusers' ``lora_adapter_metadata`` (``"unet.r": 4`` → ``{"unet": {"r": 4}}``)."""
    try:
        flat = json.loads(header.metadata.get("lora_adapter_metadata") or "{}")
    except json.JSONDecodeError:
        return {}
    configs: dict[str, dict[str, Any]] = {}
    for key, value in flat.items() if isinstance(flat, dict) else ():
        component, _, name = key.partition(".")
        configs.setdefault(component, {})[name] = value
    return configs
