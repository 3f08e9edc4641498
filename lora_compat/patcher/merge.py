"""The merge computation: new parameter values from pristine ones and a stack of patches, in fp32."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..patches import LoraPatch, Patch

Contribution = tuple[Patch, float]


def merged_values(base: Mapping[str, torch.Tensor], contributions: Sequence[Contribution],
                  out: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``base + Σ deltas`` for every parameter the contributions touch, in a fixed order, in fp32.

    Plain LoRA terms are folded into one GEMM (``[s₁·up₁ | s₂·up₂] @ [down₁; down₂]``) added to the base
    with ``addmm``; other kinds add their delta. ``out`` may give fp32 buffers to write the weight into.
    """
    deltas: dict[str, torch.Tensor] = {}
    ups: list[torch.Tensor] = []
    downs: list[torch.Tensor] = []
    for patch, strength in contributions:
        if isinstance(patch, LoraPatch) and patch.mid is None and "weight" in base:
            up, down, scale = patch.factors()
            ups.append(up * (scale * strength))
            downs.append(down)
            if patch.bias is not None:
                _accumulate(deltas, "bias", patch.bias.load() * (scale * strength))
            continue
        for param, delta in patch.delta(base, strength).items():
            _accumulate(deltas, param, delta)
    result: dict[str, torch.Tensor] = {}
    if ups:
        weight = base["weight"]
        flat = weight.reshape(weight.shape[0], -1)
        target = out.get("weight") if out else None
        up, down = (ups[0], downs[0]) if len(ups) == 1 else (torch.cat(ups, 1), torch.cat(downs, 0))
        if target is not None:
            torch.addmm(flat, up, down, out=target.view(flat.shape))
            new = target
        else:
            new = torch.addmm(flat, up, down).reshape(weight.shape)
        if "weight" in deltas:
            new += deltas.pop("weight")
        result["weight"] = new
    for param, delta in deltas.items():
        result[param] = base[param] + delta
    return result


def _accumulate(into: dict[str, torch.Tensor], param: str, delta: torch.Tensor) -> None:
    into[param] = delta if param not in into else into[param] + delta
