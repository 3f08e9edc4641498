"""DoRA: weight decomposition around a factorised patch (LoRA, LoHa, LoKr).

How a strength ``s`` is read (``dora_strength``, equal at ``s = 1``):

- ``"interpolate"`` (the default; the hosts' convention: A1111/SD.Next ``finalize_updown``, ComfyUI and Forge
  ``weight_decompose``, InvokeAI): ``W' = W + s·(W_dora − W)``, ``W_dora`` being the file's full-strength DoRA
  weight. 0 leaves the module exactly as it was, 1 is the whole LoRA, and the change is linear in ``s`` (so
  block weights, per-component multipliers and merge weights scale it like any LoRA).
- ``"library"`` (the convention of the library that wrote the file):
  LyCORIS/kohya/OneTrainer ``dora_scale``: ``W' = V·(1 + s·(m/(‖V‖+eps) − 1))`` with ``V = W + ΔW``, ΔW not
  scaled by ``s`` (at 0 the whole ΔW stays applied); PEFT ``lora_magnitude_vector``:
  ``W' = m·(W + s·ΔW)/‖W + s·ΔW‖`` per output row (at 0: ``m·W/‖W‖``, not ``W``).
"""
from __future__ import annotations

from typing import Literal, Mapping

from .._lazy import torch

from .base import BuildContext, FactorisedPatch, IncompletePatch, LowRank, Patch, Ref, Shape, Tensor, numel

Axis = Literal["out", "in"]
Convention = Literal["lycoris", "peft"]
DoraStrength = Literal["interpolate", "library"]
DORA_STRENGTHS: tuple[str, ...] = ("interpolate", "library")
EPS = 2.0 ** -23  # torch.finfo(torch.float32).eps, without importing torch


def check_dora_strength(mode: object) -> DoraStrength:
    """``mode`` if it is a known DoRA strength convention, else ``ValueError``."""
    if mode not in DORA_STRENGTHS:
        raise ValueError(f"dora_strength must be 'interpolate' (W + s·(W_dora − W), the hosts' convention) or "
                         f"'library' (the training library's own convention), not {mode!r}")
    return mode  # type: ignore[return-value]


def column_norm(weight: Tensor, axis: Axis) -> Tensor:
    """Norm of each output row (``out``) or each input column (``in``), shaped to broadcast over ``weight``."""
    rest = [1] * (weight.dim() - 1)
    if axis == "out":
        return weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], *rest)
    norms = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
    return norms.reshape(1, weight.shape[1], *rest[1:])


class DoraPatch(Patch):
    """``V = W + ΔW``; ``W_dora = m · V / ‖V‖`` with the norm per output row or input column.

    ``convention`` is the file's (``lycoris``: ``dora_scale``, norm + eps; ``peft``: ``lora_magnitude_vector``);
    ``strength_mode`` how a strength other than 1 is read (module docstring): ``interpolate`` or ``library``.
    """

    kind = "dora"
    linear_in_strength = False
    wraps = True
    order = 10
    suffixes = {"dora_scale": "dora_scale", "lora_magnitude_vector.weight": "magnitude_peft",
                "lora_magnitude_vector": "magnitude_peft"}
    min_dims = {"dora_scale": 1, "magnitude_peft": 1}

    @classmethod
    def wrap(cls, inner: Patch, parts: Mapping[str, Ref], context: BuildContext) -> "DoraPatch | None":
        magnitude = parts.get("dora_scale") or parts.get("magnitude_peft")
        if magnitude is None:
            return None
        if not isinstance(inner, FactorisedPatch):
            raise IncompletePatch(f"DoRA magnitude next to a {inner.kind} patch")
        peft = "magnitude_peft" in parts
        axis = "out" if peft or magnitude.shape[0] != 1 or len(magnitude.shape) == 1 else "in"
        return cls(inner, magnitude, axis, "peft" if peft else context.dora_convention)  # type: ignore[arg-type]

    def __init__(self, inner: FactorisedPatch, magnitude: Ref, axis: Axis, convention: Convention,
                 strength_mode: DoraStrength = "interpolate"):
        self.inner, self.magnitude, self.axis, self.convention = inner, magnitude, axis, convention
        self.strength_mode = check_dora_strength(strength_mode)

    def with_dora_strength(self, mode: str) -> "DoraPatch":
        if check_dora_strength(mode) == self.strength_mode:
            return self
        return DoraPatch(self.inner, self.magnitude, self.axis, self.convention, mode)  # type: ignore[arg-type]

    @property
    def params(self) -> tuple[str, ...]:
        return self.inner.params

    @property
    def rank(self) -> int | None:
        return self.inner.rank

    @property
    def kinds(self) -> tuple[str, ...]:
        return (*self.inner.kinds, "dora")

    def refs(self) -> dict[str, Ref]:
        return {**self.inner.refs(), "magnitude": self.magnitude}

    @property
    def reads_dora_strength(self) -> bool:
        return True

    def peft_lora(self) -> tuple[LowRank, Ref | None] | None:
        """A PEFT-convention DoRA around a LoRA: the LoRA's factors and the magnitude as PEFT stores it."""
        low_rank = self.inner.low_rank()
        if self.convention != "peft" or low_rank is None:
            return None
        return low_rank, self.magnitude

    def to_tensors(self) -> dict[str, Tensor]:
        return {**self.inner.to_tensors(),
                "lora_magnitude_vector" if self.convention == "peft" else "dora_scale": self.magnitude.loader()}

    def misfit(self, shapes: Mapping[str, Shape]) -> str | None:
        reason = self.inner.misfit(shapes)
        if reason:
            return reason
        weight = shapes["weight"]
        size = weight[0] if self.axis == "out" else weight[1]
        if numel(self.magnitude.shape) != size:
            return (f"DoRA magnitude {list(self.magnitude.shape)} needs {size} entries "
                    f"(one per {'output row' if self.axis == 'out' else 'input column'} of {list(weight)})")
        return None

    def delta(self, base: Mapping[str, Tensor], strength: float = 1.0) -> dict[str, Tensor]:
        if self.strength_mode == "library":
            return self._library_delta(base, strength)
        if strength == 0.0:  # exactly W, even where the DoRA weight is not finite
            return {p: torch.zeros_like(base[p], dtype=torch.float32) for p in self.params if p in base}
        full = self._library_delta(base, 1.0)
        return full if strength == 1.0 else {p: d * strength for p, d in full.items()}

    def _library_delta(self, base: Mapping[str, Tensor], strength: float) -> dict[str, Tensor]:
        weight = base["weight"]
        inner = self.inner.delta(base, 1.0 if self.convention == "lycoris" else strength)
        merged = weight + inner["weight"]
        norm = column_norm(merged, self.axis)
        magnitude = self.magnitude.load().reshape(norm.shape)
        if self.convention == "lycoris":
            factor = magnitude / (norm + EPS)
            if strength != 1.0:
                factor = strength * (factor - 1) + 1
        else:
            factor = magnitude / norm
        out = {"weight": merged * factor - weight}
        if "bias" in inner:
            out["bias"] = inner["bias"] * (strength if self.convention == "lycoris" else 1.0)
        return out
