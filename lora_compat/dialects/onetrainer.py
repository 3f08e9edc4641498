"""OneTrainer Flux (and Chroma, SD3) LoRAs: ``lora_transformer_<diffusers path>`` (+ ``lora_te1_`` CLIP-L,
``lora_te2_`` T5) with kohya suffixes, alpha and DoRA ``dora_scale`` (Wan: ``lora_transformer_``/``lora_transformer_2_`` for the two
experts, ``lora_te_`` UMT5); and the newer BFL form with the fused layers split into numbered
parts (``transformer.double_blocks.N.img_attn.qkv.{0,1,2}``, ``single_blocks.N.linear1.{0,1,2,3}``)."""
from __future__ import annotations

import re

from ..archs import ModuleIndex
from ..files import Header, LoraFile
from ..patchset import PatchSet
from .base import (Dialect, Match, ModuleReader, Resolved, any_key_starts, claimed_fraction, component_parts,
                   kohya_resolver)

#: ``lora_te_``: the one text encoder of a Wan file (UMT5), beside ``lora_transformer_`` keys
PREFIXES = ("lora_transformer_", "lora_te1_", "lora_te2_", "lora_te_")
_BFL_KEY = re.compile(r"^transformer\.(double|single)_blocks\.")


def is_onetrainer_key(key: str) -> bool:
    return key.startswith(PREFIXES) or bool(_BFL_KEY.match(key))


class OneTrainerDialect(Dialect):
    id = "onetrainer"
    description = "OneTrainer Flux LoRAs (lora_transformer_*, lora_te2_ = T5, DoRA; numbered BFL parts)"
    bases = ("flux1", "wan", "chroma", "sd3")

    def detect(self, header: Header) -> Match | None:
        if not any_key_starts(header, ("lora_transformer_", "transformer.")):  # the test below, quickly
            return None
        if not any(k.startswith("lora_transformer_") or _BFL_KEY.match(k) for k in header.keys()):
            return None
        fraction = claimed_fraction(header, is_onetrainer_key)
        return Match(self.id, fraction, (f"{fraction:.0%} of keys use OneTrainer's Flux names",))

    def read(self, file: LoraFile, index: ModuleIndex) -> PatchSet:
        if any(_BFL_KEY.match(k) for k in file.keys()):
            return ModuleReader(lambda m: resolve_numbered(index, m)).read(file, index, self.id, dotted=True)
        return ModuleReader(kohya_resolver(index)).read(file, index, self.id, dotted=False)


def resolve_numbered(index: ModuleIndex, module: str) -> Resolved:
    """``transformer.double_blocks.0.img_attn.qkv.1`` → the canonical module of part 1 (``attn.to_k``);
    a name that is a whole BFL module (``...img_mlp.0``) resolves as that module."""
    if not module.startswith("transformer."):
        return None
    name = module[len("transformer."):]
    whole = component_parts(index, "transformer", name)
    if whole is not None:
        return whole
    head, _, number = name.rpartition(".")
    parts = index.split_names("transformer").get(head)
    if parts is None or not number.isdigit() or int(number) >= len(parts):
        return None
    return f"transformer.{parts[int(number)].target}"
