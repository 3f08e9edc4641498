"""Name handling shared by the FLUX.1 dialects: BFL module names, component prefixes, input widening."""
from __future__ import annotations

from ..archs import ModuleIndex
from ..archs.flux import FLUX1
from ..patches.widen import WidenPatch
from ..patchset import PatchSet
from .base import Resolved, component_parts

#: BFL names only FLUX.2 has (its shared modulation)
FLUX2_ONLY_HEADS = ("double_stream_modulation_img.", "double_stream_modulation_txt.", "single_stream_modulation.")
#: first segment of every BFL transformer module name (FLUX.1's, FLUX.2's, Chroma's)
BFL_HEADS = ("double_blocks.", "single_blocks.", "img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.",
             "final_layer.", "distilled_guidance_layer.", *FLUX2_ONLY_HEADS)
#: first segment of every diffusers FluxTransformer2DModel / Flux2Transformer2DModel / ChromaTransformer2DModel
#: module name
DIFFUSERS_FLUX_HEADS = ("transformer_blocks.", "single_transformer_blocks.", "x_embedder.", "context_embedder.",
                        "time_text_embed.", "norm_out.", "proj_out.", "distilled_guidance_layer.",
                        "time_guidance_embed.", "double_stream_modulation_img.", "double_stream_modulation_txt.",
                        "single_stream_modulation.")


def comfy_components(base: str) -> dict[str, str]:
    """ComfyUI text-encoder prefix → component, for ``base`` (the inverse of its ``Arch.comfy_text_encoders``)."""
    arch = _families().get(base)
    return {prefix: component for component, prefix in arch.comfy_text_encoders.items()} if arch else {}


def comfy_text_encoder(component: str, t5: bool, base: str | None = None) -> str | None:
    """The ComfyUI prefix of a text-encoder component (a T5 encoder when ``t5``): the base's own when it names
    one, else the first registered family's that holds an encoder of that kind there; ``None`` when none does."""
    families = _families()
    own = families[base].comfy_text_encoders.get(component) if base in families else None
    if own is not None:
        return own
    for arch in families.values():
        prefix = arch.comfy_text_encoders.get(component)
        if prefix is not None and (".t5" in prefix) == t5:
            return prefix
    return None


def _families():
    from ..plugins import archs  # the registry imports the dialects: asked when first needed

    return archs()


#: the text-encoder prefixes the BFL dialects read (FLUX.1's)
BFL_TEXT_ENCODERS = {prefix: component for component, prefix in FLUX1.comfy_text_encoders.items()}


def resolve_bfl(index: ModuleIndex, name: str) -> Resolved:
    """A BFL transformer module name, or a ComfyUI text-encoder name (as the index's family names its encoders:
    Chroma's T5 is its ``text_encoder``), → canonical target(s)."""
    family = index.family
    encoders = BFL_TEXT_ENCODERS if family is None or not family.comfy_text_encoders else \
        {prefix: component for component, prefix in family.comfy_text_encoders.items()}
    for prefix, component in encoders.items():
        if name.startswith(prefix):
            found = index.resolve(f"{component}.{name[len(prefix):]}")
            return f"{found[0]}.{found[1]}" if found else None
    if name.startswith(KOHYA_TEXT_ENCODER):
        return _kohya_text_encoder(index, name)
    found = component_parts(index, "transformer", name)
    if found is None and "_" in name.partition(".")[2]:  # musubi's mixed form: double_blocks.0.img_attn_qkv (#905)
        found = component_parts(index, "transformer", name.replace(".", "_"))
    if found is None and f"{name}.".startswith((*DIFFUSERS_FLUX_HEADS, "sformer_blocks.")):  # diffusers (FLUX.2)
        if name.startswith("sformer_blocks."):
            name = "transformer_blocks." + name[len("sformer_blocks."):]
        path = index.resolve(f"transformer.{name}")
        found = f"{path[0]}.{path[1]}" if path else None
    return found


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


#: sd-scripts' text-encoder prefixes (``lora_te_``, ``lora_te1_``...)
KOHYA_TEXT_ENCODER = "lora_te"


def _kohya_text_encoder(index: ModuleIndex, name: str) -> Resolved:
    """A text-encoder module under sd-scripts' names, in a BFL file of a family with no ComfyUI text-encoder names
    of its own (FLUX.2's LLM encoders: what the bfl dialect writes for them)."""
    family = index.family
    if family is None or family.comfy_text_encoders:
        return None
    for prefix, component in index.read_prefixes().items():
        if component.startswith("text_encoder") and name.startswith(prefix):
            path = index.aliases(component).get(name[len(prefix):])
            return f"{component}.{path}" if path is not None else None
    return None
