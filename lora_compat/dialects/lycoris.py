"""LyCORIS: LoHa, LoKr, IA3, GLoRA, Diag-OFT / kohya OFT, BOFT, full, norm, DoRA (+ LoCon/Tucker)."""
from __future__ import annotations

from ..archs import ModuleIndex
from ..files import Header, LoraFile
from ..patchset import PatchSet
from .base import Dialect, Match, ModuleReader, index_prefixes, kohya_resolver
from .kohya import KOHYA_PREFIXES, family_prefixes

LYCORIS_PREFIXES = (*KOHYA_PREFIXES, "lycoris_", "oft_unet_")
#: suffixes that plain kohya LoRA never writes
LYCORIS_ONLY = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a",
                "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "oft_blocks", "oft_diag", "diff", "diff_b",
                "w_norm", "b_norm", "a1.weight", "a2.weight", "b1.weight", "b2.weight", "on_input", "dora_scale",
                "rescale"}
KNOWN = {"lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "weight"} | LYCORIS_ONLY


def plugin_suffixes() -> frozenset[str]:
    """The suffixes of patch kinds that third-party plugins register: on kohya-style names, LyCORIS reads them."""
    from .. import plugins

    return frozenset(s for r in plugins.registry().kinds.values() if r.plugin != "builtin"
                     for s in r.obj.suffixes)  # type: ignore[attr-defined]


class LycorisDialect(Dialect):
    id = "lycoris"
    description = "LyCORIS algorithms on kohya names (lora_unet_/lora_te_/lycoris_/oft_unet_)"

    def detect(self, header: Header) -> Match | None:
        claimed = specific = False
        count = 0
        extra = plugin_suffixes()
        prefixes = (*LYCORIS_PREFIXES, *family_prefixes())
        for key in header.keys():
            module, _, suffix = key.partition(".")
            if module.startswith(prefixes) and (suffix in KNOWN or suffix in extra):
                count += 1
                claimed = True
                specific = specific or suffix in LYCORIS_ONLY or suffix in extra or \
                    module.startswith(("lycoris_", "oft_unet_"))
        if not claimed:
            return None
        fraction = count / len(header)
        # plain LoRA keys are kohya's; LyCORIS claims them with less confidence
        return Match(self.id, fraction if specific else fraction * 0.5,
                     ("LyCORIS-specific tensors present",) if specific else ())

    def read(self, file: LoraFile, index: ModuleIndex) -> PatchSet:
        prefixes = dict(index_prefixes(index))
        unet = prefixes.get("lora_unet_", "unet")
        prefixes.update({"lycoris_": unet, "oft_unet_": unet})
        kohya_oft = any(k.startswith("oft_unet_") for k in file.keys()) or \
            file.metadata.get("ss_network_module") == "networks.oft"
        reader = ModuleReader(kohya_resolver(index, prefixes), oft_style="kohya" if kohya_oft else "lycoris")
        return reader.read(file, index, self.id, dotted=False)
