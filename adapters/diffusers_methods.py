"""diffusers' own adapter methods, extended to lora_compat's patcher-route adapters (installed by ``enable()``).

Adapters that took the patcher route (OFT, IA3, DoRA, LoKr, ...) are merged into the weights by a
:class:`lora_compat.Patcher`; PEFT knows nothing of them. While ``enable()`` is on, the methods below of
``diffusers.loaders.lora_base.LoraBaseMixin`` (every loader class and its overrides reach them) treat them as
diffusers treats its own adapters, and hand everything else to diffusers' own method unchanged:

- ``get_list_adapters()`` lists a patcher adapter under each component it touches; ``get_active_adapters()``
  lists it while it is active.
- ``set_adapters(names, weights)`` activates exactly ``names`` (others, of either kind, are off but stay loaded)
  at the given weights; a number, or a ``{component: number}`` dict, is exact for patcher adapters (a weight
  equals a fresh load at that strength). diffusers' per-block dicts (``{"unet": {"down": ...}}``) are refused
  for patcher adapters: use ``lora_compat.Entry(blocks=...)`` with a Patcher instead.
- ``delete_adapters(names)`` and ``unload_lora_weights()`` remove them, putting back bit-exactly what they
  changed, and free the name.
- ``disable_lora()`` restores the weights exactly (the adapters stay loaded); ``enable_lora()`` re-applies them.
  A patcher adapter loaded while disabled waits for ``enable_lora()``.
- ``fuse_lora(components, lora_scale, adapter_names=...)``: a patcher adapter is already merged; fusing it pins it
  at ``weight * lora_scale`` on those components until ``unfuse_lora``, as PEFT pins a merged adapter. As in
  diffusers, ``delete_adapters``/``unload_lora_weights`` then leave the fused adapter in the weights (the
  ``fuse_lora(); unload_lora_weights()`` recipe bakes it); without a fuse they restore exactly.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import numbers
from typing import Any, Callable

from lora_compat.models import component_modules
from lora_compat.errors import LoraCompatError
from lora_compat.patcher import Entry

from .diffusers_load import _restore_originals
from .diffusers_patcher import _components, _patcher_modules, _reconcile_patcher, peft_writes_in_place, \
    remove_patcher_adapters
from .diffusers_state import _forget, _lock, _peft_adapter_names, _state, _tuner_layers

METHODS = ("get_list_adapters", "get_active_adapters", "set_adapters", "delete_adapters", "unload_lora_weights",
           "disable_lora", "enable_lora", "fuse_lora", "unfuse_lora")
_installed: dict[str, Callable] = {}


def _base_class() -> type:
    from diffusers.loaders.lora_base import LoraBaseMixin

    return LoraBaseMixin


def install() -> None:
    """Wrap diffusers' methods on ``LoraBaseMixin`` (idempotent)."""
    cls = _base_class()
    for name in METHODS:
        if name in _installed:
            continue
        original = cls.__dict__[name]
        wrapper = functools.wraps(original)(_WRAPPERS[name](original))
        wrapper.__lora_compat_original__ = original
        _installed[name] = original
        setattr(cls, name, wrapper)


def uninstall() -> None:
    """Put diffusers' own methods back (idempotent)."""
    cls = _base_class()
    for name, original in list(_installed.items()):
        setattr(cls, name, original)
        del _installed[name]


def _patcher_names(pipe: Any) -> list[str]:
    return list(_state(pipe).patcher_entries)


# -- listing --------------------------------------------------------------------------------------------------
def _get_list_adapters(original):
    def get_list_adapters(self) -> dict[str, list[str]]:
        listed = original(self)
        state = _state(self)
        ours: dict[str, list[str]] = {}
        for name, entry in state.patcher_entries.items():
            for component in _components(entry):
                ours.setdefault(component, []).append(name)
        if not ours:
            return listed
        result: dict[str, list[str]] = {}
        for component in [*self._lora_loadable_modules, *listed, *ours]:
            if component in result or (component not in listed and component not in ours):
                continue
            names = list(listed.get(component, []))
            result[component] = names + [n for n in ours.get(component, []) if n not in names]
        return result

    return get_list_adapters


