"""LoRA / LoCon (incl. Tucker ``lora_mid``, DyLoRA, and ``lora_B.bias``)."""
from __future__ import annotations

from typing import Mapping

from .._lazy import torch

from .base import (ONE, BuildContext, FactorisedPatch, LowRank, Patch, Ref, Scale, Shape, Tensor, alpha_tensors, flat,
                   numel, stored)
from .fused import row_ref


class LoraPatch(FactorisedPatch):
    """``ΔW = scale · up @ down`` (reshaped to W); with ``mid``: ``einsum(oa,abhw,bi->oihw)``."""

    kind = "lora"
    order = 10
    suffixes = {
        "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "alpha": "alpha",
        "lora_A.weight": "down", "lora_B.weight": "up", "lora_B.bias": "bias",
        "lora.down.weight": "down", "lora.up.weight": "up",
        "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up",
    }
    min_dims = {"down": 2, "up": 2, "mid": 2}

    @classmethod
    def from_parts(cls, parts: Mapping[str, Ref], context: BuildContext) -> "LoraPatch | None":
        if "up" not in parts or "down" not in parts:
            return None
        scale = context.rank_scale(parts["down"].shape[0])
        bias = parts.get("bias")
        if bias is None and context.lora_diff_b and "diff_b" in parts:
            # added as it is, where a LoRA's own bias is scaled by alpha / rank
            diff_b = parts["diff_b"]
            bias = Ref(diff_b.shape, lambda: diff_b.load() / scale.value(), diff_b.name)
        return cls(parts["up"], parts["down"], scale, mid=parts.get("mid"), bias=bias)

    def __init__(self, up: Ref, down: Ref, scale: Scale = ONE, mid: Ref | None = None, bias: Ref | None = None):
        self.up, self.down, self.mid, self.bias, self.scale = up, down, mid, bias, scale

    @property
    def params(self) -> tuple[str, ...]:
        return ("weight", "bias") if self.bias is not None else ("weight",)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def refs(self) -> dict[str, Ref]:
        refs = {"up": self.up, "down": self.down}
        if self.mid is not None:
            refs["mid"] = self.mid
        if self.bias is not None:
            refs["bias"] = self.bias
        if isinstance(self.scale.alpha, Ref):
            refs["alpha"] = self.scale.alpha
        return refs

    def _implied(self) -> tuple[int, int]:
        out = self.up.shape[0]
        if self.mid is not None:
            return out, self.down.shape[1] * numel(self.mid.shape[2:])
        return out, numel(self.down.shape[1:])

    def misfit(self, shapes: Mapping[str, Shape]) -> str | None:
        weight = shapes.get("weight")
        out, inner = self._implied()
        if weight is None:
            return "module has no weight"
        rank = self.mid.shape[:2] if self.mid is not None else (self.down.shape[0],)
        if self.up.shape[1] != rank[0] or self.down.shape[0] != rank[-1]:
            return f"LoRA up {list(self.up.shape)} and down {list(self.down.shape)} disagree on the rank"
        if weight[0] != out or numel(weight[1:]) != inner:
            return (f"LoRA up {list(self.up.shape)} / down {list(self.down.shape)} implies a weight "
                    f"[{out}, {inner} per row], module weight is {list(weight)}")
        if self.mid is None and len(self.down.shape) == 4 and len(weight) == 4 and self.down.shape[2:] != weight[2:]:
            return f"LoRA down kernel {list(self.down.shape[2:])} != module kernel {list(weight[2:])}"
        if self.bias is not None and shapes.get("bias") != (out,):
            return f"lora_B.bias {list(self.bias.shape)} needs a module bias of [{out}]"
        return None

    def to_tensors(self) -> dict[str, Tensor]:
        return {**stored((("lora_down.weight", self.down), ("lora_up.weight", self.up), ("lora_mid.weight", self.mid),
                          ("lora_B.bias", self.bias))), **alpha_tensors(self.scale)}

    def out_rows(self) -> int:
        return self.up.shape[0]

    def in_columns(self) -> int:
        return self._implied()[1]

    def rows(self, start: int, stop: int, total: int, swap: bool = False) -> Patch:
        """Exact without Tucker ``mid``: the up rows sliced, the down (the shared rank) kept whole."""
        if self.mid is not None:
            return super().rows(start, stop, total, swap)
        bias = row_ref(self.bias, start, stop, swap) if self.bias is not None else None
        return LoraPatch(row_ref(self.up, start, stop, swap), self.down, self.scale, bias=bias)

    def host_native(self) -> bool:
        return self.mid is None and self.bias is None

    def implied_weight_shape(self) -> Shape:
        if self.mid is not None:
            return (self.up.shape[0], self.down.shape[1], *self.mid.shape[2:])
        return (self.up.shape[0], *self.down.shape[1:])

    def shaped_delta(self, shape: Shape) -> tuple[Tensor, Tensor | None]:
        bias = self.bias.load() * self.scale.value() if self.bias is not None else None
        return self.weight_delta(torch.Size(shape)), bias

    def low_rank(self) -> LowRank | None:
        """Its up/down (and bias) without Tucker ``mid``; with ``mid``, none."""
        return LowRank(self.up, self.down, self.scale, self.bias) if self.mid is None else None

    def factors(self) -> tuple[Tensor, Tensor, float]:
        """``(up [out, r], down [r, in·k·k], scale)`` of a LoRA without ``mid``: ΔW = scale · up @ down."""
        return LowRank(self.up, self.down, self.scale).factors()

    def peft_factors(self, weight: Shape | None = None) -> tuple[Tensor, Tensor]:
        """``(lora_A, lora_B)`` as PEFT's layers hold them (see :meth:`LowRank.peft_factors`)."""
        return LowRank(self.up, self.down, self.scale).peft_factors(weight)

    def weight_delta(self, weight_shape: torch.Size) -> Tensor:
        up, down = flat(self.up.load()), self.down.load()
        if self.mid is not None:
            mid = self.mid.load()
            delta = torch.einsum("oa,abhw,bi->oihw", up, mid, flat(down))
        else:
            delta = up @ flat(down)
        return delta.reshape(weight_shape) * self.scale.value()

    def delta(self, base: Mapping[str, Tensor], strength: float = 1.0) -> dict[str, Tensor]:
        out = {"weight": self.weight_delta(base["weight"].shape) * strength}
        if self.bias is not None:
            out["bias"] = self.bias.load() * (self.scale.value() * strength)
        return out
