"""The dialect contract and the shared machinery every dialect reads with.

A dialect is one module with a :class:`Dialect` subclass: ``detect(header)`` scores the header alone
(no tensor data), ``read(file, index)`` maps the file's modules to canonical targets of ``index``, and a
dialect that writes (``writes``: the ``convert`` targets it serves) ``write(patchset, index)`` gives its
tensors back under its names, from the same name tables ``read`` inverts.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import partial
from itertools import repeat
from typing import TYPE_CHECKING, Callable, ClassVar, Iterable, Mapping, Union

from ..archs import ModuleIndex
from ..archs.routes import Part, scaled_parts
from ..errors import LoraCompatError, NotALoraError
from ..files import Header, LoraFile
from ..patches import Patch, Ref, Scale
from ..patches.build import IncompletePatch, build_patch, kind_table, split_key, suffix_role
from ..patches.base import numel
from ..patches.param import on_param
from ..patchset import PatchSet

if TYPE_CHECKING:
    from ..deltas import BaseWeights
    from .writing import Written


@dataclass(frozen=True)
class Match:
    """A dialect's claim on a header: ``score`` in (0, 1], higher wins; ``notes`` explain it."""

    dialect: str
    score: float
    notes: tuple[str, ...] = ()


#: the end of the reason of every key whose module name matches nothing in the index (read by name)
NO_MODULE = "matches no module of the model"


class Dialect(ABC):
    """Base class of every dialect plugin."""

    id: ClassVar[str]
    description: ClassVar[str] = ""
    #: True for recognisers of non-LoRA files: their ``read`` raises NotALoraError naming what the file is
    refuses: ClassVar[bool] = False
    #: the bases this dialect can be read against (``None``: whatever is registered)
    bases: ClassVar[tuple[str, ...] | None] = None
    #: the ``convert`` targets this dialect writes (``write``'s ``target``); empty: it reads only
    writes: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def detect(self, header: Header) -> Match | None:
        """Score the header alone; ``None`` when this is not the dialect's file."""

    @abstractmethod
    def read(self, file: LoraFile, index: ModuleIndex) -> PatchSet:
        """Map the file's tensors to patches on ``index`` 's modules (tensor data stays lazy)."""

    def write(self, patchset: PatchSet, index: ModuleIndex, *, target: str | None = None, base: str | None = None,
              rank: int | None = None, weights: "BaseWeights | None" = None) -> "Written":
        """``patchset`` (canonical targets of ``index``) as this dialect's tensors and header entries.
        ``target``: one of :attr:`writes` (default its first); ``base``: the base the patches are for;
        ``rank``: compress kinds the dialect cannot hold to LoRAs of this rank (where it offers that);
        ``weights``: the base weights, for kinds whose change depends on them."""
        raise LoraCompatError(f"the {self.id} dialect reads only; convert writes the targets "
                              f"{', '.join(write_targets())}")

    def write_target(self, target: str | None) -> str:
        """``target`` checked against :attr:`writes` (``None``: the first)."""
        if target is None and self.writes:
            return self.writes[0]
        if target not in self.writes:
            raise LoraCompatError(f"the {self.id} dialect writes {', '.join(self.writes) or 'nothing'}, "
                                  f"not {target!r}")
        return target

    def __repr__(self) -> str:
        return f"<dialect {self.id}>"


def write_targets() -> dict[str, Dialect]:
    """Every ``convert`` target → the registered dialect that writes it (the first to name it)."""
    from ..plugins import dialects  # the registry imports the dialects: asked when first needed

    targets: dict[str, Dialect] = {}
    for dialect in dialects().values():
        for target in dialect.writes:
            targets.setdefault(target, dialect)
    return targets


class RefusingDialect(Dialect):
    """A recogniser for files that are not LoRAs; ``read`` raises :class:`NotALoraError`."""

    refuses = True

    @abstractmethod
    def explain(self, header: Header) -> str:
        """One sentence: what the file is and what to do with it instead."""

    def read(self, file: LoraFile, index: ModuleIndex) -> PatchSet:
        raise NotALoraError(f"{file.header.display_name}: {self.explain(file.header)}", kind=self.id)


def group_modules(keys: Iterable[str], dotted: bool, rename: Callable[[str], str] = lambda k: k
                  ) -> tuple[dict[str, dict[str, str]], list[str]]:
    """``{module name: {suffix: original key}}`` and the keys no suffix explains.

    ``rename`` normalises a key before it is split (e.g. legacy ``processor.to_q_lora`` names).
    """
    groups: dict[str, dict[str, str]] = {}
    stray: list[str] = []
    table = kind_table()
    for key in keys:
        split = split_key(rename(key), dotted, table)
        if split is None:
            stray.append(key)
        else:
            groups.setdefault(split[0], {})[split[1]] = key
    return groups, stray


