"""Input widening: a patch made for a wider input than the module has (FLUX.1 Control LoRAs widen ``x_embedder``
from 64 to 128 input channels). The module's weight is zero-padded to the new width, then patched."""
from __future__ import annotations

from typing import Mapping

from .._lazy import torch

from .base import Patch, Ref, Shape, Tensor


class WidenPatch(Patch):
    """``W' = [W | 0] + Δ``: the inner patch applied to the weight zero-padded to ``in_features`` columns."""

    linear_in_strength = False

    def __init__(self, inner: Patch, in_features: int):
        self.inner, self.in_features = inner, in_features

    @property
    def kind(self) -> str:  # type: ignore[override]
        return self.inner.kind

    @property
    def kinds(self) -> tuple[str, ...]:
        return (*self.inner.kinds, "widen")

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(("weight", *self.inner.params)))

    @property
    def rank(self) -> int | None:
        return self.inner.rank

    def refs(self) -> dict[str, Ref]:
        return self.inner.refs()

    def widening(self) -> tuple[int, Patch]:
        return self.in_features, self.inner

    @property
    def reads_dora_strength(self) -> bool:
        return self.inner.reads_dora_strength

    def with_dora_strength(self, mode: str) -> "WidenPatch":
        inner = self.inner.with_dora_strength(mode)
        return self if inner is self.inner else WidenPatch(inner, self.in_features)

    def widened(self, shapes: Mapping[str, Shape]) -> dict[str, Shape]:
        weight = shapes["weight"]
        return {**shapes, "weight": (weight[0], self.in_features, *weight[2:])}

    def misfit(self, shapes: Mapping[str, Shape]) -> str | None:
        weight = shapes.get("weight")
        if weight is None or len(weight) != 2:
            return "input widening needs a Linear weight"
        if weight[1] > self.in_features:
            return f"the patch widens the input to {self.in_features}, the module already has {weight[1]}"
        return self.inner.misfit(self.widened(shapes))

    def delta(self, base: Mapping[str, Tensor], strength: float = 1.0) -> dict[str, Tensor]:
        """The inner patch's change against the zero-padded base (``weight`` comes back at the new width;
        the merge pads the base itself with :func:`pad_weight`)."""
        return self.inner.delta(pad_weight(base, self.in_features), strength)


def pad_weight(base: Mapping[str, Tensor], in_features: int) -> dict[str, Tensor]:
    """``base`` with its weight zero-padded to ``in_features`` columns (unchanged if already that wide)."""
    weight = base["weight"]
    if weight.shape[1] == in_features:
        return dict(base)
    wide = torch.zeros((weight.shape[0], in_features), dtype=weight.dtype, device=weight.device)
    wide[:, : weight.shape[1]] = weight
    return {**base, "weight": wide}