def _get_active_adapters(original):
    def get_active_adapters(self) -> list[str]:
        active = list(original(self))
        state = _state(self)
        active += [n for n in state.patcher_entries if n not in state.inactive and n not in active]
        if state.order:  # the order of the last set_adapters call, as diffusers reports it
            position = {n: i for i, n in enumerate(state.order)}
            active.sort(key=lambda n: position.get(n, len(position)))
        return active

    return get_active_adapters


# -- weights --------------------------------------------------------------------------------------------------
def _weighted(entry: Entry, name: str, weight: Any) -> Entry:
    """The entry at a diffusers ``set_adapters`` weight: ``None`` (1.0), a number, or ``{component: number}``
    (components left out get 1.0, as in diffusers)."""
    if weight is None:
        weight = 1.0
    if isinstance(weight, numbers.Real) and not isinstance(weight, bool):
        return dataclasses.replace(entry, strength=float(weight), components=None)
    if not isinstance(weight, dict):
        raise LoraCompatError(f"set_adapters: the weight of adapter {name!r} must be a number or a dict "
                              f"{{component: number}}, not {weight!r}")
    factors = {}
    for component in _components(entry):
        value = weight.get(component)
        value = 1.0 if value is None else value
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise LoraCompatError(
                f"set_adapters: adapter {name!r} took lora_compat's patcher route (it is merged into the weights, "
                f"not a PEFT layer), so its weight on {component!r} must be one number, not {value!r}; per-block "
                "weights for it: lora_compat.Patcher with Entry(source, strength, blocks=...)")
        factors[component] = float(value)
    return dataclasses.replace(entry, strength=1.0, components=factors)


def _set_adapters(original):
    def set_adapters(self, adapter_names, adapter_weights=None):
        with _lock:
            state = _state(self)
            ours = set(state.patcher_entries)
            if not ours:
                return original(self, adapter_names, adapter_weights)
            names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
            weights = copy.deepcopy(adapter_weights)
            if not isinstance(weights, list):
                weights = [weights] * len(names)
            if len(names) != len(weights):  # diffusers' own checks and messages, before anything changes
                raise ValueError(f"Length of adapter names {len(names)} is not equal to the length of the weights "
                                 f"{len(weights)}")
            theirs_present = _peft_adapter_names(self)
            missing = set(names) - ours - theirs_present
            if missing:
                raise ValueError(f"Adapter name(s) {missing} not in the list of present adapters: "
                                 f"{theirs_present | ours}.")
            chosen = {n: _weighted(state.patcher_entries[n], n, w) for n, w in zip(names, weights) if n in ours}
            if theirs_present:
                theirs = [n for n in names if n not in ours]
                their_weights = adapter_weights if not isinstance(adapter_weights, list) else \
                    [w for n, w in zip(names, adapter_weights) if n not in ours]
                original(self, theirs, their_weights)
            before = (dict(state.patcher_entries), set(state.inactive))
            state.patcher_entries.update(chosen)
            state.inactive = ours - set(chosen)
            try:
                _reconcile_patcher(self, state)
            except BaseException:
                state.patcher_entries, state.inactive = before
                raise
            state.order = names
            state.strengths.update({n: e.strength for n, e in chosen.items() if e.components is None})

    return set_adapters


# -- removing -------------------------------------------------------------------------------------------------
def _delete_adapters(original):
    def delete_adapters(self, adapter_names):
        with _lock:
            state = _state(self)
            names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
            ours = [n for n in names if n in state.patcher_entries]
            theirs = [n for n in names if n not in ours]
            _refuse_fused_under_patcher(self, state, theirs, keep=[n for n in state.patcher_entries if n not in ours])
            if ours:  # first: PEFT layers fused over modules the patcher writes are still there to lift
                remove_patcher_adapters(self, state, ours, bake=True)
            result = None
            if theirs or not ours:
                result = original(self, theirs if ours else adapter_names)
            for name in theirs:  # diffusers/peft-route adapters of lora_compat.load: the name is free again
                if state.routes.get(name) is not None:
                    _forget(state, name)
            return result

    return delete_adapters


