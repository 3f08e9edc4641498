"""Patches back into host-readable form: the kohya/LyCORIS tensors of each kind, and the flat module names the
webui family and ComfyUI map (``lora_unet_<SGM or BFL name>``, ``lora_te[12]_text_model_...``).

Canonical targets are diffusers names; each component is written as its family declares (``Arch.host_names``):
an SD UNet target with its SGM (compvis) name, a Flux target with its BFL name and, for a part of a fused
module, the rows it occupies.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence
import torch

from . import plugins
from .archs import ModuleIndex
from .archs.names import HostName
from .archs.routes import Route
from .core import detect
from .dialects.flux_names import comfy_text_encoder
from .errors import LoraCompatError
from .patches import Patch, Ref
from .patches.build import IncompletePatch, build_patch, suffix_role
from .patches.rows import FusedPatch, fused_lora
from .patchset import PatchSet


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


@dataclass
class Conversion:
    """A file converted for a host: tensors under host names, the patch behind each module name, and the
    keys that map to nothing (reported loudly)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    patches: dict[str, tuple[Patch, HostName | None]] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    dialect: str = ""
    base: str | None = None


# -- converting a whole file -------------------------------------------------------------------------------------------------
def convert_for_host(filename: str, layout: str, index: ModuleIndex | None = None, base: str | None = None
                     ) -> Conversion:
    """Read ``filename`` (any dialect) and name its patches for a host. ``layout``: ``compvis`` (A1111: SGM
    UNet names), ``diffusers`` (SD.Next: ``lora_unet_<diffusers name>``, ``lora_transformer_``) or ``comfy``
    (Forge/ComfyUI: SGM / BFL names, fused Flux modules): the kohya dialect's write tables
    (:func:`lora_compat.dialects.kohya_write.write_names`). ``index``: the host model's own modules (canonical
    names), when known; otherwise the detected base's full-size table. ``base``: the host model's base, when
    the host knows it: it decides where the header alone cannot (instead of the file's first candidate)."""
    from .dialects.kohya_write import write_names  # the dialects' writers name through this module

    detection = detect(filename)
    if index is not None:
        patchset = detection.dialect.read(detection.file, index).fitted(index)
        base = detection.base or "the host's model"
    elif detection.base is None and base in plugins.archs():
        # the names fit several bases (or the shapes none): the loaded model's base decides, by name
        index = plugins.archs()[base].index
        names_only = index.names_only()
        patchset = detection.dialect.read(detection.file, names_only).fitted(names_only)
    else:
        # shapes may decide no base (tiny or pruned models); names then decide, as detect() resolved them
        base = detection.base or next(iter(detection.base_candidates), None)
        if base is None:
            raise LoraCompatError(f"{filename}: no known base model has these module names "
                                  f"({detection.base_reason}); cannot name its modules for the host")
        patchset = detection.patchset
        index = index_for_file(plugins.archs()[base].index, patchset)
    conversion = Conversion(dialect=detection.dialect.id, base=base, unmatched=sorted(patchset.unmatched))
    names = write_names(index, list(patchset), layout, base)
    fused: dict[str, list[tuple[HostName, Patch]]] = {}
    for target, patch in patchset.items():
        name = names.get(target)
        if name is None:
            conversion.unmatched += sorted(ref.name for ref in patch.refs().values())
            continue
        if name.rows is None and not name.swap:
            _put(conversion, name.name, patch, name)
        else:
            fused.setdefault(name.name, []).append((name, patch))
    for module, parts in fused.items():
        total = fused_rows(index, module[len("lora_unet_"):]) or max(h.rows[1] if h.rows else 0 for h, _ in parts)
        patch, tensors = fused_module(module, parts, total)
        for suffix, tensor in tensors.items():
            conversion.tensors[f"{module}.{suffix}"] = tensor
        conversion.patches[module] = (patch, None)
    return conversion


def _put(conversion: Conversion, name: str, patch: Patch, host: HostName | None) -> None:
    conversion.patches[name] = (patch, host)
    try:
        tensors = kohya_tensors(patch)
    except ValueError:
        # no kohya form (PEFT OFT/BOFT/IA3): the patch's own tensors, so that a host grouping the file by module
        # name (A1111, SD.Next) makes a module of it, which lora_compat's module type then computes
        tensors = {role: ref.loader() for role, ref in patch.refs().items()} if patch.written_as_diff else {}
    for suffix, tensor in tensors.items():
        conversion.tensors[f"{name}.{suffix}"] = tensor


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


def index_from_state_dict(shapes: Mapping[str, tuple[int, ...]], prefix: str = "diffusion_model.") -> ModuleIndex | None:
    """The canonical index of a BFL-layout Flux model known by its state dict (``diffusion_model.<name>.<param>``
    → shape), as ComfyUI and Forge hold it; ``None`` for other models."""
    host: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        if key.startswith(prefix):
            module, _, param = key[len(prefix):].rpartition(".")
            host.setdefault(module, {})[param] = tuple(shape)
    layout = next((a.fused_layout for a in plugins.archs().values()
                   if a.fused_layout is not None and a.fused_layout.is_fused(host)), None)
    if layout is None:
        return None
    table, _ = layout.canonical(host)
    return ModuleIndex({"transformer": table})


# -- patches rebuilt from a host's weights dict -----------------------------------------------------------------
def patch_from_weights(network_key: str, w: Mapping[str, torch.Tensor]) -> Patch | None:
    """The patch a module's tensors (grouped by the host under ``network_key``) describe, or ``None``."""
    parts = {}
    for suffix, tensor in w.items():
        role = suffix_role(suffix)
        if role is None:
            return None
        parts[role] = Ref.of(tensor, f"{network_key}.{suffix}")
    try:
        return build_patch(parts, oft_style="kohya" if network_key.startswith("oft_unet_") else "lycoris")
    except IncompletePatch:
        return None


def updown(patch: Patch, weight: torch.Tensor, bias: torch.Tensor | None, strength: float, *,
           dora_strength: str = "interpolate") -> tuple[torch.Tensor, torch.Tensor | None]:
    """The change of a module's weight (and bias) at ``strength``, computed in fp32 with lora_compat's math,
    on the device of the patch's tensors (the CPU: files load there) and returned on the weight's device.
    ``dora_strength``: how DoRA reads the strength (``"interpolate"``, the hosts' own convention, or
    ``"library"``; see :mod:`lora_compat.patches.dora`)."""
    base = {"weight": weight.detach().float().cpu()}
    if bias is not None:
        base["bias"] = bias.detach().float().cpu()
    delta = patch.with_dora_strength(dora_strength).delta(base, strength)
    change = delta.get("weight", torch.zeros_like(base["weight"])).to(weight.device)
    bias_change = delta.get("bias")
    return change, None if bias_change is None else bias_change.to(weight.device)




def host_native(patch: Patch) -> bool:
    """Whether ComfyUI-style hosts (ComfyUI, Forge) compute this patch exactly as lora_compat does at every
    strength: plain LoRA (no Tucker mid, no bias), LoHa without Tucker, full diffs, and fused modules made
    of plain LoRA parts. Everything else is handed over as an exact diff or computed by lora_compat."""
    return patch.host_native()
