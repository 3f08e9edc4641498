"""Loading into a diffusers pipeline: the route a file takes (:func:`choose_route`), ``load`` through diffusers'
own ``load_lora_weights``, PEFT's LoHa layers or the patcher, ``set_strength`` and ``unload`` whichever route,
and the copy of the base weights diffusers' ``fuse_lora`` is about to change."""
from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

import torch

from lora_compat.models import check_patchset, component_modules, resolve_patchset
from lora_compat.archs import ModuleIndex
from lora_compat.archs.names import is_t5
from lora_compat.errors import LoraCompatError
from lora_compat.patcher import Entry
from lora_compat.patches import Patch
from lora_compat.patches.dora import check_dora_strength
from lora_compat.patchset import PatchSet

from .diffusers_patcher import _reconcile_patcher, _under_wrappers, _unwrapped, remove_patcher_adapters
from .diffusers_state import (ROUTES, Loaded, _forget, _lock, _original, _peft_adapter_names, _scale_peft_adapter,
                              _state, _State, _tuner_layers)


def _diffusers_state_dict(patchset: PatchSet) -> dict[str, torch.Tensor]:
    # the writer stays in the public module (adapters.diffusers), which imports this one: looked up at call time
    from .diffusers import to_diffusers_state_dict

    return to_diffusers_state_dict(patchset)


def _is_plain_lora(patch: Patch) -> bool:
    return patch.low_rank() is not None


def _is_peft_loha(patch: Patch) -> bool:
    return patch.peft_loha() is not None


def choose_route(patchset: PatchSet, pipe: Any = None) -> str:
    """``diffusers`` for plain LoRA, ``peft`` for LoHa, else ``patcher``; PEFT cannot mix tuner types on one
    layer, so a module another tuner type already wraps sends the file to the patcher, and so does a component
    diffusers' own loader of the pipeline does not load (Wan's text encoder, SD3's T5
    ``text_encoder_3``) or cannot (a T5 text encoder: Chroma's)."""
    patches = list(patchset.values())
    wrappers = _wrapper_kinds(pipe, patchset) if pipe is not None else set()
    through_diffusers = pipe is None or _diffusers_into(pipe, patchset) != "patcher"
    if patches and all(_is_plain_lora(p) for p in patches) and wrappers <= {"lora"} and through_diffusers:
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


def _pipeline_patchset(pipe: Any, source: Any, strict: bool, base: str | None, into: str | None = None
                       ) -> tuple[PatchSet, ModuleIndex]:
    modules = component_modules(pipe)
    if into is not None:
        modules = _swapped(modules, into)
    index = ModuleIndex.from_modules(modules)
    patchset = resolve_patchset(source, index, base)
    check_patchset(patchset, index, strict)
    if into is not None:  # the file's transformer modules, read against ``into``, are ``into`` 's
        patchset = dataclasses.replace(patchset, patches={
            (f"{into}.{t.partition('.')[2]}" if t.partition(".")[0] == "transformer" else t): p
            for t, p in patchset.items()})
    return patchset, index


def _swapped(modules: dict[str, torch.nn.Module], into: str) -> dict[str, torch.nn.Module]:
    """The pipeline's components with ``into`` standing as ``transformer`` (the component the file's keys name)."""
    if into not in modules or "transformer" not in modules:
        raise LoraCompatError(f"into={into!r}: the pipeline has no {into} component beside its transformer "
                              f"(components: {', '.join(modules)})")
    swapped = {c: m for c, m in modules.items() if c not in ("transformer", into)}
    swapped["transformer"] = modules[into]
    return swapped


def _diffusers_into(pipe: Any, patchset: PatchSet) -> str | None:
    """Where diffusers' own loader would put the patchset: ``None`` (as named), ``"transformer_2"`` (Wan 2.2's
    ``load_into_transformer_2``), or ``"patcher"`` when it cannot (a component the pipeline's loader does not load,
    such as Wan's text encoder or SD3's T5 ``text_encoder_3``, dropped in silence there; a T5 text encoder; or several
    transformers at once)."""
    loadable = set(getattr(pipe, "_lora_loadable_modules", ()) or ())
    components = {t.partition(".")[0] for t in patchset}
    if loadable and not components <= loadable:
        return "patcher"
    # diffusers 0.42 converts only CLIP names on a text encoder: a LoRA on a T5 one (Chroma's) raises there
    modules = component_modules(pipe) if any(c.startswith("text_encoder") for c in components) else {}
    if any(c.startswith("text_encoder") and c in modules and is_t5(n for n, _ in modules[c].named_modules())
           for c in components):
        return "patcher"
    if "transformer_2" in components:
        return "transformer_2" if components == {"transformer_2"} else "patcher"
    return None


