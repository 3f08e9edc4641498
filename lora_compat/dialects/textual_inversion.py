"""Textual-inversion embeddings (A1111 .pt/.safetensors, diffusers learned_embeds, SDXL clip_l/clip_g): refused."""
from __future__ import annotations

from ..files import Header
from .base import Match, RefusingDialect

WIDTH_BASE = {768: "SD1.x", 1024: "SD2.x", 1280: "SDXL (CLIP-G)"}
LORA_MARKERS = ("lora_", "hada_", "lokr_", ".alpha", "diff", "oft_", "on_input", "w_norm")


def _vectors(header: Header) -> tuple[int, int | None]:
    for key in ("emb_params", "clip_l", "clip_g"):
        if header.shapes.get(key):  # a scalar under a marker name has no width
            shape = header.shapes[key]
            return (shape[0] if len(shape) == 2 else 1), shape[-1]
    shapes = list(header.shapes.values())
    widths = {s[-1] for s in shapes if s}
    return sum(s[0] if len(s) == 2 else 1 for s in shapes), (widths.pop() if len(widths) == 1 else None)


class TextualInversionRecogniser(RefusingDialect):
    id = "textual-inversion"
    description = "textual-inversion embeddings"

    def detect(self, header: Header) -> Match | None:
        keys = list(header.keys()) + list(header.extras)
        if any(k in ("emb_params", "clip_l", "clip_g") or k.startswith(("string_to_param", "string_to_token"))
               for k in keys):
            return Match(self.id, 1.0, ("embedding marker key",))
        shapes = list(header.shapes.values())
        if (0 < len(shapes) <= 8 and all(1 <= len(s) <= 2 and s[-1] in WIDTH_BASE for s in shapes)
                and not any(m in k for k in header.keys() for m in LORA_MARKERS)):
            return Match(self.id, 0.9, ("a few token-width vectors and nothing else",))
        return None

    def explain(self, header: Header) -> str:
        vectors, width = _vectors(header)
        if "clip_l" in header.shapes and "clip_g" in header.shapes:
            base, width = "SDXL", "/".join(str(header.shapes[k][-1]) for k in ("clip_l", "clip_g") if header.shapes[k])
        else:
            base = WIDTH_BASE.get(width or 0, "unknown base")
        return (f"is a textual-inversion embedding ({vectors} vectors, width {width} -> {base}), not a LoRA; "
                "load it as an embedding")
