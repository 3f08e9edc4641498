"""``convert``: write a LoRA in another dialect, exactly where the target can hold the patches.

Targets: ``kohya`` (sd-scripts names: diffusers-style for SD1/SD2, SGM for SDXL, BFL for Flux), ``webui``
(AUTOMATIC1111's compvis/SGM names), ``diffusers`` (``<component>.<module>.lora_A/lora_B`` with
``lora_adapter_metadata``), ``peft`` (``base_model.model.`` + ``adapter_config.json``), ``bfl``
(``diffusion_model.<BFL name>``, Flux). kohya/webui/bfl keep every LyCORIS kind; diffusers/peft hold LoRA
(and PEFT DoRA) only: other kinds are refused, or with ``rank`` compressed by truncated SVD of each delta.
A kind with no kohya/LyCORIS form (PEFT OFT/BOFT/IA3) goes to kohya/webui/bfl as its exact ``diff`` of
the base weights ``checkpoint`` gives.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from . import plugins
from .archs import ModuleIndex
from .archs.flux import is_flux_transformer
from .core import Detection, Source, detect
from .deltas import CHECKPOINT_HINT, BaseWeights, module_delta
from .errors import LoraCompatError, UnmatchedKeysError
from .files import LoraFile
from .hostkeys import HostName, fused_rows, host_route, index_for_file, kohya_names, kohya_tensors
from .outputs import atomic_output, refuse_inputs
from .patches import Patch
from .patches.rows import fused_lora
from .patchset import PatchSet

TARGETS = ("kohya", "webui", "diffusers", "peft", "bfl")
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
    or single-file safetensors, or a :class:`lora_compat.bake.Checkpoint`): the same from a checkpoint's
    headers, and the base weights that ``rank`` needs to compress kinds whose delta depends on the weight
    (DoRA, OFT/BOFT, IA3, GLoRA)."""
    if to not in TARGETS:
        raise LoraCompatError(f"unknown target dialect {to!r}; choose from {', '.join(TARGETS)}")
    if components is not None and checkpoint is not None:
        raise LoraCompatError("pass components= or checkpoint=, not both")
    detection = detect(source, base)
    chosen = detection.base or next(iter(detection.base_candidates), None)
    weights = None
    if checkpoint is not None:
        from .apply import resolve_patchset
        from .bake import Checkpoint

        weights = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
        index = weights.index
        patchset = resolve_patchset(detection.file, index, base)
    elif components is not None:
        from .apply import component_modules, resolve_patchset

        index = ModuleIndex.from_modules(component_modules(components))
        patchset = resolve_patchset(detection.file, index, base)
    elif chosen is None:
        raise LoraCompatError(f"{detection.file.header.display_name}: no known base has these module names "
                              f"({detection.base_reason})")
    else:
        patchset = _by_names_if_misfit(detection, chosen)
        index = index_for_file(plugins.archs()[chosen].index, patchset)
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
    """Tensors and metadata of ``patchset`` (canonical targets of ``index``) in dialect ``to``; ``weights``:
    the base weights for compressing kinds whose delta depends on them."""
    writer = _LoraWriter(patchset, index, rank, report, weights) if to in ("diffusers", "peft") else \
        _KohyaWriter(patchset, index, to, report, weights)
    tensors = writer.write()
    metadata = _metadata(dict(source_metadata or {}), report, writer.extra_metadata())
    report.modules, report.tensors = writer.modules, len(tensors)
    if report.svd_errors:
        report.overall_error = writer.overall_error()
    return tensors, metadata, report


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
    from . import __version__

    metadata = {k: v for k, v in source.items() if k in KEPT_METADATA}
    metadata.update({"lora_compat.version": __version__, "lora_compat.source_dialect": report.source_dialect,
                     "lora_compat.base": report.base or ""})
    metadata.update(extra)
    return metadata


