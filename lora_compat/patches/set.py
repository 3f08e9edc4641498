"""Replace a parameter with a stored value (e.g. Flux Control LoRA norm scales). Strength is ignored."""
from __future__ import annotations

from typing import Mapping

from .base import BuildContext, Patch, Ref, Shape, Tensor
from .fused import row_ref


class SetPatch(Patch):
    """``p' = value`` for one parameter; the delta is ``value - p`` whatever the strength."""

    kind = "set"
    linear_in_strength = False
    order = 100
    suffixes = {"scale": "scale"}
    min_dims = {"scale": 1}

    @classmethod
    def from_parts(cls, parts: Mapping[str, Ref], context: BuildContext) -> "SetPatch | None":
        # a BFL RMSNorm's parameter stored whole (FLUX.1 Control LoRAs): replace it
        return cls(parts["scale"], "weight") if set(parts) == {"scale"} else None

    def __init__(self, value: Ref, param: str = "weight"):
        self.value, self.param = value, param

    @property
    def params(self) -> tuple[str, ...]:
        return (self.param,)

    def refs(self) -> dict[str, Ref]:
        return {"value": self.value}

    def to_tensors(self) -> dict[str, Tensor]:
        if self.param != "weight":
            return super().to_tensors()
        return {"scale": self.value.loader()}

    def replacement(self) -> tuple[str, Ref]:
        return self.param, self.value

    def out_rows(self) -> int:
        return self.value.shape[0]

    def rows(self, start: int, stop: int, total: int, swap: bool = False) -> "SetPatch":
        return SetPatch(row_ref(self.value, start, stop, swap), self.param)

    def misfit(self, shapes: Mapping[str, Shape]) -> str | None:
        if shapes.get(self.param) != self.value.shape:
            return f"value {list(self.value.shape)} != module {self.param} {shapes.get(self.param)}"
        return None

    def delta(self, base: Mapping[str, Tensor], strength: float = 1.0) -> dict[str, Tensor]:
        return {self.param: self.value.load().reshape(base[self.param].shape) - base[self.param]}
