"""lora_compat for diffusers pipelines: ``load`` any dialect, ``set_strength``, ``unload``, and an opt-in
``enable()`` that makes ``pipe.load_lora_weights(path)`` accept every dialect.

Routes (``load`` returns the adapter name; its ``.route`` says which was taken):

- ``"diffusers"``: plain LoRA / LoCon (+ ``lora_B.bias``) is handed to diffusers' own ``load_lora_weights`` as a
  canonical diffusers/PEFT state dict (alpha and the rank scale baked into ``lora_B``, no ``.alpha`` keys), so
  ``set_adapters``, ``fuse_lora``/``unfuse_lora``, ``delete_adapters``, ``unload_lora_weights`` and hotswap work.
- ``"peft"``: LoHa goes into PEFT's own LoHa tuner layers (PEFT's LoHa math equals LyCORIS').
- ``"patcher"``: every other kind (DoRA from kohya/LyCORIS files, LoKr, IA3, OFT/BOFT, GLoRA, full, norm, Tucker,
  Flux Control ``set``/widening) is merged exactly by :class:`lora_compat.Patcher`, one per pipeline.

While ``enable()`` is on, diffusers' own adapter methods (``get_list_adapters``, ``set_adapters``,
``delete_adapters``, ``unload_lora_weights``, ``disable_lora``/``enable_lora``, ``fuse_lora``/``unfuse_lora``,
``get_active_adapters``) also act on patcher-route adapters (see :mod:`lora_compat.adapters.diffusers_methods`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from lora_compat.apply import check_patchset, component_modules, resolve_patchset
from lora_compat.archs import ModuleIndex
from lora_compat.errors import LoraCompatError
from lora_compat.patcher import Entry, Patcher, sync_config
from lora_compat.patches import Patch
from lora_compat.patches.dora import check_dora_strength
from lora_compat.patchset import PatchSet

__all__ = ["load", "set_strength", "unload", "adapters", "enable", "disable", "enabled", "to_diffusers_state_dict",
           "Loaded"]

ROUTES = ("diffusers", "peft", "patcher")
_STATE_ATTR = "_lora_compat_state"
_lock = threading.RLock()


class Loaded(str):
    """The adapter name (a ``str``), with the route it took and the keys that matched nothing."""

    route: str
    unmatched: list[str]

    def __new__(cls, name: str, route: str, unmatched: list[str]) -> "Loaded":
        value = super().__new__(cls, name)
        value.route, value.unmatched = route, unmatched
        return value


@dataclass
class _State:
    routes: dict[str, str] = field(default_factory=dict)
    strengths: dict[str, float] = field(default_factory=dict)
    #: patcher-route adapters: name → the entry as the user last weighted it (load, set_strength, set_adapters)
    patcher_entries: dict[str, Entry] = field(default_factory=dict)
    patcher: Patcher | None = None
    #: patcher-route adapters that diffusers' ``set_adapters`` left out (loaded, not applied)
    inactive: set[str] = field(default_factory=set)
    #: diffusers' ``disable_lora()`` is in effect: no patcher-route adapter is applied
    disabled: bool = False
    #: patcher-route adapter → {component: factor it was fused at} (diffusers' ``fuse_lora``; PEFT keeps a
    #: merged adapter at the scale it was merged at, whatever ``set_adapters`` says later, until ``unfuse_lora``)
    fused: dict[str, dict[str, float]] = field(default_factory=dict)
    #: the names of the last ``set_adapters`` call, in order (``get_active_adapters`` lists them in it)
    order: list[str] = field(default_factory=list)
    #: patcher-route adapter → its PatchSet as last given to the patcher, keyed for the PEFT wrappers then present
    fitted: dict[str, PatchSet] = field(default_factory=dict)
    #: parameter → its value before diffusers' ``fuse_lora`` first wrote into it (``unfuse_lora`` drifts;
    #: ``unload`` of the last adapter puts these back, so the round trip is exact)
    originals: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = field(default_factory=dict)


def _state(pipe: Any) -> _State:
    state = pipe.__dict__.get(_STATE_ATTR)
    if state is None:
        state = _State()
        pipe.__dict__[_STATE_ATTR] = state
    return state


def adapters(pipe: Any) -> dict[str, str]:
    """Adapters loaded through lora_compat: ``{name: route}``."""
    return dict(_state(pipe).routes)


# -- classifying and converting -------------------------------------------------------------------------------
def _is_plain_lora(patch: Patch) -> bool:
    return patch.low_rank() is not None


def _is_peft_loha(patch: Patch) -> bool:
    return patch.peft_loha() is not None


def choose_route(patchset: PatchSet, pipe: Any = None) -> str:
    """``diffusers`` for plain LoRA, ``peft`` for LoHa, else ``patcher``; PEFT cannot mix tuner types on one
    layer, so a module another tuner type already wraps sends the file to the patcher."""
    patches = list(patchset.values())
    wrappers = _wrapper_kinds(pipe, patchset) if pipe is not None else set()
    if patches and all(_is_plain_lora(p) for p in patches) and wrappers <= {"lora"}:
        return "diffusers"
    if patches and all(_is_peft_loha(p) for p in patches) and wrappers <= {"loha"}:
        return "peft"
    return "patcher"


def _wrapper_kinds(pipe: Any, patchset: PatchSet) -> set[str]:
    """The PEFT tuner types wrapping the modules the patchset targets (``lora``, ``loha``, ``other``)."""
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.lora import LoraLayer

    modules = component_modules(pipe)
    kinds = set()
    for target in patchset:
        if not target.endswith(".base_layer"):
            continue
        component, _, path = target.removesuffix(".base_layer").partition(".")
        wrapper = modules[component].get_submodule(path)
        kinds.add("lora" if isinstance(wrapper, LoraLayer) else "loha" if isinstance(wrapper, LoHaLayer) else "other")
    return kinds


def to_diffusers_state_dict(patchset: PatchSet) -> dict[str, torch.Tensor]:
    """Canonical diffusers/PEFT tensors of a plain-LoRA PatchSet: ``<component>.<module>.lora_A.weight`` /
    ``lora_B.weight`` (+ ``lora_B.bias``), the rank scale baked into ``lora_B``, no ``.alpha`` keys.
    Targets must be real module paths (a PatchSet fitted to the pipeline). Written by the diffusers dialect."""
    from lora_compat.plugins import dialects

    return dialects()["diffusers"].write(patchset, None, scale_in_up=True).tensors  # type: ignore[call-arg]


# -- loading --------------------------------------------------------------------------------------------------
def _pipeline_patchset(pipe: Any, source: Any, strict: bool, base: str | None) -> tuple[PatchSet, ModuleIndex]:
    modules = component_modules(pipe)
    index = ModuleIndex.from_modules(modules)
    patchset = resolve_patchset(source, index, base)
    check_patchset(patchset, index, strict)
    return patchset, index


def _default_name(pipe: Any, source: Any) -> str:
    stem = Path(os.fspath(source)).stem if isinstance(source, (str, os.PathLike)) else "lora"
    taken = set(_state(pipe).routes) | set(_peft_adapter_names(pipe))
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f"{stem}_{n}"
    return name


def _peft_adapter_names(pipe: Any) -> set[str]:
    """The adapters diffusers itself knows (PEFT layers), without the patcher-route names ``enable()`` adds."""
    try:
        listed = _original("get_list_adapters", pipe)(pipe)
    except Exception:  # no PEFT layers anywhere yet
        return set()
    return {name for names in listed.values() for name in names}


def load(pipe: Any, source: Any, adapter_name: str | None = None, strength: float = 1.0, *,
         strict: bool = False, base: str | None = None, route: str | None = None, hotswap: bool = False,
         dora_strength: str = "interpolate") -> Loaded:
    """Load a LoRA file of any dialect into a diffusers pipeline; returns the adapter name (``.route`` tells
    how it was applied). ``route`` forces ``"patcher"`` (or a route the file allows). ``hotswap``: replace
    the weights of the existing diffusers-route adapter ``adapter_name`` in place (diffusers' hotswap).
    ``dora_strength``: how DoRA files (patcher route) read ``strength``: ``"interpolate"``
    (``W + s·(W_dora − W)``: 0 is off, as in the webuis and ComfyUI) or ``"library"`` (LyCORIS' multiplier,
    PEFT's scaling)."""
    check_dora_strength(dora_strength)
    with _lock:
        state = _state(pipe)
        name = adapter_name or _default_name(pipe, source)
        if hotswap:
            if state.routes.get(name) != "diffusers":
                raise LoraCompatError(f"hotswap needs an adapter {name!r} loaded through the diffusers route")
            patchset, _ = _pipeline_patchset(pipe, source, strict, base)
            if choose_route(patchset, pipe) != "diffusers":
                raise LoraCompatError(f"{patchset.source}: only plain LoRA can be hot-swapped (diffusers' hotswap)")
            encoders = sorted({t.partition(".")[0] for t in patchset if t.startswith("text_encoder")})
            if encoders:
                raise LoraCompatError(f"{patchset.source}: diffusers cannot hot-swap text-encoder LoRAs "
                                      f"({', '.join(encoders)}); unload and load instead")
            _original("load_lora_weights", pipe)(pipe, to_diffusers_state_dict(patchset), adapter_name=name,
                                                 hotswap=True)
            _scale_peft_adapter(pipe, name, strength)
            state.strengths[name] = strength
            return Loaded(name, "diffusers", sorted(patchset.unmatched))
        if name in state.routes or name in _peft_adapter_names(pipe):
            raise LoraCompatError(f"adapter name {name!r} is already in use; unload it first or pick another")
        patchset, _ = _pipeline_patchset(pipe, source, strict, base)
        chosen = route or choose_route(patchset, pipe)
        if chosen not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, not {chosen!r}")
        if chosen in ("diffusers", "peft"):
            _guard_fuse(pipe, state)
        if chosen == "diffusers":
            _load_through_diffusers(pipe, patchset, name)
        elif chosen == "peft":
            _load_through_peft(pipe, patchset, name)
        else:
            state.patcher_entries[name] = Entry(_unwrapped(patchset), strength, dora_strength=dora_strength)
            try:
                _reconcile_patcher(pipe, state)
            except BaseException:
                del state.patcher_entries[name]
                raise
        state.routes[name] = chosen
        if chosen != "patcher":
            _scale_peft_adapter(pipe, name, strength)
        state.strengths[name] = strength
        return Loaded(name, chosen, sorted(patchset.unmatched))


def _guard_fuse(pipe: Any, state: _State) -> None:
    """Before diffusers' ``fuse_lora`` writes into the base weights (and ``unfuse_lora`` subtracts, inexactly),
    keep a copy of each base weight it is about to change; ``unload`` of the last adapter puts them back.
    Nothing is copied unless the pipeline is fused."""
    if "fuse_lora" in pipe.__dict__:
        return
    fuse = getattr(type(pipe), "fuse_lora")

    @functools.wraps(fuse)
    def fuse_lora(*args, **kwargs):
        for layer in _tuner_layers(pipe):
            for param in layer.get_base_layer().parameters(recurse=False):
                if id(param) not in state.originals:
                    state.originals[id(param)] = (param, param.detach().to("cpu", copy=True))
        # the class's method at call time: enable()/disable() may have changed it since
        return getattr(type(pipe), "fuse_lora")(pipe, *args, **kwargs)

    pipe.__dict__["fuse_lora"] = fuse_lora


def _restore_originals(pipe: Any, state: _State) -> None:
    pipe.__dict__.pop("fuse_lora", None)
    with torch.no_grad():
        for param, value in state.originals.values():
            if param.shape == value.shape and not torch.equal(param.detach().cpu(), value):
                param.copy_(value)
    state.originals.clear()


def _original(method_name: str, pipe: Any):
    """diffusers' own method even while ``enable()`` has wrapped it."""
    method = getattr(type(pipe), method_name)
    return getattr(method, "__lora_compat_original__", method)


def _load_through_diffusers(pipe: Any, patchset: PatchSet, name: str) -> None:
    tensors = to_diffusers_state_dict(patchset)
    # low_cpu_mem_usage: PEFT creates the adapter weights empty instead of random-initialising them first
    _original("load_lora_weights", pipe)(pipe, tensors, adapter_name=name, low_cpu_mem_usage=True)
    if name not in _peft_adapter_names(pipe):
        raise LoraCompatError(f"{patchset.source}: diffusers did not create adapter {name!r} from the converted "
                              "state dict")


def _load_through_peft(pipe: Any, patchset: PatchSet, name: str) -> None:
    from peft import LoHaConfig, inject_adapter_in_model, set_peft_model_state_dict

    by_component: dict[str, dict[str, Patch]] = {}
    for target, patch in patchset.items():
        component, _, path = target.partition(".")
        # a module PEFT already wraps (an earlier LoHa adapter): address the wrapper, which takes the new adapter
        by_component.setdefault(component, {})[path.removesuffix(".base_layer")] = patch
    modules = component_modules(pipe)
    for component, patches in by_component.items():
        model = modules[component]
        held = {path: p.peft_loha() for path, p in patches.items()}
        ranks = {path: factors["hada_w1_b"].shape[0] for path, (factors, _) in held.items()}
        alphas = {path: scale.value() * ranks[path] for path, (_, scale) in held.items()}
        first = next(iter(patches))
        config = LoHaConfig(r=ranks[first], alpha=alphas[first], target_modules=list(patches),
                            rank_pattern={f"^{k}$": v for k, v in ranks.items()},
                            alpha_pattern={f"^{k}$": v for k, v in alphas.items()})
        inject_adapter_in_model(config, model, adapter_name=name)
        state = {}
        for path, (factors, _) in held.items():
            for role, ref in factors.items():
                state[f"{path}.{role}"] = ref.load()
        configs = getattr(model, "peft_config", None) or {}
        configs[name] = config
        model.peft_config = configs
        set_peft_model_state_dict(model, state, adapter_name=name)
        model._hf_peft_config_loaded = True


def _tuner_layers(pipe: Any):
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in component_modules(pipe).values():
        for sub in module.modules():
            if isinstance(sub, BaseTunerLayer):
                yield sub


def _scale_peft_adapter(pipe: Any, name: str, strength: float) -> None:
    """Set the adapter's strength on every PEFT layer that has it (what ``set_adapters`` does per layer),
    without changing which adapters are active."""
    for layer in _tuner_layers(pipe):
        if name in getattr(layer, "scaling", {}):
            layer.set_scale(name, strength)


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


def _forget(state: _State, name: str) -> None:
    for table in (state.routes, state.strengths, state.patcher_entries, state.fused, state.fitted):
        table.pop(name, None)
    state.inactive.discard(name)


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
        values: list[tuple[str, torch.nn.Module, str, torch.Tensor]] = []
        for entry in baked:
            for target in entry.source:
                component, _, path = target.partition(".")
                if entry.strength_for(component) is None:
                    continue
                module = modules[component].get_submodule(path)
                values += [(component, module, n, p.detach().clone())
                           for n, p in module.named_parameters(recurse=False)]
        state.patcher.close()  # every parameter back to pristine; the baked values go in below, as the new pristine
        state.patcher = None
        for name in names:
            _forget(state, name)
        _write(values, modules)
        _reconcile_patcher(pipe, state)


def _write(values: list[tuple[str, torch.nn.Module, str, torch.Tensor]], modules: Mapping[str, Any]) -> None:
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
    for component in {v[0] for v in values}:
        sync_config(modules[component])


def set_strength(pipe: Any, adapter_name: str, strength: float) -> None:
    """Change an adapter's strength, whichever route it took."""
    with _lock:
        state = _state(pipe)
        route = state.routes.get(adapter_name)
        if route is None:
            raise LoraCompatError(f"no adapter {adapter_name!r} was loaded through lora_compat "
                                  f"(loaded: {', '.join(state.routes) or 'none'})")
        if route == "patcher":
            entry = state.patcher_entries[adapter_name]
            state.patcher_entries[adapter_name] = dataclasses.replace(entry, strength=strength)
            try:
                _reconcile_patcher(pipe, state)
            except BaseException:
                state.patcher_entries[adapter_name] = entry
                raise
        else:
            _scale_peft_adapter(pipe, adapter_name, strength)
        state.strengths[adapter_name] = strength


def unload(pipe: Any, adapter_name: str | None = None) -> None:
    """Remove one adapter (or, with ``None``, every adapter loaded through lora_compat), whichever route.

    When no adapter is left, the weights PEFT wrapped are put back exactly as they were before the first
    ``load`` (diffusers' ``fuse_lora``/``unfuse_lora`` round trip is not exact; this is)."""
    with _lock:
        state = _state(pipe)
        names = list(state.routes) if adapter_name is None else [adapter_name]
        for name in names:
            route = state.routes.get(name)
            if route is None:
                raise LoraCompatError(f"no adapter {name!r} was loaded through lora_compat")
            if route == "patcher":
                remove_patcher_adapters(pipe, state, [name], bake=False)
            elif name in _peft_adapter_names(pipe):  # the user may have deleted it through diffusers already
                _original("delete_adapters", pipe)(pipe, name)
            _forget(state, name)
        if not _peft_adapter_names(pipe):
            if any(True for _ in _tuner_layers(pipe)) and not _under_wrappers(state):
                _original("unload_lora_weights", pipe)(pipe)  # no adapter left anywhere: drop the empty wrappers
            _restore_originals(pipe, state)
        if not state.patcher_entries and not any(True for _ in _tuner_layers(pipe)):
            state.disabled, state.order = False, []  # as diffusers: no adapter layer left, nothing disabled


# -- enable(): plain load_lora_weights accepts every dialect ----------------------------------------------------
_enabled: dict[type, Any] = {}


def _is_local_file(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike)) and Path(os.fspath(value)).is_file()


def _wrap(original):
    @functools.wraps(original)
    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None, **kwargs):
        source = pretrained_model_name_or_path_or_dict
        if adapter_name in _state(self).patcher_entries and not kwargs.get("hotswap"):
            raise LoraCompatError(f"adapter name {adapter_name!r} is already in use; unload it first or pick another")
        if isinstance(source, Mapping) or not _is_local_file(source):
            return original(self, source, adapter_name=adapter_name, **kwargs)  # dicts, hub ids, folders
        patchset, _ = _pipeline_patchset(self, source, strict=False, base=None)
        route = choose_route(patchset, self)
        if route == "diffusers":  # convert, then diffusers' own method: every contract of it is kept
            return original(self, to_diffusers_state_dict(patchset), adapter_name=adapter_name, **kwargs)
        load(self, source, adapter_name=adapter_name, route=route, hotswap=bool(kwargs.get("hotswap")))
        return None

    load_lora_weights.__lora_compat_original__ = original
    return load_lora_weights


def _loader_classes() -> list[type]:
    from diffusers.loaders.lora_base import LoraBaseMixin

    found, stack = [], [LoraBaseMixin]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if "load_lora_weights" in cls.__dict__:
            found.append(cls)
    return found


def enable() -> None:
    """Make ``pipe.load_lora_weights(path)`` accept every dialect lora_compat reads, and diffusers' adapter
    methods (``get_list_adapters``, ``set_adapters``, ``delete_adapters``, ``unload_lora_weights``, ...) act on
    patcher-route adapters as on PEFT ones (idempotent)."""
    from lora_compat.adapters import diffusers_methods

    with _lock:
        for cls in _loader_classes():
            if cls in _enabled:
                continue
            original = cls.__dict__["load_lora_weights"]
            _enabled[cls] = original
            setattr(cls, "load_lora_weights", _wrap(original))
        diffusers_methods.install()


def disable() -> None:
    """Put diffusers' own methods back on every loader class (idempotent)."""
    from lora_compat.adapters import diffusers_methods

    with _lock:
        for cls, original in list(_enabled.items()):
            setattr(cls, "load_lora_weights", original)
            del _enabled[cls]
        diffusers_methods.uninstall()


def enabled() -> bool:
    return bool(_enabled)
