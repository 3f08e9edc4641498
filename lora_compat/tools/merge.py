"""Merging several LoRAs into one file: ``concat`` (exact, ranks add up), ``svd`` (to rank R, with the error
it makes), ``ties`` and ``dare`` on full deltas (PEFT's definitions, seeded), ``linear`` only where it is exact.

Definitions (``w_i`` the weights, ``ΔW_i`` each LoRA's full delta with its own scale):

- concat: ``down = [down_1; ...]``, ``up = [w_1·s_1·up_1 | ...]``, so ``up @ down = Σ w_i ΔW_i`` exactly.
- svd: the best rank-R approximation of ``Σ w_i ΔW_i`` (Eckart-Young); relative Frobenius error reported.
- ties (PEFT ``merge_utils.ties``, sign election "total"): keep each ``ΔW_i`` 's top ``density`` fraction by
  magnitude, weight it, elect the sign of the weighted sum per element, and average the weighted entries that
  agree with it (``Σ agreeing / #agreeing``).
- dare (PEFT ``dare_linear``): keep each element of ``ΔW_i`` with probability ``density`` and divide by it,
  then ``Σ w_i ·``. Source ``i`` 's mask for a module is ``torch.rand(shape, generator=g) < density`` with
  ``g = torch.Generator().manual_seed((seed * 1_000_003 + i) ^ zlib.crc32(target))``: reproducible, and one
  module's masks do not depend on the others.
- linear: ``Σ w_i·s_i·up_i`` on the shared down, only when every LoRA has the same down for a module.

``ties``/``dare`` results are full deltas: written as LyCORIS ``diff`` tensors (kohya/webui/bfl dialects) or,
with ``rank``, compressed to a LoRA by SVD.

svd/ties/dare work on full deltas (:mod:`lora_compat.deltas`): LoRA, LoHa, LoKr and full patches give theirs
from the files alone, on any shapes; DoRA, OFT/BOFT, IA3 and GLoRA need the base weights (``checkpoint=``,
``--checkpoint PATH``). A bias delta (full ``diff_b``, ``lora_B.bias``) is merged by the same method as the
weights (dare: its masks seeded with ``target + ".bias"``) and written exactly beside them.

DoRA's change depends on the base weights, so svd/ties/dare merge DoRA LoRAs only with the model given
(``components`` or ``checkpoint``). Its weight is read like a strength (``dora_strength``): ``"interpolate"`` (default)
``ΔW_i = W_dora,i − W`` weighted by ``w_i`` like any LoRA, so ``W + w_i·ΔW_i`` is what the webuis and ComfyUI
apply at strength ``w_i``; ``"library"``: ``ΔW_i`` is the library's change at strength ``w_i`` (LyCORIS'
multiplier, PEFT's scaling), merged with weight 1.

The AutoLoRA learned gate (input-dependent fusion, hot mode only) lives in :mod:`lora_compat.tools.autolora_gate`
and is re-exported here: ``Patcher(target, mode="hot", fusion=FusionGates.load(path, target))``.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import plugins
from ..archs import ModuleIndex
from .convert import ConvertReport, save, source_paths, write_patchset
from ..detection import detect
from ..deltas import BaseWeights, module_delta
from ..dialects.writing import svd_factors
from ..errors import LoraCompatError, UnmatchedKeysError
from .autolora_gate import FusionGates, gate
from ..outputs import refuse_inputs
from ..patches import FullPatch, LoraPatch, Patch, Ref
from ..patches.base import LowRank
from ..patches.dora import check_dora_strength
from ..patchset import PatchSet

METHODS = ("concat", "svd", "ties", "dare", "linear")


@dataclass
class MergeReport:
    method: str
    path: str | None = None
    modules: int = 0
    svd_errors: dict[str, float] = field(default_factory=dict)
    overall_error: float | None = None
    convert: ConvertReport | None = None
    #: source → its keys that map to no module (left out of the merged file)
    unmatched: dict[str, list[str]] = field(default_factory=dict)


def _read_all(sources: Sequence[tuple[Any, float]], base: str | None, components: Any, checkpoint: Any
              ) -> tuple[list[tuple[PatchSet, float]], ModuleIndex, str | None, BaseWeights | None]:
    if components is not None and checkpoint is not None:
        raise LoraCompatError("pass components= or checkpoint=, not both")
    if components is not None or checkpoint is not None:
        from ..models import component_modules, resolve_patchset

        weights = None
        if checkpoint is not None:
            from .bake import Checkpoint

            weights = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
            index = weights.index
        else:
            modules = component_modules(components)
            index = ModuleIndex.from_modules(modules)
            weights = _model_weights(modules)
        first = detect(sources[0][0], base)  # the base only names the output (sd-scripts style per base)
        named = base or first.base or next(iter(first.base_candidates), None)
        return [(resolve_patchset(src, index, base), w) for src, w in sources], index, named, weights
    detections = [detect(src, base) for src, _ in sources]
    bases = {d.base or next(iter(d.base_candidates), None) for d in detections}
    if len(bases) != 1 or None in bases:
        raise LoraCompatError(f"the LoRAs are for different or unknown bases ({', '.join(map(str, bases))}); "
                              "merge LoRAs of one base (or pass base=)")
    chosen = bases.pop()
    patchsets = [(d.patchset, w) for d, (_, w) in zip(detections, sources)]
    return patchsets, plugins.archs()[chosen].index, chosen, None


def _model_weights(modules: dict[str, torch.nn.Module]) -> BaseWeights:
    """The base weights of a model's modules, by canonical target (fp32 copies)."""
    def weights(target: str) -> dict[str, torch.Tensor] | None:
        component, _, path = target.partition(".")
        try:
            module = modules[component].get_submodule(path)
        except (KeyError, AttributeError):
            return None
        return {name: p.detach().float() for name, p in module.named_parameters(recurse=False)}
    return weights


