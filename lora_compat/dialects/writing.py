"""What every dialect's ``write`` gives back, and the truncated SVD that compresses a delta to a LoRA."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Written:
    """A PatchSet under a dialect's names: the tensors, the header entries the dialect adds (the caller adds
    the carried-over metadata), how many modules were written, and the SVD errors when ``rank`` compressed some."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    modules: int = 0
    #: module → relative Frobenius error of its compressed delta (only modules that were compressed)
    svd_errors: dict[str, float] = field(default_factory=dict)
    #: ‖ΔW − ΔW_r‖ / ‖ΔW‖ over all compressed modules together (``None``: nothing was compressed)
    overall_error: float | None = None


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``up @ down`` of rank ≤ ``rank`` closest to ``delta`` (Frobenius), and the relative error."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(rank, s.shape[0])
    up = (u[:, :r] * s[:r]).float()
    down = vh[:r].float()
    norm = float(delta.norm())
    error = float((delta - up @ down).norm()) / norm if norm else 0.0
    return up, down, error
