"""PEFT OFT (``peft.tuners.oft``, the ``oft_R.weight`` layout of peft > 0.15.2): a block-diagonal rotation of the
weight's *input* columns, ``W' = W · Rᵀ`` (conv: the flattened ``in·kh·kw`` columns).

Unlike LyCORIS Diag-OFT (output rows, exact Cayley), PEFT stores each block's strictly-upper triangle packed
(``[n_blocks, b(b−1)/2]``; one shared block with ``block_share``) and by default builds the rotation with a
truncated Neumann series instead of the exact Cayley transform. ``coft`` projects the parameters onto an
``eps``-ball before use. Everything here follows ``OFTRotationModule.get_weight`` and ``Linear.merge``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from .._lazy import torch

from .base import Patch, Ref, Shape, Tensor, numel


@dataclass(frozen=True)
class OftSettings:
    """The OFTConfig fields that change the merged weight (PEFT's defaults)."""

    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    coft: bool = False
    eps: float = 6e-5


def block_size_of(packed: int) -> int | None:
    """``b`` with ``b(b−1)/2 == packed`` (the packed upper triangle of a ``b x b`` block), or ``None``."""
    b = int(round((1 + math.sqrt(1 + 8 * packed)) / 2))
    return b if b * (b - 1) // 2 == packed and b > 1 else None


def _skew(vec: Tensor, b: int) -> Tensor:
    rows, cols = torch.triu_indices(b, b, 1)
    matrix = torch.zeros(vec.shape[0], b, b, dtype=vec.dtype)
    matrix[:, rows, cols] = vec
    return matrix - matrix.transpose(-2, -1)


def _project(vec: Tensor, b: int, eps: float) -> Tensor:
    """COFT: each block's skew matrix scaled into the ``eps / sqrt(n_blocks)`` ball (``_project_batch``)."""
    skew = _skew(vec, b)
    eps = eps * 1 / torch.sqrt(torch.tensor(skew.shape[0]))
    norm = torch.norm(skew, dim=(1, 2), keepdim=True)
    out = torch.where(norm <= eps, skew, eps * (skew / norm))
    rows, cols = torch.triu_indices(b, b, 1)
    return out[:, rows, cols]


def peft_oft_rotation(vec: Tensor, b: int, settings: OftSettings) -> Tensor:
    """Per-block rotation ``[n, b, b]`` from the packed parameters (``_cayley_batch``): the Neumann series
    ``I + 2Q + 2Q² + … + Q^(k−1)`` (PEFT's term count), or ``(I − Q)(I + Q)⁻¹`` without it."""
    if settings.coft:
        vec = _project(vec, b, settings.eps)
    q = _skew(vec, b)
    terms = settings.num_cayley_neumann_terms
    if settings.use_cayley_neumann:
        r = torch.eye(b, dtype=q.dtype).repeat(q.shape[0], 1, 1)
        if terms > 1:
            r.add_(q, alpha=2.0)
            if terms > 2:
                power = torch.bmm(q, q)
                r.add_(power, alpha=2.0)
                for _ in range(3, terms - 1):
                    power = torch.bmm(power, q)
                    r.add_(power, alpha=2.0)
                power = torch.bmm(power, q)
                r.add_(power)
        return r
    eye = torch.eye(b, dtype=q.dtype).expand_as(q)
    return torch.linalg.solve(eye + q, eye - q, left=False)


def rotate_columns(weight: Tensor, r: Tensor) -> Tensor:
    """``W · blockdiag(R)ᵀ`` on the flattened input columns, block by block."""
    b = r.shape[-1]
    columns = weight.reshape(weight.shape[0], -1, b)
    if r.shape[0] != columns.shape[1]:  # one shared block
        r = r.expand(columns.shape[1], b, b)
    return torch.einsum("okj,kcj->okc", columns, r).reshape(weight.shape)


class PeftOftPatch(Patch):
    """``W' = W · blockdiag(R)ᵀ``. PEFT has no strength for OFT (``set_scale`` warns and keeps 1); here the
    strength interpolates the rotation like lora_compat's OFT, ``R_s = s·(R − I) + I``, which for a rotation
    of the input columns is exactly ``W + s·(W' − W)``: linear in the strength."""

    kind = "peft_oft"
    written_as_diff = True

    def __init__(self, params: Ref, settings: OftSettings = OftSettings(), shared: bool | None = None):
        b = block_size_of(params.shape[-1]) if len(params.shape) == 2 else None
        if b is None:
            raise ValueError(f"oft_R.weight {list(params.shape)} is not [blocks, b(b-1)/2]")
        self.packed, self.settings, self.block_size = params, settings, b
        #: one block for every column group (``block_share``); ``None``: decided by the weight's width
        self.shared = shared

    @property
    def rank(self) -> int:
        """Block size (OFT's counterpart of a rank)."""
        return self.block_size

    def refs(self) -> dict[str, Ref]:
        return {"oft_R": self.packed}

    def misfit(self, shapes: Mapping[str, Shape]) -> str | None:
        weight = shapes.get("weight")
        if weight is None or len(weight) < 2:
            return "module has no matrix weight"
        columns, n, b = numel(weight[1:]), self.packed.shape[0], self.block_size
        if n == 1 and self.shared is not False:
            if columns % b == 0:
                return None
            return (f"PEFT OFT shared block of {b} needs input columns in multiples of {b}, "
                    f"module weight is {list(weight)}")
        if columns != n * b:
            return f"PEFT OFT {n} blocks of {b} need {n * b} input columns, module weight is {list(weight)}"
        return None

    def rotation(self) -> Tensor:
        """The per-block rotation ``R`` at strength 1."""
        return peft_oft_rotation(self.packed.load(), self.block_size, self.settings)

    def delta(self, base: Mapping[str, Tensor], strength: float = 1.0) -> dict[str, Tensor]:
        weight = base["weight"]
        return {"weight": (rotate_columns(weight, self.rotation()) - weight) * strength}
