"""LyCORIS LoKr (Kronecker product), every factorisation: full, low-rank, Tucker."""
from __future__ import annotations

from typing import Mapping

from .._lazy import torch

from .base import (ONE, BuildContext, FactorisedPatch, IncompletePatch, Ref, Scale, Shape, Tensor, alpha_tensors, numel,
                   stored)


class LokrPatch(FactorisedPatch):
    """``ΔW = scale · kron(w1, w2)``; each factor full or a low-rank product (``w2`` may be Tucker)."""

    kind = "lokr"
    order = 30
    flat_kernel = True
    suffixes = {s: s for s in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
                               "alpha")}
    min_dims = {s: 2 for s in suffixes if s != "alpha"}

    @classmethod
    def from_parts(cls, parts: Mapping[str, Ref], context: BuildContext) -> "LokrPatch | None":
        if "lokr_w1" not in parts and "lokr_w1_a" not in parts:
            return None
        patch = cls(w1=parts.get("lokr_w1"), w1a=parts.get("lokr_w1_a"), w1b=parts.get("lokr_w1_b"),
                    w2=parts.get("lokr_w2"), w2a=parts.get("lokr_w2_a"), w2b=parts.get("lokr_w2_b"),
                    t2=parts.get("lokr_t2"))
        if patch.w1 is None and (patch.w1a is None or patch.w1b is None):
            raise IncompletePatch("LoKr needs lokr_w1 or both lokr_w1_a and lokr_w1_b")
        if patch.w2 is None and (patch.w2a is None or patch.w2b is None):
            raise IncompletePatch("LoKr needs lokr_w2 or both lokr_w2_a and lokr_w2_b")
        # both factors full: LyCORIS forces alpha = dim at training, every loader uses scale 1
        patch.scale = context.rank_scale(patch.rank)
        return patch

    def __init__(self, w1: Ref | None = None, w1a: Ref | None = None, w1b: Ref | None = None,
                 w2: Ref | None = None, w2a: Ref | None = None, w2b: Ref | None = None,
                 t2: Ref | None = None, scale: Scale = ONE):
        self.w1, self.w1a, self.w1b, self.w2, self.w2a, self.w2b, self.t2 = w1, w1a, w1b, w2, w2a, w2b, t2
        self.scale = scale

    @property
    def rank(self) -> int | None:
        if self.w1b is not None:
            return self.w1b.shape[0]
        if self.w2b is not None:
            return self.w2b.shape[0]
        return None

    def refs(self) -> dict[str, Ref]:
        refs = {k: v for k, v in vars(self).items() if isinstance(v, Ref)}
        if isinstance(self.scale.alpha, Ref):
            refs["alpha"] = self.scale.alpha
        return refs

    def to_tensors(self) -> dict[str, Tensor]:
        return {**stored((("lokr_w1", self.w1), ("lokr_w1_a", self.w1a), ("lokr_w1_b", self.w1b), ("lokr_w2", self.w2),
                          ("lokr_w2_a", self.w2a), ("lokr_w2_b", self.w2b), ("lokr_t2", self.t2))),
                **alpha_tensors(self.scale)}

    def _w1_shape(self) -> tuple[int, int]:
        if self.w1 is not None:
            return self.w1.shape[0], self.w1.shape[1]
        return self.w1a.shape[0], self.w1b.shape[1]

    def _w2_rows_inner(self) -> tuple[int, int | None]:
        """Rows of w2 and, when known from shapes alone, its elements per row (d x kernel)."""
        if self.w2 is not None:
            return self.w2.shape[0], numel(self.w2.shape[1:])
        if self.t2 is not None:
            return self.w2a.shape[1], self.w2b.shape[1] * numel(self.t2.shape[2:])
        return self.w2a.shape[0], self.w2b.shape[1]

    def implied_weight_shape(self) -> Shape:
        (a, c), (b, rest) = self._w1_shape(), self._w2_dims()
        return (a * b, c * rest[0], *rest[1:])

    def _w2_dims(self) -> tuple[int, Shape]:
        """Rows of w2 and the rest of its shape (d, kernel...) as the tensors give it."""
        if self.w2 is not None:
            return self.w2.shape[0], self.w2.shape[1:]
        if self.t2 is not None:
            return self.w2a.shape[1], (self.w2b.shape[1], *self.t2.shape[2:])
        return self.w2a.shape[0], self.w2b.shape[1:]

    def misfit(self, shapes: Mapping[str, Shape]) -> str | None:
        weight = shapes.get("weight")
        if weight is None:
            return "module has no weight"
        (a, c), (b, inner2) = self._w1_shape(), self._w2_rows_inner()
        if weight[0] != a * b or numel(weight[1:]) != c * inner2:
            return (f"LoKr factors {a}x{c} (x) {b}x{inner2} imply a weight of {a * b} rows x {c * inner2}, "
                    f"module weight is {list(weight)}")
        return None

    def weight_delta(self, weight_shape: torch.Size) -> Tensor:
        w1 = self.w1.load() if self.w1 is not None else self.w1a.load() @ self.w1b.load()
        if self.w2 is not None:
            w2 = self.w2.load()
        elif self.t2 is not None:
            w2 = torch.einsum("ijhw,ip,jr->prhw", self.t2.load(), self.w2a.load(), self.w2b.load())
        else:
            w2 = self.w2a.load() @ self.w2b.load()
        kernel = tuple(weight_shape[2:])
        if kernel:
            w2 = w2.reshape(w2.shape[0], -1, *kernel) if w2.dim() == 2 else w2
            w1 = w1.reshape(*w1.shape, *([1] * len(kernel)))
        return torch.kron(w1.contiguous(), w2.contiguous()).reshape(weight_shape) * self.scale.value()
