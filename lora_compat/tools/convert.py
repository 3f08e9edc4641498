"""``convert``: write a LoRA in another dialect, exactly where the target can hold the patches.

Each target is written by the registered dialect whose ``writes`` names it (:meth:`Dialect.write`). Targets:
``kohya`` (sd-scripts names: diffusers-style for SD1/SD2, SGM for SDXL, BFL for Flux), ``webui``
(AUTOMATIC1111's compvis/SGM names), ``diffusers`` (``<component>.<module>.lora_A/lora_B`` with
``lora_adapter_metadata``), ``peft`` (``base_model.model.`` + ``adapter_config.json``), ``bfl``
(``diffusion_model.<BFL name>``, Flux). kohya/webui/bfl keep every LyCORIS kind; diffusers/peft hold LoRA
(and PEFT DoRA) only: other kinds are refused, or with ``rank`` compressed by truncated SVD of each delta.
A kind with no kohya/LyCORIS form (PEFT OFT/BOFT/IA3) goes to kohya/webui/bfl as its exact ``diff`` of
the base weights ``checkpoint`` gives.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from .. import plugins
from ..archs import ModuleIndex
from ..detection import Detection, Source, detect
from ..deltas import BaseWeights
from ..dialects.base import write_targets
from ..errors import LoraCompatError, UnmatchedKeysError
from ..files import LoraFile
from ..dialects.kohya_names import index_for_file
from ..outputs import atomic_output, refuse_inputs
from ..patchset import PatchSet

#: metadata carried over from the source file (trigger words, names, training notes)
KEPT_METADATA = ("ss_tag_frequency", "ss_output_name", "ss_dataset_dirs", "ss_training_comment",
                 "modelspec.title", "modelspec.trigger_phrase", "modelspec.description", "modelspec.architecture")


@dataclass
class ConvertReport:
    """What ``convert`` wrote: counts, and the SVD errors when ``rank`` compressed some modules."""

    target: str
    source_dialect: str
    base: str | None
    modules: int = 0
    tensors: int = 0
    path: str | None = None
    #: module → relative Frobenius error of its compressed delta (only modules that were compressed)
    svd_errors: dict[str, float] = field(default_factory=dict)
    #: ‖ΔW − ΔW_r‖ / ‖ΔW‖ over all compressed modules together
    overall_error: float | None = None
    unmatched: list[str] = field(default_factory=list)


def convert_state_dict(source: Source, to: str, *, base: str | None = None, rank: int | None = None,
                       components: Any = None, checkpoint: Any = None
                       ) -> tuple[dict[str, torch.Tensor], dict[str, str], ConvertReport]:
    """The converted tensors, the safetensors metadata and the report (nothing written). ``components``
    (a mapping or a diffusers pipeline): name and shape the modules after this model instead of the
    detected base's full-size table (models of another width or depth). ``checkpoint`` (a diffusers folder
    or single-file safetensors, or a :class:`lora_compat.tools.bake.Checkpoint`): the same from a checkpoint's
    headers, and the base weights that ``rank`` needs to compress kinds whose delta depends on the weight
    (DoRA, OFT/BOFT, IA3, GLoRA)."""
    if to not in write_targets():
        raise LoraCompatError(f"unknown target dialect {to!r}; choose from {', '.join(write_targets())}")
    if components is not None and checkpoint is not None:
        raise LoraCompatError("pass components= or checkpoint=, not both")
    detection = detect(source, base)
    chosen = detection.base or next(iter(detection.base_candidates), None)
    weights = None
    if checkpoint is not None:
        from ..models import resolve_patchset
        from .bake import Checkpoint

        weights = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
        index = weights.index
        patchset = resolve_patchset(detection.file, index, base)
    elif components is not None:
        from ..models import component_modules, resolve_patchset

        index = ModuleIndex.from_modules(component_modules(components))
        patchset = resolve_patchset(detection.file, index, base)
    elif chosen is None:
        raise LoraCompatError(f"{detection.file.header.display_name}: no known base has these module names "
                              f"({detection.base_reason})")
    else:
        patchset = _by_names_if_misfit(detection, chosen)
        arch = plugins.archs()[chosen]
        table = detection.table if chosen == detection.base else None  # the variant the shapes fit (SD3 Medium)
        index = index_for_file(arch.variant_index(table) if table else arch.index, patchset)
    report = ConvertReport(to, detection.dialect.id, chosen, unmatched=sorted(patchset.unmatched))
    return write_patchset(patchset, index, to, report, detection.file.metadata, rank, weights)


def _by_names_if_misfit(detection: Detection, base: str) -> PatchSet:
    """The detected patches; with a base given whose full-size shapes the file does not have, the patches resolved
    by name instead when no other base fits it either (a smaller model of the family: with no model at hand, the
    file's shapes are the truth). A file another base fits by shape is refused: its names would mislead."""
    patchset = detection.patchset
    if not patchset.misfits or len(patchset) * 2 >= len(patchset) + len(patchset.misfits):
        return patchset
    fits = detect(detection.file).base
    if fits is not None and fits != base:
        target, reason = next(iter(patchset.misfits.items()))
        raise LoraCompatError(f"{detection.file.header.display_name}: made for {fits} (its shapes fit it), not the "
                              f"given base {base}: {len(patchset.misfits)} modules do not fit (e.g. {target}: {reason})")
    names_only = plugins.archs()[base].index.names_only()
    by_names = detection.dialect.read(detection.file, names_only).fitted(names_only)
    by_names.base, by_names.warnings[:0] = patchset.base, detection.warnings
    return by_names


def write_patchset(patchset: PatchSet, index: ModuleIndex, to: str, report: ConvertReport,
                   source_metadata: dict | None = None, rank: int | None = None, weights: BaseWeights | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, str], ConvertReport]:
    """Tensors and metadata of ``patchset`` (canonical targets of ``index``) in dialect ``to``, written by the
    registered dialect that writes it; ``weights``: the base weights for compressing kinds whose delta depends
    on them."""
    dialect = write_targets().get(to)
    if dialect is None:
        raise LoraCompatError(f"unknown target dialect {to!r}; choose from {', '.join(write_targets())}")
    written = dialect.write(patchset, index, target=to, base=report.base, rank=rank, weights=weights)
    metadata = _metadata(dict(source_metadata or {}), report, written.metadata)
    report.modules, report.tensors = written.modules, len(written.tensors)
    report.svd_errors.update(written.svd_errors)
    if report.svd_errors:
        report.overall_error = written.overall_error
    return written.tensors, metadata, report


