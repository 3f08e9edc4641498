"""BFL-named Flux LoRAs: ``diffusion_model.double_blocks...`` (ai-toolkit, ComfyUI-saved) with lora_A/lora_B,
lora_down/lora_up(+alpha) or LyCORIS kinds (``lokr_*``, ``hada_*``); ComfyUI text-encoder names too."""
from __future__ import annotations

from ..archs import ModuleIndex
from ..files import Header, LoraFile
from ..patches.build import split_key
from ..patchset import PatchSet
from .base import Dialect, Match, ModuleReader, claimed_fraction
from .flux_names import BFL_HEADS, BFL_TEXT_ENCODERS, resolve_bfl, widen_inputs

PREFIXES = ("diffusion_model.", "model.diffusion_model.")
_TEXT_ENCODER_PREFIXES = tuple(BFL_TEXT_ENCODERS)
#: every BFL key starts with one of these (one call rejects the rest)
_HEADS = (*PREFIXES, *BFL_HEADS, *_TEXT_ENCODER_PREFIXES)


def strip_prefix(key: str) -> str:
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def is_bfl_key(key: str) -> bool:
    if not key.startswith(_HEADS):
        return False
    name = strip_prefix(key)
    if not name.startswith(BFL_HEADS) and not name.startswith(_TEXT_ENCODER_PREFIXES):
        return False
    return split_key(name, True) is not None


class BflDialect(Dialect):
    id = "bfl"
    description = "Flux LoRAs on BFL module names (diffusion_model.double_blocks...: ai-toolkit, ComfyUI)"
    bases = ("flux1",)

    def detect(self, header: Header) -> Match | None:
        fraction = claimed_fraction(header, is_bfl_key)
        if fraction == 0:
            return None
        # bare BFL names with control markers are bfl-control's; they still parse here, with less confidence
        prefixed = any(k.startswith(PREFIXES) for k in header.keys())
        return Match(self.id, fraction if prefixed else fraction * 0.9,
                     (f"{fraction:.0%} of keys are LoRA tensors on BFL Flux module names",))

    def read(self, file: LoraFile, index: ModuleIndex) -> PatchSet:
        reader = ModuleReader(lambda module: resolve_bfl(index, module))
        return widen_inputs(reader.read(file, index, self.id, dotted=True, rename=strip_prefix), index)
