"""ControlNet checkpoints (original ``control_model.*`` and diffusers ``ControlNetModel``): refused for now."""
from __future__ import annotations

from ..files import Header
from .base import Match, RefusingDialect

MARKERS = ("control_model.", "input_hint_block.", "zero_convs.", "middle_block_out.",
           "controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")


class ControlNetRecogniser(RefusingDialect):
    id = "controlnet"
    description = "ControlNet checkpoints"

    def detect(self, header: Header) -> Match | None:
        if "lora_controlnet" in header:
            return None
        hits = sum(1 for k in header.keys() if k.startswith(MARKERS) or ".input_hint_block." in k)
        return Match(self.id, 1.0, (f"{hits} ControlNet marker keys",)) if hits else None

    def explain(self, header: Header) -> str:
        return "is a ControlNet checkpoint, not a LoRA; load it as a ControlNet (ControlNetModel)"