def _refuse_fused_under_patcher(pipe: Any, state: Any, deleted: list[str], keep: list[str]) -> None:
    """diffusers leaves a fused adapter in the weights when it is deleted; where a patcher-route adapter that
    stays also writes those weights, its next write would drop that delta (the patcher computes from its
    pristine copy), so such a delete is refused before anything changes."""
    if not deleted or not keep:
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    kept = {t.removesuffix(".base_layer"): n for n in keep for t in state.fitted.get(n, ())
            if t.endswith(".base_layer")}
    for component, module in component_modules(pipe).items():
        for path, layer in module.named_modules():
            other = kept.get(f"{component}.{path}")
            fused = [n for n in deleted if n in getattr(layer, "merged_adapters", ())] if other else []
            if isinstance(layer, BaseTunerLayer) and fused:
                raise LoraCompatError(
                    f"delete_adapters: {fused[0]!r} is fused (fuse_lora) into {component}.{path}, whose weights the "
                    f"patcher-route adapter {other!r} also changes; unfuse_lora() first, or delete both together")


def _unload_lora_weights(original):
    def unload_lora_weights(self, *args, **kwargs):
        with _lock:
            state = _state(self)
            fused = any(getattr(layer, "merged", False) for layer in _tuner_layers(self)) or \
                (bool(state.fused) and not state.disabled)
            # first, while the PEFT wrappers the patcher's targets may run through (``...base_layer``) still exist
            remove_patcher_adapters(self, state, _patcher_names(self), bake=True)
            result = original(self, *args, **kwargs)
            for name in list(state.routes):
                _forget(state, name)
            state.disabled, state.order = False, []
            if fused:  # diffusers keeps fused adapters in the weights: so do we
                state.originals.clear()
                self.__dict__.pop("fuse_lora", None)
            else:  # nothing fused now: undo the drift of any earlier fuse_lora/unfuse_lora round trip
                _restore_originals(self, state)
            return result

    return unload_lora_weights


# -- disabling and fusing -------------------------------------------------------------------------------------
def _toggle(disabled: bool):
    def wrap(original):
        def toggle(self):
            with _lock:
                result = original(self)
                state = _state(self)
                previous, state.disabled = state.disabled, disabled
                try:
                    _reconcile_patcher(self, state)
                except BaseException:
                    state.disabled = previous
                    raise
                return result

        return toggle

    return wrap


def _fuse_lora(original):
    def fuse_lora(self, components=None, lora_scale=1.0, safe_fusing=False, adapter_names=None, **kwargs):
        with _lock:
            state = _state(self)
            with peft_writes_in_place(self, _patcher_modules(state, [])):
                result = original(self, components=components, lora_scale=lora_scale, safe_fusing=safe_fusing,
                                  adapter_names=adapter_names, **kwargs)
            before = copy.deepcopy(state.fused)
            for name, entry in state.patcher_entries.items():
                chosen = name in adapter_names if adapter_names is not None else name not in state.inactive
                if not chosen:  # as PEFT: the named adapters, else the active ones
                    continue
                fused = state.fused.setdefault(name, {})
                for component in _components(entry):
                    strength = entry.strength_for(component)
                    if component in components and component not in fused and strength is not None:
                        fused[component] = strength * lora_scale
                if not fused:
                    del state.fused[name]
            try:
                _reconcile_patcher(self, state)
            except BaseException:
                state.fused = before
                raise
            return result

    return fuse_lora


def _unfuse_lora(original):
    def unfuse_lora(self, components=None, **kwargs):
        with _lock:
            # PEFT's unmerge subtracts; where it subtracts from weights the patcher writes, they are rewritten
            rewrite = any(getattr(layer, "merged", False) for layer in _tuner_layers(self))
            state = _state(self)
            with peft_writes_in_place(self, _patcher_modules(state, [])):
                result = original(self, components=components, **kwargs)
            before = copy.deepcopy(state.fused)
            for name in list(state.fused):
                state.fused[name] = {c: f for c, f in state.fused[name].items() if c not in components}
                if not state.fused[name]:
                    del state.fused[name]
            try:
                _reconcile_patcher(self, state, rewrite=rewrite)
            except BaseException:
                state.fused = before
                raise
            return result

    return unfuse_lora


_WRAPPERS: dict[str, Callable[[Callable], Callable]] = {
    "get_list_adapters": _get_list_adapters, "get_active_adapters": _get_active_adapters,
    "set_adapters": _set_adapters, "delete_adapters": _delete_adapters, "unload_lora_weights": _unload_lora_weights,
    "disable_lora": _toggle(True), "enable_lora": _toggle(False), "fuse_lora": _fuse_lora,
    "unfuse_lora": _unfuse_lora,
}
