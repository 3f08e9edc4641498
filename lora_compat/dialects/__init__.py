"""Built-in dialects, one module each. Stable ids are the ``id`` attributes."""
from .base import Dialect, Match, ModuleReader, RefusingDialect

__all__ = ["Dialect", "Match", "ModuleReader", "RefusingDialect"]
