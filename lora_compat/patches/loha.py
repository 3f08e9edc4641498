"""LyCORIS LoHa (Hadamard product of two low-rank products), incl. the Tucker form."""
from __future__ import annotations

from typing import Mapping

from .._lazy import torch

from .base import (ONE, BuildContext, FactorisedPatch, Ref, Scale, Shape, Tensor, alpha_tensors, conv_or_linear_misfit,
                   numel, stored)


class LohaPatch(FactorisedPatch):
    """``ΔW = scale · (w1a @ w1b) ⊙ (w2a @ w2b)``; Tucker: ``einsum(ijhw,jr,ip->prhw)`` per factor."""

    kind = "loha"
    order = 20
    flat_kernel = True
    suffixes = {s: s for s in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha")}
    min_dims = {s: 2 for s in suffixes if s != "alpha"}

    @classmethod
    def from_parts(cls, parts: Mapping[str, Ref], context: BuildContext) -> "LohaPatch | None":
        if not {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= set(parts):
            return None
        return cls(parts["hada_w1_a"], parts["hada_w1_b"], parts["hada_w2_a"], parts["hada_w2_b"],
                   context.rank_scale(parts["hada_w1_b"].shape[0]), parts.get("hada_t1"), parts.get("hada_t2"))

    def __init__(self, w1a: Ref, w1b: Ref, w2a: Ref, w2b: Ref, scale: Scale = ONE,
                 t1: Ref | None = None, t2: Ref | None = None):
        self.w1a, self.w1b, self.w2a, self.w2b, self.t1, self.t2, self.scale = w1a, w1b, w2a, w2b, t1, t2, scale

    @property
    def rank(self) -> int:
        return self.w1b.shape[0]

    def refs(self) -> dict[str, Ref]:
        refs = {"w1a": self.w1a, "w1b": self.w1b, "w2a": self.w2a, "w2b": self.w2b}
        refs.update({k: v for k, v in (("t1", self.t1), ("t2", self.t2)) if v is not None})
        if isinstance(self.scale.alpha, Ref):
            refs["alpha"] = self.scale.alpha
        return refs

    def to_tensors(self) -> dict[str, Tensor]:
        return {**stored((("hada_w1_a", self.w1a), ("hada_w1_b", self.w1b), ("hada_w2_a", self.w2a),
                          ("hada_w2_b", self.w2b), ("hada_t1", self.t1), ("hada_t2", self.t2))),
                **alpha_tensors(self.scale)}

    def host_native(self) -> bool:
        return self.t1 is None and self.t2 is None

    def peft_loha(self) -> "tuple[dict[str, Ref], Scale] | None":
        if self.t1 is not None or self.t2 is not None:  # the PEFT route loads LoHa without Tucker factors
            return None
        return {"hada_w1_a": self.w1a, "hada_w1_b": self.w1b, "hada_w2_a": self.w2a, "hada_w2_b": self.w2b}, self.scale

    def implied_weight_shape(self) -> Shape:
        if self.t1 is not None:
            return (self.w1a.shape[1], self.w1b.shape[1], *self.t1.shape[2:])
        return (self.w1a.shape[0], self.w1b.shape[1])

    def misfit(self, shapes: Mapping[str, Shape]) -> str | None:
        if self.t1 is not None:
            out, inner = self.w1a.shape[1], self.w1b.shape[1] * numel(self.t1.shape[2:])
        else:
            out, inner = self.w1a.shape[0], self.w1b.shape[1]
        return conv_or_linear_misfit(shapes.get("weight"), out, inner, "LoHa")

    def weight_delta(self, weight_shape: torch.Size) -> Tensor:
        w1a, w1b, w2a, w2b = (r.load() for r in (self.w1a, self.w1b, self.w2a, self.w2b))
        if self.t1 is not None and self.t2 is not None:
            first = torch.einsum("ijhw,jr,ip->prhw", self.t1.load(), w1b, w1a)
            second = torch.einsum("ijhw,jr,ip->prhw", self.t2.load(), w2b, w2a)
        else:
            first, second = w1a @ w1b, w2a @ w2b
        return (first * second).reshape(weight_shape) * self.scale.value()
