"""PEFT IA³ (``peft.tuners.ia3``): the weight multiplied by a learned vector ``ia3_l`` (initialised to 1).

A feed-forward module scales its input columns (``ia3_l [1, in]``, conv ``[1, in, 1, 1]``); any other module
scales its output rows and, as PEFT's ``merge`` does, its bias (``[out, 1]``, conv ``[1, out, 1, 1]``). Unlike
LyCORIS IA³ (``W·(1 + w)``, bias untouched) the stored vector is the factor itself.
"""
from __future__ import annotations

from typing import Mapping

from .base import Patch, Ref, Shape, Tensor, numel


class PeftIa3Patch(Patch):
    """``W' = W ⊙ l`` (rows, or input columns for a feed-forward module), ``b' = b ⊙ l`` (rows only). PEFT has
    no strength for IA³; here it interpolates the merged weight linearly, ``W + s·(W' − W)``."""

    kind = "peft_ia3"
    written_as_diff = True

    def __init__(self, vector: Ref, feedforward: bool | None = None):
        self.vector = vector
        #: scales the input columns; ``None``: decided by the module's shapes (rows when both would fit)
        self.feedforward = feedforward

    @property
    def params(self) -> tuple[str, ...]:
        return ("weight",) if self.feedforward else ("weight", "bias")

    def refs(self) -> dict[str, Ref]:
        return {"ia3_l": self.vector}

    def _on_input(self, weight: Shape) -> bool | None:
        """Whether the vector scales the input columns of a weight of this shape (``None``: it fits neither)."""
        n = numel(self.vector.shape)
        rows, columns = n == weight[0], n == weight[1]
        if self.feedforward is not None:
            return self.feedforward if (columns if self.feedforward else rows) else None
        if len(weight) == 2 and self.vector.shape[0] == 1 and n > 1:  # Linear: [1, in] feed-forward, [out, 1] not
            return True if columns else None
        return False if rows else True if columns else None

    def misfit(self, shapes: Mapping[str, Shape]) -> str | None:
        weight = shapes.get("weight")
        if weight is None or len(weight) < 2:
            return "module has no matrix weight"
        if self._on_input(weight) is None:
            side = {True: "input columns", False: "output rows", None: "rows or columns"}[self.feedforward]
            return f"PEFT IA3 ia3_l {list(self.vector.shape)} matches no {side} of the module weight {list(weight)}"
        return None

    def delta(self, base: Mapping[str, Tensor], strength: float = 1.0) -> dict[str, Tensor]:
        weight = base["weight"]
        l = self.vector.load().reshape(-1)
        on_input = self._on_input(tuple(weight.shape))
        shape = (1, -1, *[1] * (weight.dim() - 2)) if on_input else (-1, *[1] * (weight.dim() - 1))
        out = {"weight": (weight * l.reshape(shape) - weight) * strength}
        if not on_input and base.get("bias") is not None:
            out["bias"] = (base["bias"] * l - base["bias"]) * strength
        return out