def save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], to: str, out: str | Path) -> Path:
    """Write converted tensors (``peft``: a folder with ``adapter_config.json``); returns the weights file.
    Written under a temporary name beside ``out`` and renamed into place when complete."""
    from safetensors.torch import save_file

    out = Path(out)
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    if to == "peft":
        config = json.dumps(json.loads(metadata.pop("lora_compat.peft_config")), indent=2)
        with atomic_output(out, directory=True) as folder:
            (folder / "adapter_config.json").write_text(config)
            save_file(contiguous, str(folder / "adapter_model.safetensors"), metadata=metadata)
        return out / "adapter_model.safetensors"
    with atomic_output(out) as path:
        save_file(contiguous, str(path), metadata=metadata)
    return out


def source_paths(sources: Iterable[Any]) -> list[Path]:
    """The file paths among inputs: paths, and the ``path`` of a :class:`LoraFile` or a checkpoint
    (PatchSets, models and ``None`` have none)."""
    paths = []
    for source in sources:
        if isinstance(source, (str, os.PathLike)):
            paths.append(Path(source))
        elif isinstance(getattr(source, "path", None), Path):
            paths.append(source.path)
    return paths


def convert(source: Source, to: str, out: str | Path, *, base: str | None = None, rank: int | None = None,
            components: Any = None, checkpoint: Any = None, strict: bool = False) -> ConvertReport:
    """Write ``source`` in dialect ``to`` at ``out`` (``peft``: ``out`` is a folder with
    ``adapter_model.safetensors`` and ``adapter_config.json``). ``strict``: refuse (``UnmatchedKeysError``,
    nothing written) when some keys of the source map to no module instead of leaving them out (they are
    listed in ``report.unmatched``). An ``out`` that is the source (or the checkpoint) is refused."""
    refuse_inputs(out, source_paths([source, checkpoint]))
    tensors, metadata, report = convert_state_dict(source, to, base=base, rank=rank, components=components,
                                                   checkpoint=checkpoint)
    if strict and report.unmatched:
        keys = report.unmatched
        raise UnmatchedKeysError(f"{_display(source)}: {len(keys)} keys map to no module and would be left out "
                                 f"of the converted file: {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}",
                                 keys)
    path = save(tensors, metadata, to, out)
    report.path = str(path)
    return report


def _display(source: Any) -> str:
    if isinstance(source, LoraFile):
        return source.header.display_name
    return str(source)


def _metadata(source: dict, report: ConvertReport, extra: dict[str, str]) -> dict[str, str]:
    from .. import __version__

    metadata = {k: v for k, v in source.items() if k in KEPT_METADATA}
    metadata.update({"lora_compat.version": __version__, "lora_compat.source_dialect": report.source_dialect,
                     "lora_compat.base": report.base or ""})
    metadata.update(extra)
    return metadata
