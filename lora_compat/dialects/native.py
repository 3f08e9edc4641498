"""LoRAs on a family's native (original / ComfyUI) module names: ``diffusion_model.blocks.0.self_attn.q`` with
``lora_A``/``lora_B``, ``lora_down``/``lora_up`` (+ ``alpha``), ``.lora.down``/``.lora.up``, LyCORIS kinds or
``diff``/``diff_b`` (ComfyUI, ai-toolkit, diffusion-pipe, lightx2v), also bare (``blocks.0.self_attn.q``) and musubi-tuner's dotted
``lora_unet_blocks_0.self_attn.q``.

Names resolve through the family's alias maker (native name → diffusers module, e.g. Wan's
:func:`~lora_compat.archs.wan.native_aliases`). Only the families in :attr:`NativeDialect.bases` are read: FLUX.1's
``diffusion_model.`` files are BFL-named and stay the ``bfl`` dialect's.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..archs import ModuleIndex
from ..archs.names import HostName
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
#: the first name part of every native Wan module, and of SD3's MMDiT (``final_layer.`` and ``context_embedder.``
#: are read too, but not claimed: FLUX.1's BFL and diffusers files have them)
BARE_HEADS = ("blocks.", "head.head.", "time_projection.", "time_embedding.", "text_embedding.", "img_emb.",
              "patch_embedding.", "condition_embedder.", "joint_blocks.", "x_embedder.proj.", "t_embedder.mlp.",
              "y_embedder.mlp.")
#: ``.lora.down.weight`` (an older ComfyUI/diffusers form) → the kohya suffixes the patch kinds read
_LEGACY = {".lora.down.weight": ".lora_down.weight", ".lora.up.weight": ".lora_up.weight"}


#: musubi-tuner files with dots left in the module name (``lora_unet_blocks_22.self_attn.k.lora_down.weight``)
DOTTED_KOHYA = "lora_unet_"


def _rename(key: str) -> str:
    for prefix in (PREFIX, DOTTED_KOHYA):
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    for old, new in _LEGACY.items():
        if key.endswith(old):
            return key[: -len(old)] + new
    return key


def is_native_key(key: str) -> bool:
    if key.startswith(DOTTED_KOHYA):  # only the dotted form: plain kohya names are the kohya dialect's
        return not is_kohya_key(key) and "." in key.partition(".")[2].removesuffix(".alpha") \
            and split_key(_rename(key), True) is not None
    # a native Wan module name, prefixed or bare (an SD file under LDM names, ``diffusion_model.input_blocks``,
    # is no file of this dialect's families)
    if not key.removeprefix(PREFIX).startswith(BARE_HEADS) or is_bfl_key(key):
        return False
    return split_key(_rename(key), True) is not None


class NativeDialect(Dialect):
    id = "native"
    description = ("LoRAs on native/ComfyUI module names (diffusion_model.blocks.N.self_attn.q...: ComfyUI, "
                   "ai-toolkit, diffusion-pipe, lightx2v) of the families that have them (Wan)")
    bases = ("wan", "sd3")
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

        family = index.family
        encoders = {prefix: c for c, prefix in (family.comfy_text_encoders if family is not None else {}).items()}

        def resolve(module: str) -> Resolved:
            for prefix, encoder in encoders.items():  # ComfyUI's text-encoder names
                if module.startswith(prefix):
                    found = index.resolve(f"{encoder}.{module[len(prefix):]}")
                    return f"{found[0]}.{found[1]}" if found else None
            path = aliases.get(module.replace(".", "_"))
            if path is not None:
                return f"{component}.{path}"
            # a fused native module (SD3's ``joint_blocks.N.x_block.attn.qkv``): its canonical parts
            return component_parts(index, component, module)

        # lightx2v's diff_b beside a LoRA is the module's bias change (the LoRA kind reads it so)
        patchset = ModuleReader(resolve, lora_diff_b=True).read(file, index, self.id, dotted=True, rename=_rename)
        return report_unused(patchset, file)


    def write(self, patchset: PatchSet, index: ModuleIndex, *, target: str | None = None, base: str | None = None,
              rank: int | None = None, weights: "BaseWeights | None" = None) -> "Written":
        """``diffusion_model.<native name>`` (a module without a native name: its own path) with each kind's
        kohya tensors."""
        from .kohya_write import KohyaWriter  # torch: not imported for header work

        target = self.write_target(target)
        family = index.family
        if family is None or family.id not in self.bases:
            raise LoraCompatError(f"the native dialect names {', '.join(self.bases)} modules; this LoRA is for {base}")
        return KohyaWriter(patchset, index, target, weights).write(native_names(index, list(patchset)))


def native_names(index: ModuleIndex, targets: list[str]) -> dict[str, HostName]:
    """Canonical target → ``diffusion_model.<native name>``: the inverse of :meth:`NativeDialect.read`. A part of
    a fused native module (SD3's ``qkv``) is named by that module, with its rows."""
    from .kohya_names import kohya_names

    family = index.family
    encoders = family.comfy_text_encoders if family is not None else {}
    # text encoders under ComfyUI's names (``text_encoders.clip_l.transformer.``), as the read takes them
    names = kohya_names(index, [t for t in targets if t.partition(".")[0] in encoders], comfy=True,
                        base=family.id if family is not None else None)
    for component in {t.partition(".")[0] for t in targets} - set(encoders):
        naming = index.host_names(component)
        modules = index.components.get(component, {})
        native = {path: alias for alias, path in naming.aliases(modules).items()} if naming.aliases else {}
        fused = {part.target: HostName(PREFIX + module, None if len(parts) == 1 and not part.swap
                                       else (part.start, part.stop), part.swap)
                 for module, parts in index.fused_modules(component).items() for part in parts}
        for t in targets:
            c, _, path = t.partition(".")
            if c == component and path.removesuffix(".base_layer") in fused:
                names[t] = fused[path.removesuffix(".base_layer")]
            elif c == component:
                path = path.removesuffix(".base_layer")
                names[t] = HostName(PREFIX + native.get(path, path))
    return names


def report_unused(patchset: PatchSet, file: LoraFile) -> PatchSet:
    """Keys of a module that its patch does not use (lightx2v's ``diff_b`` next to a LoRA's ``lora_down``/
    ``lora_up``: a bias delta applied unscaled, which one LoRA patch cannot hold) are listed unmatched, never
    dropped in silence."""
    used = {ref.name for patch in patchset.values() for ref in patch.refs().values()}
    for key in file.keys():
        if key not in used and key not in patchset.unmatched:
            patchset.unmatched[key] = "not applied: its module's other tensors form a patch that cannot hold it"
    return patchset
