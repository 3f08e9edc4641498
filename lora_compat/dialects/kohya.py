"""kohya sd-scripts LoRA / LoCon / DyLoRA: ``lora_unet_*``, ``lora_te[12]_*`` + lora_down/lora_up/alpha."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from ..archs import ModuleIndex
from ..files import Header, LoraFile
from ..patchset import PatchSet
from .base import Dialect, Match, ModuleReader, claimed_fraction, kohya_resolver

if TYPE_CHECKING:
    from ..deltas import BaseWeights
    from .writing import Written

#: sd-scripts' own prefixes; a third-party family's kohya prefixes are claimed too (:func:`family_prefixes`)
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")
KOHYA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha")


def family_prefixes() -> tuple[str, ...]:
    """The kohya prefixes third-party families read (their ``Arch.kohya_prefixes``) beyond sd-scripts' own."""
    from .. import plugins

    return tuple(dict.fromkeys(p for r in plugins.registry().archs.values() if r.plugin != "builtin"
                               for p in r.obj.kohya_prefixes if p not in KOHYA_PREFIXES))  # type: ignore[attr-defined]


def is_kohya_key(key: str, prefixes: tuple[str, ...] = KOHYA_PREFIXES) -> bool:
    module, _, suffix = key.partition(".")
    return module.startswith(prefixes) and suffix in KOHYA_SUFFIXES


class KohyaDialect(Dialect):
    id = "kohya"
    description = "kohya sd-scripts LoRA/LoCon/DyLoRA (lora_unet_/lora_te_ names: SD1-style, SGM, Flux BFL names)"
    #: ``webui``: AUTOMATIC1111's compvis/SGM names for every base; ``kohya``: sd-scripts' (diffusers-style UNet
    #: names for SD1/SD2); every LyCORIS kind keeps its own tensors
    writes = ("kohya", "webui")

    def detect(self, header: Header) -> Match | None:
        prefixes = (*KOHYA_PREFIXES, *family_prefixes())
        fraction = claimed_fraction(header, lambda key: is_kohya_key(key, prefixes))
        if fraction == 0 or not any(k.endswith(".lora_down.weight") for k in header.keys()):
            return None
        return Match(self.id, fraction, (f"{fraction:.0%} of keys are kohya lora_down/lora_up/alpha",))

    def read(self, file: LoraFile, index: ModuleIndex) -> PatchSet:
        patchset = ModuleReader(kohya_resolver(index)).read(file, index, self.id, dotted=False)
        broken = file.cache.get("trailing underscores")
        if broken is None:  # detection reads the same file against every base: find them once
            broken = file.cache["trailing underscores"] = _trailing_underscores(file.keys())
        return explain_trailing_underscores(patchset, broken)

    def write(self, patchset: PatchSet, index: ModuleIndex, *, target: str | None = None, base: str | None = None,
              rank: int | None = None, weights: "BaseWeights | None" = None) -> "Written":
        """Kohya-style names of ``target``'s layout (:func:`~lora_compat.dialects.kohya_write.write_names`);
        ``rank`` is not needed: every kind has its own tensors here (PEFT OFT/BOFT/IA3 are written as their exact
        ``diff`` of ``weights``)."""
        from .kohya_write import KohyaWriter, write_names  # torch: not imported for header work

        target = self.write_target(target)
        names = write_names(index, list(patchset), target, base)
        return KohyaWriter(patchset, index, target, weights).write(names)


def _trailing_underscores(keys: Iterable[str]) -> list[str]:
    return [key for key in keys if ("_." in key or key.endswith("_")) and key.partition(".")[0].endswith("_")]


def explain_trailing_underscores(patchset: PatchSet, keys: Iterable[str] | None = None) -> PatchSet:
    """A known broken diffusers→kohya converter wrote names like ``lora_unet_context_embedder_.alpha``
    (sd-scripts issue #1463): say so instead of a bare "no such module". ``keys``: the file's keys of that form,
    when already known."""
    for key in _trailing_underscores(patchset.unmatched) if keys is None else keys:
        if key in patchset.unmatched:
            patchset.unmatched[key] = ("module name ends with '_': written by a broken converter (sd-scripts "
                                       "issue #1463); re-convert the file from its source")
    return patchset
