"""Classify a module's tensors by their key suffixes and build the matching patch kind.

Files mix algorithms per module, so the kind is decided per module from its suffix set (DoRA wraps the
factorised kinds). Every dialect shares this table; a dialect only decides how names resolve and how
the rank scale is found.
"""
from __future__ import annotations

from typing import Literal, Mapping

from .base import Ref, Scale
from .boft import BoftPatch
from .dora import DoraPatch
from .full import FullPatch
from .glora import GloraPatch
from .ia3 import Ia3Patch
from .loha import LohaPatch
from .lokr import LokrPatch
from .lora import LoraPatch
from .norm import NormPatch
from .oft import OftPatch, OftStyle
from .set import SetPatch
from .base import Patch

#: key suffix → role, longest suffixes first so that ``lora_B.bias`` wins over shorter endings
SUFFIX_ROLES: dict[str, str] = {
    "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up",
    "lora_magnitude_vector.weight": "magnitude_peft", "lora_magnitude_vector": "magnitude_peft",
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid",
    "lora_A.weight": "down", "lora_B.weight": "up", "lora_B.bias": "bias",
    "lora.down.weight": "down", "lora.up.weight": "up",
    "hada_w1_a": "hada_w1_a", "hada_w1_b": "hada_w1_b", "hada_w2_a": "hada_w2_a", "hada_w2_b": "hada_w2_b",
    "hada_t1": "hada_t1", "hada_t2": "hada_t2",
    "lokr_w1": "lokr_w1", "lokr_w1_a": "lokr_w1_a", "lokr_w1_b": "lokr_w1_b",
    "lokr_w2": "lokr_w2", "lokr_w2_a": "lokr_w2_a", "lokr_w2_b": "lokr_w2_b", "lokr_t2": "lokr_t2",
    "a1.weight": "a1", "a2.weight": "a2", "b1.weight": "b1", "b2.weight": "b2",
    "oft_blocks": "oft_blocks", "oft_diag": "oft_diag", "rescale": "rescale",
    "diff_b": "diff_b", "diff": "diff", "w_norm": "w_norm", "b_norm": "b_norm",
    "on_input": "on_input", "dora_scale": "dora_scale", "alpha": "alpha", "scale": "scale",
}
ORDERED_SUFFIXES = sorted(SUFFIX_ROLES, key=len, reverse=True)
#: the fewest dimensions a tensor in each role needs (the patch kinds index these shapes)
MIN_DIMS: dict[str, int] = {
    "down": 2, "up": 2, "mid": 2, "hada_w1_a": 2, "hada_w1_b": 2, "hada_w2_a": 2, "hada_w2_b": 2,
    "hada_t1": 2, "hada_t2": 2, "lokr_w1": 2, "lokr_w1_a": 2, "lokr_w1_b": 2, "lokr_w2": 2, "lokr_w2_a": 2,
    "lokr_w2_b": 2, "lokr_t2": 2, "a1": 2, "a2": 2, "b1": 2, "b2": 2, "oft_blocks": 2, "oft_diag": 2,
    "dora_scale": 1, "magnitude_peft": 1, "diff": 1, "w_norm": 1, "weight": 1, "scale": 1,
}


def split_key(key: str, dotted: bool) -> tuple[str, str] | None:
    """``(module name, suffix)``. kohya-style module names have no dots; dotted ones need suffix matching."""
    if not dotted:
        module, _, suffix = key.partition(".")
        if suffix in SUFFIX_ROLES or suffix == "weight":
            return module, suffix
        return None
    for suffix in ORDERED_SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


class IncompletePatch(ValueError):
    """The module's tensors do not form any known patch kind."""


