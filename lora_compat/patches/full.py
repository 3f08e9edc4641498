"""LyCORIS full / diff: the whole weight (and bias) delta stored as is."""
from __future__ import annotations

from typing import Mapping

from .._lazy import torch

from .base import BuildContext, Patch, Ref, Shape, Tensor, numel, stored
from .fused import row_ref


class FullPatch(Patch):
    """``W' = W + s·diff``, ``b' = b + s·diff_b``."""

    kind = "full"
    order = 70
    needs_base = False
    suffixes = {"diff": "diff", "diff_b": "diff_b"}
    min_dims = {"diff": 1}

    @classmethod
    def from_parts(cls, parts: Mapping[str, Ref], context: BuildContext) -> "FullPatch | None":
        if "diff" not in parts and "diff_b" not in parts:
            return None
        return cls(parts.get("diff"), parts.get("diff_b"))

    def __init__(self, diff: Ref | None, diff_b: Ref | None = None):
        self.diff, self.diff_b = diff, diff_b

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(p for p, ref in (("weight", self.diff), ("bias", self.diff_b)) if ref is not None)

    def refs(self) -> dict[str, Ref]:
        return {k: v for k, v in (("diff", self.diff), ("diff_b", self.diff_b)) if v is not None}

    def to_tensors(self) -> dict[str, Tensor]:
        return stored((("diff", self.diff), ("diff_b", self.diff_b)))

    def out_rows(self) -> int:
        return (self.diff or self.diff_b).shape[0]

    def in_columns(self) -> int | None:
        return numel(self.diff.shape[1:]) if self.diff is not None else None

    def rows(self, start: int, stop: int, total: int, swap: bool = False) -> "FullPatch":
        return FullPatch(row_ref(self.diff, start, stop, swap) if self.diff is not None else None,
                         row_ref(self.diff_b, start, stop, swap) if self.diff_b is not None else None)

    def host_native(self) -> bool:
        return True

    def implied_weight_shape(self) -> Shape | None:
        return self.diff.shape if self.diff is not None else None

    def shaped_delta(self, shape: Shape) -> tuple[Tensor, Tensor | None]:
        delta = self.diff.load().reshape(shape) if self.diff is not None else torch.zeros(shape)
        return delta, self.diff_b.load() if self.diff_b is not None else None

    def misfit(self, shapes: Mapping[str, Shape]) -> str | None:
        for param, ref in (("weight", self.diff), ("bias", self.diff_b)):
            if ref is not None and shapes.get(param) != ref.shape:
                return f"diff for {param} is {list(ref.shape)}, module {param} is {shapes.get(param)}"
        return None

    def delta(self, base: Mapping[str, Tensor], strength: float = 1.0) -> dict[str, Tensor]:
        out = {}
        for param, ref in (("weight", self.diff), ("bias", self.diff_b)):
            if ref is not None:
                out[param] = ref.load().reshape(base[param].shape) * strength
        return out
