"""A low-rank patch's factors as the merge uses them: ``(scale·strength·up, down)`` in fp32, 2-D.

Reading and converting them is most of what a switch costs beyond the GEMMs themselves, so the Patcher keeps
the recently used ones (:class:`FactorCache`): switching back to a LoRA reuses them instead of reading its
file again. Cached or not, the tensors are the same values computed the same way.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, NamedTuple

import torch

from ..patches.base import LowRank


class Factors(NamedTuple):
    """``ΔW = up @ down`` (strength and rank scale already in ``up``) and ``Δb = bias`` (or ``None``)."""

    up: torch.Tensor
    down: torch.Tensor
    bias: torch.Tensor | None


#: how a merge gets a low-rank patch's factors at a strength
FactorSource = Callable[[LowRank, float], Factors]

#: bytes of fp32 factors the Patcher keeps for recently used LoRAs (the active stack's and the ones before)
FACTOR_CACHE_BYTES = 1 << 30


def scaled_factors(low_rank: LowRank, strength: float) -> Factors:
    """Read from the file and scaled: ``up · (scale · strength)`` (one fp32 multiply), ``down`` as it is."""
    up, down, scale = low_rank.factors()
    factor = scale * strength
    bias = low_rank.bias.load() * factor if low_rank.bias is not None else None
    return Factors(up * factor, down, bias)


class FactorCache:
    """The factors of recently used (patch, strength) pairs, least recently used dropped beyond ``budget``
    bytes. Keyed by the patch's own tensor references, so a re-read (changed) file never hits."""

    def __init__(self, budget: int = FACTOR_CACHE_BYTES):
        self.budget = budget
        self.bytes = 0
        self._entries: OrderedDict[tuple, Factors] = OrderedDict()

    def __call__(self, low_rank: LowRank, strength: float) -> Factors:
        # the strength's exact bits: 0.0 and -0.0 scale ``up`` to different zeros
        key = (low_rank.up, low_rank.down, low_rank.bias, low_rank.scale, float(strength).hex())
        factors = self._entries.get(key)
        if factors is not None:
            self._entries.move_to_end(key)
            return factors
        factors = scaled_factors(low_rank, strength)
        self._entries[key] = factors
        self.bytes += _nbytes(factors)
        while self.bytes > self.budget and self._entries:
            self.bytes -= _nbytes(self._entries.popitem(last=False)[1])
        return factors

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


def _nbytes(factors: Factors) -> int:
    return sum(t.numel() * t.element_size() for t in factors if t is not None)