class _KohyaWriter:
    """kohya / webui / bfl: every kind keeps its own tensors; fused Flux modules are assembled exactly."""

    def __init__(self, patchset: PatchSet, index: ModuleIndex, to: str, report: ConvertReport,
                 weights: BaseWeights | None = None):
        self.patchset, self.index, self.to, self.report, self.weights = patchset, index, to, report, weights
        self.modules = 0
        self.ranks: list[int] = []
        self.alphas: list[float] = []

    def names(self) -> dict[str, HostName]:
        targets = list(self.patchset)
        if self.to == "bfl":
            if not any(is_flux_transformer(m) for m in self.index.components.values()):
                raise LoraCompatError("the bfl dialect names Flux modules; this LoRA is for "
                                      f"{self.report.base}")
            names = kohya_names(self.index, targets, comfy=True)
            return {t: HostName(_bfl_name(n.name), n.rows, n.swap) if n.name.startswith("lora_unet_") else n
                    for t, n in names.items()}
        return kohya_names(self.index, targets, base=self.report.base, trainer=self.to == "kohya")

    def write(self) -> dict[str, torch.Tensor]:
        names = self.names()
        tensors: dict[str, torch.Tensor] = {}
        fused: dict[str, list[tuple[HostName, Patch, str]]] = {}
        for target, patch in self.patchset.items():
            name = names.get(target)
            if name is None:
                raise LoraCompatError(f"{self.patchset.source}: {target} has no name in the {self.to} dialect")
            if name.rows is None and not name.swap:
                self._put(tensors, name.name, patch, target)
            else:
                fused.setdefault(name.name, []).append((name, patch, target))
        for module, parts in fused.items():
            self._put_fused(tensors, module, parts)
        return tensors

    def _put(self, tensors: dict, name: str, patch: Patch, target: str) -> None:
        try:
            own = kohya_tensors(patch)
        except ValueError as exc:
            own = self._diff(patch, target, exc)
        if self.to == "bfl":
            own = {_bfl_suffix(k): v for k, v in own.items()}
        for suffix, tensor in own.items():
            tensors[f"{name}.{suffix}"] = tensor
        self.modules += 1
        if patch.rank:
            self.ranks.append(patch.rank)

    def _diff(self, patch: Patch, target: str, exc: ValueError) -> dict[str, torch.Tensor]:
        """A PEFT OFT/BOFT/IA3 patch (no kohya/LyCORIS form; linear in the strength, like a ``diff``) as its exact
        change of the checkpoint's weights (LyCORIS ``diff`` / ``diff_b``, which every host reads)."""
        if not patch.written_as_diff:
            raise LoraCompatError(f"{self.patchset.source}: {target}: {exc}") from None
        if self.weights is None:
            raise LoraCompatError(f"{self.patchset.source}: {target}: {exc}; it can be written as the exact "
                                  f"change of a checkpoint's weights: {CHECKPOINT_HINT}") from None
        delta, bias = module_delta(patch, self.index, target, self.weights)
        return {"diff": delta.contiguous()} if bias is None else {"diff": delta.contiguous(), "diff_b": bias}

    def _put_fused(self, tensors: dict, module: str, parts: list[tuple[HostName, Patch, str]]) -> None:
        sources = [p.sliced_from for _, p, _ in parts]
        if all(s is not None for s in sources) and len({id(s) for s in sources}) == 1:
            self._put(tensors, module, sources[0], parts[0][2])  # the fused source patch, unsplit
            return
        total = _fused_rows(self.index, module)
        own = fused_lora([(host_route(h, total), p) for h, p, _ in parts], total)
        if own is None:  # unlike a host (which falls back to lora_compat's patch), a written file must refuse
            kinds = sorted({p.kind for _, p, _ in parts})
            raise LoraCompatError(f"{self.patchset.source}: {module} fuses parts of kinds {kinds}; only plain "
                                  "LoRA parts can be assembled into one fused module")
        if self.to == "bfl":
            own = {_bfl_suffix(k): v for k, v in own.items()}
        for suffix, tensor in own.items():
            tensors[f"{module}.{suffix}"] = tensor
        self.modules += 1
        self.ranks.append(int(own.get("lora_down.weight", own.get("lora_A.weight")).shape[0]))

    def extra_metadata(self) -> dict[str, str]:
        if not self.ranks:
            return {}
        return {"ss_network_module": "networks.lora" if self.to != "bfl" else "", "ss_network_dim": str(max(self.ranks))}


def _bfl_name(kohya: str) -> str:
    """``lora_unet_double_blocks_0_img_attn_qkv`` → ``diffusion_model.double_blocks.0.img_attn.qkv``."""
    from .archs.flux import DOUBLE_BLOCK, SINGLE_BLOCK, TOP_LEVEL

    flat = kohya[len("lora_unet_"):]
    for table, head in ((DOUBLE_BLOCK, "double_blocks"), (SINGLE_BLOCK, "single_blocks")):
        if flat.startswith(head + "_"):
            number, _, rest = flat[len(head) + 1:].partition("_")
            for name in table:
                if name.replace(".", "_") == rest:
                    return f"diffusion_model.{head}.{number}.{name}"
    for name in TOP_LEVEL:
        if name.replace(".", "_") == flat:
            return f"diffusion_model.{name}"
    raise LoraCompatError(f"{kohya}: not a Flux BFL module name")