def merged_patchset(sources: Sequence[tuple[Any, float]], method: str, *, rank: int | None = None,
                    density: float = 0.5, seed: int = 0, base: str | None = None, components: Any = None,
                    checkpoint: Any = None, dora_strength: str = "interpolate"
                    ) -> tuple[PatchSet, ModuleIndex, MergeReport]:
    """The merged patches on canonical targets, the index they live on, and the report. ``checkpoint`` (a
    diffusers folder or single-file safetensors) or ``components`` (the model): read the LoRAs against its
    modules, and take from it the base weights that svd/ties/dare need for DoRA, OFT/BOFT, IA3 and GLoRA
    patches. ``dora_strength`` says how a DoRA LoRA's weight is read (module docstring)."""
    check_dora_strength(dora_strength)
    if method not in METHODS:
        raise LoraCompatError(f"unknown merge method {method!r}; choose from {', '.join(METHODS)}")
    if method == "svd" and rank is None:
        raise LoraCompatError("the svd method needs a rank (--rank R)")
    if not 0 < density <= 1:
        raise LoraCompatError(f"density must be in (0, 1], not {density}")
    patchsets, index, chosen, weights = _read_all(sources, base, components, checkpoint)
    report = MergeReport(method, unmatched={ps.source: sorted(ps.unmatched) for ps, _ in patchsets if ps.unmatched})
    targets = sorted({t for ps, _ in patchsets for t in ps})
    result = PatchSet(source=f"merge:{method}", dialect="merge", base=chosen)
    squared = [0.0, 0.0]
    for target in targets:
        parts = [(ps[target], w, i) for i, (ps, w) in enumerate(patchsets) if target in ps]
        if method == "concat":
            result.patches[target] = _concat(target, parts)
        elif method == "linear":
            result.patches[target] = _linear(target, parts)
        else:
            deltas = [(*_weighted_delta(target, p, w, index, weights, dora_strength), i) for p, w, i in parts]
            total = _combine(method, target, [(d, w, i) for (d, _), w, i in deltas], density, seed)
            bias = None
            if any(b is not None for (_, b), _, _ in deltas):
                rows = total.shape[0]
                biases = [(b if b is not None else torch.zeros(rows), w, i) for (_, b), w, i in deltas]
                bias = _combine(method, f"{target}.bias", biases, density, seed)
            if rank is not None:
                up, down, error = svd_factors(total.reshape(total.shape[0], -1), rank)
                if total.dim() == 4:
                    down, up = down.reshape(down.shape[0], *total.shape[1:]), up.reshape(*up.shape, 1, 1)
                result.patches[target] = LoraPatch(Ref.of(up, f"{target}.up"), Ref.of(down, f"{target}.down"),
                                                   bias=None if bias is None else Ref.of(bias, f"{target}.bias"))
                report.svd_errors[target] = error
                squared[0] += (error * float(total.norm())) ** 2
                squared[1] += float(total.norm()) ** 2
            else:
                result.patches[target] = FullPatch(Ref.of(total, f"{target}.diff"),
                                                   None if bias is None else Ref.of(bias, f"{target}.diff_b"))
    if report.svd_errors:
        report.overall_error = math.sqrt(squared[0] / squared[1]) if squared[1] else 0.0
    report.modules = len(result)
    return result, index, report


