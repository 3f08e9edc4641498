"""Patch kinds, one per module, each registered through the ``register_kinds`` hook (``builtin_plugins``).
Stable kind ids: lora, loha, lokr, ia3, glora, oft, boft, full, norm, set, dora, peft_oft, peft_boft, peft_ia3."""
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
from .peft_boft import PeftBoftPatch
from .peft_ia3 import PeftIa3Patch
from .peft_oft import PeftOftPatch
from .set import SetPatch

KINDS = ("lora", "loha", "lokr", "ia3", "glora", "oft", "boft", "full", "norm", "set", "dora", "peft_oft", "peft_boft", "peft_ia3")

__all__ = [
    "Patch", "FactorisedPatch", "Ref", "Scale", "ONE", "KINDS", "BuildContext", "IncompletePatch", "LowRank",
    "LoraPatch", "LohaPatch", "LokrPatch", "Ia3Patch", "GloraPatch", "OftPatch", "BoftPatch",
    "FullPatch", "NormPatch", "SetPatch", "DoraPatch", "PeftOftPatch", "PeftBoftPatch", "PeftIa3Patch",
]
