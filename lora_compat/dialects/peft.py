"""Raw PEFT adapters: ``base_model.model.<module>.lora_A.weight`` with ``adapter_config.json`` beside the file."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..archs import ModuleIndex
from ..files import Header, LoraFile
from ..patches import Ref, Scale
from ..patchset import PatchSet
from .base import Dialect, Match, ModuleReader, any_key_starts, claimed_fraction
from .peft_scaling import PeftScaling

if TYPE_CHECKING:
    from ..deltas import BaseWeights
    from .writing import Written

PREFIX = "base_model.model."
_ADAPTER_NAME = re.compile(r"\.(lora_A|lora_B|lora_magnitude_vector)\.default(\.|$)")
PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias", ".lora_magnitude_vector",
                 ".lora_magnitude_vector.weight")
#: PEFT's auto_mapping.base_model_class → pipeline component
BASE_CLASS_COMPONENT = {"UNet2DConditionModel": "unet", "CLIPTextModel": "text_encoder",
                        "CLIPTextModelWithProjection": "text_encoder_2", "FluxTransformer2DModel": "transformer"}


def strip_adapter_name(key: str) -> str:
    return _ADAPTER_NAME.sub(lambda m: f".{m.group(1)}{m.group(2)}", key)


def is_peft_key(key: str) -> bool:
    return key.startswith(PREFIX) and strip_adapter_name(key).endswith(PEFT_SUFFIXES)


def load_adapter_config(path: Path | None) -> dict | None:
    if path is None:
        return None
    config = path.parent / "adapter_config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return None


class PeftDialect(Dialect):
    id = "peft"
    description = "PEFT save_pretrained adapters (base_model.model. + lora_A/lora_B, adapter_config.json)"
    #: one model's LoRA/DoRA: ``base_model.model.<module>``, the config under ``lora_compat.peft_config``
    #: (``tools.convert.save`` writes it out as ``adapter_config.json``)
    writes = ("peft",)

    def detect(self, header: Header) -> Match | None:
        if not any_key_starts(header, PREFIX):
            return None
        fraction = claimed_fraction(header, is_peft_key)
        if fraction == 0:
            return None
        if header.path is None or not (header.path.parent / "adapter_config.json").is_file():
            # without a PEFT config, base_model.model. + Flux names is a diffusers Flux file: let diffusers win
            fraction *= 0.5
        return Match(self.id, fraction, ("base_model.model. prefix with PEFT LoRA tensors",))

    def read(self, file: LoraFile, index: ModuleIndex) -> PatchSet:
        config = load_adapter_config(file.path)
        warnings = []
        if config is None:
            warnings.append("no adapter_config.json beside the file: alpha = rank (scale 1) assumed")
        scaling = PeftScaling.from_config(config) if config else None
        base_class = ((config or {}).get("auto_mapping") or {}).get("base_model_class")
        order = _read_order(index, BASE_CLASS_COMPONENT.get(base_class))

        def resolve(module: str) -> str | None:
            path = module[len(PREFIX):] if module.startswith(PREFIX) else module
            for component in order:
                found = index.resolve(f"{component}.{path}")
                if found:
                    return f"{found[0]}.{found[1]}"
            return None

        def scale_for(target: str, parts: dict[str, Ref]) -> Scale | None:
            return scaling.scale(target.partition(".")[2]) if scaling else None

        reader = ModuleReader(resolve, scale_for, extra_warnings=warnings)
        return reader.read(file, index, self.id, dotted=True, rename=strip_adapter_name)

    def write(self, patchset: PatchSet, index: ModuleIndex, *, target: str | None = None, base: str | None = None,
              rank: int | None = None, weights: "BaseWeights | None" = None) -> "Written":
        """One component's modules by their path after ``base_model.model.`` (what ``read`` resolves against each
        component), the scales in the PEFT config; other kinds than LoRA/DoRA need ``rank``."""
        from .lora_write import LoraWriter  # torch: not imported for header work

        target = self.write_target(target)
        written = LoraWriter(patchset, index, target, rank, weights, model_prefix=PREFIX).write()
        component = next(iter(patchset), "").partition(".")[0]
        order = _read_order(index, None)
        misread = any(next((c for c in order if index.resolve(f"{c}.{t.partition('.')[2]}")), component) != component
                      for t in patchset)
        if misread and component in _COMPONENT_CLASS:
            # ``read`` would take these paths for an earlier component (SDXL's text_encoder_2 has text_encoder's
            # paths): name the model's class, as PEFT's own ``auto_mapping`` does
            config = json.loads(written.metadata["lora_compat.peft_config"])
            config["auto_mapping"] = {"base_model_class": _COMPONENT_CLASS[component]}
            written.metadata["lora_compat.peft_config"] = json.dumps(config)
        return written


#: component → the model class ``read`` takes it from (the inverse of :data:`BASE_CLASS_COMPONENT`)
_COMPONENT_CLASS = {component: name for name, component in BASE_CLASS_COMPONENT.items()}


def _read_order(index: ModuleIndex, preferred: str | None) -> list[str]:
    """The components ``read`` resolves a path against, in order: the config's model class's first."""
    return list(dict.fromkeys(c for c in ([preferred] if preferred else []) + list(index.components)
                              if index.has_component(c)))
