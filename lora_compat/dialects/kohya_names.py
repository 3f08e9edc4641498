"""The kohya-style write tables: a patch as its kohya/LyCORIS tensors, and the flat module names the webui family,
ComfyUI and sd-scripts use (``lora_unet_<SGM or BFL name>``, ``lora_te[12]_text_model_...``), with fused modules
assembled from their row parts. The kohya and bfl dialects write with them; the host converters name with them.

Canonical targets are diffusers names; each component is written as its family declares (``Arch.host_names``):
an SD UNet target with its SGM (compvis) name, a Flux target with its BFL name and, for a part of a fused
module, the rows it occupies.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import plugins
from ..archs import ModuleIndex
from ..archs.names import HostName
from ..archs.routes import Route
from ..errors import LoraCompatError
from ..patches import Patch
from ..patches.fused import FusedPatch, fused_lora
from ..patchset import PatchSet
from .flux_names import comfy_text_encoder


def kohya_tensors(patch: Patch) -> dict[str, torch.Tensor]:
    """The tensors of a patch under kohya/LyCORIS suffixes (``lora_down.weight``, ``hada_w1_a``, ``diff``...),
    in their stored dtype (each kind's ``to_tensors``). Raises ``ValueError`` for kinds with no kohya form."""
    return patch.to_tensors()


def kohya_names(index: ModuleIndex, targets: list[str], comfy: bool = False, base: str | None = None, *,
                trainer: bool = False) -> dict[str, HostName]:
    """Canonical target → flat kohya-style host name, as the family of ``index`` names each component
    (:meth:`ModuleIndex.host_names`: SGM names for an SD UNet, BFL names with rows for a Flux transformer,
    ``text_model_`` paths for CLIP, transformers paths for T5). ``comfy``: text encoders under ComfyUI's generic
    ``text_encoders.clip_l.transformer.`` names (``clip_h`` for SD2's, given ``base``). ``trainer``: the names
    sd-scripts writes for ``base`` 's family where they differ from the hosts' (:attr:`Arch.trainer_names`:
    SD1/SD2 UNets under diffusers names)."""
    names: dict[str, HostName] = {}
    maps: dict[str, dict[str, HostName]] = {}
    family = plugins.archs().get(base) if trainer and base is not None else None
    for component in {t.partition(".")[0] for t in targets}:
        naming = (family.trainer_names.get(component) if family is not None else None) or index.host_names(component)
        comfy_prefix = None
        if comfy and naming.encoder is not None:
            comfy_prefix = comfy_text_encoder(component, naming.encoder == "t5", base) or f"text_encoders.{component}."
        elif comfy and naming.aliases is not None:
            # an encoder ComfyUI reads under its checkpoint names (Qwen-Image's Qwen2.5-VL): the family's prefix
            arch = plugins.archs().get(base) if base is not None else None
            comfy_prefix = (arch or index.family).comfy_text_encoders.get(component) \
                if (arch or index.family) is not None else None
        maps[component] = naming.names(index.components.get(component, {}), index.fused_modules(component),
                                       comfy_prefix)
    for target in targets:
        component, _, path = target.partition(".")
        found = maps.get(component, {}).get(path.removesuffix(".base_layer"))
        if found is not None:
            names[target] = found
    return names


def index_for_file(index: ModuleIndex, patchset: PatchSet) -> ModuleIndex:
    """A base's full-size table with the rows the file's own tensors imply for a component in a fused layout
    (a Flux transformer), so its fused modules are laid out for the width the LoRA was made for (with no model
    at hand, the file is the only witness of the width; other components are named by the table alone)."""
    rows: dict[str, dict[str, int]] = {}
    for target, patch in patchset.items():
        count = (patch.inner if patch.wraps else patch).out_rows()  # a DoRA patch: the rows it was made for
        if count is not None:
            component, _, path = target.partition(".")
            rows.setdefault(component, {})[path] = count
    tables = {}
    try:
        for component, modules in index.components.items():
            layout = index.split_layout(component)
            sized = layout.sized if layout is not None else None
            tables[component] = sized(modules, rows.get(component, {})) if sized is not None else modules
    except ValueError as exc:
        raise LoraCompatError(f"{patchset.source}: {exc}") from None
    return index.with_components(tables)


def fused_module(module: str, parts: Sequence[tuple[HostName, Patch]], total: int, *, written: str | None = None
                 ) -> tuple[FusedPatch, dict[str, torch.Tensor]]:
    """Patches on parts (rows) of one fused module of ``total`` rows (BFL ``qkv``, ``linear1``): the patch
    lora_compat computes for the whole module, and its tensors as one exact fused LoRA (:func:`fused_lora`),
    which only plain LoRA parts have.

    Where there is no such LoRA, what is being written decides: a file (``written``: its source, for the
    message) refuses, since it could not hold the module; for a host (``written`` ``None``) the tensors are
    empty, as they are for swapped rows (:meth:`FusedPatch.host_native`), and the host falls back to
    lora_compat's own patch."""
    routed = [(host_route(h, total), p) for h, p in parts]
    patch = FusedPatch(routed)
    if written is None:
        return patch, (fused_lora(routed, total) or {}) if patch.host_native() else {}
    tensors = fused_lora(routed, total)
    if tensors is None:
        kinds = sorted({p.kind for _, p in parts})
        raise LoraCompatError(f"{written}: {module} fuses parts of kinds {kinds}; only plain LoRA parts can be "
                              "assembled into one fused module")
    return patch, tensors


def host_route(name: HostName, total: int) -> Route:
    """The rows of a fused host module (of ``total`` rows) that a host name points at."""
    start, stop = name.rows or (0, total)
    return Route(name.name, start, stop, name.swap)


def fused_rows(index: ModuleIndex, bfl_name: str) -> int | None:
    """Rows of a fused Flux module (BFL name, dotted or ``_``-flattened) in the model ``index`` describes."""
    for component in index.components:
        group = index.split_names(component).get(bfl_name)
        if group:
            return group[-1].stop
    return None
