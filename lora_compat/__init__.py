"""lora_compat: read, understand and apply every LoRA dialect exactly.

Public API::

    lora_compat.inspect(path) -> Inspection          # header only
    lora_compat.read(path, base=None) -> PatchSet    # canonical targets -> patches (lazy tensors)
    lora_compat.patched_weights(source, components, strength=1.0) -> {"unet.<param>": tensor, ...}
    lora_compat.convert(source, to="diffusers", out="out.safetensors", rank=None) -> ConvertReport
"""
__version__ = "0.1.0"

from importlib import import_module
from typing import TYPE_CHECKING

from .errors import (BaseMismatchError, CorruptFileError, LoraCompatError, NotALoraError, UnknownDialectError,
                     UnmatchedKeysError, UnsafeFileError)

from ._moved import install as _install_moved

_install_moved()  # the modules' earlier names keep importing

# the rest is imported on first use, so commands that need no tensors (``lora-compat search``) start without
# importing torch
_LAZY = {
    "LoraCompatWarning": ".models", "patched_weights": ".models",
    "ConvertReport": ".tools.convert", "convert": ".tools.convert", "convert_state_dict": ".tools.convert",
    "detect": ".detection", "read": ".detection", "LoraFile": ".files", "FusionGates": ".tools.autolora_gate",
    "Inspection": ".tools.inspection", "inspect": ".tools.inspection",
    "Entry": ".patcher", "Patcher": ".patcher", "SetReport": ".patcher", "PatchSet": ".patchset",
}

if TYPE_CHECKING:
    from .models import LoraCompatWarning, patched_weights
    from .tools.convert import ConvertReport, convert, convert_state_dict
    from .detection import detect, read
    from .files import LoraFile
    from .tools.autolora_gate import FusionGates
    from .tools.inspection import Inspection, inspect
    from .patcher import Entry, Patcher, SetReport
    from .patchset import PatchSet


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(import_module(module, __name__), name)
    else:  # a submodule (``lora_compat.plugins``) not imported yet
        try:
            value = import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'lora_compat' has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "inspect", "read", "detect", "patched_weights", "Patcher", "Entry", "SetReport", "Inspection", "PatchSet", "LoraFile", "LoraCompatWarning",
    "convert", "convert_state_dict", "ConvertReport", "FusionGates",
    "LoraCompatError", "CorruptFileError", "UnsafeFileError", "NotALoraError", "UnknownDialectError",
    "BaseMismatchError", "UnmatchedKeysError", "__version__",
]
