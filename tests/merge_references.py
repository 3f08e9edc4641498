"""Independent TIES and DARE merges, written from PEFT's definitions (``peft.utils.merge_utils``), for the
tests of ``merge`` and of the delta tools."""
from __future__ import annotations

import zlib

import torch


def ties_reference(deltas: list[torch.Tensor], weights, density: float) -> torch.Tensor:
    kept = []
    for delta in deltas:
        flat = delta.flatten()
        k = int(density * flat.numel())
        threshold_index = flat.abs().argsort(descending=True)[:k]
        mask = torch.zeros_like(flat)
        mask[threshold_index] = 1
        kept.append((flat * mask).reshape(delta.shape))
    weighted = [w * t for w, t in zip(weights, kept)]
    total = sum(weighted)
    elected = torch.where(total >= 0, torch.ones_like(total), -torch.ones_like(total))
    agreeing = [torch.sign(t) == elected for t in weighted]
    summed = sum(t * a for t, a in zip(weighted, agreeing))
    count = sum(a.float() for a in agreeing)
    return summed / torch.clamp(count, min=1)


def dare_reference(target: str, deltas: list[torch.Tensor], weights, density: float, seed: int) -> torch.Tensor:
    total = torch.zeros_like(deltas[0])
    for i, (delta, weight) in enumerate(zip(deltas, weights)):
        g = torch.Generator().manual_seed((seed * 1_000_003 + i) ^ zlib.crc32(target.encode()))
        keep = torch.rand(delta.shape, generator=g) < density
        total = total + weight * torch.where(keep, delta / density, torch.zeros_like(delta))
    return total
