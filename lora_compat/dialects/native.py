"""LoRAs on a family's native (original / ComfyUI) module names: ``diffusion_model.blocks.0.self_attn.q`` with
``lora_A``/``lora_B``, ``lora_down``/``lora_up`` (+ ``alpha``), ``.lora.down``/``.lora.up``, LyCORIS kinds or
``diff``/``diff_b`` (ComfyUI, ai-toolkit, diffusion-pipe, lightx2v), also bare (``blocks.0.self_attn.q``).

Names resolve through the family's alias maker (native name → diffusers module, e.g. Wan's
:func:`~lora_compat.archs.wan.native_aliases`). Only the families in :attr:`NativeDialect.bases` are read: FLUX.1's
``diffusion_model.`` files are BFL-named and stay the ``bfl`` dialect's.
"""
from __future__ import annotations

from ..archs import ModuleIndex
from ..files import Header, LoraFile
from ..patches.build import split_key
from ..patchset import PatchSet
from .base import Dialect, Match, ModuleReader, Resolved, claimed_fraction
from .bfl import is_bfl_key

PREFIX = "diffusion_model."
#: the first name part of every native Wan module (what a bare key may start with)
BARE_HEADS = ("blocks.", "head.head.", "time_projection.", "time_embedding.", "text_embedding.", "img_emb.",
              "patch_embedding.")
#: ``.lora.down.weight`` (an older ComfyUI/diffusers form) → the kohya suffixes the patch kinds read
_LEGACY = {".lora.down.weight": ".lora_down.weight", ".lora.up.weight": ".lora_up.weight"}


def _rename(key: str) -> str:
    key = key[len(PREFIX):] if key.startswith(PREFIX) else key
    for old, new in _LEGACY.items():
        if key.endswith(old):
            return key[: -len(old)] + new
    return key


def is_native_key(key: str) -> bool:
    if not key.startswith((PREFIX, *BARE_HEADS)) or is_bfl_key(key):
        return False
    return split_key(_rename(key), True) is not None


class NativeDialect(Dialect):
    id = "native"
    description = ("LoRAs on native/ComfyUI module names (diffusion_model.blocks.N.self_attn.q...: ComfyUI, "
                   "ai-toolkit, diffusion-pipe, lightx2v) of the families that have them (Wan)")
    bases = ("wan",)

    def detect(self, header: Header) -> Match | None:
        fraction = claimed_fraction(header, is_native_key)
        if fraction == 0:
            return None
        prefixed = any(k.startswith(PREFIX) for k in header.keys())
        # bare names are weaker evidence (``blocks.`` is a common word)
        return Match(self.id, fraction if prefixed else fraction * 0.8,
                     (f"{fraction:.0%} of keys are LoRA tensors on native (ComfyUI) module names",))

    def read(self, file: LoraFile, index: ModuleIndex) -> PatchSet:
        component = index.read_prefixes().get("lora_unet_", "transformer")
        aliases = index.aliases(component)

        def resolve(module: str) -> Resolved:
            path = aliases.get(module.replace(".", "_"))
            return f"{component}.{path}" if path is not None else None

        return ModuleReader(resolve).read(file, index, self.id, dotted=True, rename=_rename)