def build_patch(parts: Mapping[str, Ref], *, scale: Scale | None = None,
                dora_convention: Literal["lycoris", "peft"] = "lycoris",
                oft_style: OftStyle = "lycoris") -> Patch:
    """Build the patch a module's tensors describe. ``parts`` maps roles (see SUFFIX_ROLES) to tensors.

    ``scale`` overrides the rank scale (diffusers/PEFT keep alpha outside the file); otherwise it is
    ``alpha / rank`` from the module's own ``alpha`` tensor (none → 1).
    """
    alpha = parts.get("alpha")
    roles = set(parts)
    flat = sorted(role for role, ref in parts.items() if len(ref.shape) < MIN_DIMS.get(role, 0))
    if flat:
        raise IncompletePatch("too few dimensions for their role: "
                              + ", ".join(f"{role} {list(parts[role].shape)}" for role in flat))

    def rank_scale(rank: int | None) -> Scale:
        if scale is not None:
            return scale
        return Scale(alpha, rank) if rank else Scale(None, 0)

    patch: Patch
    if {"up", "down"} <= roles:
        patch = LoraPatch(parts["up"], parts["down"], rank_scale(parts["down"].shape[0]),
                          mid=parts.get("mid"), bias=parts.get("bias"))
    elif {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= roles:
        patch = LohaPatch(parts["hada_w1_a"], parts["hada_w1_b"], parts["hada_w2_a"], parts["hada_w2_b"],
                          rank_scale(parts["hada_w1_b"].shape[0]), parts.get("hada_t1"), parts.get("hada_t2"))
    elif roles & {"lokr_w1", "lokr_w1_a"}:
        patch = _lokr(parts, scale)
    elif {"a1", "a2", "b1", "b2"} <= roles:
        patch = GloraPatch(parts["a1"], parts["a2"], parts["b1"], parts["b2"])
        patch.scale = rank_scale(patch.rank)
    elif "oft_blocks" in roles and len(parts["oft_blocks"].shape) == 4:
        patch = BoftPatch(parts["oft_blocks"], alpha, parts.get("rescale"))
    elif "oft_blocks" in roles:
        patch = OftPatch(parts["oft_blocks"], alpha, parts.get("rescale"), oft_style)
    elif "oft_diag" in roles:
        patch = OftPatch(parts["oft_diag"], None, parts.get("rescale"), "rotation")
    elif roles & {"diff", "diff_b"}:
        patch = FullPatch(parts.get("diff"), parts.get("diff_b"))
    elif roles & {"w_norm", "b_norm"}:
        patch = NormPatch(parts.get("w_norm"), parts.get("b_norm"))
    elif {"weight", "on_input"} <= roles:
        patch = Ia3Patch(parts["weight"], parts["on_input"])
    elif roles == {"scale"}:  # a BFL RMSNorm's parameter stored whole (FLUX.1 Control LoRAs): replace it
        patch = SetPatch(parts["scale"], "weight")
    else:
        raise IncompletePatch(f"tensors {sorted(roles)} form no known patch kind")

    magnitude = parts.get("dora_scale") or parts.get("magnitude_peft")
    if magnitude is not None:
        if not isinstance(patch, (LoraPatch, LohaPatch, LokrPatch)):
            raise IncompletePatch(f"DoRA magnitude next to a {patch.kind} patch")
        peft = "magnitude_peft" in parts
        axis = "out" if peft or magnitude.shape[0] != 1 or len(magnitude.shape) == 1 else "in"
        patch = DoraPatch(patch, magnitude, axis, "peft" if peft else dora_convention)
    return patch


def _lokr(parts: Mapping[str, Ref], scale: Scale | None) -> LokrPatch:
    patch = LokrPatch(w1=parts.get("lokr_w1"), w1a=parts.get("lokr_w1_a"), w1b=parts.get("lokr_w1_b"),
                      w2=parts.get("lokr_w2"), w2a=parts.get("lokr_w2_a"), w2b=parts.get("lokr_w2_b"),
                      t2=parts.get("lokr_t2"))
    if patch.w1 is None and (patch.w1a is None or patch.w1b is None):
        raise IncompletePatch("LoKr needs lokr_w1 or both lokr_w1_a and lokr_w1_b")
    if patch.w2 is None and (patch.w2a is None or patch.w2b is None):
        raise IncompletePatch("LoKr needs lokr_w2 or both lokr_w2_a and lokr_w2_b")
    rank = patch.rank
    # both factors full: LyCORIS forces alpha = dim at training, every loader uses scale 1
    patch.scale = scale if scale is not None else (Scale(parts.get("alpha"), rank) if rank else Scale(None, 0))
    return patch
