"""lora_compat for diffusers pipelines: ``load`` any dialect, ``set_strength``, ``unload``, and an opt-in
``enable()`` that makes ``pipe.load_lora_weights(path)`` accept every dialect.

Routes (``load`` returns the adapter name; its ``.route`` says which was taken):

- ``"diffusers"``: plain LoRA / LoCon (+ ``lora_B.bias``) is handed to diffusers' own ``load_lora_weights`` as a
  canonical diffusers/PEFT state dict (alpha and the rank scale baked into ``lora_B``, no ``.alpha`` keys), so
  ``set_adapters``, ``fuse_lora``/``unfuse_lora``, ``delete_adapters``, ``unload_lora_weights`` and hotswap work.
- ``"peft"``: LoHa goes into PEFT's own LoHa tuner layers (PEFT's LoHa math equals LyCORIS').
- ``"patcher"``: every other kind (DoRA from kohya/LyCORIS files, LoKr, IA3, OFT/BOFT, GLoRA, full, norm, Tucker,
  Flux Control ``set``/widening) is merged exactly by :class:`lora_compat.Patcher`, one per pipeline.
"""
from __future__ import annotations

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
from lora_compat.patcher import Entry, Patcher
from lora_compat.patches import LohaPatch, LoraPatch
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
    patcher_entries: dict[str, Entry] = field(default_factory=dict)
    patcher: Patcher | None = None
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
def _is_plain_lora(patch: object) -> bool:
    return type(patch) is LoraPatch and patch.mid is None


def _is_peft_loha(patch: object) -> bool:
    return type(patch) is LohaPatch and patch.t1 is None and patch.t2 is None


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
    Targets must be real module paths (a PatchSet fitted to the pipeline)."""
    tensors: dict[str, torch.Tensor] = {}
    for target, patch in patchset.items():
        target = target.removesuffix(".base_layer")  # a module PEFT already wraps: address the wrapper
        if not _is_plain_lora(patch):
            raise LoraCompatError(f"{patchset.source}: {target} is a {patch.kind} patch, not a plain LoRA")
        down, up = patch.peft_factors()
        scale = patch.scale.value()
        # down as stored (PEFT copies it into its own parameter); the scale is folded into up in fp32
        tensors[f"{target}.lora_A.weight"] = down
        tensors[f"{target}.lora_B.weight"] = up if scale == 1.0 else torch.mul(up.float(), scale)
        if patch.bias is not None:
            tensors[f"{target}.lora_B.bias"] = patch.bias.load() * scale
    return tensors


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
    try:
        listed = pipe.get_list_adapters()
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
            state.patcher_entries[name] = Entry(patchset, strength, dora_strength=dora_strength)
            _reconcile_patcher(pipe, state)
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
    fuse = getattr(pipe, "fuse_lora")

    @functools.wraps(fuse)
    def fuse_lora(*args, **kwargs):
        for layer in _tuner_layers(pipe):
            for param in layer.get_base_layer().parameters(recurse=False):
                if id(param) not in state.originals:
                    state.originals[id(param)] = (param, param.detach().to("cpu", copy=True))
        return fuse(*args, **kwargs)

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

    by_component: dict[str, dict[str, LohaPatch]] = {}
    for target, patch in patchset.items():
        component, _, path = target.partition(".")
        by_component.setdefault(component, {})[path] = patch
    modules = component_modules(pipe)
    for component, patches in by_component.items():
        model = modules[component]
        ranks = {path: p.rank for path, p in patches.items()}
        alphas = {path: p.scale.value() * p.rank for path, p in patches.items()}
        first = next(iter(patches))
        config = LoHaConfig(r=ranks[first], alpha=alphas[first], target_modules=list(patches),
                            rank_pattern={f"^{k}$": v for k, v in ranks.items()},
                            alpha_pattern={f"^{k}$": v for k, v in alphas.items()})
        inject_adapter_in_model(config, model, adapter_name=name)
        state = {}
        for path, patch in patches.items():
            for role in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
                state[f"{path}.{role}"] = getattr(patch, role[len("hada_"):].replace("_", "")).load()
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


def _reconcile_patcher(pipe: Any, state: _State) -> None:
    if state.patcher is None:
        state.patcher = Patcher(pipe)
    state.patcher.set(list(state.patcher_entries.values()))


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
            _reconcile_patcher(pipe, state)
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
                del state.patcher_entries[name]
                _reconcile_patcher(pipe, state)
            elif name in _peft_adapter_names(pipe):  # the user may have deleted it through diffusers already
                pipe.delete_adapters(name)
            del state.routes[name]
            state.strengths.pop(name, None)
        if not _peft_adapter_names(pipe):
            if any(True for _ in _tuner_layers(pipe)):
                _original("unload_lora_weights", pipe)(pipe)  # no adapter left anywhere: drop the empty wrappers
            _restore_originals(pipe, state)
        if state.patcher is not None and not state.patcher_entries:
            state.patcher.close()
            state.patcher = None


# -- enable(): plain load_lora_weights accepts every dialect ----------------------------------------------------
_enabled: dict[type, Any] = {}


def _is_local_file(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike)) and Path(os.fspath(value)).is_file()


def _wrap(original):
    @functools.wraps(original)
    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None, **kwargs):
        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, Mapping) or not _is_local_file(source):
            return original(self, source, adapter_name=adapter_name, **kwargs)  # dicts, hub ids, folders
        patchset, _ = _pipeline_patchset(self, source, strict=False, base=None)
        route = choose_route(patchset, self)
        if route == "diffusers":  # convert, then diffusers' own method: every contract of it is kept
            return original(self, to_diffusers_state_dict(patchset), adapter_name=adapter_name, **kwargs)
        load(self, source, adapter_name=adapter_name, route=route)
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
    """Make ``pipe.load_lora_weights(path)`` accept every dialect lora_compat reads (idempotent)."""
    with _lock:
        for cls in _loader_classes():
            if cls in _enabled:
                continue
            original = cls.__dict__["load_lora_weights"]
            _enabled[cls] = original
            setattr(cls, "load_lora_weights", _wrap(original))


def disable() -> None:
    """Put diffusers' own ``load_lora_weights`` back on every loader class (idempotent)."""
    with _lock:
        for cls, original in list(_enabled.items()):
            setattr(cls, "load_lora_weights", original)
            del _enabled[cls]


def enabled() -> bool:
    return bool(_enabled)
