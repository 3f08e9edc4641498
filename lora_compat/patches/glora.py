"""LyCORIS GLoRA: a weight-dependent term ``W·a1·a2`` plus a LoRA term ``b1·b2``."""
from __future__ import annotations

from typing import Mapping

from .._lazy import torch

from .base import ONE, BuildContext, Patch, Ref, Scale, Shape, Tensor, alpha_tensors, flat, stored


class GloraPatch(Patch):
    """Current layout: ``ΔW = scale · (W·a1·a2 + b1 @ b2)``; the old one: ``scale · (b2 @ b1 + W·a2·a1)``."""

    kind = "glora"
    order = 40
    suffixes = {"a1.weight": "a1", "a2.weight": "a2", "b1.weight": "b1", "b2.weight": "b2", "alpha": "alpha"}
    min_dims = {"a1": 2, "a2": 2, "b1": 2, "b2": 2}

    @classmethod
    def from_parts(cls, parts: Mapping[str, Ref], context: BuildContext) -> "GloraPatch | None":
        if not {"a1", "a2", "b1", "b2"} <= set(parts):
            return None
        patch = cls(parts["a1"], parts["a2"], parts["b1"], parts["b2"])
        patch.scale = context.rank_scale(patch.rank)
        return patch

    def __init__(self, a1: Ref, a2: Ref, b1: Ref, b2: Ref, scale: Scale = ONE):
        self.a1, self.a2, self.b1, self.b2, self.scale = a1, a2, b1, b2, scale
        a1s, a2s, b1s, b2s = a1.shape, a2.shape, b1.shape, b2.shape
        # the old LyCORIS layout stores every factor transposed (a1 [r, in], b2 [out, r])
        self.old_layout = b2s[1] == b1s[0] == a1s[0] == a2s[1] and not (b2s[0] == b1s[1] == a1s[1] == a2s[0])

    @property
    def rank(self) -> int:
        return self.a1.shape[0] if self.old_layout else self.a2.shape[0]

    def refs(self) -> dict[str, Ref]:
        refs = {"a1": self.a1, "a2": self.a2, "b1": self.b1, "b2": self.b2}
        if isinstance(self.scale.alpha, Ref):
            refs["alpha"] = self.scale.alpha
        return refs

    def to_tensors(self) -> dict[str, Tensor]:
        return {**stored((("a1.weight", self.a1), ("a2.weight", self.a2), ("b1.weight", self.b1),
                          ("b2.weight", self.b2))), **alpha_tensors(self.scale)}

    def misfit(self, shapes: Mapping[str, Shape]) -> str | None:
        weight = shapes.get("weight")
        if weight is None:
            return "module has no weight"
        out = self.b2.shape[0] if self.old_layout else self.b1.shape[0]
        in_ = self.a2.shape[0] if self.old_layout else self.a1.shape[0]
        if weight[0] != out or weight[1] != in_:
            return f"GLoRA factors imply [{out}, {in_}, ...], module weight is {list(weight)}"
        return None

    def delta(self, base: Mapping[str, Tensor], strength: float = 1.0) -> dict[str, Tensor]:
        weight = base["weight"]
        a1, a2, b1, b2 = (flat(r.load()) for r in (self.a1, self.a2, self.b1, self.b2))
        if self.old_layout:
            a_in, a_out, lora = a2, a1, b2 @ b1
        else:
            a_in, a_out, lora = a1, a2, b1 @ b2
        weighted = torch.einsum("oi...,ij->oj...", weight, a_in)
        weighted = torch.einsum("oj...,ji->oi...", weighted, a_out)
        delta = (weighted + lora.reshape(weight.shape)) * self.scale.value()
        return {"weight": delta * strength}