def _combine(method: str, target: str, deltas: Sequence[tuple[torch.Tensor, float, int]], density: float,
             seed: int) -> torch.Tensor:
    """The merged delta of one tensor (``(delta, weight, source number)`` per LoRA) by ``method``."""
    shapes = {tuple(d.shape) for d, _, _ in deltas}
    if len(shapes) > 1 and len({(s[0], math.prod(s)) for s in shapes}) == 1:
        # the same weight, one file storing it flattened (a linear-shaped delta of a 1x1 conv): take the
        # shape with the kernel
        shape = max(shapes, key=len)
        deltas = [(d.reshape(shape), w, i) for d, w, i in deltas]
        shapes = {shape}
    if len(shapes) > 1:
        raise LoraCompatError(f"{target}: the LoRAs change weights of different shapes "
                              f"({', '.join(str(list(s)) for s in sorted(shapes))}); merge LoRAs of one model")
    if method == "svd":
        return sum(w * d for d, w, _ in deltas)
    if method == "ties":
        return ties([d for d, _, _ in deltas], [w for _, w, _ in deltas], density)
    return dare(target, deltas, density, seed)


def _plain(target: str, patch: Patch, method: str) -> LowRank:
    low_rank = patch.weight_low_rank()
    if low_rank is None:
        raise LoraCompatError(f"{target}: {method} needs plain LoRA factors, this is a {patch.kind} patch; "
                              "use --method svd (or ties/dare) on full deltas")
    return low_rank


def _concat(target: str, parts) -> LoraPatch:
    ups, downs = [], []
    for patch, weight, _ in parts:
        up, down, scale = _plain(target, patch, "concat").factors()
        ups.append(up * (scale * weight))
        downs.append(down)
    up, down = torch.cat(ups, 1), torch.cat(downs, 0)
    original = parts[0][0].low_rank().down.shape
    if len(original) == 4:
        down, up = down.reshape(down.shape[0], *original[1:]), up.reshape(*up.shape, 1, 1)
    return LoraPatch(Ref.of(up, f"{target}.up"), Ref.of(down, f"{target}.down"))


def _linear(target: str, parts) -> LoraPatch:
    factors = [(_plain(target, p, "linear"), w) for p, w, _ in parts]
    downs = [low_rank.down.load() for low_rank, _ in factors]
    if any(not torch.equal(downs[0], d) for d in downs[1:]):
        raise LoraCompatError(f"{target}: linear merging of LoRA factors is exact only when the LoRAs share "
                              "their down matrix; use --method concat (exact) or svd")
    up = sum(low_rank.up.load() * (low_rank.scale.value() * w) for low_rank, w in factors)
    return LoraPatch(Ref.of(up, f"{target}.up"), Ref.of(downs[0], f"{target}.down"))


