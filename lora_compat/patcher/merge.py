"""The merge computation: new parameter values from pristine ones and a stack of patches, in fp32."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..patches import LoraPatch, Patch

Contribution = tuple[Patch, float]
#: half-precision weights are merged in blocks of about this many elements (an fp32 block that stays in cache)
CHUNK_ELEMENTS = 1 << 19


def merged_values(base: Mapping[str, torch.Tensor], contributions: Sequence[Contribution],
                  out: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``base + Σ deltas`` for every parameter the contributions touch, summed in a fixed order in fp32.

    ``base`` holds the pristine parameters in their own dtype. Plain LoRA terms are folded into one GEMM
    (``[s₁·up₁ | s₂·up₂] @ [down₁; down₂]``) added to the base with ``addmm``, block of rows by block of
    rows; other kinds add their fp32 delta. When ``out`` gives a buffer for the weight (any dtype), the
    rounded result is written straight into it and that buffer is returned; other values are fp32.
    """
    ups: list[torch.Tensor] = []
    downs: list[torch.Tensor] = []
    deltas: dict[str, torch.Tensor] = {}
    others = []
    for patch, strength in contributions:
        if isinstance(patch, LoraPatch) and patch.mid is None and "weight" in base:
            up, down, scale = patch.factors()
            ups.append(up * (scale * strength))
            downs.append(down)
            if patch.bias is not None:
                _accumulate(deltas, "bias", patch.bias.load() * (scale * strength))
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
