"""LyCORIS norm: additive deltas of a GroupNorm/LayerNorm's weight and bias."""
from __future__ import annotations

from typing import Mapping

from .base import BuildContext, Patch, Ref, Shape, Tensor, stored


class NormPatch(Patch):
    """``γ' = γ + s·w_norm``, ``β' = β + s·b_norm``."""

    kind = "norm"
    order = 80
    suffixes = {"w_norm": "w_norm", "b_norm": "b_norm"}
    min_dims = {"w_norm": 1}

    @classmethod
    def from_parts(cls, parts: Mapping[str, Ref], context: BuildContext) -> "NormPatch | None":
        if "w_norm" not in parts and "b_norm" not in parts:
            return None
        return cls(parts.get("w_norm"), parts.get("b_norm"))

    def __init__(self, w_norm: Ref | None, b_norm: Ref | None = None):
        self.w_norm, self.b_norm = w_norm, b_norm

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(p for p, ref in (("weight", self.w_norm), ("bias", self.b_norm)) if ref is not None)

    def refs(self) -> dict[str, Ref]:
        return {k: v for k, v in (("w_norm", self.w_norm), ("b_norm", self.b_norm)) if v is not None}

    def to_tensors(self) -> dict[str, Tensor]:
        return stored((("w_norm", self.w_norm), ("b_norm", self.b_norm)))

    def misfit(self, shapes: Mapping[str, Shape]) -> str | None:
        for param, ref in (("weight", self.w_norm), ("bias", self.b_norm)):
            if ref is not None and shapes.get(param) != ref.shape:
                return f"norm delta for {param} is {list(ref.shape)}, module {param} is {shapes.get(param)}"
        return None

    def delta(self, base: Mapping[str, Tensor], strength: float = 1.0) -> dict[str, Tensor]:
        out = {}
        for param, ref in (("weight", self.w_norm), ("bias", self.b_norm)):
            if ref is not None:
                out[param] = ref.load() * strength
        return out