def _weighted_delta(target: str, patch: Patch, weight: float, index: ModuleIndex, weights: BaseWeights | None,
                    dora_strength: str) -> tuple[tuple[torch.Tensor, torch.Tensor | None], float]:
    """A patch's full ``(ΔW, Δb)`` and the weight it is merged with. A DoRA LoRA's is ``W_dora − W`` with the
    LoRA's weight (``interpolate``), or the library's change at that weight, merged with weight 1
    (``library``)."""
    if patch.reads_dora_strength and dora_strength == "library":
        return module_delta(patch.with_dora_strength("library"), index, target, weights, strength=weight), 1.0
    return module_delta(patch.with_dora_strength(dora_strength), index, target, weights), weight


def ties(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """TIES-merging as PEFT ``merge_utils.ties`` (magnitude trim, "total" sign election, disjoint mean)."""
    trimmed = []
    for delta in deltas:
        k = int(density * delta.numel())
        mask = torch.zeros(delta.numel(), dtype=delta.dtype)
        if k:
            mask[torch.topk(delta.abs().reshape(-1), k=k).indices] = 1
        trimmed.append(delta * mask.reshape(delta.shape))
    weighted = torch.stack([t * w for t, w in zip(trimmed, weights)])
    sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = weighted.sign() == sign
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def dare(target: str, deltas, density: float, seed: int) -> torch.Tensor:
    """DARE-linear: random drop with keep probability ``density``, rescale by 1/density, weighted sum."""
    total = None
    for delta, weight, index in deltas:
        generator = torch.Generator().manual_seed((seed * 1_000_003 + index) ^ zlib.crc32(target.encode()))
        keep = torch.rand(delta.shape, generator=generator) < density
        term = delta * keep / density * weight
        total = term if total is None else total + term
    return total


def merge(sources: Sequence[tuple[Any, float]], out: str | Path, method: str = "concat", *, to: str = "kohya",
          rank: int | None = None, density: float = 0.5, seed: int = 0, base: str | None = None,
          components: Any = None, checkpoint: Any = None, dora_strength: str = "interpolate",
          strict: bool = False) -> MergeReport:
    """Merge ``sources`` (``(path, weight)`` pairs) with ``method`` and write the result in dialect ``to``
    (under a temporary name beside ``out``, renamed into place when complete; an ``out`` that is one of the
    sources or the checkpoint is refused). ``checkpoint``, ``dora_strength``: see :func:`merged_patchset`.
    ``strict``: refuse (``UnmatchedKeysError``, nothing written) when keys of a source map to no module instead
    of leaving them out (``report.unmatched`` lists them)."""
    refuse_inputs(out, source_paths([*(s for s, _ in sources), checkpoint]))
    patchset, index, report = merged_patchset(sources, method, rank=rank, density=density, seed=seed, base=base,
                                              components=components, checkpoint=checkpoint,
                                              dora_strength=dora_strength)
    if strict and report.unmatched:
        source, keys = next(iter(report.unmatched.items()))
        total = sum(len(k) for k in report.unmatched.values())
        raise UnmatchedKeysError(f"{source}: {len(keys)} keys map to no module and would be left out of the merged "
                                 f"file: {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}"
                                 + (f" ({total} in all the sources)" if total > len(keys) else ""),
                                 [k for keys in report.unmatched.values() for k in keys])
    convert_report = ConvertReport(to, "merge", patchset.base)
    tensors, metadata, convert_report = write_patchset(patchset, index, to, convert_report)
    metadata["lora_compat.merge"] = f"{method}: " + ", ".join(f"{Path(str(s)).name}:{w:g}" for s, w in sources)
    report.path = str(save(tensors, metadata, to, out))
    report.convert = convert_report
    return report


__all__ = ["METHODS", "MergeReport", "merge", "merged_patchset", "ties", "dare", "FusionGates", "gate"]
