"""lora_compat for diffusers pipelines: ``load`` any dialect, ``set_strength``, ``unload``, and an opt-in
``enable()`` that makes ``pipe.load_lora_weights(path)`` accept every dialect.

Routes (``load`` returns the adapter name; its ``.route`` says which was taken):

- ``"diffusers"``: plain LoRA / LoCon (+ ``lora_B.bias``) is handed to diffusers' own ``load_lora_weights`` as a
  canonical diffusers/PEFT state dict (alpha and the rank scale baked into ``lora_B``, no ``.alpha`` keys), so
  ``set_adapters``, ``fuse_lora``/``unfuse_lora``, ``delete_adapters``, ``unload_lora_weights`` and hotswap work.
- ``"peft"``: LoHa goes into PEFT's own LoHa tuner layers (PEFT's LoHa math equals LyCORIS').
- ``"patcher"``: every other kind (DoRA from kohya/LyCORIS files, LoKr, IA3, OFT/BOFT, GLoRA, full, norm, Tucker,
  Flux Control ``set``/widening) is merged exactly by :class:`lora_compat.Patcher`, one per pipeline.

While ``enable()`` is on, diffusers' own adapter methods (``get_list_adapters``, ``set_adapters``,
``delete_adapters``, ``unload_lora_weights``, ``disable_lora``/``enable_lora``, ``fuse_lora``/``unfuse_lora``,
``get_active_adapters``) also act on patcher-route adapters (see :mod:`lora_compat.adapters.diffusers_methods`).

This module is the public face: the converter :func:`to_diffusers_state_dict` lives here, the rest in
:mod:`.diffusers_state` (what is kept on a pipeline), :mod:`.diffusers_load` (routes, ``load``, ``set_strength``,
``unload``), :mod:`.diffusers_patcher` (the patcher route) and :mod:`.diffusers_enable` (``enable``/``disable``).
"""
from __future__ import annotations

import torch

from lora_compat.patchset import PatchSet

# the public names, re-exported from where they live
from .diffusers_enable import disable, enable, enabled
from .diffusers_load import choose_route, load, set_strength, unload  # noqa: F401
from .diffusers_patcher import peft_writes_in_place, remove_patcher_adapters  # noqa: F401
from .diffusers_state import ROUTES, Loaded, adapters  # noqa: F401

__all__ = ["load", "set_strength", "unload", "adapters", "enable", "disable", "enabled", "to_diffusers_state_dict",
           "Loaded"]


def to_diffusers_state_dict(patchset: PatchSet) -> dict[str, torch.Tensor]:
    """Canonical diffusers/PEFT tensors of a plain-LoRA PatchSet: ``<component>.<module>.lora_A.weight`` /
    ``lora_B.weight`` (+ ``lora_B.bias``), the rank scale baked into ``lora_B``, no ``.alpha`` keys.
    Targets must be real module paths (a PatchSet fitted to the pipeline). Written by the diffusers dialect."""
    from lora_compat.plugins import dialects

    return dialects()["diffusers"].write(patchset, None, scale_in_up=True).tensors  # type: ignore[call-arg]
