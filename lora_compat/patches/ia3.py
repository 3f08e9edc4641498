"""LyCORIS IA3: learned per-row (or per-input-column) scaling of the weight."""
from __future__ import annotations

from typing import Mapping

from .._lazy import torch

from .base import BuildContext, Patch, Ref, Shape, Tensor


class Ia3Patch(Patch):
    """``ΔW = W ⊙ w`` broadcast over output rows (``on_input`` 0) or input columns (1)."""

    kind = "ia3"
    order = 90
    suffixes = {"weight": "weight", "on_input": "on_input"}
    min_dims = {"weight": 1}

    @classmethod
    def from_parts(cls, parts: Mapping[str, Ref], context: BuildContext) -> "Ia3Patch | None":
        if "weight" not in parts or "on_input" not in parts:
            return None
        return cls(parts["weight"], parts["on_input"])

    def __init__(self, weight: Ref, on_input: Ref | bool):
        self.weight, self.on_input = weight, on_input

    def refs(self) -> dict[str, Ref]:
        refs = {"weight": self.weight}
        if isinstance(self.on_input, Ref):
            refs["on_input"] = self.on_input
        return refs

    def to_tensors(self) -> dict[str, Tensor]:
        on_input = self.on_input.loader() if isinstance(self.on_input, Ref) else torch.tensor(self.on_input)
        return {"weight": self.weight.loader(), "on_input": on_input}

    def _on_input(self) -> bool:
        return bool(self.on_input.item()) if isinstance(self.on_input, Ref) else bool(self.on_input)

    def misfit(self, shapes: Mapping[str, Shape]) -> str | None:
        weight = shapes.get("weight")
        size = 1
        for d in self.weight.shape:
            size *= d
        if weight is None or len(weight) < 2:
            return "IA3 needs a Linear or Conv weight"
        if size not in (weight[0], weight[1]):
            return f"IA3 vector of {size} matches neither the {weight[0]} outputs nor the {weight[1]} inputs"
        return None

    def delta(self, base: Mapping[str, Tensor], strength: float = 1.0) -> dict[str, Tensor]:
        weight = base["weight"]
        vector = self.weight.load().reshape(-1)
        shape = [1] * weight.dim()
        shape[1 if self._on_input() else 0] = vector.numel()
        return {"weight": weight * vector.reshape(shape) * strength}
