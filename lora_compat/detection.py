"""Open → detect → read: the header-only pipeline behind ``inspect`` and ``read``."""
from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Collection, Iterable, Iterator, Mapping, Union

from .archs import Arch, ModuleIndex
from .dialects import Dialect, Match
from .dialects.base import NO_MODULE
from .dialects.family_evidence import foreign_modules
from .errors import LoraCompatError, UnknownDialectError
from .files import Header, LoraFile
from .patchset import PatchSet
from . import plugins

BUNDLED_EMBEDDING_PREFIX = "bundle_emb."
Source = Union[str, "os.PathLike[str]", LoraFile]


@dataclass
class Detection:
    """The winning dialect and the base it fits, decided from the header alone."""

    file: LoraFile
    dialect: Dialect
    match: Match
    base: str | None
    base_candidates: list[str]
    base_reason: str
    patchset: PatchSet
    warnings: list[str] = field(default_factory=list)
    #: the variant of the base the shapes tell (``wan21-t2v-1.3b``), ``None`` when they cannot
    variant: str | None = None
    #: the base's variant table (:attr:`Arch.variant_tables`) the shapes fit, ``None``: its main table
    table: str | None = None


def _strip_bundled_embeddings(file: LoraFile) -> tuple[LoraFile, list[str]]:
    bundled = sorted({k.split(".")[1] for k in file.keys() if k.startswith(BUNDLED_EMBEDDING_PREFIX)})
    if not bundled:
        return file, []
    header = file.header.filtered(lambda k: not k.startswith(BUNDLED_EMBEDDING_PREFIX))
    stripped = LoraFile(header, file.tensor, file.format)
    return stripped, [f"stripped {len(bundled)} bundled textual-inversion embedding(s) ({', '.join(bundled)}); "
                      "load them as embeddings"]


def choose_dialect(header: Header) -> tuple[Dialect, Match]:
    """The registered dialect whose ``detect`` scores the header highest (refusers win ties)."""
    if len(header) == 0:
        raise UnknownDialectError(f"{header.display_name}: holds no tensors")
    best: tuple[float, bool, Dialect, Match] | None = None
    for dialect in plugins.dialects().values():
        match = dialect.detect(header)
        if match is None or match.score <= 0:
            continue
        rank = (match.score, dialect.refuses)
        if best is None or rank > best[:2]:
            best = (match.score, dialect.refuses, dialect, match)
    if best is None:
        sample = ", ".join(list(header.keys())[:3])
        raise UnknownDialectError(f"{header.display_name}: no registered dialect recognises these keys "
                                  f"(e.g. {sample}); run `lora-compat dialects` to see what is supported")
    return best[2], best[3]


def _score(patchset: PatchSet) -> tuple[int, int]:
    """(modules that fit by name and shape, modules found by name)."""
    return len(patchset), len(patchset) + len(patchset.misfits)


def detect(source: Source, base: str | None = None) -> Detection:
    """Detect dialect and base from the header alone and build the (lazy) PatchSet.

    The decision is kept on the :class:`LoraFile`: detecting the same file again (``detection.file`` handed
    to ``resolve_patchset``, a converter...) reuses it while the plugin registry is unchanged."""
    with no_cyclic_gc():
        opened = source if isinstance(source, LoraFile) else LoraFile.open(source)
        registry = plugins.registry()
        cached = opened.cache.get(("detection", base))
        if cached is None or cached[0] is not registry:
            detection = _detect(opened, base)
            # kept without the file it is kept on (no reference cycle): a stripped copy, or the file itself
            stripped = detection.file if detection.file is not opened else None
            cached = opened.cache[("detection", base)] = (registry, replace(detection, file=None), stripped)
        return _copy(cached[1], opened if cached[2] is None else cached[2])  # (a LoraFile has a len)


@contextmanager
def no_cyclic_gc() -> Iterator[None]:
    """CPython's cycle collector paused (if it runs) for the block. Parsing a header and detecting make tens of
    thousands of small containers, none of them cyclic garbage; with the collector on, they set off a full
    collection over every object of the process (torch's, a host's) nearly every call, which costs more than
    the detection itself. Reference counting still frees everything; the collector runs again afterwards."""
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


def _copy(detection: Detection, file: LoraFile) -> Detection:
    """A detection of ``file`` whose lists and PatchSet the caller may change (the patches are shared)."""
    ps = detection.patchset
    patchset = replace(ps, patches=dict(ps.patches), base_candidates=list(ps.base_candidates),
                       unmatched=dict(ps.unmatched), misfits=dict(ps.misfits), warnings=list(ps.warnings))
    return replace(detection, file=file, base_candidates=list(detection.base_candidates), patchset=patchset,
                   warnings=list(detection.warnings))


