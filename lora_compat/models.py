"""``patched_weights``: the new value of every parameter a LoRA touches, computed in fp32, nothing modified."""
from __future__ import annotations

import warnings
from typing import Mapping, Union

import torch

from . import plugins
from .archs import ModuleIndex
from .archs.base import most_specific
from .detection import Source, detect, no_cyclic_gc
from .errors import BaseMismatchError, UnmatchedKeysError
from .patches.dora import check_dora_strength
from .patchset import PatchSet

Components = Union[Mapping[str, torch.nn.Module], object]


class LoraCompatWarning(UserWarning):
    """Loud, non-fatal problems: unmatched keys, stripped embeddings, undetermined base."""


def component_modules(components: Components) -> dict[str, torch.nn.Module]:
    """``{"unet": ..., "text_encoder": ...}`` from a mapping or a diffusers pipeline (its ``components``)."""
    if isinstance(components, torch.nn.Module):
        raise TypeError("pass components as a mapping like {'unet': unet}, or a diffusers pipeline")
    mapping = components if isinstance(components, Mapping) else getattr(components, "components", None)
    if not isinstance(mapping, Mapping):
        raise TypeError(f"expected a mapping of components or a diffusers pipeline, got {type(components).__name__}")
    return {k: v for k, v in mapping.items() if isinstance(v, torch.nn.Module)}


def guess_base(index: ModuleIndex) -> str | None:
    """The registered base whose full-size module shapes the components have (``None`` for other models)."""
    for base, arch in plugins.archs().items():
        table = arch.index
        shared = [c for c in table.components if index.has_component(c)]
        if not shared:
            continue
        checked = [(c, path, shapes) for c in shared for path, shapes in table.components[c].items()]
        if checked and all(index.shapes(f"{c}.{path}") == shapes for c, path, shapes in checked):
            return base
    return None


def component_of_class(class_name: str, default: str = "unet") -> str:
    """The component name a LoRA's keys use for a bare model of this class, as the registered families say."""
    for arch in plugins.archs().values():
        component = arch.component_of(class_name)
        if component is not None:
            return component
    return default


def describe_components(index: ModuleIndex) -> str | None:
    """Which base the components are: a registered base at full size, else the family by structure."""
    base = guess_base(index)
    if base is not None:
        return base
    family = most_specific(a for a in plugins.archs().values() if a.looks_like(index.components))
    return family.describe() if family is not None else None


def resolve_patchset(source: Source | PatchSet, index: ModuleIndex, base: str | None = None) -> PatchSet:
    """The source's patches on ``index`` 's real modules (a PatchSet's targets are re-resolved and re-checked)."""
    if isinstance(source, PatchSet):
        return source.fitted(index)
    detection = detect(source, base)  # kept on the file: a file already detected is not detected again
    with no_cyclic_gc():
        patchset = detection.dialect.read(detection.file, index).fitted(index)
    patchset.base = detection.base
    patchset.base_candidates = list(detection.base_candidates)
    patchset.warnings[:0] = detection.warnings
    return patchset


def check_patchset(patchset: PatchSet, index: ModuleIndex, strict: bool) -> None:
    """Raise on a wrong base or (with ``strict``) unmatched keys; warn loudly otherwise."""
    applied_keys = sum(len(p.refs()) for p in patchset.values())
    lost_share = len(patchset.unmatched) / max(1, len(patchset.unmatched) + applied_keys)
    models = describe_components(index)
    looks = f"; the components look like {models}" if models else ""
    if patchset.base:
        made_for = f"made for {patchset.base}"
    elif patchset.base_candidates:
        made_for = f"made for {' or '.join(patchset.base_candidates)} (by its names)"
    else:
        made_for = "made for another model"
    if patchset.misfits and (lost_share >= 0.25 or not patchset):
        target, reason = next(iter(patchset.misfits.items()))
        raise BaseMismatchError(f"{patchset.source}: this LoRA is {made_for}{looks}: {len(patchset.misfits)} modules "
                                f"do not fit and {lost_share:.0%} of its keys map to nothing "
                                f"(e.g. {target}: {reason})")
    if not patchset and patchset.unmatched:
        raise BaseMismatchError(f"{patchset.source}: none of its {len(patchset.unmatched)} keys maps to a module of "
                                f"these components ({', '.join(index.components)}): the LoRA is {made_for}{looks}; "
                                f"e.g. {next(iter(patchset.unmatched))}")
    if patchset.unmatched:
        keys = sorted(patchset.unmatched)
        message = (f"{patchset.source}: {len(keys)} keys map to no module of the model and are ignored: "
                   f"{', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}")
        if strict:
            raise UnmatchedKeysError(message, keys)
        warnings.warn(message, LoraCompatWarning, stacklevel=3)
    for note in patchset.warnings:
        warnings.warn(f"{patchset.source}: {note}", LoraCompatWarning, stacklevel=3)


@torch.no_grad()
def patched_weights(source: Source | PatchSet, components: Components, strength: float = 1.0, *,
                    strict: bool = False, base: str | None = None,
                    dora_strength: str = "interpolate") -> dict[str, torch.Tensor]:
    """New value of every parameter the LoRA touches, keyed ``"<component>.<state_dict name>"``.

    Computed in fp32 from the components' current weights, returned in each parameter's dtype.
    ``components`` is a mapping like ``{"unet": unet, "text_encoder": te}`` or a diffusers pipeline.
    ``dora_strength``: how DoRA modules read ``strength``: ``"interpolate"`` (``W + s·(W_dora − W)``, as the
    webuis and ComfyUI do) or ``"library"`` (LyCORIS' multiplier / PEFT's scaling). Nothing is modified.
    """
    check_dora_strength(dora_strength)
    modules = component_modules(components)
    index = ModuleIndex.from_modules(modules)
    patchset = resolve_patchset(source, index, base).with_dora_strength(dora_strength)
    check_patchset(patchset, index, strict)
    from .patcher.values import merged_values  # the patcher's own computation, so both agree bit for bit

    result: dict[str, torch.Tensor] = {}
    for target, patch in patchset.items():
        component, _, path = target.partition(".")
        module = modules[component].get_submodule(path)
        params = dict(module.named_parameters(recurse=False))
        base = {name: p.detach() for name, p in params.items()}
        for name, value in merged_values(base, [(patch, strength)]).items():
            key = f"{component}.{path}.{name}" if path else f"{component}.{name}"
            result[key] = value.to(params[name].dtype)
    return result
