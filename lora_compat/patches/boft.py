"""LyCORIS BOFT: butterfly-factorised orthogonal fine-tuning."""
from __future__ import annotations

from typing import Mapping

from .._lazy import torch

from .base import BuildContext, Patch, Ref, Shape, Tensor, stored
from .oft import cayley, constraint_tensors, lycoris_constrain, rotation_refs, skew


class BoftPatch(Patch):
    """``m`` butterfly stages; stage ``i`` permutes rows in groups of ``2^i·b/2``, applies ``R_i`` per block
    (``R·W``, not ``Rᵀ``), and permutes back; then ``rescale``. Strength interpolates every stage:
    ``R_i ← s·R_i + (1−s)·I`` (LyCORIS)."""

    kind = "boft"
    linear_in_strength = False
    order = 50
    suffixes = {"oft_blocks": "oft_blocks", "rescale": "rescale", "alpha": "alpha"}
    min_dims = {"oft_blocks": 2}

    @classmethod
    def from_parts(cls, parts: Mapping[str, Ref], context: BuildContext) -> "BoftPatch | None":
        if "oft_blocks" not in parts or len(parts["oft_blocks"].shape) != 4:  # [stages, blocks, b, b]
            return None
        return cls(parts["oft_blocks"], parts.get("alpha"), parts.get("rescale"))

    def __init__(self, blocks: Ref, constraint: Ref | float | None = None, rescale: Ref | None = None):
        self.blocks, self.constraint, self.rescale = blocks, constraint, rescale

    @property
    def rank(self) -> int:
        return self.blocks.shape[-1]

    def refs(self) -> dict[str, Ref]:
        return rotation_refs(self.blocks, self.constraint, self.rescale)

    def to_tensors(self) -> dict[str, Tensor]:
        return {**stored((("oft_blocks", self.blocks), ("rescale", self.rescale))),
                **constraint_tensors(self.constraint)}

    def misfit(self, shapes: Mapping[str, Shape]) -> str | None:
        weight = shapes.get("weight")
        _, n, b, _ = self.blocks.shape
        if weight is None or weight[0] != n * b:
            return f"BOFT {n} blocks of {b} need {n * b} output rows, module weight is {weight}"
        return None

    def delta(self, base: Mapping[str, Tensor], strength: float = 1.0) -> dict[str, Tensor]:
        weight = base["weight"]
        alpha = self.constraint.item() if isinstance(self.constraint, Ref) else float(self.constraint or 0.0)
        blocks = self.blocks.load()
        stages, _, b, _ = blocks.shape
        r = cayley(lycoris_constrain(skew(blocks), alpha * weight.shape[0]))
        eye = torch.eye(b, dtype=r.dtype)
        x = weight
        for i in range(stages):
            ri = r[i] if strength == 1.0 else strength * r[i] + (1 - strength) * eye
            k = 2 ** i * (b // 2)
            x = x.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
            x = torch.einsum("bij,bj...->bi...", ri, x)
            x = x.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
        if self.rescale is not None:
            x = x * self.rescale.load().reshape(-1, *[1] * (weight.dim() - 1))
        return {"weight": x - weight}
