"""The plugin manager: built-in dialects/architectures/patch kinds and third-party plugins register the same way."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from types import ModuleType

import pluggy

from lora_compat.hooks import ENTRY_POINT_GROUP, PROJECT_NAME, LoraCompatSpec

from .archs import Arch
from .dialects import Dialect
from .errors import LoraCompatError
from .patches.base import Patch
from .patches import build
from .patches.build import KindTable

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
    #: patch kinds by id (``Registered.obj`` is the ``Patch`` subclass)
    kinds: dict[str, Registered] = field(default_factory=dict)
    kind_table: KindTable | None = None


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
        build._table = None


def registry() -> Registry:
    """Every registered dialect, architecture and patch kind, by id, with the name of the plugin that gave it."""
    global _registry
    with _lock:
        if _registry is None:
            _registry = _collect(get_plugin_manager())
            build._table = _registry.kind_table
        return _registry


def _collect(manager: pluggy.PluginManager) -> Registry:
    dialects: dict[str, Registered] = {}
    archs: dict[str, Registered] = {}
    kinds: dict[str, Registered] = {}

    def collector(kind: type, store: dict[str, Registered], plugin_name: str):
        def register(obj: object) -> None:
            if kind is Patch:  # a kind registers its class
                if not (isinstance(obj, type) and issubclass(obj, Patch) and isinstance(obj.__dict__.get("kind"), str)):
                    raise LoraCompatError(f"plugin {plugin_name!r} registered {obj!r}, expected a Patch subclass "
                                          "with its own `kind` id")
                key, what = obj.kind, "kind"
            else:
                if not isinstance(obj, kind):
                    raise LoraCompatError(f"plugin {plugin_name!r} registered {obj!r}, expected a {kind.__name__}")
                key, what = obj.id, kind.__name__  # type: ignore[attr-defined]
            if key in store and store[key].plugin != plugin_name:
                raise LoraCompatError(f"plugin {plugin_name!r} registers {what} id {key!r}, "
                                      f"already provided by {store[key].plugin!r}")
            store[key] = Registered(obj, plugin_name)
        return register

    # call each implementation separately so every registration knows which plugin made it
    for hook_name, kind, store in (("register_dialects", Dialect, dialects), ("register_archs", Arch, archs),
                                   ("register_kinds", Patch, kinds)):
        for impl in getattr(manager.hook, hook_name).get_hookimpls():
            impl.function(register=collector(kind, store, impl.plugin_name))
    try:
        table = KindTable.of(r.obj for r in kinds.values())  # type: ignore[misc]
    except ValueError as exc:
        raise LoraCompatError(f"patch kinds disagree: {exc}") from None
    return Registry(dialects, archs, kinds, table)


def dialects() -> dict[str, Dialect]:
    return {k: r.obj for k, r in registry().dialects.items()}  # type: ignore[misc]


def archs() -> dict[str, Arch]:
    return {k: r.obj for k, r in registry().archs.items()}  # type: ignore[misc]


def kinds() -> dict[str, type[Patch]]:
    """Every registered patch kind's class, by kind id."""
    return {k: r.obj for k, r in registry().kinds.items()}  # type: ignore[misc]


def kind_table() -> KindTable:
    """The registered kinds' suffixes, roles and build order (see :mod:`lora_compat.patches.build`)."""
    table = registry().kind_table
    assert table is not None
    return table