@dataclass
class ModuleReader:
    """Turns grouped module tensors into a PatchSet, resolving names with ``resolve``.

    ``resolve(module_name)`` gives a canonical target, the canonical parts of a fused module, or ``None``;
    ``scale_for(target, parts)`` may override the rank scale.
    """

    resolve: Callable[[str], "Resolved"]
    scale_for: Callable[[str, Mapping[str, Ref]], Scale | None] | None = None
    dora_convention: str = "lycoris"
    oft_style: str = "lycoris"
    #: a ``diff_b`` beside a LoRA's factors is the module's bias change (:class:`BuildContext`)
    lora_diff_b: bool = False
    extra_warnings: list[str] = field(default_factory=list)

    def read(self, file: LoraFile, index: ModuleIndex, dialect: str, dotted: bool,
             keys: Iterable[str] | None = None, rename: Callable[[str], str] = lambda k: k) -> PatchSet:
        result = PatchSet(source=file.header.display_name, dialect=dialect, metadata=file.metadata,
                          warnings=list(self.extra_warnings))
        if keys is None:  # the same file is read against every base during detection: group its keys once
            grouped = file.cache.get(("groups", dotted, rename))
            if grouped is None:
                grouped = file.cache[("groups", dotted, rename)] = group_modules(file.keys(), dotted, rename)
            groups, stray = grouped
            # a module no base names gives the same entries every time
            unnamed = file.cache.setdefault(("unnamed", dotted, rename), {})
        else:
            groups, stray = group_modules(keys, dotted, rename)
            unnamed = {}
        unmatched = result.unmatched
        unmatched.update(dict.fromkeys(stray, "not a known LoRA tensor name"))
        names = getattr(self.resolve, "names", None)  # all the names the resolver knows, where it says
        if names is not None and keys is None and names.isdisjoint(groups):
            # no module of the file has a name of this base (an SDXL file against Qwen-Image): all unmatched
            every = file.cache.get(("all unnamed", dotted, rename))
            if every is None:
                every = file.cache[("all unnamed", dotted, rename)] = {
                    key: why for module, suffixes in groups.items()
                    for key, why in unnamed.setdefault(
                        module, dict.fromkeys(suffixes.values(), f"module {module!r} {NO_MODULE}")).items()}
            unmatched.update(every)
            return result
        # without a target-dependent scale, a module's patch does not depend on the model: build it once per
        # file (detection reads the same file against every base)
        options = (self.dora_convention, self.oft_style, self.lora_diff_b)
        shared = file.cache.setdefault(("patches", dialect, *options), {}) \
            if self.scale_for is None and keys is None else {}
        for module, suffixes in groups.items():
            target = self.resolve(module) if names is None or module in names else None
            if target is None:
                entries = unnamed.get(module)
                if entries is None:
                    entries = unnamed[module] = dict.fromkeys(suffixes.values(), f"module {module!r} {NO_MODULE}")
                unmatched.update(entries)
                continue
            patch = shared.get(module)
            if patch is None:
                patch = self._build(file, target if isinstance(target, str) else target[0].target, suffixes)
                if self.scale_for is None:
                    shared[module] = patch
            if isinstance(patch, IncompletePatch):
                for key in suffixes.values():
                    result.unmatched[key] = f"module {module!r}: {patch}"
                continue
            if isinstance(target, str):  # a module without a weight: its one parameter (Wan's scale_shift_table)
                on_module = on_param(patch, index.shapes(target))
                placed = [(target, on_module)] if isinstance(on_module, Patch) else f"module {module!r}: {on_module}"
            else:
                placed = _split(module, patch, target, index)
            if isinstance(placed, str):
                for key in suffixes.values():
                    result.unmatched[key] = placed
                continue
            for canonical, part in placed:
                if canonical in result.patches:
                    for key in suffixes.values():
                        result.unmatched[key] = f"{canonical} is already patched by another module of this file"
                else:
                    result.patches[canonical] = part
            for key, why in unused_keys(patch, suffixes).items():
                unmatched.setdefault(key, why)
        return result

    def _build(self, file: LoraFile, target: str, suffixes: Mapping[str, str]) -> Patch | IncompletePatch:
        shapes, load = file.header.shapes, file.tensor
        table = kind_table()
        parts = {suffix_role(s, table): Ref(shapes[k], partial(load, k), k) for s, k in suffixes.items()}
        try:
            return build_patch(parts, scale=self.scale_for(target, parts) if self.scale_for else None,
                               dora_convention=self.dora_convention, oft_style=self.oft_style,
                               lora_diff_b=self.lora_diff_b)
        except IncompletePatch as exc:
            return exc