def _detect(opened: LoraFile, base: str | None) -> Detection:
    file, warnings = _strip_bundled_embeddings(opened)
    dialect, match = choose_dialect(file.header)
    archs = plugins.archs()
    if dialect.refuses:
        dialect.read(file, ModuleIndex({}))  # raises NotALoraError naming what the file is
    if base is not None:
        if base not in archs:
            raise LoraCompatError(f"unknown base {base!r}; registered bases: {', '.join(sorted(archs))}")
        candidates = {base: archs[base]}
    else:
        candidates = {k: a for k, a in archs.items() if dialect.bases is None or k in dialect.bases}
    results = {k: dialect.read(file, a.index).fitted(a.index) for k, a in candidates.items()}
    scores = {k: _score(ps) for k, ps in results.items()}
    tables: dict[str, str | None] = {}
    # no base fits at all: a variant may have modules its main table lacks (Qwen-Image-2.1's img_mlp.gate_layer)
    none_fit = not any(_fits_by_shape(*s) for s in scores.values())
    for k, arch in candidates.items():
        if arch.variant_tables and (scores[k][1] or none_fit) and not _fits_by_shape(*scores[k]):
            # the family's names, other shapes: one of its other sizes (Wan 1.3B, 5B)
            for variant in arch.variant_tables:
                index = arch.variant_index(variant)
                patchset = dialect.read(file, index).fitted(index)
                if _score(patchset)[0] > scores[k][0]:
                    results[k], scores[k], tables[k] = patchset, _score(patchset), variant
    by_name: dict[str, PatchSet] = {}

    def named_only(arch: str) -> PatchSet:
        """The file mapped by name alone (no shape checks) on ``arch``: on its main table, or on the variant
        table that names more of the file's modules (SD3.5-Medium's second attention is in no other table)."""
        if arch not in by_name:
            family = candidates[arch]
            index = family.index.names_only()
            by_name[arch] = dialect.read(file, index).fitted(index)
            for variant in family.variant_tables if _unnamed(by_name[arch]) else ():
                index = family.variant_index(variant).names_only()
                patchset = dialect.read(file, index).fitted(index)
                if _unnamed(patchset) < _unnamed(by_name[arch]):
                    by_name[arch] = patchset
        return by_name[arch]

    def names_its_modules(arch: str) -> bool:
        """``arch`` has a module of every name of the file but a few (at most one key in twenty unnamed)."""
        return _unnamed(named_only(arch)) * 20 <= len(file.header)

    def in_proportion(arch: str) -> int:
        """Modules of the file mapped by name whose shape is the table's at another width (out:in as the table
        has it): a tiny FLUX.1 file's 7:1 ``linear1`` is FLUX.1's, not FLUX.2's 9:1."""
        index, count = candidates[arch].index, 0
        for target, patch in named_only(arch).patches.items():
            table = (index.shapes(target) or {}).get("weight")
            rows, columns = patch.out_rows(), patch.in_columns()
            count += bool(table and len(table) == 2 and rows and columns and rows * table[1] == columns * table[0])
        return count

    chosen, reason, named = _decide_base(file.header, candidates, scores, names_its_modules, forced=base is not None,
                                         in_proportion=in_proportion,
                                         encoders_only={k for k, ps in results.items() if ps and _encoders_only(ps)})
    if base is None:
        chosen, reason, named = _rule_out_foreign(file.header, chosen, reason, named, candidates, archs, warnings)
    if chosen is not None and (base is not None or _fits_by_shape(*scores[chosen])):
        patchset = results[chosen]
    elif chosen or named:  # no full-size base fits: map by name on the best-named candidate
        patchset = named_only(chosen or named[0])
        patchset.warnings.append("shapes not checked: no full-size base fits, targets resolved by name only")
    else:  # no base names its modules: a base of a family lora_compat does not know; nothing matches
        patchset = dialect.read(file, ModuleIndex({})).fitted(ModuleIndex({}))
    patchset.base = chosen
    if chosen is None and named:
        warnings.append(f"base undetermined ({reason}); candidates: {', '.join(named)}")
    patchset.warnings[:0] = warnings
    arch = archs.get(chosen) if chosen is not None else None
    variant = arch.variant_of(patchset.patches, tables.get(chosen)) \
        if arch is not None and arch.variant_of is not None else None
    return Detection(file, dialect, match, chosen, named, reason, patchset, warnings, variant, tables.get(chosen))


