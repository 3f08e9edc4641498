"""The patcher route: patcher-route adapters kept applied by one :class:`lora_compat.Patcher` per pipeline, as
their strengths, diffusers' ``set_adapters``/``disable_lora``/``fuse_lora`` and PEFT's wrappers around the same
modules say (:func:`_reconcile_patcher`), and removed exactly (:func:`remove_patcher_adapters`)."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Mapping, NamedTuple

import torch

from lora_compat.models import component_modules
from lora_compat.patcher import Entry, Patcher, sync_config
from lora_compat.patchset import PatchSet

from .diffusers_state import _forget, _State


class _Baked(NamedTuple):
    """A parameter's value with a fused adapter baked in, to be written back as its new pristine value."""

    component: str
    module: torch.nn.Module
    name: str
    value: torch.Tensor

def _components(entry: Entry) -> list[str]:
    """The components a patcher-route adapter touches (its source is the PatchSet ``load`` fitted)."""
    return sorted({target.partition(".")[0] for target in entry.source})


def _applied_entry(state: _State, name: str, fused_only: bool = False) -> Entry | None:
    """What the patcher applies for adapter ``name`` now (``fused_only``: just its fused part), or ``None``."""
    entry = state.patcher_entries[name]
    fused = state.fused.get(name, {})
    active = name not in state.inactive and not fused_only
    if not fused:
        return entry if active else None
    factors = {}
    for component in _components(entry):
        strength = entry.strength_for(component)
        if component in fused:
            factors[component] = fused[component]
        elif active and strength is not None:
            factors[component] = strength
    return dataclasses.replace(entry, strength=1.0, components=factors) if factors else None


def _unwrapped(patchset: PatchSet) -> PatchSet:
    """The PatchSet keyed by the modules' own paths: a module PEFT wraps now may be unwrapped later and the
    other way round, so patcher-route adapters are kept in this form and keyed for the wrappers at each set."""
    if not any(target.endswith(".base_layer") for target in patchset):
        return patchset
    return dataclasses.replace(patchset, patches={t.removesuffix(".base_layer"): p for t, p in patchset.items()})