#: why a key of a module whose other tensors were applied was not
UNUSED = "not applied: its module's other tensors form a patch that cannot hold it"


def unused_keys(patch: Patch, suffixes: Mapping[str, str]) -> dict[str, str]:
    """The keys (``{suffix: key}`` of one module) that its patch does not read (a ``diff_b`` beside a kohya
    LoRA's ``lora_down``/``lora_up``): listed unmatched, never dropped in silence. An ``alpha`` is not one: a
    kind without a rank (LyCORIS LoKr of full matrices, ``diff``) reads it as scale 1, as LyCORIS does."""
    used = {ref.name for ref in patch.refs().values()}
    table = kind_table()
    return {key: UNUSED for suffix, key in suffixes.items()
            if key not in used and suffix_role(suffix, table) != "alpha"}


def _split(module: str, patch: Patch, parts: list[Part], index: ModuleIndex) -> list[tuple[str, Patch]] | str:
    """A patch made for a fused module, split into patches on the canonical modules it fuses (or the
    reason it cannot be). With a names-only index (no full-size base fits the file), the parts' rows come
    from the patch's own width, in the table's proportions."""
    rows = patch.out_rows()
    total = parts[-1].stop
    if rows is not None and rows != total:
        if index.check_shapes:
            covered = [p for p in parts if p.stop <= rows]
        else:
            table = (index.shapes(parts[0].target) or {}).get("weight")
            columns = patch.in_columns()
            width = (columns, numel(table[1:])) if table and columns else None
            covered = scaled_parts(parts, rows, width)
        if not covered or covered[-1].stop != rows:
            return (f"module {module!r}: the patch has {rows} output rows; the fused module's parts end at "
                    f"{', '.join(str(p.stop) for p in parts)}"
                    + ("" if index.check_shapes else " at full size, and at no other width in their proportions"))
        parts, total = covered, rows
    try:
        return [(p.target, patch.rows(p.start, p.stop, total, p.swap)) for p in parts]
    except ValueError as exc:
        return f"module {module!r}: {exc}"


Resolved = Union[str, list[Part], None]


def kohya_resolver(index: ModuleIndex, prefixes: Mapping[str, str] | None = None) -> Callable[[str], Resolved]:
    """Resolve ``lora_unet_down_blocks_0_...`` style names against the index's real module names; BFL names
    of a fused Flux module (``lora_unet_double_blocks_0_img_attn_qkv``) resolve to their canonical parts."""
    prefixes = prefixes or index_prefixes(index)
    ordered = [(prefix, len(prefix), component, index.aliases(component), index.split_names(component))
               for prefix, component in sorted(prefixes.items(), key=lambda kv: len(kv[0]), reverse=True)]

    def resolve(name: str) -> Resolved:
        for prefix, size, component, aliases, fused in ordered:
            if name.startswith(prefix):
                rest = name[size:]
                path = aliases.get(rest)
                if path is not None:
                    return f"{component}.{path}"
                return component_parts(index, component, rest) if rest in fused else None
        return None

    # every name it can resolve: a file none of whose modules is one is skipped whole (ModuleReader.read)
    sets = index.__dict__.setdefault("_kohya_name_sets", {})
    key = tuple(sorted(prefixes.items()))
    if key not in sets:
        sets[key] = frozenset(prefix + name for prefix, _, _, aliases, fused in ordered for name in (*aliases, *fused))
    resolve.names = sets[key]  # type: ignore[attr-defined]
    return resolve


def component_parts(index: ModuleIndex, component: str, bfl_name: str) -> Resolved:
    """A BFL module name (dotted or flattened) of ``component`` → its canonical parts (one part: a plain target)."""
    parts = index.split_names(component).get(bfl_name)
    if parts is None:
        return None
    parts = [Part(f"{component}.{p.target}", p.start, p.stop, p.swap) for p in parts]
    if len(parts) == 1 and not parts[0].swap:
        return parts[0].target
    return parts


def index_prefixes(index: ModuleIndex) -> dict[str, str]:
    """kohya-style prefix → component for ``index``: those of its family (:meth:`ModuleIndex.read_prefixes`)."""
    return index.read_prefixes()


def any_key_starts(header: Header, prefixes: str | tuple[str, ...]) -> bool:
    """Whether a key starts with one of ``prefixes``: a walk in C, for a quick "not this dialect's file"."""
    return any(map(str.startswith, header.keys(), repeat(prefixes)))


def claimed_fraction(header: Header, claims: Callable[[str], bool]) -> float:
    total = len(header)
    return sum(map(bool, map(claims, header.keys()))) / total if total else 0.0
