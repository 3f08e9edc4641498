"""Architectures (base model families) that LoRA keys resolve against."""
from .base import Arch, ModuleIndex
from .names import HostName, HostNames
from .sd import SD2, SD15, SDXL, sgm_aliases

__all__ = ["Arch", "HostName", "HostNames", "ModuleIndex", "SD15", "SD2", "SDXL", "sgm_aliases"]
