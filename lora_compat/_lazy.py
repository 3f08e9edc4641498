"""torch, imported on first use.

Header work (parsing a file's header, choosing its dialect and base, building its patches from names and
shapes) never touches tensors, so ``inspect``, ``dialects``, ``index``, ``search`` and ``recommend`` run
without importing torch (which takes ~2 s). The modules that hold both header-level code and tensor math
(``files``, ``patches.*``) write ``from ._lazy import torch``: the real module is imported by the first
attribute access (``torch.einsum``...), i.e. by the first tensor read or computation.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any


class LazyModule(ModuleType):
    """Stands for the module ``name`` and imports it on first attribute access (it never enters
    ``sys.modules`` itself). Each attribute is kept once looked up, so later lookups cost what a module's do."""

    def __getattr__(self, attr: str) -> Any:
        value = getattr(importlib.import_module(self.__name__), attr)
        setattr(self, attr, value)
        return value


if TYPE_CHECKING:
    import torch as torch
else:
    torch = LazyModule("torch")
