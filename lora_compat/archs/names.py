"""How a family's components are named in the hosts' flat LoRA keys (the webuis, ComfyUI, sd-scripts).

A family declares, per component, a :class:`HostNames`: the kohya prefix the component is written under and
how its module paths become host paths (the module path itself, an alias such as the SGM name of a diffusers UNet
module, a CLIP path under ``text_model.``, a T5 path). A component in a family's fused layout (BFL Flux) is
named by its fused host modules, with the rows each canonical module occupies.

Like :mod:`.routes`, this module imports nothing from the family modules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from .routes import ModuleTable, Part

__all__ = ["HostName", "HostNames", "is_t5", "kohya_convention"]

#: the text-encoder kinds a component can be named as (ComfyUI names these ``text_encoders.<model>.…``); ``llm``: an
#: LLM encoder (Qwen3, Gemma 2) under its transformers paths
ENCODERS = ("clip", "t5", "llm")


@dataclass(frozen=True)
class HostName:
    """Where a canonical target lives under host names: a flat module name and, for a part of a fused
    module, its rows ``(start, stop)`` and whether the halves swap (Flux ``final_layer.adaLN_modulation.1``)."""

    name: str
    rows: tuple[int, int] | None = None
    swap: bool = False


def is_t5(modules: Iterable[str]) -> bool:
    """transformers' T5 encoder module paths (``encoder.block.N...``)."""
    return any(p.startswith("encoder.block.") for p in modules)


def clip_path(path: str) -> str:
    """A CLIP text-model path as the hosts write it: under ``text_model.`` (transformers 5 dropped that level)."""
    return path if path.startswith("text_model.") else f"text_model.{path}"


@dataclass(frozen=True)
class HostNames:
    """How one component's modules are named in the hosts: ``prefix`` + the host path, dots flattened to ``_``."""

    #: the kohya prefix the component is written under (``lora_unet_``, ``lora_te1_``)
    prefix: str
    #: module paths → ``{host path: module path}`` (SGM names for a diffusers UNet); ``None``: the path itself
    aliases: Callable[[Iterable[str]], dict[str, str]] | None = None
    #: a text encoder: ``"clip"`` (paths under ``text_model.``) or ``"t5"`` (transformers paths); ComfyUI names
    #: these under its ``text_encoders.`` prefixes instead of the kohya one
    encoder: str | None = None

    def __post_init__(self) -> None:
        if self.encoder is not None and self.encoder not in ENCODERS:
            raise ValueError(f"HostNames.encoder: {self.encoder!r} is none of {', '.join(ENCODERS)}")

    def fits(self, modules: Iterable[str]) -> bool:
        """Whether these names are for modules like these (a CLIP naming does not name a T5 encoder)."""
        return self.encoder is None or (self.encoder == "t5") == is_t5(modules)

    def names(self, modules: ModuleTable, fused: Mapping[str, list[Part]] | None = None,
              comfy_prefix: str | None = None) -> dict[str, HostName]:
        """Module path → its host name. ``fused``: the component's fused host modules (a family's fused layout)
        → their canonical parts. ``comfy_prefix``: ComfyUI's prefix for a text encoder (dotted paths; with
        ``aliases``, the alias names)."""
        if comfy_prefix is not None and self.encoder is not None:
            return {path: HostName(comfy_prefix + self._path(path)) for path in modules}
        if comfy_prefix is not None and self.aliases is not None:  # ComfyUI: the alias names, dotted
            return {path: HostName(comfy_prefix + alias) for alias, path in self.aliases(modules).items()}
        if fused:
            names: dict[str, HostName] = {}
            for host, parts in fused.items():
                flat = self.prefix + host.replace(".", "_")
                for part in parts:
                    whole = len(parts) == 1 and not part.swap
                    names[part.target] = HostName(flat, None if whole else (part.start, part.stop), part.swap)
            return names
        if self.aliases is not None:
            return {path: HostName(self.prefix + alias.replace(".", "_"))
                    for alias, path in self.aliases(modules).items()}
        return {path: HostName(self.prefix + self._path(path).replace(".", "_")) for path in modules}

    def _path(self, path: str) -> str:
        return clip_path(path) if self.encoder == "clip" else path


def kohya_convention(component: str, components: Mapping[str, ModuleTable]) -> HostNames:
    """sd-scripts' names for a component no family names: a T5 encoder under ``lora_te3_``; CLIP encoders under
    ``lora_te_`` alone, ``lora_te1_`` / ``lora_te2_`` beside a second CLIP encoder; anything else under
    ``lora_<component>_``."""
    modules = components.get(component, {})
    if is_t5(modules):
        return HostNames("lora_te3_", encoder="t5")
    if not component.startswith("text_encoder"):
        return HostNames(f"lora_{component}_")
    pair = "text_encoder_2" in components and not is_t5(components["text_encoder_2"])
    prefixes = {"text_encoder": "lora_te1_" if pair else "lora_te_", "text_encoder_2": "lora_te2_"}
    return HostNames(prefixes.get(component, f"lora_{component}_"), encoder="clip")
