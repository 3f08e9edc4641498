"""XLabs x-flux LoRAs: ``double_blocks.N.processor.{qkv,proj}_lora{1,2}`` and ``single_blocks.N.processor.*``.

``lora1`` is the image stream, ``lora2`` the text stream. A single block's ``qkv_lora`` covers only the first
3 x width rows of ``linear1`` (q, k, v; the MLP rows are untouched). No alpha is stored: scale 1.
"""
from __future__ import annotations

import re

from ..archs import ModuleIndex
from ..files import Header, LoraFile
from ..patchset import PatchSet
from .base import Dialect, Match, ModuleReader, claimed_fraction
from .flux_names import resolve_bfl

_KEY = re.compile(r"^(?:diffusion_model\.)?(double|single)_blocks\.(\d+)\.processor\."
                  r"(qkv|proj)_lora(1|2)?\.(down|up)\.weight$")
BFL_MODULE = {("double", "qkv", "1"): "img_attn.qkv", ("double", "proj", "1"): "img_attn.proj",
              ("double", "qkv", "2"): "txt_attn.qkv", ("double", "proj", "2"): "txt_attn.proj",
              ("single", "qkv", None): "linear1", ("single", "proj", None): "linear2"}


def to_bfl_key(key: str) -> str:
    """``double_blocks.0.processor.qkv_lora1.down.weight`` → ``double_blocks.0.img_attn.qkv.lora.down.weight``."""
    m = _KEY.match(key)
    if not m:
        return key
    kind, block, what, stream, role = m.groups()
    module = BFL_MODULE.get((kind, what, stream))
    return f"{kind}_blocks.{block}.{module}.lora.{role}.weight" if module else key


class XlabsDialect(Dialect):
    id = "xlabs"
    description = "XLabs x-flux Flux LoRAs (double_blocks.N.processor.qkv_lora1 ...)"
    bases = ("flux1",)

    def detect(self, header: Header) -> Match | None:
        fraction = claimed_fraction(header, _KEY.match)
        if fraction == 0:
            return None
        return Match(self.id, fraction, (f"{fraction:.0%} of keys are x-flux processor LoRA tensors",))

    def read(self, file: LoraFile, index: ModuleIndex) -> PatchSet:
        reader = ModuleReader(lambda module: resolve_bfl(index, module))
        return reader.read(file, index, self.id, dotted=True, rename=to_bfl_key)