def _wrapped_paths(pipe: Any) -> set[str]:
    """``"<component>.<path>"`` of every module a PEFT tuner layer wraps now."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {f"{component}.{name}" for component, module in component_modules(pipe).items()
            for name, sub in module.named_modules() if isinstance(sub, BaseTunerLayer)}


def _fitted(state: _State, name: str, entry: Entry, wrapped: set[str]) -> Entry:
    """``entry`` with its PatchSet keyed through today's PEFT wrappers (``...base_layer``); the same PatchSet
    object while the wrappers stay, so the patcher recomputes only what changed."""
    canonical = state.patcher_entries[name].source
    keys = [f"{t}.base_layer" if t in wrapped else t for t in canonical]
    fitted = state.fitted.get(name)
    if fitted is None or list(fitted) != keys:
        fitted = canonical if keys == list(canonical) else \
            dataclasses.replace(canonical, patches=dict(zip(keys, canonical.values())))
        state.fitted[name] = fitted
    return dataclasses.replace(entry, source=fitted)


def _patcher_stack(pipe: Any, state: _State, names: list[str] | None = None, fused_only: bool = False) -> list[Entry]:
    if state.disabled:
        return []
    wrapped = _wrapped_paths(pipe)
    stack = []
    for name in state.patcher_entries if names is None else names:
        entry = _applied_entry(state, name, fused_only)
        if entry is not None:
            stack.append(_fitted(state, name, entry, wrapped))
    return stack


def _reconcile_patcher(pipe: Any, state: _State, rewrite: bool = False) -> None:
    """Put the patcher-route adapters' weights in the state ``state`` describes (all or nothing).
    ``rewrite``: recompute every module from its pristine copy, not only those whose stack changed."""
    if state.patcher is None:
        if not state.patcher_entries:
            return
        state.patcher = Patcher(pipe)
    stack = _patcher_stack(pipe, state)
    written = _patcher_modules(state, stack) if rewrite else _changed_modules(state, stack)
    with _peft_merges_lifted(pipe, written):
        if rewrite:
            previous = state.patcher.active
            state.patcher.set([])
            try:
                state.patcher.set(stack)
            except BaseException:
                state.patcher.set(previous)
                raise
        else:
            state.patcher.set(stack)
    if not state.patcher_entries:
        state.patcher.close()
        state.patcher = None


def _patcher_modules(state: _State, stack: list[Entry]) -> set[str]:
    """Modules the patcher writes now or is about to write."""
    entries = list(stack) + (state.patcher.active if state.patcher is not None else [])
    return {target for entry in entries for target in entry.source}


def _changed_modules(state: _State, stack: list[Entry]) -> set[str]:
    """Modules of the entries that ``stack`` adds, drops or changes: those the patcher is about to rewrite."""
    def key(entry: Entry) -> tuple:
        return id(entry.source), repr((entry.strength, entry.components, entry.blocks, entry.start, entry.stop))

    previous = state.patcher.active if state.patcher is not None else []
    before, after = {key(e) for e in previous}, {key(e) for e in stack}
    changed = [e for e in previous if key(e) not in after] + [e for e in stack if key(e) not in before]
    return {target for entry in changed for target in entry.source}


@contextlib.contextmanager
def _peft_merges_lifted(pipe: Any, modules: set[str]):
    """PEFT layers merged (``fuse_lora``) into one of ``modules``, which the patcher is about to write from
    its pristine copies (which never hold PEFT's deltas): their merged adapters are unmerged for the write and
    merged back on top after. The patcher's write replaces whatever PEFT's unmerge (a subtraction) left."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    written = {t.removesuffix(".base_layer") for t in modules if t.endswith(".base_layer")}
    lifted = []
    if written:
        with peft_writes_in_place(pipe, modules):
            for component, module in component_modules(pipe).items():
                for name, sub in module.named_modules():
                    if isinstance(sub, BaseTunerLayer) and sub.merged and f"{component}.{name}" in written:
                        lifted.append((sub, list(sub.merged_adapters)))
                        sub.unmerge()
    try:
        yield
    finally:
        with peft_writes_in_place(pipe, modules):
            for layer, names in lifted:
                layer.merge(adapter_names=names)


@contextlib.contextmanager
def peft_writes_in_place(pipe: Any, targets: set[str]):
    """PEFT's safe merge and its DoRA unmerge give ``weight.data`` a new tensor; the patcher would take that
    for a foreign write (a new checkpoint) and adopt the value as pristine. For the parameters of ``targets``
    the new value is copied into the tensor they held, which is put back."""
    modules = component_modules(pipe)
    held = []
    for target in targets:
        component, _, path = target.partition(".")
        try:
            module = modules[component].get_submodule(path)
        except (KeyError, AttributeError):
            continue
        held += [(param, param.data) for param in module.parameters(recurse=False)]
    try:
        yield
    finally:
        with torch.no_grad():
            for param, tensor in held:
                if param.data_ptr() != tensor.data_ptr() and param.shape == tensor.shape:
                    tensor.copy_(param.data)
                    param.data = tensor


def _under_wrappers(state: _State) -> bool:
    """Whether the patcher reaches a module through a PEFT wrapper (``...base_layer``): removing the wrappers
    would pull the module from under it."""
    return any(target.endswith(".base_layer") for fitted in state.fitted.values() for target in fitted)


def remove_patcher_adapters(pipe: Any, state: _State, names: list[str], bake: bool) -> None:
    """Remove patcher-route adapters, restoring exactly what they changed; with ``bake``, the fused part of a
    fused adapter stays in the weights instead (diffusers' ``delete_adapters``/``unload_lora_weights`` leave a
    fused adapter merged)."""
    baked = _patcher_stack(pipe, state, names, fused_only=True) if bake else []
    if not baked or state.patcher is None:
        for name in names:
            _forget(state, name)
        _reconcile_patcher(pipe, state)
        return
    with _peft_merges_lifted(pipe, _patcher_modules(state, baked)):
        state.patcher.set([])
        state.patcher.set(baked)
        modules = component_modules(pipe)
        values: list[_Baked] = []
        for entry in baked:
            for target in entry.source:
                component, _, path = target.partition(".")
                if entry.strength_for(component) is None:
                    continue
                module = modules[component].get_submodule(path)
                values += [_Baked(component, module, n, p.detach().clone())
                           for n, p in module.named_parameters(recurse=False)]
        state.patcher.close()  # every parameter back to pristine; the baked values go in below, as the new pristine
        state.patcher = None
        for name in names:
            _forget(state, name)
        _write(values, modules)
        _reconcile_patcher(pipe, state)


def _write(values: list[_Baked], modules: Mapping[str, Any]) -> None:
    with torch.no_grad():
        for component, module, param_name, value in values:
            param = getattr(module, param_name)
            if param.shape == value.shape:
                if not torch.equal(param, value):
                    param.copy_(value)
            else:  # an input-widening patch (Flux Control) stays widened
                param.data = value
                if isinstance(module, torch.nn.Linear):
                    module.out_features, module.in_features = value.shape
    for component in {v.component for v in values}:
        sync_config(modules[component])
