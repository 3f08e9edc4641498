"""diffusers pipeline LoRAs: PEFT-backend files (``unet.`` / ``text_encoder(_2).`` + lora_A/lora_B) and the
legacy attention-processor / ``.lora.down`` / ``lora_linear_layer`` layouts."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..archs import ModuleIndex
from ..archs.qwen_image import TRANSFORMER_HEADS as QWEN_IMAGE_HEADS
from ..files import Header, LoraFile
from ..patches import Ref, Scale
from ..patches.build import split_key
from ..patchset import PatchSet
from .base import Dialect, Match, ModuleReader, Resolved, claimed_fraction, component_parts
from .flux_names import DIFFUSERS_FLUX_HEADS, widen_inputs
from .lycoris import LYCORIS_ONLY
from .peft import strip_adapter_name
from .peft_scaling import PeftScaling, metadata_configs

if TYPE_CHECKING:
    from ..deltas import BaseWeights
    from .writing import Written

COMPONENT_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.", "transformer.")
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
DIFFUSERS_SUFFIXES = {"lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector",
                      "lora_magnitude_vector.weight", "lora.down.weight", "lora.up.weight",
                      "lora_linear_layer.down.weight", "lora_linear_layer.up.weight", "alpha"}


def normalise_legacy(key: str) -> str:
    """``attn1.processor.to_q_lora.down.weight`` → ``attn1.to_q.lora.down.weight``."""
    def repl(m: re.Match) -> str:
        module = "to_out.0" if m.group(1) == "to_out" else m.group(1)
        return f".{module}.lora.{m.group(2)}.weight"
    return _PROCESSOR.sub(repl, key)


PEFT_PREFIX = "base_model.model."
#: first name parts of the diffusers transformers whose files also name them bare (FLUX.1, Qwen-Image)
BARE_TRANSFORMER_HEADS = tuple(dict.fromkeys((*DIFFUSERS_FLUX_HEADS, *QWEN_IMAGE_HEADS)))


def strip_peft_prefix(key: str) -> str:
    """``base_model.model.<transformer name>`` (diffusers Flux / Qwen-Image LoRAs saved through PEFT) → the bare
    name."""
    if key.startswith(PEFT_PREFIX) and key[len(PEFT_PREFIX):].startswith(BARE_TRANSFORMER_HEADS):
        return key[len(PEFT_PREFIX):]
    return key


def is_bare_flux_name(module: str) -> bool:
    """A diffusers Flux / Qwen-Image transformer module named without its component
    (``transformer_blocks.0.attn.to_q``, and the top-level ``proj_out`` / ``x_embedder`` / ``img_in``, which have no
    dot of their own)."""
    return module.startswith(BARE_TRANSFORMER_HEADS) or f"{module}." in BARE_TRANSFORMER_HEADS


#: every diffusers key starts with one of these (one call rejects the rest)
_HEADS = (PEFT_PREFIX, *COMPONENT_PREFIXES, *BARE_TRANSFORMER_HEADS)


def is_diffusers_key(key: str) -> bool:
    if not key.startswith(_HEADS):
        return False
    if key.startswith(("transformer.double_blocks.", "transformer.single_blocks.")):
        return False  # OneTrainer's numbered BFL parts
    key = strip_peft_prefix(key)
    if not key.startswith(COMPONENT_PREFIXES) and not key.startswith(BARE_TRANSFORMER_HEADS):
        return False
    split = split_key(normalise_legacy(strip_adapter_name(key)), True)
    if split is None:
        return False
    # SimpleTuner / bare diffusers LyCORIS files (``transformer_blocks.0.attn.to_q.lokr_w1``)
    return split[1] in DIFFUSERS_SUFFIXES or (split[1] in LYCORIS_ONLY and key.startswith(BARE_TRANSFORMER_HEADS))


def adapter_metadata(header: Header) -> dict[str, PeftScaling]:
    """Per-component scaling from the ``lora_adapter_metadata`` header entry (``unet.r``, ``unet.lora_alpha``...)."""
    return {c: PeftScaling.from_config(cfg) for c, cfg in metadata_configs(header).items() if "r" in cfg}


class DiffusersDialect(Dialect):
    id = "diffusers"
    description = ("diffusers save_lora_weights files (unet./text_encoder(_2)./transformer. or bare Flux names + "
                   "lora_A/lora_B), legacy layouts")
    #: ``<component>.<module>.lora_A/lora_B`` with ``lora_adapter_metadata``: LoRA and PEFT DoRA
    writes = ("diffusers",)

    def detect(self, header: Header) -> Match | None:
        fraction = claimed_fraction(header, is_diffusers_key)
        if fraction == 0:
            return None
        if header.path is not None and (header.path.parent / "adapter_config.json").is_file() and \
                any(k.startswith(PEFT_PREFIX) for k in header.keys()):
            fraction *= 0.5  # a PEFT save_pretrained folder: the peft dialect reads the scales from its config
        return Match(self.id, fraction, (f"{fraction:.0%} of keys are diffusers component-prefixed LoRA tensors",))

    def read(self, file: LoraFile, index: ModuleIndex) -> PatchSet:
        scalings = adapter_metadata(file.header)
        warnings = []
        if not scalings and not any(k.endswith(".alpha") for k in file.keys()):
            warnings.append("no lora_adapter_metadata in the header: alpha = rank (scale 1), as diffusers assumes")

        def resolve(module: str) -> Resolved:
            if is_bare_flux_name(module):  # bare Flux transformer names
                module = "transformer." + module
            found = index.resolve(module)
            if found:
                return f"{found[0]}.{found[1]}"
            component, _, path = module.partition(".")
            return component_parts(index, component, path)

        def scale_for(target: str, parts: dict[str, Ref]) -> Scale | None:
            if "alpha" in parts:
                return None
            component, _, path = target.partition(".")
            scaling = scalings.get(component)
            return scaling.scale(path) if scaling else None

        reader = ModuleReader(resolve, scale_for, extra_warnings=warnings)
        rename = _rename
        return widen_inputs(reader.read(file, index, self.id, dotted=True, rename=rename), index)

    def write(self, patchset: PatchSet, index: ModuleIndex | None, *, target: str | None = None,
              base: str | None = None, rank: int | None = None, weights: "BaseWeights | None" = None,
              scale_in_up: bool = False) -> "Written":
        """Canonical names (what ``read`` resolves by ``index.resolve``), the scales in ``lora_adapter_metadata``;
        other kinds than LoRA/DoRA need ``rank`` (truncated SVD). ``scale_in_up``: the state dict diffusers'
        ``load_lora_weights`` takes (the rank scale folded into ``lora_B``, no metadata, plain LoRA only; a
        ``.base_layer`` target names its PEFT wrapper); ``index`` may then be ``None``."""
        from .lora_write import LoraWriter  # torch: not imported for header work

        target = self.write_target(target)
        return LoraWriter(patchset, index, target, rank, weights, scale_in_up=scale_in_up).write()


def _rename(key: str) -> str:
    # DiffSynth-Studio's PEFT dumps keep the adapter name (``lora_A.default.weight``)
    return normalise_legacy(strip_adapter_name(strip_peft_prefix(key)))
