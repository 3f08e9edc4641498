"""LoRAs on a family's native (original / ComfyUI) module names: ``diffusion_model.blocks.0.self_attn.q`` with
``lora_A``/``lora_B``, ``lora_down``/``lora_up`` (+ ``alpha``), ``.lora.down``/``.lora.up``, LyCORIS kinds or
``diff``/``diff_b`` (ComfyUI, ai-toolkit, diffusion-pipe, lightx2v), also bare (``blocks.0.self_attn.q``) and musubi-tuner's dotted
``lora_unet_blocks_0.self_attn.q``.

Names resolve through the family's alias maker (native name → diffusers module, e.g. Wan's
:func:`~lora_compat.archs.wan.native_aliases`); Qwen-Image's native names are its diffusers names
(``diffusion_model.transformer_blocks.0.attn.to_q``, also bare with ``lora_down``/``alpha``: Lightning, InvokeAI).
Only the families in :attr:`NativeDialect.bases` are read: FLUX.1's ``diffusion_model.`` files are BFL-named and stay
the ``bfl`` dialect's (no FLUX.1 tool writes or reads ``diffusion_model.`` + diffusers names, which is why a
Qwen-Image file of attention only is Qwen-Image's in this layout). Text encoders are read and written under
ComfyUI's names (``text_encoders.qwen25_7b.transformer.model.layers.0.self_attn.q_proj``: the family's
``Arch.comfy_text_encoders`` + the encoder's alias names).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..archs import ModuleIndex
from ..archs.qwen_image import QWEN_IMAGE, TRANSFORMER_HEADS as QWEN_IMAGE_HEADS
from ..archs.wan import WAN
from ..archs.names import HostName
from ..archs.nextdit import COMFY_TEXT_ENCODERS, NATIVE_HEADS as NEXTDIT_HEADS
from ..errors import LoraCompatError
from ..files import Header, LoraFile
from ..patches.build import split_key
from ..patchset import PatchSet
from .base import Dialect, Match, ModuleReader, Resolved, claimed_fraction, component_parts
from .bfl import is_bfl_key
from .kohya import is_kohya_key

if TYPE_CHECKING:
    from ..deltas import BaseWeights
    from .writing import Written

PREFIX = "diffusion_model."
#: the first name part of every native Wan and Qwen-Image module, and of SD3's MMDiT (its ``x_embedder.proj.``,
#: ``t_embedder.mlp.`` and ``final_layer.`` are among the NextDiT heads below; ``context_embedder.`` is read too,
#: but not claimed: FLUX.1's diffusers files have it)
BARE_HEADS = ("blocks.", "head.head.", "time_projection.", "time_embedding.", "text_embedding.", "img_emb.",
              "patch_embedding.", "condition_embedder.", "head.modulation.", "head.diff_m", "joint_blocks.",
              "y_embedder.mlp.", *QWEN_IMAGE_HEADS)
#: Z-Image / Lumina 2 (NextDiT); ``final_layer.`` is a BFL name too: a FLUX.1 file stays the bfl dialect's, which
#: claims all of its keys
BARE_HEADS += NEXTDIT_HEADS
#: ComfyUI's names of the text encoders of these families (``text_encoders.qwen3_4b.transformer.model.``)
TEXT_ENCODER_HEADS = (WAN.comfy_text_encoders["text_encoder"], *QWEN_IMAGE.comfy_text_encoders.values(),
                      *COMFY_TEXT_ENCODERS.values())
#: ``.lora.down.weight`` (an older ComfyUI/diffusers form) → the kohya suffixes the patch kinds read
_LEGACY = {".lora.down.weight": ".lora_down.weight", ".lora.up.weight": ".lora_up.weight",
           # DiffSynth-Studio: PEFT's adapter name left in the key
           ".lora_A.default.weight": ".lora_A.weight", ".lora_B.default.weight": ".lora_B.weight"}

#: lightx2v's name of a modulation delta (``blocks.N.diff_m``) → ComfyUI's (``blocks.N.modulation.diff``)
DIFF_M = (".diff_m", ".modulation.diff")


#: musubi-tuner files with dots left in the module name (``lora_unet_blocks_22.self_attn.k.lora_down.weight``)
DOTTED_KOHYA = "lora_unet_"


def _rename(key: str) -> str:
    for prefix in (PREFIX, DOTTED_KOHYA):
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    if ".default." in key:  # DiffSynth-Studio's PEFT dumps: PEFT's adapter name left in (``lora_A.default.weight``)
        key = key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
    for old, new in _LEGACY.items():
        if key.endswith(old):
            return key[: -len(old)] + new
    if key.endswith(DIFF_M[0]):  # lightx2v's modulation delta: the ``diff`` of the block's modulation parameter
        return key[: -len(DIFF_M[0])] + DIFF_M[1]
    return key


def is_native_key(key: str) -> bool:
    if key.startswith(DOTTED_KOHYA):  # only the dotted form: plain kohya names are the kohya dialect's
        return not is_kohya_key(key) and "." in key.partition(".")[2].removesuffix(".alpha") \
            and split_key(_rename(key), True) is not None
    # a native Wan module name, prefixed or bare (an SD file under LDM names, ``diffusion_model.input_blocks``,
    # is no file of this dialect's families)
    name = key.removeprefix(PREFIX)
    if name.startswith(TEXT_ENCODER_HEADS):
        return split_key(_rename(key), True) is not None
    if not name.startswith(BARE_HEADS) or (is_bfl_key(key) and not name.startswith(NEXTDIT_HEADS)):
        return False
    return split_key(_rename(key), True) is not None


class NativeDialect(Dialect):
    id = "native"
    description = ("LoRAs on native/ComfyUI module names (diffusion_model.blocks.N.self_attn.q...: ComfyUI, "
                   "ai-toolkit, diffusion-pipe, lightx2v) of the families that have them (Wan, Qwen-Image, "
                   "Z-Image, Lumina 2, SD3)")
    bases = ("wan", "qwen-image", "z-image", "lumina2", "sd3")
    #: ``diffusion_model.<native name>`` with kohya tensors (``lora_down``/``lora_up`` + ``alpha``), as ComfyUI
    #: and musubi-tuner's ComfyUI export write them; every LyCORIS kind keeps its tensors
    writes = ("native",)

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
        encoders = text_encoder_prefixes(index)

        def resolve(module: str) -> Resolved:
            for prefix, encoder in encoders.items():
                if module.startswith(prefix):  # ComfyUI's text-encoder names
                    rest = module[len(prefix):]
                    path = index.aliases(encoder).get(rest.replace(".", "_"))
                    if path is not None:
                        return f"{encoder}.{path}"
                    found = index.resolve(f"{encoder}.{rest}")
                    return f"{found[0]}.{found[1]}" if found else None
            path = aliases.get(module.replace(".", "_"))
            # a module of a fused layout (Z-Image's ``attention.qkv``, SD3's ``joint_blocks.N.x_block.attn.qkv``):
            # its canonical parts
            return f"{component}.{path}" if path is not None else component_parts(index, component, module)

        # lightx2v's diff_b beside a LoRA is the module's bias change (the LoRA kind reads it so)
        return ModuleReader(resolve, lora_diff_b=True).read(file, index, self.id, dotted=True, rename=_rename)

    def write(self, patchset: PatchSet, index: ModuleIndex, *, target: str | None = None, base: str | None = None,
              rank: int | None = None, weights: "BaseWeights | None" = None) -> "Written":
        """``diffusion_model.<native name>`` (a module without a native name: its own path; a text encoder under
        ComfyUI's ``text_encoders.`` name) with each kind's kohya tensors."""
        from .kohya_write import KohyaWriter  # torch: not imported for header work

        target = self.write_target(target)
        family = index.family
        if family is None or family.id not in self.bases:
            raise LoraCompatError(f"the native dialect names {', '.join(self.bases)} modules; this LoRA is for {base}")
        component = index.read_prefixes().get("lora_unet_", "transformer")
        others = sorted({t.partition(".")[0] for t in patchset} - {component, *family.comfy_text_encoders})
        if others:  # a text encoder with no ComfyUI name has no native name
            raise LoraCompatError(f"{patchset.source}: the native layout names the {component} and the text encoders "
                                  f"ComfyUI names; this LoRA also patches {', '.join(others)}: convert it to kohya "
                                  "or diffusers")
        return KohyaWriter(patchset, index, target, weights).write(native_names(index, list(patchset)))


def text_encoder_prefixes(index: ModuleIndex) -> dict[str, str]:
    """ComfyUI's text-encoder prefix → component, for the family of ``index`` (``Arch.comfy_text_encoders``)."""
    family = index.family
    return {prefix: c for c, prefix in family.comfy_text_encoders.items()} if family is not None else {}


def native_names(index: ModuleIndex, targets: list[str]) -> dict[str, HostName]:
    """Canonical target → ``diffusion_model.<native name>`` (a text encoder: ComfyUI's prefix for it + its alias
    name): the inverse of :meth:`NativeDialect.read`."""
    names: dict[str, HostName] = {}
    prefixes = {c: prefix for prefix, c in text_encoder_prefixes(index).items()}
    for component in {t.partition(".")[0] for t in targets}:
        naming = index.host_names(component)
        modules = index.components.get(component, {})
        prefix = prefixes.get(component, PREFIX)  # a text encoder: ComfyUI's name for it
        native = {path: HostName(prefix + alias) for alias, path in naming.aliases(modules).items()} \
            if naming.aliases else {}
        # a fused layout (Z-Image's ``attention.qkv``, SD3's ``qkv``): a part is named by its fused module, with
        # its rows
        for module, parts in index.fused_modules(component).items():
            whole = len(parts) == 1 and not parts[0].swap
            native.update({p.target: HostName(prefix + module, None if whole else (p.start, p.stop), p.swap)
                           for p in parts})
        for t in targets:
            c, _, path = t.partition(".")
            if c == component:
                path = path.removesuffix(".base_layer")
                names[t] = native.get(path) or HostName(prefix + path)
    return names

