"""What the webui family and ComfyUI adapters call: a LoRA file converted for a host's own loader
(:func:`convert_for_host`, named with the kohya dialect's write tables), patches rebuilt from a host's grouped
weights, and a module's change computed with lora_compat's math (:func:`updown`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

from .. import plugins
from ..archs import ModuleIndex
from ..archs.names import HostName
from ..detection import detect
from ..dialects.kohya_names import fused_module, fused_rows, index_for_file, kohya_names, kohya_tensors
from ..dialects.kohya_write import write_names
from ..errors import LoraCompatError
from ..patches import Patch, Ref
from ..patches.build import IncompletePatch, build_patch, suffix_role
from ..patches.param import ParamPatch

#: what the earlier ``lora_compat.hostkeys`` offered, importable from here still
__all__ = ["Conversion", "HostName", "convert_for_host", "host_native", "index_from_state_dict", "kohya_names",
           "kohya_tensors", "patch_from_weights", "updown"]


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
        arch = plugins.archs()[base]
        table = detection.table if base == detection.base else None  # the variant the shapes fit (SD3 Medium)
        index = index_for_file(arch.variant_index(table) if table else arch.index, patchset)
    conversion = Conversion(dialect=detection.dialect.id, base=base, unmatched=sorted(patchset.unmatched))
    names = write_names(index, list(patchset), layout, base)
    if layout == "comfy":
        names.update(comfy_parameter_names(index, patchset))
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


def comfy_parameter_names(index: ModuleIndex, patchset: Mapping[str, Patch]) -> dict[str, HostName]:
    """Parameter-level targets (Wan's ``blocks.N.modulation``) under the name ComfyUI's generic key map gives a
    parameter that is no ``.weight``: ``diffusion_model.<native parameter name>`` (its ``lora_unet_`` names are
    for weights only)."""
    names: dict[str, HostName] = {}
    for target, patch in patchset.items():
        if not isinstance(patch, ParamPatch):
            continue
        component, _, path = target.partition(".")
        naming = index.host_names(component)
        native = {p: a for a, p in naming.aliases(index.components.get(component, {})).items()} \
            if naming.aliases else {}
        names[target] = HostName("diffusion_model." + native.get(path, path))
    return names


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