def _default_name(pipe: Any, source: Any) -> str:
    stem = Path(os.fspath(source)).stem if isinstance(source, (str, os.PathLike)) else "lora"
    taken = set(_state(pipe).routes) | set(_peft_adapter_names(pipe))
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f"{stem}_{n}"
    return name


def load(pipe: Any, source: Any, adapter_name: str | None = None, strength: float = 1.0, *,
         strict: bool = False, base: str | None = None, route: str | None = None, hotswap: bool = False,
         dora_strength: str = "interpolate", into: str | None = None) -> Loaded:
    """Load a LoRA file of any dialect into a diffusers pipeline; returns the adapter name (``.route`` tells
    how it was applied). ``route`` forces ``"patcher"`` (or a route the file allows). ``hotswap``: replace
    the weights of the existing diffusers-route adapter ``adapter_name`` in place (diffusers' hotswap).
    ``dora_strength``: how DoRA files (patcher route) read ``strength``: ``"interpolate"``
    (``W + s·(W_dora − W)``: 0 is off, as in the webuis and ComfyUI) or ``"library"`` (LyCORIS' multiplier,
    PEFT's scaling). ``into``: the pipeline component that the file's transformer modules go to instead of
    ``transformer`` (Wan 2.2's second expert: ``into="transformer_2"``, as diffusers' ``load_into_transformer_2``)."""
    check_dora_strength(dora_strength)
    with _lock:
        state = _state(pipe)
        name = adapter_name or _default_name(pipe, source)
        if hotswap:
            if state.routes.get(name) != "diffusers":
                raise LoraCompatError(f"hotswap needs an adapter {name!r} loaded through the diffusers route")
            patchset, _ = _pipeline_patchset(pipe, source, strict, base, into)
            if choose_route(patchset, pipe) != "diffusers":
                raise LoraCompatError(f"{patchset.source}: only plain LoRA can be hot-swapped (diffusers' hotswap)")
            encoders = sorted({t.partition(".")[0] for t in patchset if t.startswith("text_encoder")})
            if encoders:
                raise LoraCompatError(f"{patchset.source}: diffusers cannot hot-swap text-encoder LoRAs "
                                      f"({', '.join(encoders)}); unload and load instead")
            tensors, kwargs = _diffusers_call(pipe, patchset)
            _original("load_lora_weights", pipe)(pipe, tensors, adapter_name=name, hotswap=True, **kwargs)
            _scale_peft_adapter(pipe, name, strength)
            state.strengths[name] = strength
            return Loaded(name, "diffusers", sorted(patchset.unmatched))
        if name in state.routes or name in _peft_adapter_names(pipe):
            raise LoraCompatError(f"adapter name {name!r} is already in use; unload it first or pick another")
        patchset, _ = _pipeline_patchset(pipe, source, strict, base, into)
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


def _diffusers_call(pipe: Any, patchset: PatchSet) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict and keyword arguments of diffusers' ``load_lora_weights`` for ``patchset``: a patchset on
    ``transformer_2`` goes under ``transformer.`` names with ``load_into_transformer_2=True``."""
    tensors = _diffusers_state_dict(patchset)
    if _diffusers_into(pipe, patchset) != "transformer_2":
        return tensors, {}
    return ({"transformer." + k.removeprefix("transformer_2."): v for k, v in tensors.items()},
            {"load_into_transformer_2": True})


def _load_through_diffusers(pipe: Any, patchset: PatchSet, name: str) -> None:
    tensors, kwargs = _diffusers_call(pipe, patchset)
    # low_cpu_mem_usage: PEFT creates the adapter weights empty instead of random-initialising them first
    _original("load_lora_weights", pipe)(pipe, tensors, adapter_name=name, low_cpu_mem_usage=True, **kwargs)
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
