"""T2I-Adapter checkpoints (TencentARC full/light, diffusers ``adapter.*``): refused as LoRAs."""
from __future__ import annotations

import re

from ..files import Header
from .base import Match, RefusingDialect

_BODY = re.compile(r"^(adapter\.)?body\.\d+\.(block[12]|in_conv|out_conv|body\.\d+\.block[12]|resnets\.\d+\.block[12])\.")


class T2IAdapterRecogniser(RefusingDialect):
    id = "t2i-adapter"
    description = "T2I-Adapter checkpoints"

    def detect(self, header: Header) -> Match | None:
        keys = list(header.keys())
        hits = sum(1 for k in keys if _BODY.match(k))
        if hits and hits >= len(keys) // 2:
            return Match(self.id, 1.0, (f"{hits} T2I-Adapter body keys",))
        return None

    def explain(self, header: Header) -> str:
        return "is a T2I-Adapter checkpoint, not a LoRA; load it as a T2IAdapter"
