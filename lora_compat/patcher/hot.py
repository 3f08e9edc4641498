"""Hot mode: weights are never written; forward hooks add each patch's contribution at run time."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..errors import LoraCompatError
from ..patches import LoraPatch
from ..patches.widen import WidenPatch
from .merge import Contribution


def _conv_kwargs(module: torch.nn.Conv2d) -> dict:
    return {"stride": module.stride, "padding": module.padding, "dilation": module.dilation, "groups": module.groups}


class HotPatch:
    """The forward hook of one module: ``output + Σ contributions``.

    Plain LoRA/LoCon runs as the low-rank path (``x @ downᵀ @ upᵀ · scale``); every other kind as a
    materialised delta ``ΔW`` (exact for Linear/Conv, whose output is linear in the weight), cached until
    the weights change; modules of other types (norms) are re-run with patched parameters.
    """

    def __init__(self, module: torch.nn.Module, contributions: Sequence[Contribution]):
        self.module = module
        self.contributions = list(contributions)
        self._cache_key: tuple | None = None
        self._cached: dict[str, torch.Tensor] = {}
        self._factors: dict[int, tuple] = {}
        self._reentered = False
        self._lowranks = [(p, s) for p, s in self.contributions if self._lowrank(p)]
        self._has_dense = len(self._lowranks) < len(self.contributions)
        self.handle = module.register_forward_hook(self, with_kwargs=True)

    def remove(self) -> None:
        self.handle.remove()

    def _lowrank(self, patch: LoraPatch) -> bool:
        return (isinstance(patch, LoraPatch) and patch.mid is None
                and isinstance(self.module, (torch.nn.Linear, torch.nn.Conv2d)))

    def _materialised(self) -> dict[str, torch.Tensor]:
        """``ΔW``/``Δb`` of the non-low-rank contributions, from the current parameters."""
        params = dict(self.module.named_parameters(recurse=False))
        key = tuple((name, p.data_ptr(), p._version) for name, p in params.items())
        if key != self._cache_key:
            base = {name: p.detach().float() for name, p in params.items()}
            deltas: dict[str, torch.Tensor] = {}
            for patch, strength in self.contributions:
                if not self._lowrank(patch):
                    for name, delta in patch.delta(base, strength).items():
                        deltas[name] = delta if name not in deltas else deltas[name] + delta
            self._cached = deltas
            self._cache_key = key
        return self._cached

    @torch.no_grad()
    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        x = args[0] if args else kwargs.get("input", kwargs.get("hidden_states"))
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            if self._reentered:  # the re-run below calls this hook again
                return output
            params = dict(module.named_parameters(recurse=False))
            deltas = self._materialised()
            patched = {name: (p.float() + deltas[name]).to(p.dtype) if name in deltas else p
                       for name, p in params.items()}
            self._reentered = True
            try:
                return functional_call(module, patched, args, kwargs)
            finally:
                self._reentered = False
        extra = None
        for patch, strength in self._lowranks:
            term = self._lowrank_forward(patch, strength, x)
            extra = term if extra is None else extra + term
        deltas = self._materialised() if self._has_dense else None
        if deltas:
            term = self._dense_forward(deltas, x)
            extra = term if extra is None else extra + term
        return output if extra is None else output + extra.to(output.dtype)

    def _load_factors(self, patch: LoraPatch, device: torch.device) -> tuple:
        """up, down (shaped for this module's op), bias and scale of a LoRA, read once (the LoRA's own size)
        and kept on the input's device."""
        cached = self._factors.get(id(patch))
        if cached is None or cached[0].device != device:
            up, down = patch.up.load().to(device), patch.down.load().to(device)
            if isinstance(self.module, torch.nn.Conv2d):
                kernel = self.module.weight.shape[1:]
                down = down.reshape(down.shape[0], *kernel)
                up = up.reshape(up.shape[0], up.shape[1], 1, 1)
            else:
                down, up = down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1)
            bias = patch.bias.load().to(device) if patch.bias is not None else None
            if bias is not None and isinstance(self.module, torch.nn.Conv2d):
                bias = bias.reshape(-1, 1, 1)
            cached = (up, down, bias, patch.scale.value())
            self._factors[id(patch)] = cached
        return cached

    def _lowrank_forward(self, patch: LoraPatch, strength: float, x: torch.Tensor) -> torch.Tensor:
        up, down, bias, scale = self._load_factors(patch, x.device)
        x = x.float()
        if isinstance(self.module, torch.nn.Conv2d):
            term = F.conv2d(F.conv2d(x, down, **_conv_kwargs(self.module)), up)
        else:
            term = F.linear(F.linear(x, down), up)
        if bias is not None:
            term = term + bias
        return term.mul_(scale * strength)

    def _dense_forward(self, deltas: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        weight = deltas.get("weight")
        bias = deltas.get("bias")
        x = x.float()
        if weight is None:
            weight = torch.zeros_like(self.module.weight, dtype=torch.float32)
        if isinstance(self.module, torch.nn.Conv2d):
            return F.conv2d(x, weight.to(x.device), None if bias is None else bias.to(x.device),
                            **_conv_kwargs(self.module))
        return F.linear(x, weight.to(x.device), None if bias is None else bias.to(x.device))


class HotBackend:
    def __init__(self) -> None:
        self.hooks: dict[str, HotPatch] = {}

    def adopt_external_changes(self, target: str, module: torch.nn.Module, warned: set[str]) -> bool:
        return False  # hooks read the live weights: nothing to adopt

    def apply(self, target: str, module: torch.nn.Module, contributions: Sequence[Contribution]) -> None:
        old = self.hooks.pop(target, None)
        if old is not None:
            old.remove()
        if any(isinstance(patch, WidenPatch) for patch, _ in contributions):
            raise LoraCompatError(f"{target}: this LoRA widens the module's input (a FLUX.1 Control LoRA); "
                                  "hot mode never changes weights or shapes, use Patcher(mode='merge')")
        if contributions:
            self.hooks[target] = HotPatch(module, contributions)

    def release(self) -> None:
        for hook in self.hooks.values():
            hook.remove()
        self.hooks.clear()
