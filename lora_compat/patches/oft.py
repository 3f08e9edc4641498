"""Orthogonal fine-tuning: LyCORIS Diag-OFT, kohya OFT (``oft_unet_``) and legacy LyCORIS ``oft_diag``."""
from __future__ import annotations

from typing import Literal, Mapping

from .._lazy import torch

from .base import BuildContext, Patch, Ref, Shape, Tensor, stored

OftStyle = Literal["lycoris", "kohya", "rotation"]


def skew(blocks: Tensor) -> Tensor:
    return blocks - blocks.transpose(-1, -2)


def cayley(q: Tensor) -> Tensor:
    eye = torch.eye(q.shape[-1], dtype=q.dtype).expand_as(q)
    return (eye + q) @ torch.linalg.inv(eye - q)


def lycoris_constrain(q: Tensor, constraint: float) -> Tensor:
    """LyCORIS: rescale Q to norm ``constraint`` when it is larger (no-op for constraint <= 0)."""
    if constraint > 0:
        norm = torch.linalg.vector_norm(q) + 1e-8
        if norm > constraint:
            return q * (constraint / norm)
    return q


def rotation_refs(blocks: Ref, constraint: Ref | float | None, rescale: Ref | None) -> dict[str, Ref]:
    """The tensors of an OFT/BOFT patch by role: its blocks, a stored constraint (``alpha``) and ``rescale``."""
    refs = {"blocks": blocks}
    if isinstance(constraint, Ref):
        refs["alpha"] = constraint
    if rescale is not None:
        refs["rescale"] = rescale
    return refs


class OftPatch(Patch):
    """Blockwise rotation of the output rows: ``W'_k = rescale ⊙ R_kᵀ · W_k``.

    Strength interpolates the rotation: ``R_s = s·(R − I) + I`` (LyCORIS and kohya agree), so the
    result is not linear in strength.
    """

    kind = "oft"
    linear_in_strength = False
    order = 60
    suffixes = {"oft_blocks": "oft_blocks", "oft_diag": "oft_diag", "rescale": "rescale", "alpha": "alpha"}
    min_dims = {"oft_blocks": 2, "oft_diag": 2}

    @classmethod
    def from_parts(cls, parts: Mapping[str, Ref], context: BuildContext) -> "OftPatch | None":
        if "oft_blocks" in parts:
            return cls(parts["oft_blocks"], parts.get("alpha"), parts.get("rescale"), context.oft_style)  # type: ignore[arg-type]
        if "oft_diag" in parts:  # legacy LyCORIS: the rotation itself
            return cls(parts["oft_diag"], None, parts.get("rescale"), "rotation")
        return None

    def __init__(self, blocks: Ref, constraint: Ref | float | None = None, rescale: Ref | None = None,
                 style: OftStyle = "lycoris"):
        self.blocks, self.constraint, self.rescale, self.style = blocks, constraint, rescale, style

    @property
    def rank(self) -> int:
        """Block size (OFT's counterpart of a rank)."""
        return self.blocks.shape[-1]

    def refs(self) -> dict[str, Ref]:
        return rotation_refs(self.blocks, self.constraint, self.rescale)

    def to_tensors(self) -> dict[str, Tensor]:
        return {**stored((("oft_diag" if self.style == "rotation" else "oft_blocks", self.blocks),
                          ("rescale", self.rescale))), **constraint_tensors(self.constraint)}

    def misfit(self, shapes: Mapping[str, Shape]) -> str | None:
        weight = shapes.get("weight")
        n, b = self.blocks.shape[0], self.blocks.shape[-1]
        if weight is None or weight[0] != n * b:
            return f"OFT {n} blocks of {b} need {n * b} output rows, module weight is {weight}"
        return None

    def _alpha(self) -> float:
        if self.constraint is None:
            return 0.0
        return self.constraint.item() if isinstance(self.constraint, Ref) else float(self.constraint)

    def rotation(self, out_dim: int) -> Tensor:
        """Per-block rotation ``R`` at strength 1."""
        blocks = self.blocks.load()
        if self.style == "rotation":
            return blocks
        q = skew(blocks)
        limit = self._alpha() * out_dim
        if self.style == "kohya":
            norm = torch.linalg.vector_norm(q)
            q = q * ((torch.clamp(norm, max=limit) + 1e-8) / (norm + 1e-8))
        else:
            q = lycoris_constrain(q, limit)
        return cayley(q)

    def delta(self, base: Mapping[str, Tensor], strength: float = 1.0) -> dict[str, Tensor]:
        weight = base["weight"]
        r = self.rotation(weight.shape[0])
        if strength != 1.0:
            eye = torch.eye(r.shape[-1], dtype=r.dtype)
            r = strength * (r - eye) + eye
        n, b = r.shape[0], r.shape[-1]
        rotated = torch.einsum("knm,kn...->km...", r, weight.reshape(n, b, *weight.shape[1:]))
        rotated = rotated.reshape(weight.shape)
        if self.rescale is not None:
            rotated = rotated * self.rescale.load().reshape(-1, *[1] * (weight.dim() - 1))
        return {"weight": rotated - weight}


def constraint_tensors(constraint: Ref | float | None) -> dict[str, Tensor]:
    """OFT/BOFT's constraint back as its ``alpha`` tensor (as stored, or the value)."""
    if isinstance(constraint, Ref):
        return {"alpha": constraint.loader()}
    return {} if constraint is None else {"alpha": torch.tensor(float(constraint))}
