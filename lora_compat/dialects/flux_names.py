"""Name handling shared by the FLUX.1 dialects: BFL module names, component prefixes, input widening."""
from __future__ import annotations

from ..archs import ModuleIndex
from ..patches.widen import WidenPatch
from ..patchset import PatchSet
from .base import Resolved, component_parts

#: first segment of every BFL transformer module name
BFL_HEADS = ("double_blocks.", "single_blocks.", "img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.",
             "final_layer.")
#: first segment of every diffusers FluxTransformer2DModel module name
DIFFUSERS_FLUX_HEADS = ("transformer_blocks.", "single_transformer_blocks.", "x_embedder.", "context_embedder.",
                        "time_text_embed.", "norm_out.", "proj_out.")
#: ComfyUI's text-encoder prefixes (``text_encoders.clip_l.transformer.text_model...``)
COMFY_TEXT_ENCODERS = {"text_encoders.clip_l.transformer.": "text_encoder",
                       "text_encoders.t5xxl.transformer.": "text_encoder_2"}


def resolve_bfl(index: ModuleIndex, name: str) -> Resolved:
    """A BFL transformer module name, or a ComfyUI text-encoder name, → canonical target(s)."""
    for prefix, component in COMFY_TEXT_ENCODERS.items():
        if name.startswith(prefix):
            found = index.resolve(f"{component}.{name[len(prefix):]}")
            return f"{found[0]}.{found[1]}" if found else None
    return component_parts(index, "transformer", name)


def widen_inputs(patchset: PatchSet, index: ModuleIndex) -> PatchSet:
    """A LoRA on ``x_embedder`` whose down has more input columns than the module (FLUX.1 Control LoRAs
    concatenate the control latents to the input) becomes an input-widening patch."""
    target = "transformer.x_embedder"
    patch = patchset.patches.get(target)
    shapes = index.shapes(target)
    low_rank = patch.low_rank() if patch is not None else None
    if low_rank is not None and shapes and "weight" in shapes:
        width = low_rank.down.shape[1] if len(low_rank.down.shape) == 2 else None
        if width is not None and width > shapes["weight"][1]:
            patchset.patches[target] = WidenPatch(patch, width)
    return patchset
