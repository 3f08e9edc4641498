"""Hot mode: weights are never written; forward hooks add each patch's contribution at run time.

Each contribution carries its entry's step window (``Entry.start``/``stop``): it runs only while the
backend's ``StepClock`` (moved by ``Patcher.step_callback()``) is inside it. With ``FusionGates`` the
modules of a gated layer hand their LoRAs' outputs to that layer's learned gate instead of summing them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..errors import LoraCompatError
from ..tools.autolora_gate import FusionGates, GateLayer, gate
from ..patches import Patch
from .values import Contribution


@dataclass(frozen=True)
class TermSource:
    """Which entry a contribution comes from, the fraction of the denoising steps it runs in, and how its
    DoRA modules read the strength (it changes the patch, so it is part of the recompute signature)."""

    key: str
    start: float = 0.0
    stop: float = 1.0
    dora_strength: str = "interpolate"


@dataclass
class StepClock:
    """Where the denoising is: the fraction of steps already done (0 outside a scheduled run)."""

    fraction: float = 0.0

    def runs(self, source: TermSource) -> bool:
        return source.start <= self.fraction < source.stop


def _conv_kwargs(module: torch.nn.Conv2d) -> dict:
    return {"stride": module.stride, "padding": module.padding, "dilation": module.dilation, "groups": module.groups}


class HotPatch:
    """The forward hook of one module: ``output + Σ contributions`` (or the gate's output, see ``GateGroup``).

    Plain LoRA/LoCon runs as the low-rank path (``x @ downᵀ @ upᵀ · scale``); every other kind as a
    materialised delta ``ΔW`` (exact for Linear/Conv, whose output is linear in the weight), cached until
    the weights change; modules of other types (norms) are re-run with patched parameters.
    """

    def __init__(self, module: torch.nn.Module, contributions: Sequence[Contribution],
                 sources: Sequence[TermSource], clock: StepClock, group: "GateGroup | None" = None):
        self.module = module
        self.contributions = list(contributions)
        self.sources = list(sources)
        self.clock = clock
        self.group = group
        self._cache_key: tuple | None = None
        self._cached: list[dict[str, torch.Tensor] | None] = []
        self._summed: tuple[tuple, dict[str, torch.Tensor]] | None = None
        self._factors: dict[int, tuple] = {}
        self._reentered = False
        self.handle = module.register_forward_hook(self, with_kwargs=True)

    def remove(self) -> None:
        self.handle.remove()

    def _lowrank(self, patch: Patch) -> bool:
        return patch.low_rank() is not None and isinstance(self.module, (torch.nn.Linear, torch.nn.Conv2d))

    def _running(self) -> list[int]:
        return [i for i, source in enumerate(self.sources) if self.clock.runs(source)]

    def _deltas(self) -> list[dict[str, torch.Tensor] | None]:
        """``ΔW``/``Δb`` of each non-low-rank contribution (``None`` for low-rank ones), from the current
        parameters; recomputed only when a parameter changed."""
        params = dict(self.module.named_parameters(recurse=False))
        key = tuple((name, p.data_ptr(), p._version) for name, p in params.items())
        if key != self._cache_key:
            base = {name: p.detach().float() for name, p in params.items()}
            self._cached = [None if self._lowrank(patch) else patch.delta(base, strength)
                            for patch, strength in self.contributions]
            self._cache_key = key
            self._summed = None
        return self._cached

    def _summed_deltas(self, running: list[int]) -> dict[str, torch.Tensor]:
        deltas = self._deltas()
        key = (self._cache_key, tuple(running))
        if self._summed is None or self._summed[0] != key:
            total: dict[str, torch.Tensor] = {}
            for i in running:
                for name, delta in (deltas[i] or {}).items():
                    total[name] = delta if name not in total else total[name] + delta
            self._summed = (key, total)
        return self._summed[1]

    @torch.no_grad()
    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        x = args[0] if args else kwargs.get("input", kwargs.get("hidden_states"))
        if self.group is not None:
            return self.group.output(self, x, output)
        running = self._running()
        if not running:
            return output
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            return self._rerun(module, args, kwargs, output, running)
        extra = None
        for i in running:
            patch, strength = self.contributions[i]
            if self._lowrank(patch):
                term = self._lowrank_forward(patch, strength, x)
                extra = term if extra is None else extra + term
        if any(not self._lowrank(self.contributions[i][0]) for i in running):
            term = self._dense_forward(self._summed_deltas(running), x)
            extra = term if extra is None else extra + term
        return output if extra is None else output + extra.to(output.dtype)

    def terms(self, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Each running contribution's output on ``x`` (fp32), with its entry's key."""
        out = []
        for i in self._running():
            patch, strength = self.contributions[i]
            if self._lowrank(patch):
                term = self._lowrank_forward(patch, strength, x)
            else:
                term = self._dense_forward(self._deltas()[i], x)
            out.append((self.sources[i].key, term))
        return out

    def _rerun(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor,
               running: list[int]) -> torch.Tensor:
        if self._reentered:  # the re-run below calls this hook again
            return output
        params = dict(module.named_parameters(recurse=False))
        deltas = self._summed_deltas(running)
        patched = {name: (p.float() + deltas[name]).to(p.dtype) if name in deltas else p
                   for name, p in params.items()}
        self._reentered = True
        try:
            return functional_call(module, patched, args, kwargs)
        finally:
            self._reentered = False

    def _load_factors(self, patch: Patch, device: torch.device) -> tuple:
        """up, down (shaped for this module's op), bias and scale of a patch's low-rank form, read once (the
        LoRA's own size) and kept on the input's device."""
        cached = self._factors.get(id(patch))
        if cached is None or cached[0].device != device:
            patch = patch.low_rank()
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

    def _lowrank_forward(self, patch: Patch, strength: float, x: torch.Tensor) -> torch.Tensor:
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


class GateGroup:
    """The modules of one gated layer. The first of them to run computes the whole layer: every part's
    base output, each entry's LoRA output across the parts (zero where an entry has no patch), the gate;
    the other parts' hooks then return their rows of that result (they get the same input)."""

    def __init__(self, layer: GateLayer, gates: FusionGates, modules: Mapping[str, torch.nn.Module],
                 hooks: Mapping[str, HotPatch]):
        self.layer = layer
        self.gates = gates
        self.modules = [modules[part.target.partition(".")[0]].get_submodule(part.target.partition(".")[2])
                        for part in layer.parts]
        self.hooks = hooks
        self._input: torch.Tensor | None = None
        self._version = -1
        self._outputs: dict[int, torch.Tensor] = {}

    def output(self, hook: HotPatch, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        index = next(i for i, m in enumerate(self.modules) if m is hook.module)
        if self._input is not x or self._version != x._version or index not in self._outputs:
            self._compute(index, x, output)
        result = self._outputs.pop(index)
        if not self._outputs:
            self._input = None
        return result

    def _compute(self, index: int, x: torch.Tensor, output: torch.Tensor) -> None:
        bases = [output if i == index else F.linear(x, m.weight, m.bias) for i, m in enumerate(self.modules)]
        base = torch.cat([b.float() for b in bases], dim=-1)
        keys: list[str] = []
        pieces: list[tuple[str, int, torch.Tensor]] = []
        for i, part in enumerate(self.layer.parts):
            hook = self.hooks.get(part.target)
            if hook is None:
                continue
            for key, term in hook.terms(x):
                if key not in keys:
                    keys.append(key)
                pieces.append((key, i, term))
        if keys:
            lora = base.new_zeros((len(keys), *base.shape))
            for key, i, term in pieces:
                part = self.layer.parts[i]
                lora[keys.index(key), ..., part.start:part.stop] += term
            result = gate(self.gates.params_on(self.layer.name, base.device), base, lora)
        else:
            result = base
        self._input, self._version = x, x._version
        self._outputs = {i: result[..., part.start:part.stop].to(bases[i].dtype)
                         for i, part in enumerate(self.layer.parts) if part.target in self.hooks}


class HotBackend:
    """Adds each module's patches in a forward hook; the weights are never written."""

    def __init__(self, fusion: FusionGates | None = None) -> None:
        self.hooks: dict[str, HotPatch] = {}
        self.clock = StepClock()
        self.fusion = fusion
        self._groups: dict[str, GateGroup] = {}
        self._bound: dict[str, torch.nn.Module] = {}

    def bind(self, modules: Mapping[str, torch.nn.Module]) -> None:
        """Map the gates onto the target's current modules (again when a component was replaced)."""
        if self.fusion is None or modules == self._bound:
            return
        self.fusion.check(modules)
        self._groups = {}
        for layer in self.fusion.layers.values():
            group = GateGroup(layer, self.fusion, modules, self.hooks)
            for part in layer.parts:
                self._groups[part.target] = group
        self._bound = dict(modules)

    def adopt_external_changes(self, target: str, module: torch.nn.Module, warned: set[str]) -> bool:
        return False  # hooks read the live weights: nothing to adopt

    def apply(self, target: str, module: torch.nn.Module, contributions: Sequence[Contribution],
              sources: Sequence[TermSource]) -> None:
        old = self.hooks.pop(target, None)
        if old is not None:
            old.remove()
        if any(patch.widening() is not None for patch, _ in contributions):
            raise LoraCompatError(f"{target}: this LoRA widens the module's input (a FLUX.1 Control LoRA); "
                                  "hot mode never changes weights or shapes, use Patcher(mode='merge')")
        if contributions:
            self.hooks[target] = HotPatch(module, contributions, sources, self.clock, self._groups.get(target))

    def memory(self) -> dict[str, int]:
        """Hooks keep no copies and write no buffers."""
        return {"pristine_copies": 0, "buffers": 0}

    def release(self) -> None:
        for hook in self.hooks.values():
            hook.remove()
        self.hooks.clear()
