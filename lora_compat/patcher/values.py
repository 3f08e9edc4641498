"""Patched values: new parameter values from pristine ones and a stack of contributions, summed in fp32."""
from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import torch

from ..patches import Patch
from ..patches.fused import place, route_view
from ..patches.widen import pad_weight
from .factors import FactorSource, scaled_factors


class Contribution(NamedTuple):
    """One patch of a module's stack with the strength it is applied at (a tuple: ``patch, s = c`` works)."""

    patch: Patch
    strength: float


#: half-precision weights are merged in blocks of about this many elements (an fp32 block that stays in cache)
CHUNK_ELEMENTS = 1 << 19


def merged_values(base: Mapping[str, torch.Tensor], contributions: Sequence[Contribution],
                  out: Mapping[str, torch.Tensor] | None = None,
                  factors: FactorSource = scaled_factors) -> dict[str, torch.Tensor]:
    """``base + Σ deltas`` for every parameter the contributions touch, summed in a fixed order in fp32.

    ``base`` holds the pristine parameters in their own dtype. Plain LoRA terms are folded into one GEMM
    (``[s₁·up₁ | s₂·up₂] @ [down₁; down₂]``) added to the base with ``addmm``, block of rows by block of
    rows; other kinds add their fp32 delta. When ``out`` gives a buffer for the weight (any dtype), the
    rounded result is written straight into it and that buffer is returned; other values are fp32.
    ``factors`` gives the plain LoRA terms' scaled factors (the Patcher passes its :class:`FactorCache`).

    ``set`` patches replace the base value before anything is added (exact: no ``value - base`` round
    trip); input-widening patches zero-pad the base weight first.
    """
    if any(patch.row_parts is not None for patch, _ in contributions):
        return _merged_fused(base, contributions, out, factors)
    widths = [widening[0] for widening in (patch.widening() for patch, _ in contributions) if widening is not None]
    if widths:
        base = pad_weight(base, max(widths))
        contributions = [((p.widening() or (0, p))[1], s) for p, s in contributions]
        if out and "weight" in out and out["weight"].shape != base["weight"].shape:
            out = None
    replaced = [r for r in (patch.replacement() for patch, _ in contributions) if r is not None]
    if replaced:
        base = dict(base)
        for param, value in replaced:
            base[param] = value.load().reshape(base[param].shape)
        contributions = [(p, s) for p, s in contributions if p.replacement() is None]
    ups: list[torch.Tensor] = []
    downs: list[torch.Tensor] = []
    deltas: dict[str, torch.Tensor] = {}
    others = []
    for patch, strength in contributions:
        low_rank = patch.low_rank() if "weight" in base else None
        if low_rank is not None:
            up, down, bias = factors(low_rank, strength)
            ups.append(up)
            downs.append(down)
            if bias is not None:
                _accumulate(deltas, "bias", bias)
        else:
            others.append((patch, strength))
    if others:
        fp32 = {name: t.float() for name, t in base.items()}
        for patch, strength in others:
            for param, delta in patch.delta(fp32, strength).items():
                _accumulate(deltas, param, delta)
    result: dict[str, torch.Tensor] = {}
    if ups:
        up, down = (ups[0], downs[0]) if len(ups) == 1 else (torch.cat(ups, 1), torch.cat(downs, 0))
        extra = deltas.pop("weight", None)
        target = out.get("weight") if out else None
        if target is None or extra is not None:
            target = torch.empty(base["weight"].shape, dtype=torch.float32, device=base["weight"].device)
        _lowrank_into(target, base["weight"], up, down)
        if extra is not None:
            target += extra
        result["weight"] = target
    for param, delta in deltas.items():
        result[param] = base[param].float() + delta
    for param, _ in replaced:
        result.setdefault(param, base[param].float())
    if widths:
        result.setdefault("weight", base["weight"].float())
    return result


def _merged_fused(base: Mapping[str, torch.Tensor], contributions: Sequence[Contribution],
                  out: Mapping[str, torch.Tensor] | None, factors: FactorSource) -> dict[str, torch.Tensor]:
    """A fused host weight (BFL ``qkv``/``linear1``): each canonical module's rows are merged exactly as the
    split module would be (same inputs, same order), the rows no patch covers stay as they were."""
    groups: dict = {}
    for patch, strength in contributions:
        if patch.row_parts is None:
            raise TypeError(f"a {patch.kind} patch cannot be stacked with row-sliced patches on one fused weight")
        for route, part in patch.row_parts:
            groups.setdefault(route, []).append((part, strength))
    result: dict[str, torch.Tensor] = {}
    for patch, _ in contributions:
        for param in patch.params:
            if param in result:
                continue
            target = out.get(param) if out else None
            if target is None or target.shape != base[param].shape:
                target = torch.empty(base[param].shape, dtype=torch.float32, device=base[param].device)
            target.copy_(base[param])
            result[param] = target
    for route in sorted(groups, key=lambda r: r.start):
        host_weight = result.get(route.host_param("weight"))
        sub_out = None if route.swap or host_weight is None else {"weight": host_weight[route.start:route.stop]}
        for param, value in merged_values(route_view(route, base), groups[route], sub_out, factors).items():
            if sub_out is not None and param == "weight" and value.data_ptr() == sub_out["weight"].data_ptr():
                continue
            place(route, result[route.host_param(param)], value)
    return result


def _lowrank_into(target: torch.Tensor, weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
    """``target = weight + up @ down`` computed in fp32 block by block of rows, rounded once into ``target``."""
    rows = weight.shape[0]
    flat_weight = weight.reshape(rows, -1)
    flat_target = target.view(rows, -1)
    if flat_target.dtype == torch.float32 and flat_weight.dtype == torch.float32:
        torch.addmm(flat_weight, up, down, out=flat_target)
        return
    # half precision: one reused fp32 scratch block (fresh allocations per block would fault in new pages)
    step = max(1, CHUNK_ELEMENTS // max(1, flat_weight.shape[1]))
    scratch = torch.empty(min(rows, step) * flat_weight.shape[1], dtype=torch.float32, device=weight.device)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        block = scratch[: (stop - start) * flat_weight.shape[1]].view(stop - start, -1)
        block.copy_(flat_weight[start:stop])
        block.addmm_(up[start:stop], down)
        flat_target[start:stop].copy_(block)


def _accumulate(into: dict[str, torch.Tensor], param: str, delta: torch.Tensor) -> None:
    into[param] = delta if param not in into else into[param] + delta
