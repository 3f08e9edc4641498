"""The plugin manager: built-in dialects/architectures and third-party plugins register the same way."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from types import ModuleType

import pluggy

from lora_compat.hooks import ENTRY_POINT_GROUP, PROJECT_NAME, LoraCompatSpec

from .archs import Arch
from .dialects import Dialect
from .errors import LoraCompatError

_lock = threading.RLock()
_manager: pluggy.PluginManager | None = None
_registry: "Registry | None" = None


@dataclass(frozen=True)
class Registered:
    obj: object
    plugin: str


@dataclass
class Registry:
    dialects: dict[str, Registered]
    archs: dict[str, Registered]


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager, with entry-point plugins (the built-ins among them) loaded."""
    global _manager
    with _lock:
        if _manager is None:
            manager = pluggy.PluginManager(PROJECT_NAME)
            manager.add_hookspecs(LoraCompatSpec)
            from . import builtin_plugins

            manager.register(builtin_plugins, name="builtin")
            manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
            _manager = manager
        return _manager


def register_plugin(plugin: ModuleType | object, name: str | None = None) -> None:
    """Register a plugin object/module at run time (instead of an entry point)."""
    with _lock:
        get_plugin_manager().register(plugin, name=name)
        reset_registry()


def unregister_plugin(plugin: ModuleType | object) -> None:
    with _lock:
        get_plugin_manager().unregister(plugin)
        reset_registry()


def reset_registry() -> None:
    global _registry
    with _lock:
        _registry = None


def registry() -> Registry:
    """Every registered dialect and architecture, by id, with the name of the plugin that gave it."""
    global _registry
    with _lock:
        if _registry is None:
            _registry = _collect(get_plugin_manager())
        return _registry


def _collect(manager: pluggy.PluginManager) -> Registry:
    dialects: dict[str, Registered] = {}
    archs: dict[str, Registered] = {}

    def collector(kind: type, store: dict[str, Registered], plugin_name: str):
        def register(obj: object) -> None:
            if not isinstance(obj, kind):
                raise LoraCompatError(f"plugin {plugin_name!r} registered {obj!r}, expected a {kind.__name__}")
            if obj.id in store and store[obj.id].plugin != plugin_name:
                raise LoraCompatError(f"plugin {plugin_name!r} registers {kind.__name__} id {obj.id!r}, "
                                      f"already provided by {store[obj.id].plugin!r}")
            store[obj.id] = Registered(obj, plugin_name)
        return register

    # call each implementation separately so every registration knows which plugin made it
    for hook_name, kind, store in (("register_dialects", Dialect, dialects), ("register_archs", Arch, archs)):
        for impl in getattr(manager.hook, hook_name).get_hookimpls():
            impl.function(register=collector(kind, store, impl.plugin_name))
    return Registry(dialects, archs)


def dialects() -> dict[str, Dialect]:
    return {k: r.obj for k, r in registry().dialects.items()}  # type: ignore[misc]


def archs() -> dict[str, Arch]:
    return {k: r.obj for k, r in registry().archs.items()}  # type: ignore[misc]
