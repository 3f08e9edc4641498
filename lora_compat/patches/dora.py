"""DoRA: weight decomposition around a factorised patch (LoRA, LoHa, LoKr)."""
from __future__ import annotations

from typing import Literal, Mapping

from .._lazy import torch

from .base import FactorisedPatch, Patch, Ref, Shape, Tensor, numel

Axis = Literal["out", "in"]
Convention = Literal["lycoris", "peft"]
EPS = 2.0 ** -23  # torch.finfo(torch.float32).eps, without importing torch


def column_norm(weight: Tensor, axis: Axis) -> Tensor:
    """Norm of each output row (``out``) or each input column (``in``), shaped to broadcast over ``weight``."""
    rest = [1] * (weight.dim() - 1)
    if axis == "out":
        return weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], *rest)
    norms = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
    return norms.reshape(1, weight.shape[1], *rest[1:])


class DoraPatch(Patch):
    """``V = W + ΔW``; ``W_dora = m · V / ‖V‖`` with the norm per output row or input column.

    Strength conventions (equal at strength 1):
    - ``lycoris`` (kohya/LyCORIS/OneTrainer ``dora_scale``): ``W' = V · (1 + s·(m/(‖V‖+eps) − 1))``,
      ΔW itself not scaled by s (LyCORIS' forward).
    - ``peft`` (``lora_magnitude_vector``): ``W' = m · (W + s·ΔW) / ‖W + s·ΔW‖`` per output row.
    """

    kind = "dora"
    linear_in_strength = False

    def __init__(self, inner: FactorisedPatch, magnitude: Ref, axis: Axis, convention: Convention):
        self.inner, self.magnitude, self.axis, self.convention = inner, magnitude, axis, convention

    @property
    def params(self) -> tuple[str, ...]:
        return self.inner.params

    @property
    def rank(self) -> int | None:
        return self.inner.rank

    @property
    def kinds(self) -> tuple[str, ...]:
        return (*self.inner.kinds, "dora")

    def refs(self) -> dict[str, Ref]:
        return {**self.inner.refs(), "magnitude": self.magnitude}

    def misfit(self, shapes: Mapping[str, Shape]) -> str | None:
        reason = self.inner.misfit(shapes)
        if reason:
            return reason
        weight = shapes["weight"]
        size = weight[0] if self.axis == "out" else weight[1]
        if numel(self.magnitude.shape) != size:
            return (f"DoRA magnitude {list(self.magnitude.shape)} needs {size} entries "
                    f"(one per {'output row' if self.axis == 'out' else 'input column'} of {list(weight)})")
        return None

    def delta(self, base: Mapping[str, Tensor], strength: float = 1.0) -> dict[str, Tensor]:
        weight = base["weight"]
        inner = self.inner.delta(base, 1.0 if self.convention == "lycoris" else strength)
        merged = weight + inner["weight"]
        norm = column_norm(merged, self.axis)
        magnitude = self.magnitude.load().reshape(norm.shape)
        if self.convention == "lycoris":
            factor = magnitude / (norm + EPS)
            if strength != 1.0:
                factor = strength * (factor - 1) + 1
        else:
            factor = magnitude / norm
        out = {"weight": merged * factor - weight}
        if "bias" in inner:
            out["bias"] = inner["bias"] * (strength if self.convention == "lycoris" else 1.0)
        return out