def _rule_out_foreign(header: Header, chosen: str | None, reason: str, named: list[str], candidates: Iterable[str],
                      archs: Mapping[str, Arch], warnings: list[str]) -> tuple[str | None, str, list[str]]:
    """The decision without the bases ruled out by modules (or metadata) of an unsupported family: a Qwen-Image
    LoRA's ``img_mlp`` against FLUX.1, whose names and shapes fit its attention. Never a confident wrong base.
    Where no base was named anyway, only the reason says which family the file is for."""
    bases = {*named, *([chosen] if chosen else [])}
    found = foreign_modules(header, bases or set(candidates), archs)
    if not found:
        return chosen, reason, named
    ruled_out = {b for entry, _ in found for b in entry.vetoes}
    named = [b for b in named if b not in ruled_out]
    if chosen is not None and chosen not in ruled_out:
        return chosen, reason, named
    seen = "; ".join(f"{entry.what} (e.g. {key})" for entry, key in found)
    if not bases:
        return None, f"{reason}: it has {seen}", named
    reason = f"it has {seen}, which rule out {', '.join(sorted(ruled_out))}; no supported base has them"
    warnings.append(f"base undetermined: {reason}")
    return None, reason, named


def _unnamed(patchset: PatchSet) -> int:
    """Keys of ``patchset`` whose module name matches nothing."""
    return sum(reason.endswith(NO_MODULE) for reason in patchset.unmatched.values())


def _fits_by_shape(fit: int, named: int) -> bool:
    """Most named modules also fit by shape (a few coincidental fits decide nothing)."""
    return fit > 0 and fit * 2 >= named


def _encoders_only(patchset: PatchSet) -> bool:
    return all(t.startswith("text_encoder") for t in patchset.patches)


def _decide_base(header: Header, archs: Mapping[str, Arch], scores: Mapping[str, tuple[int, int]],
                 names_all: Callable[[str], bool], forced: bool,
                 in_proportion: Callable[[str], int] = lambda k: 0, encoders_only: Collection[str] = ()
                 ) -> tuple[str | None, str, list[str]]:
    if forced:
        only = next(iter(archs))
        return only, "given by the caller", [only]
    archs, scores = _without_plain_derivatives(header, archs, scores, encoders_only)
    named = sorted((k for k, (_, n) in scores.items() if n > 0), key=lambda k: -scores[k][1])
    best_fit = max((fit for fit, _ in scores.values()), default=0)
    most_named = max((n for _, n in scores.values()), default=0)
    if _fits_by_shape(best_fit, most_named):
        winners = [k for k, (fit, _) in scores.items() if fit == best_fit]
        if len(winners) == 1:
            return winners[0], f"{best_fit} modules fit its shapes", winners
        hinted = [k for k in winners if archs[k].metadata_hint(header.metadata)]
        if len(hinted) == 1:
            return hinted[0], "shapes fit several bases; metadata names this one", named
        return None, f"shapes fit {', '.join(winners)} equally", winners
    # Without shapes, only a base that names (nearly) every module of the file is a candidate: a partial match by
    # name (Qwen-Image's transformer_blocks.N.attn.to_k are FLUX.1 names too) says nothing about the base. A
    # base none of whose full-size modules the file fits (a fused module split at another width) may still name
    # them all.
    named = [k for k in [*named, *(k for k in archs if k not in named)] if names_all(k)]
    if not named:
        return None, "no supported base has modules of these names and shapes", []
    # families whose fused layouts share names (FLUX.1's and FLUX.2's BFL names): those whose shapes the file has
    # in proportion (other families' tiny test models are named alike at any proportions: left as they were)
    fused = [k for k in named if archs[k].fused_layout is not None]
    if len(fused) > 1:
        counts = {k: in_proportion(k) for k in fused}
        named = [k for k in named if k not in fused or counts[k] == max(counts.values())]
    hinted = [k for k in named if archs[k].metadata_hint(header.metadata)]
    if len(hinted) == 1:
        return hinted[0], "names match but shapes fit no full-size base; metadata names this one", named
    return None, "names match but shapes fit no full-size base and metadata names none", named


def _without_plain_derivatives(header: Header, archs: Mapping[str, Arch], scores: Mapping[str, tuple[int, int]],
                               encoders_only: Collection[str]) -> tuple[dict[str, Arch], dict[str, tuple[int, int]]]:
    """The candidates less each family derived from another (:attr:`Arch.derives_from`: Chroma from FLUX.1) that
    fits the file no better than its parent, by shape and by name, unless the metadata names it: a FLUX.1 LoRA is
    a Chroma LoRA by names and shapes too, and stays FLUX.1's unless it patches a module only the derivative has
    (Chroma's approximator) or its trainer says so. A file on text encoders alone (``encoders_only``: shared by
    many families, a T5 LoRA) is no evidence of the parent: there the derivative stays a candidate."""
    plain = {k for k, arch in archs.items()
             if arch.derives_from in scores and k in scores and k not in encoders_only
             and all(p >= d for p, d in zip(scores[arch.derives_from], scores[k]))
             and not arch.metadata_hint(header.metadata)}
    return ({k: a for k, a in archs.items() if k not in plain},
            {k: s for k, s in scores.items() if k not in plain})


def read(source: Source, base: str | None = None) -> PatchSet:
    """The file as a :class:`PatchSet` on canonical targets of its (detected or given) base."""
    return detect(source, base).patchset
