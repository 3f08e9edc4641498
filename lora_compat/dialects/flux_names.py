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
#: ComfyUI's generic text-encoder names (``text_encoders.<clip state-dict prefix>``), per base and component: the
#: one table hosts are written with (``hostkeys.kohya_names``); what the dialects read is its inverse
COMFY_TEXT_ENCODERS: dict[str, dict[str, str]] = {
    "sd15": {"text_encoder": "text_encoders.clip_l.transformer."},
    "sd2": {"text_encoder": "text_encoders.clip_h.transformer."},  # SD2's OpenCLIP-H
    "sdxl": {"text_encoder": "text_encoders.clip_l.transformer.", "text_encoder_2": "text_encoders.clip_g.transformer."},
    "flux1": {"text_encoder": "text_encoders.clip_l.transformer.", "text_encoder_2": "text_encoders.t5xxl.transformer."},
}


def comfy_components(base: str) -> dict[str, str]:
    """ComfyUI text-encoder prefix → component, for ``base`` (the inverse of its :data:`COMFY_TEXT_ENCODERS`)."""
    return {prefix: component for component, prefix in COMFY_TEXT_ENCODERS.get(base, {}).items()}


def comfy_text_encoder(component: str, t5: bool, base: str | None = None) -> str | None:
    """The ComfyUI prefix of a text-encoder component (a T5 encoder when ``t5``): the base's own when it has one,
    else the first base's that holds an encoder of that kind there; ``None`` when no base does."""
    tables = [COMFY_TEXT_ENCODERS[base]] if base in COMFY_TEXT_ENCODERS else []
    for table in (*tables, *COMFY_TEXT_ENCODERS.values()):
        prefix = table.get(component)
        if prefix is not None and (".t5" in prefix) == t5:
            return prefix
    return None


#: the text-encoder prefixes the BFL dialects read (FLUX.1's)
BFL_TEXT_ENCODERS = comfy_components("flux1")


def resolve_bfl(index: ModuleIndex, name: str) -> Resolved:
    """A BFL transformer module name, or a ComfyUI text-encoder name, → canonical target(s)."""
    for prefix, component in BFL_TEXT_ENCODERS.items():
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
