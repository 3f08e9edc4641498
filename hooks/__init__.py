"""The lora_compat plugin contract.

A plugin is a module with ``@hookimpl`` functions, registered through the entry-point group
``lora_compat`` (or directly with ``lora_compat.plugins.get_plugin_manager().register(module)``)::

    from lora_compat.hooks import hookimpl

    @hookimpl
    def register_dialects(register):
        register(MyDialect())
"""
from __future__ import annotations

from typing import Callable

import pluggy

PROJECT_NAME = "lora_compat"
ENTRY_POINT_GROUP = "lora_compat"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


class LoraCompatSpec:
    """Hook specifications. Every hook receives a ``register`` callable; call it once per object."""

    @hookspec
    def register_dialects(self, register: Callable[[object], None]) -> None:
        """Register ``lora_compat.dialects.Dialect`` instances (one per file dialect)."""

    @hookspec
    def register_archs(self, register: Callable[[object], None]) -> None:
        """Register ``lora_compat.archs.Arch`` instances (one per base model family, e.g. ``sd15``)."""

    @hookspec
    def register_kinds(self, register: Callable[[object], None]) -> None:
        """Register patch kinds: ``lora_compat.patches.Patch`` subclasses (the class, not an instance) with a
        ``kind`` id, the key ``suffixes`` they recognise and ``from_parts`` (see ``lora_compat.patches.base``)."""


__all__ = ["hookimpl", "hookspec", "LoraCompatSpec", "PROJECT_NAME", "ENTRY_POINT_GROUP"]