def _bfl_suffix(suffix: str) -> str:
    return {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(suffix, suffix)


def _fused_rows(index: ModuleIndex, module: str) -> int:
    name = module[len("lora_unet_"):] if module.startswith("lora_unet_") else module[len("diffusion_model."):]
    rows = fused_rows(index, name)
    if rows is None:
        raise LoraCompatError(f"{module}: not a fused module of this base")
    return rows


class _LoraWriter:
    """diffusers / peft: LoRA (and PEFT DoRA) tensors, scales in ``lora_adapter_metadata`` / the PEFT config."""

    def __init__(self, patchset: PatchSet, index: ModuleIndex, rank: int | None, report: ConvertReport,
                 weights: BaseWeights | None = None):
        self.patchset, self.index, self.rank, self.report, self.weights = patchset, index, rank, report, weights
        self.to = report.target
        self.modules = 0
        self.configs: dict[str, dict[str, Any]] = {}
        self._error_sums = [0.0, 0.0]

    def write(self) -> dict[str, torch.Tensor]:
        components = sorted({t.partition(".")[0] for t in self.patchset})
        if self.to == "peft" and len(components) > 1:
            raise LoraCompatError(f"{self.patchset.source}: a PEFT adapter holds one model; this LoRA patches "
                                  f"{', '.join(components)} (use --to diffusers)")
        tensors: dict[str, torch.Tensor] = {}
        for target, patch in self.patchset.items():
            component, _, path = target.partition(".")
            key = f"base_model.model.{path}" if self.to == "peft" else target
            up, down, alpha, extra = self._factors(target, patch)
            tensors[f"{key}.lora_A.weight"] = down
            tensors[f"{key}.lora_B.weight"] = up
            for suffix, tensor in extra.items():
                tensors[f"{key}.{suffix}"] = tensor
            config = self.configs.setdefault(component, {"rank_pattern": {}, "alpha_pattern": {},
                                                         "target_modules": [], "use_dora": False,
                                                         "lora_bias": False})
            config["rank_pattern"][path] = int(down.shape[0])
            config["alpha_pattern"][path] = alpha
            config["target_modules"].append(path)
            config["use_dora"] |= "lora_magnitude_vector" in extra
            config["lora_bias"] |= "lora_B.bias" in extra
            self.modules += 1
        return tensors

    def _factors(self, target: str, patch: Patch) -> tuple[torch.Tensor, torch.Tensor, float, dict]:
        extra: dict[str, torch.Tensor] = {}
        peft = patch.peft_lora()
        if peft is not None:
            low_rank, magnitude = peft
            if magnitude is not None:
                extra["lora_magnitude_vector"] = magnitude.loader()
            scale = low_rank.scale.value()
            if low_rank.bias is not None:
                extra["lora_B.bias"] = low_rank.bias.load() * scale
            shapes = self.index.shapes(target) or {}
            # a module shape the patch does not fit is not the real one (a smaller model than the table's):
            # the file's own shapes decide then
            weight = shapes.get("weight") if shapes and patch.misfit(shapes) is None else None
            down, up = low_rank.peft_factors(weight)
            return up, down, scale * low_rank.rank, extra
        if self.rank is None:
            raise LoraCompatError(f"{self.patchset.source}: {target} is a {patch.kind} patch, which the {self.to} "
                                  f"dialect cannot hold; pass rank=R (--rank R) to compress it to a LoRA by SVD")
        weight, bias = module_delta(patch, self.index, target, self.weights)
        delta = weight.reshape(weight.shape[0], -1)
        up, down, error = svd_factors(delta, self.rank)
        if weight.dim() == 4:  # a conv LoRA: down is the kernel, up a 1x1 conv
            down, up = down.reshape(down.shape[0], *weight.shape[1:]), up.reshape(*up.shape, 1, 1)
        if bias is not None:  # carried exactly (scale alpha/rank = 1)
            extra["lora_B.bias"] = bias
        norm = float(delta.norm())
        self.report.svd_errors[target] = error
        self._error_sums[0] += (error * norm) ** 2
        self._error_sums[1] += norm ** 2
        return up, down, float(down.shape[0]), extra

    def overall_error(self) -> float:
        return math.sqrt(self._error_sums[0] / self._error_sums[1]) if self._error_sums[1] else 0.0

    def extra_metadata(self) -> dict[str, str]:
        flat: dict[str, Any] = {}
        for component, config in self.configs.items():
            ranks = config["rank_pattern"]
            default_rank = max(set(ranks.values()), key=list(ranks.values()).count)
            peft = {"r": default_rank, "lora_alpha": float(default_rank), "rank_pattern": ranks,
                    "alpha_pattern": config["alpha_pattern"], "target_modules": sorted(config["target_modules"]),
                    "use_dora": config["use_dora"], "lora_bias": config["lora_bias"], "use_rslora": False}
            if self.to == "peft":
                peft.update({"peft_type": "LORA", "bias": "none", "init_lora_weights": True})
                return {"lora_compat.peft_config": json.dumps(peft)}
            for key, value in peft.items():
                flat[f"{component}.{key}"] = value
        return {"lora_adapter_metadata": json.dumps(flat)} if flat else {}


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``up @ down`` of rank ≤ ``rank`` closest to ``delta`` (Frobenius), and the relative error."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(rank, s.shape[0])
    up = (u[:, :r] * s[:r]).float()
    down = vh[:r].float()
    norm = float(delta.norm())
    error = float((delta - up @ down).norm()) / norm if norm else 0.0
    return up, down, error
