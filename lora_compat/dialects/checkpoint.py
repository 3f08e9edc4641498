"""Full model checkpoints (LDM single files, diffusers component state dicts, the newer families' transformers,
VAEs and text encoders): refused, named where the header tells what they are."""
from __future__ import annotations

from ..files import Header
from ..patches.build import split_key
from .base import Match, RefusingDialect
from .model_files import has_adapter_tensors, identify

LDM_MARKERS = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.embedders.")
DIFFUSERS_UNET_MARKERS = ("conv_in.weight", "time_embedding.linear_1.weight", "down_blocks.0.resnets.0.conv1.weight")


def _plain_parameters(header: Header) -> float:
    keys = list(header.keys())
    plain = sum(1 for k in keys if k.endswith((".weight", ".bias")) and "lora" not in k
                and split_key(k, True) is None)
    return plain / len(keys) if keys else 0.0


class CheckpointRecogniser(RefusingDialect):
    id = "checkpoint"
    description = "full model checkpoints"

    def detect(self, header: Header) -> Match | None:
        named = identify(header)
        if named is not None:  # parameters only that model has, and no adapter tensor: outranks every LoRA reader
            return Match(self.id, 1.0, (f"{named}: full model parameters, no LoRA tensors",))
        if "scaled_fp8" in header and not has_adapter_tensors(header):
            return Match(self.id, 1.0, ("ComfyUI fp8-scaled model parameters, no LoRA tensors",))
        if len(header) < 20 or _plain_parameters(header) < 0.95:
            return None
        keys = header.keys()
        if any(k.startswith(LDM_MARKERS) for k in keys) or all(m in header for m in DIFFUSERS_UNET_MARKERS[:2]):
            return Match(self.id, 0.95, ("full model parameters, no LoRA tensors",))
        return Match(self.id, 0.6, ("only plain .weight/.bias parameters",))

    def explain(self, header: Header) -> str:
        named = identify(header)
        if named is not None:
            return f"is {named}, not a LoRA ({len(header)} model tensors, no LoRA tensors); load it as a model"
        if "scaled_fp8" in header:
            return (f"is a ComfyUI fp8-scaled model checkpoint, not a LoRA ({len(header)} model tensors, no LoRA "
                    "tensors); load it as a model")
        return (f"is a full model checkpoint ({len(header)} plain parameters, no LoRA tensors), not a LoRA; "
                "load it as a model")
