"""What lora_compat keeps on a diffusers pipeline (:class:`_State`: each adapter's route and strength, the
patcher-route entries, what diffusers' own methods did to them) and the PEFT side of it: diffusers' own
methods, the adapters PEFT holds, their layers and scales."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from lora_compat.models import component_modules
from lora_compat.patcher import Entry, Patcher
from lora_compat.patchset import PatchSet

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


def _forget(state: _State, name: str) -> None:
    for table in (state.routes, state.strengths, state.patcher_entries, state.fused, state.fitted):
        table.pop(name, None)
    state.inactive.discard(name)


def _original(method_name: str, pipe: Any):
    """diffusers' own method even while ``enable()`` has wrapped it."""
    method = getattr(type(pipe), method_name)
    return getattr(method, "__lora_compat_original__", method)


def _peft_adapter_names(pipe: Any) -> set[str]:
    """The adapters diffusers itself knows (PEFT layers), without the patcher-route names ``enable()`` adds."""
    try:
        listed = _original("get_list_adapters", pipe)(pipe)
    except Exception:  # no PEFT layers anywhere yet
        return set()
    return {name for names in listed.values() for name in names}


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
