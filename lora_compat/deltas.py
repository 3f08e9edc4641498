"""Full weight deltas ``ΔW`` of single patches, for what works on whole deltas: ``convert --rank`` (truncated
SVD) and the ``svd``/``ties``/``dare`` merges.

- LoRA, LoHa, LoKr and full (``diff``) patches carry their delta in their own tensors: it is computed from
  the file alone, on any shapes. The weight's shape comes from the base's module when the patch fits it,
  else from the patch's own factors (a model of another width or depth; a kernel stored flattened, as
  LoHa/LoKr store 3x3 convs, is taken from the base's module of that name).
- DoRA, OFT/BOFT, IA3 and GLoRA (its ``W·a1·a2`` term) change the weight as a function of the weight: their
  delta needs the base weights, from a checkpoint (``BaseWeights``, e.g. :class:`lora_compat.tools.bake.Checkpoint`).

Deltas are at strength 1 unless asked otherwise, in fp32.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch

from .archs import ModuleIndex
from .errors import LoraCompatError
from .patches import Patch
from .patches.base import Shape, numel

#: canonical target → its module's base parameters (fp32), or ``None`` when the checkpoint lacks the module
BaseWeights = Callable[[str], Optional[Mapping[str, torch.Tensor]]]
#: how the CLI and the Python API take the base weights
CHECKPOINT_HINT = "pass --checkpoint PATH (Python: checkpoint=PATH), a diffusers folder or single-file safetensors"


def needs_base(patch: Patch) -> bool:
    """Whether the patch's delta depends on the base weight (DoRA, OFT/BOFT, IA3, GLoRA, norms...)."""
    return patch.needs_base


def implied_weight_shape(patch: Patch) -> Shape | None:
    """The weight shape the patch's own tensors imply (2-D ``[out, in·k·k]`` when a conv kernel is stored
    flattened), or ``None`` for kinds whose tensors do not tell."""
    return patch.implied_weight_shape()


def weight_shape(patch: Patch, index: ModuleIndex, target: str) -> Shape:
    """The shape of the weight ``patch`` changes: the index's module when the patch fits it, else the
    patch's own (see the module docstring)."""
    shapes = index.shapes(target) or {}
    known = shapes.get("weight")
    if known is not None and not patch.misfit(shapes):
        return tuple(known)
    implied = implied_weight_shape(patch)
    if implied is None:
        reason = patch.misfit(shapes) if shapes else "no such module in the base"
        raise LoraCompatError(f"{target}: its {patch.kind} patch does not fit the module ({reason})")
    if patch.flat_kernel and len(implied) == 2 and known is not None and len(known) == 4:
        kernel = numel(known[2:])
        if implied[1] % kernel == 0:  # LoHa/LoKr store a conv's kernel flattened: the base's module tells it
            return (implied[0], implied[1] // kernel, *known[2:])
    return tuple(implied)


def module_delta(patch: Patch, index: ModuleIndex, target: str, weights: BaseWeights | None = None,
                 strength: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(ΔW, Δb)`` of ``patch`` on ``target`` at ``strength`` (1: the whole patch), ``ΔW`` in the weight's
    shape, ``Δb`` ``None`` when the bias does not change. Kinds that need the base weight read it from
    ``weights``."""
    if needs_base(patch):
        base = weights(target) if weights is not None else None
        if weights is None:
            raise LoraCompatError(f"{target}: its {patch.kind} patch depends on the base weights, so its delta "
                                  f"needs them: {CHECKPOINT_HINT}")
        if base is None or "weight" not in base:
            raise LoraCompatError(f"{target}: the checkpoint has no weight for this module, which the "
                                  f"{patch.kind} patch needs")
        reason = patch.misfit({k: tuple(v.shape) for k, v in base.items()})
        if reason:
            raise LoraCompatError(f"{target}: the {patch.kind} patch does not fit the checkpoint's module: {reason}")
        changed = patch.delta({k: v.float() for k, v in base.items()}, strength)
        if set(changed) - {"weight", "bias"} or "weight" not in changed or changed["weight"].dim() < 2:
            raise LoraCompatError(f"{target}: its {patch.kind} patch changes {', '.join(sorted(changed))}, which a "
                                  "weight delta (a LoRA) cannot hold")
        return changed["weight"], changed.get("bias")
    shape = torch.Size(weight_shape(patch, index, target))
    if len(shape) < 2:
        raise LoraCompatError(f"{target}: its {patch.kind} patch is on a {len(shape)}-D parameter, which has "
                              "no matrix delta to compress or merge")
    delta, bias = patch.shaped_delta(shape)
    if strength != 1.0:
        delta, bias = delta * strength, None if bias is None else bias * strength
    return delta, bias


__all__ = ["BaseWeights", "CHECKPOINT_HINT", "needs_base", "implied_weight_shape", "weight_shape", "module_delta"]
