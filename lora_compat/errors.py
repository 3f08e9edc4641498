"""The LoraCompatError hierarchy. Messages name the file, the key and what was expected."""
from __future__ import annotations


class LoraCompatError(Exception):
    """Base class of every error lora_compat raises on purpose."""


class CorruptFileError(LoraCompatError):
    """The file is truncated, its header is malformed, or its tensors do not match the header."""


class UnsafeFileError(LoraCompatError):
    """A pickle file that cannot be loaded without running code (refused, nothing executed)."""


class NotALoraError(LoraCompatError):
    """The file is something else: textual inversion, full checkpoint, ControlNet, T2I-Adapter...

    ``kind`` is the stable id of what it was recognised as (``textual-inversion``, ``checkpoint``, ...).
    """

    def __init__(self, message: str, kind: str = "unknown"):
        super().__init__(message)
        self.kind = kind


class UnknownDialectError(LoraCompatError):
    """No registered dialect recognises the file's keys."""


class BaseMismatchError(LoraCompatError):
    """The LoRA was made for another base model than the components it is applied to."""


class UnmatchedKeysError(LoraCompatError):
    """``strict=True`` and some keys of the file map to no module of the target."""

    def __init__(self, message: str, keys: list[str]):
        super().__init__(message)
        self.keys = keys


__all__ = [
    "LoraCompatError", "CorruptFileError", "UnsafeFileError", "NotALoraError",
    "UnknownDialectError", "BaseMismatchError", "UnmatchedKeysError",
]
