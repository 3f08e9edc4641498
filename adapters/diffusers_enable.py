"""``enable()``: diffusers' own ``load_lora_weights`` accepts every dialect lora_compat reads (a plain LoRA file
is converted and handed to it; other kinds go through :func:`load`), and diffusers' adapter methods act on
patcher-route adapters (:mod:`lora_compat.adapters.diffusers_methods`); ``disable()`` puts diffusers' own
methods back."""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Mapping

from lora_compat.errors import LoraCompatError

from .diffusers_load import _diffusers_call, _pipeline_patchset, choose_route, load
from .diffusers_state import _lock, _state

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
        # Wan 2.2: diffusers' own flag puts the file's transformer modules into the second expert
        into = "transformer_2" if kwargs.get("load_into_transformer_2") else None
        patchset, _ = _pipeline_patchset(self, source, strict=False, base=None, into=into)
        route = choose_route(patchset, self)
        if route == "diffusers":  # convert, then diffusers' own method: every contract of it is kept
            tensors, extra = _diffusers_call(self, patchset)
            return original(self, tensors, adapter_name=adapter_name, **{**kwargs, **extra})
        load(self, source, adapter_name=adapter_name, route=route, hotswap=bool(kwargs.get("hotswap")), into=into)
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
