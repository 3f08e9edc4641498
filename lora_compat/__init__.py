"""lora_compat: read, understand and apply every LoRA dialect exactly.

Public API::

    lora_compat.inspect(path) -> Inspection          # header only
    lora_compat.read(path, base=None) -> PatchSet    # canonical targets -> patches (lazy tensors)
    lora_compat.patched_weights(source, components, strength=1.0) -> {"unet.<param>": tensor, ...}
    lora_compat.convert(source, to="diffusers", out="out.safetensors", rank=None) -> ConvertReport
"""
__version__ = "0.1.0"

from .apply import LoraCompatWarning, patched_weights
from .conversion import ConvertReport, convert, convert_state_dict
from .core import detect, read
from .errors import (BaseMismatchError, CorruptFileError, LoraCompatError, NotALoraError, UnknownDialectError,
                     UnmatchedKeysError, UnsafeFileError)
from .files import LoraFile
from .fusion_gate import FusionGates
from .inspection import Inspection, inspect
from .patcher import Entry, Patcher, SetReport
from .patchset import PatchSet

__all__ = [
    "inspect", "read", "detect", "patched_weights", "Patcher", "Entry", "SetReport", "Inspection", "PatchSet", "LoraFile", "LoraCompatWarning",
    "convert", "convert_state_dict", "ConvertReport", "FusionGates",
    "LoraCompatError", "CorruptFileError", "UnsafeFileError", "NotALoraError", "UnknownDialectError",
    "BaseMismatchError", "UnmatchedKeysError", "__version__",
]
