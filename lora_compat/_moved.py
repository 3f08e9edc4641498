"""The modules' earlier names (``lora_compat.bake``, ``lora_compat.core``...), importable still: each resolves
to the module under its new name (the same module object), so code written against 0.1 keeps working."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

#: earlier name (under lora_compat) -> the module's name now
MOVED = {
    "core": "detection",
    "apply": "models",
    "conversion": "tools.convert",
    "bake": "tools.bake",
    "fuse": "tools.merge",
    "blocks": "tools.block_weights",
    "fusion_gate": "tools.autolora_gate",
    "controlnet": "tools.controlnet",
    "matrix": "tools.matrix",
    "inspection": "tools.inspection",
    "examples": "tools.examples",
    "hostkeys": "hosts.convert",
    "install_host": "hosts.install",
    "bundle": "hosts.bundle",
    "patches.rows": "patches.fused",
    "library": "tools.library",
    "retrieval": "tools.library.retrieval",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if _now(fullname) else None

    def create_module(self, spec):
        return importlib.import_module(_now(spec.name))

    def exec_module(self, module) -> None:
        pass


def _now(fullname: str) -> str | None:
    """The name now of a module under an earlier name (its submodules too: ``lora_compat.library.store``)."""
    package, _, rest = fullname.partition(".")
    if package != "lora_compat":
        return None
    for earlier, now in MOVED.items():
        if rest == earlier or rest.startswith(earlier + "."):
            return f"lora_compat.{now}{rest[len(earlier):]}"
    return None


def install() -> None:
    # first on the path: a submodule of an earlier name must not load a second time under that name
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Alias())
