"""FLUX.1 Depth/Canny Control LoRAs (BFL): bare BFL names with lora_A/lora_B/lora_B.bias, the query/key norm
``scale`` values stored whole (kind ``set``), and ``img_in`` widened to take the control latents."""
from __future__ import annotations

import re

from ..archs import ModuleIndex
from ..files import Header, LoraFile
from ..patchset import PatchSet
from .base import Dialect, Match, ModuleReader
from .flux_names import BFL_HEADS, FLUX2_ONLY_HEADS, resolve_bfl, widen_inputs

_KEY = re.compile(r"^[\w.]+\.(lora_A\.weight|lora_B\.weight|lora_B\.bias|scale)$")


class BflControlDialect(Dialect):
    id = "bfl-control"
    description = "FLUX.1 Control LoRAs (Depth/Canny): BFL names, lora_B.bias, norm scales, widened img_in"
    bases = ("flux1",)

    def detect(self, header: Header) -> Match | None:
        keys = list(header.keys())
        if not keys or not all(k.startswith(BFL_HEADS) and _KEY.match(k) for k in keys):
            return None
        if any(k.startswith(FLUX2_ONLY_HEADS) for k in keys):  # FLUX.2's img_in takes 128 columns too
            return None
        shapes = header.shapes
        widened = "img_in.lora_A.weight" in shapes and "img_in.lora_B.weight" in shapes and \
            len(shapes["img_in.lora_A.weight"]) == 2 and shapes["img_in.lora_A.weight"][1] > 64
        markers = widened or any(k.endswith((".scale", ".lora_B.bias")) for k in keys)
        if not markers:
            return None
        return Match(self.id, 1.0, ("BFL names with lora_B.bias / norm scales"
                                    + (" and a widened img_in" if widened else ""),))

    def read(self, file: LoraFile, index: ModuleIndex) -> PatchSet:
        reader = ModuleReader(lambda module: resolve_bfl(index, module))
        return widen_inputs(reader.read(file, index, self.id, dotted=True), index)
