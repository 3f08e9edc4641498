"""Stability Control-LoRA (``lora_controlnet`` marker): a ControlNet patch, refused as a UNet LoRA for now."""
from __future__ import annotations

from ..files import Header
from .base import Match, RefusingDialect


class ControlLoraRecogniser(RefusingDialect):
    id = "control-lora"
    description = "Stability Control-LoRA (a ControlNet patch, not a UNet LoRA)"

    def detect(self, header: Header) -> Match | None:
        return Match(self.id, 1.0, ("lora_controlnet marker key",)) if "lora_controlnet" in header else None

    def explain(self, header: Header) -> str:
        return ("is a Stability Control-LoRA: it builds a ControlNet from a base UNet, it does not patch the UNet; "
                "load it as a ControlNet")
