"""Patch kinds, one per module, each registered through the ``register_kinds`` hook (``builtin_plugins``).
Stable kind ids: lora, loha, lokr, ia3, glora, oft, boft, full, norm, set, dora."""
from .base import ONE, BuildContext, FactorisedPatch, IncompletePatch, LowRank, Patch, Ref, Scale
from .boft import BoftPatch
from .dora import DoraPatch
from .full import FullPatch
from .glora import GloraPatch
from .ia3 import Ia3Patch
from .loha import LohaPatch
from .lokr import LokrPatch
from .lora import LoraPatch
from .norm import NormPatch
from .oft import OftPatch
from .set import SetPatch

KINDS = ("lora", "loha", "lokr", "ia3", "glora", "oft", "boft", "full", "norm", "set", "dora")

__all__ = [
    "Patch", "FactorisedPatch", "Ref", "Scale", "ONE", "KINDS", "BuildContext", "IncompletePatch", "LowRank",
    "LoraPatch", "LohaPatch", "LokrPatch", "Ia3Patch", "GloraPatch", "OftPatch", "BoftPatch",
    "FullPatch", "NormPatch", "SetPatch", "DoraPatch",
]
