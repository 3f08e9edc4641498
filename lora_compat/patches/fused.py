"""Row slices: splitting a patch made for a fused weight (BFL ``qkv``, ``linear1``) into patches on the split
modules, and bundling patches on split modules into one patch on a fused host weight.

Each kind slices itself (``Patch.rows``): a LoRA exactly, by slicing its up rows and sharing its down (never
splitting the shared rank); other factorised kinds are materialised and sliced (:class:`RowsOf`). Missing parts
of a fused weight are zero deltas.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

from .._lazy import torch

from .base import FactorisedPatch, Patch, Ref, Shape, Tensor

if TYPE_CHECKING:
    from ..archs.routes import Route


def swap_halves(t: Tensor) -> Tensor:
    """(shift, scale) ↔ (scale, shift) along the rows."""
    half = t.shape[0] // 2
    return torch.cat([t[half:], t[:half]])


def row_ref(ref: Ref, start: int, stop: int, swap: bool = False) -> Ref:
    """Rows ``[start, stop)`` of a lazy tensor (halves swapped first when ``swap``)."""
    loader = ref.loader

    def load() -> Tensor:
        t = loader()
        return (swap_halves(t) if swap else t)[start:stop]

    return Ref((stop - start, *ref.shape[1:]), load, ref.name)


class RowsOf(FactorisedPatch):
    """Rows ``[start, stop)`` of a factorised patch made for a fused weight of ``total`` rows."""

    def __init__(self, inner: FactorisedPatch, start: int, stop: int, total: int, swap: bool = False):
        self.inner, self.start, self.stop, self.total, self.swap = inner, start, stop, total, swap

    @property
    def kind(self) -> str:  # type: ignore[override]
        return self.inner.kind

    @property
    def rank(self) -> int | None:
        return self.inner.rank

    @property
    def kinds(self) -> tuple[str, ...]:
        return self.inner.kinds

    def refs(self) -> dict[str, Ref]:
        return self.inner.refs()

    def out_rows(self) -> int:
        return self.stop - self.start

    @property
    def sliced_from(self) -> FactorisedPatch:
        return self.inner

    @property
    def flat_kernel(self) -> bool:  # type: ignore[override]
        return self.inner.flat_kernel

    def implied_weight_shape(self) -> Shape | None:
        inner = self.inner.implied_weight_shape()
        return None if inner is None else (self.stop - self.start, *inner[1:])

    def in_columns(self) -> int | None:
        return self.inner.in_columns()

    def misfit(self, shapes: Mapping[str, Shape]) -> str | None:
        weight = shapes.get("weight")
        if weight is None:
            return "module has no weight"
        if weight[0] != self.stop - self.start:
            return f"rows [{self.start}, {self.stop}) of a fused patch do not fit a weight of {weight[0]} rows"
        return self.inner.misfit({"weight": (self.total, *weight[1:])})

    def weight_delta(self, weight_shape: torch.Size) -> Tensor:
        full = self.inner.weight_delta(torch.Size((self.total, *weight_shape[1:])))
        return (swap_halves(full) if self.swap else full)[self.start:self.stop]


class FusedPatch(Patch):
    """Patches on canonical (split) modules that live in rows of one fused host module.

    ``delta`` places each part's change in its rows (zero elsewhere); the merge computes each row range
    exactly like the split module would (see ``patcher.values``).
    """

    kind = "fused"
    linear_in_strength = False

    def __init__(self, parts: Sequence[tuple["Route", Patch]]):
        self.parts = sorted(parts, key=lambda part: part[0].start)

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(route.host_param(p) for route, patch in self.parts for p in patch.params))

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(sorted({k for _, patch in self.parts for k in patch.kinds}))

    @property
    def rank(self) -> int | None:
        return max((patch.rank or 0 for _, patch in self.parts), default=None) or None

    def refs(self) -> dict[str, Ref]:
        refs: dict[str, Ref] = {}
        for route, patch in self.parts:
            for role, ref in patch.refs().items():
                refs[f"{route.start}:{role}"] = ref
        return refs

    @property
    def row_parts(self) -> Sequence[tuple["Route", Patch]]:
        return self.parts

    @property
    def reads_dora_strength(self) -> bool:
        return any(patch.reads_dora_strength for _, patch in self.parts)

    def misfit(self, shapes: Mapping[str, Shape]) -> str | None:
        return None  # each part was checked against its canonical module's shapes

    def host_native(self) -> bool:
        """Plain LoRA parts in unswapped rows: what a host computes itself from :func:`fused_lora`'s tensors."""
        return all(patch.weight_low_rank() is not None for _, patch in self.parts) and \
            not any(route.swap for route, _ in self.parts)

    def with_dora_strength(self, mode: str) -> "FusedPatch":
        parts = [(route, patch.with_dora_strength(mode)) for route, patch in self.parts]
        return self if all(new is old for (_, new), (_, old) in zip(parts, self.parts)) else FusedPatch(parts)

    def delta(self, base: Mapping[str, Tensor], strength: float = 1.0) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for route, patch in self.parts:
            view = route_view(route, base)
            for param, delta in patch.delta(view, strength).items():
                host = route.host_param(param)
                full = out.setdefault(host, torch.zeros(base[host].shape, dtype=torch.float32,
                                                        device=base[host].device))
                place(route, full, delta)
        return out


def fused_lora(parts: Sequence[tuple["Route", Patch]], total_rows: int) -> dict[str, Tensor] | None:
    """Patches on row ranges of one fused module → one exact LoRA for the fused module (fp32):
    ``down = [down_1; down_2; ...]``, ``up`` block-diagonal with each part's scale folded in, alpha = rank;
    rows no part covers are zero; a part in swapped halves has its up rows swapped back. ``None`` when a part is
    not a plain LoRA (no bare ``up``/``down`` pair): each caller decides what then becomes of the module."""
    low_ranks = [patch.weight_low_rank() for _, patch in parts]
    if any(low_rank is None for low_rank in low_ranks):
        return None
    factors = [low_rank.factors() for low_rank in low_ranks]
    down = torch.cat([d for _, d, _ in factors])
    up = torch.zeros(total_rows, down.shape[0])
    col = 0
    for (route, _), (part_up, _, scale) in zip(parts, factors):
        block = part_up * scale
        rows = torch.zeros(total_rows, block.shape[1])
        rows[route.start:route.stop] = block
        up[:, col:col + block.shape[1]] = swap_halves(rows) if route.swap else rows
        col += block.shape[1]
    return {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(float(down.shape[0]))}


def route_view(route: "Route", host_params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The canonical module's parameters as views (copies when swapped) of the host's rows."""
    view = {}
    for param in ("weight", "bias"):
        host = host_params.get(route.host_param(param))
        if host is not None:
            rows = swap_halves(host) if route.swap else host
            view[param] = rows[route.start:route.stop]
    return view


def place(route: "Route", host: Tensor, value: Tensor) -> None:
    """Write a canonical module's value into its rows of the host tensor."""
    if route.swap:
        value = swap_halves(value)
    host[route.start:route.stop].copy_(value)
