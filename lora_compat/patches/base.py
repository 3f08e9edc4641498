"""Patch kinds: each maps a module's base parameters to new values, computed in fp32.

A patch holds :class:`Ref` s (lazy tensors: shape known from the header, data read on demand), so a
``PatchSet`` can be built and shape-checked from a file header alone.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Mapping

from .._lazy import torch

if TYPE_CHECKING:
    from torch import Tensor
else:  # only annotations (deferred in every patch module) name it: building patches must not import torch
    Tensor = "torch.Tensor"

Shape = tuple[int, ...]


class Ref:
    """A tensor known by its shape until :meth:`load` reads it (as fp32)."""

    __slots__ = ("shape", "loader", "name")

    def __init__(self, shape: Shape, loader: Callable[[], Tensor], name: str = ""):
        self.shape, self.loader, self.name = tuple(shape), loader, name

    def __repr__(self) -> str:
        return f"Ref({self.name!r}, {list(self.shape)})"

    @classmethod
    def of(cls, tensor: Tensor, name: str = "") -> "Ref":
        return cls(tuple(tensor.shape), lambda: tensor, name)

    def load(self) -> Tensor:
        return self.loader().to(torch.float32)

    def item(self) -> float:
        return float(self.loader().float().reshape(-1)[0])


@dataclass(frozen=True)
class Scale:
    """A rank scale: ``alpha / rank`` (``alpha / sqrt(rank)`` for rsLoRA); no alpha means 1."""

    alpha: Ref | float | None
    rank: int
    rs: bool = False

    def value(self) -> float:
        if self.alpha is None or self.rank == 0:
            return 1.0
        alpha = self.alpha.item() if isinstance(self.alpha, Ref) else float(self.alpha)
        return alpha / (math.sqrt(self.rank) if self.rs else self.rank)


ONE = Scale(None, 0)


def flat(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


def numel(shape: Shape) -> int:
    return math.prod(shape)


class Patch(ABC):
    """One patch on one module. Subclasses set ``kind`` and implement :meth:`delta` and :meth:`misfit`."""

    kind: ClassVar[str]
    #: True when ``delta`` is linear in the strength (the patcher's hot mode may then use it directly)
    linear_in_strength: ClassVar[bool] = True

    @property
    def params(self) -> tuple[str, ...]:
        """Names of the module parameters this patch changes."""
        return ("weight",)

    @property
    def rank(self) -> int | None:
        return None

    @property
    def kinds(self) -> tuple[str, ...]:
        return (self.kind,)

    @abstractmethod
    def refs(self) -> dict[str, Ref]:
        """The patch's tensors by role (``up``, ``down``, ``alpha``...)."""

    @abstractmethod
    def misfit(self, shapes: Mapping[str, Shape]) -> str | None:
        """Why this patch cannot apply to a module with these parameter shapes, or ``None`` if it fits."""

    @abstractmethod
    def delta(self, base: Mapping[str, Tensor], strength: float = 1.0) -> dict[str, Tensor]:
        """fp32 change of each parameter in :attr:`params`, given the fp32 base parameters."""

    def with_dora_strength(self, mode: str) -> "Patch":
        """This patch with its DoRA parts reading the strength by ``mode`` (see :mod:`.dora`); a kind
        without DoRA returns itself, a wrapper maps the patches it holds."""
        return self


class FactorisedPatch(Patch):
    """A kind whose change is an additive ``ΔW`` built from factors (LoRA, LoHa, LoKr): DoRA can wrap it."""

    @abstractmethod
    def weight_delta(self, weight_shape: torch.Size) -> Tensor:
        """``ΔW`` in the weight's shape with the rank scale applied and strength 1."""

    def delta(self, base: Mapping[str, Tensor], strength: float = 1.0) -> dict[str, Tensor]:
        return {"weight": self.weight_delta(base["weight"].shape) * strength}


def conv_or_linear_misfit(weight: Shape | None, out: int, inner: int, what: str) -> str | None:
    """Common check for factorised kinds: ``out`` rows and ``inner`` = in x kernel elements."""
    if weight is None:
        return "module has no weight"
    if weight[0] != out or numel(weight[1:]) != inner:
        return f"{what} implies a weight of {out} x {inner} elements per row, module weight is {list(weight)}"
    return None
