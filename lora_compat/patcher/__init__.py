"""The Patcher: reconcile a model to exactly the requested LoRA stack, exactly, all or nothing.

- ``set(entries)`` declares the wanted stack; history never matters (``set(A); set(B)`` equals ``set(B)``).
- Merge mode computes every touched parameter from its pristine value in fp32 (patches summed in a
  fixed order), rounds once and writes it; it never subtracts. Hot mode writes nothing and adds the
  patches in forward hooks.
- Only modules whose (patch, strength) set changed are recomputed; modules no longer patched are restored.
- Parameters changed behind the patcher's back are adopted as the new originals, never overwritten with
  stale data. An error leaves every parameter as it was before ``set``.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Literal, Mapping, NamedTuple

import torch

from ..models import check_patchset, component_modules, component_of_class, resolve_patchset
from ..archs import ModuleIndex
from ..tools.block_weights import factors as block_factors
from ..errors import LoraCompatError
from ..tools.autolora_gate import FusionGates
from ..patches.dora import DoraStrength, check_dora_strength
from ..patchset import PatchSet
from .entries import Entry, SourceLike, as_entries, source_key, source_name
from .hot import HotBackend, StepClock, TermSource
from .merge_backend import MergeBackend, PristineMode
from .values import Contribution

Mode = Literal["merge", "hot"]

#: PatchSets of recently used sources kept (header parsed and mapped once; tensors stay on disk until used)
RECENT_SOURCES = 8

_owners: "weakref.WeakKeyDictionary[torch.nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()
_owners_lock = threading.Lock()


@dataclass
class SetReport:
    """What a ``set`` did."""

    targets: int = 0
    recomputed: int = 0
    restored: int = 0
    unmatched: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class _Loaded:
    entry: Entry
    key: str
    #: the source's patches, DoRA reading the strength by ``dora_strength``
    patchset: PatchSet
    dora_strength: str = "interpolate"
    #: target → block-weight multiplier (``Entry.blocks``)
    blocks: dict[str, float] = field(default_factory=dict)


class _Stack(NamedTuple):
    """What one target gets: its contributions summed in a fixed order, each with its source."""

    #: what decides whether the module must be recomputed (see ``_signature``)
    signature: tuple
    contributions: list[Contribution]
    sources: list[TermSource]


_NOTHING = _Stack((), [], [])


def sync_config(component: torch.nn.Module) -> None:
    """Keep a diffusers model's config in step with a widened (or restored) input layer, as diffusers'
    own Control LoRA loader does (``in_channels`` of a Flux transformer follows ``x_embedder``)."""
    embedder = getattr(component, "x_embedder", None)
    config = getattr(component, "config", None)
    if not isinstance(embedder, torch.nn.Linear) or config is None or not hasattr(component, "register_to_config"):
        return
    if getattr(config, "in_channels", embedder.in_features) != embedder.in_features:
        component.register_to_config(in_channels=embedder.in_features)


class Patcher:
    """Apply, stack, switch and remove LoRAs on a model with bit-exact restoration.

    ``target`` is an ``nn.Module`` (its component name is guessed from its class, or give ``component``),
    a mapping ``{"unet": unet, "text_encoder": te}``, or a diffusers pipeline (its components are re-read
    at every ``set``, so a swapped ``pipe.unet`` is noticed).

    ``fusion`` (hot mode, FLUX.1): a LoRAFusion gate file (or loaded ``FusionGates``); the LoRAs' outputs in
    every gated layer are then combined by the AutoLoRA gate instead of summed (see
    :mod:`lora_compat.tools.autolora_gate`).

    ``dora_strength``: how DoRA modules read an entry's strength (an ``Entry`` may override it):
    ``"interpolate"`` (default) ``W + s·(W_dora − W)``, as A1111, SD.Next, Forge and ComfyUI do: 0 is off,
    1 the whole LoRA; ``"library"``: the training library's own convention (LyCORIS' multiplier, PEFT's
    scaling), under which strength 0 still changes the weights. See :mod:`lora_compat.patches.dora`.
    """

    def __init__(self, target: object, mode: Mode = "merge", pristine: PristineMode = "cpu", *,
                 strict: bool = False, component: str | None = None,
                 fusion: "FusionGates | str | os.PathLike[str] | None" = None,
                 dora_strength: DoraStrength = "interpolate"):
        if mode not in ("merge", "hot"):
            raise ValueError(f"mode must be 'merge' or 'hot', not {mode!r}")
        if pristine not in ("cpu", "same-device"):
            raise ValueError(f"pristine must be 'cpu' or 'same-device', not {pristine!r}")
        self.dora_strength = check_dora_strength(dora_strength)
        self.mode, self.strict, self._target, self._component = mode, strict, target, component
        if fusion is not None and mode != "hot":
            raise LoraCompatError("the AutoLoRA gate depends on each input, so it cannot be merged into the "
                                  "weights: use Patcher(target, mode='hot', fusion=...)")
        if fusion is not None and not isinstance(fusion, FusionGates):
            fusion = FusionGates.load(fusion, self._current_modules())
        self.fusion = fusion
        self._backend: MergeBackend | HotBackend = MergeBackend(pristine) if mode == "merge" else HotBackend(fusion)
        self._lock = threading.RLock()
        self._modules: dict[str, torch.nn.Module] = {}
        self._applied: dict[str, _Stack] = {}
        self._loaded: list[_Loaded] = []
        self._cache: "OrderedDict[tuple[str, tuple[int, ...]], PatchSet]" = OrderedDict()
        self._warned: set[str] = set()
        self._submodules: dict[str, torch.nn.Module] = {}
        #: component → {path: module}, walked once per ``set`` (``get_submodule`` per target costs more)
        self._tables: dict[str, dict[str, torch.nn.Module]] = {}
        self._claim(self._current_modules())

    # -- public API ---------------------------------------------------------------------------------
    @property
    def active(self) -> list[Entry]:
        """The entries currently applied, in the order they were given."""
        return [loaded.entry for loaded in self._loaded]

    def set(self, entries: Iterable[Entry | tuple | SourceLike]) -> SetReport:
        """Reconcile the model to exactly this stack (an empty one restores everything)."""
        with self._lock:
            start = time.perf_counter()
            wanted = as_entries(entries)
            if self.mode == "merge":
                for entry in wanted:
                    if entry.scheduled:
                        raise LoraCompatError(f"{source_name(entry.source)}: start/stop step fractions run the "
                                              "LoRA in part of the denoising only, which needs "
                                              "Patcher(mode='hot') and callback_on_step_end=step_callback()")
            modules = self._refresh_modules()
            self._backend.bind(modules)
            index = _LazyIndex(modules)
            loaded = [self._load(entry, index) for entry in wanted]  # may raise: nothing touched yet
            report = SetReport()
            for item in loaded:
                if item.patchset.unmatched:
                    report.unmatched[source_name(item.entry.source)] = sorted(item.patchset.unmatched)
            desired = self._desired(loaded)
            self._submodules, self._tables = {}, {}
            stale = self._adopt_external_changes(modules)
            changed = sorted(t for t in set(desired) | set(self._applied)
                             if t in stale
                             or desired.get(t, _NOTHING).signature != self._applied.get(t, _NOTHING).signature)
            names = {item.key: source_name(item.entry.source) for item in loaded}
            self._transaction(modules, changed, desired, names)
            for component in {t.partition(".")[0] for t in changed}:
                sync_config(modules[component])
            self._loaded = loaded
            self._keep_recent({item.key for item in loaded})
            report.targets = len(desired)
            report.recomputed = sum(1 for t in changed if t in desired)
            report.restored = len(changed) - report.recomputed
            report.seconds = time.perf_counter() - start
            return report

    def clear(self) -> SetReport:
        """Remove every LoRA: ``set([])``."""
        return self.set([])

    @contextmanager
    def applied(self, entries: Iterable[Entry | tuple | SourceLike]) -> Iterator[SetReport]:
        """Apply ``entries`` for the block, then go back to the previous stack (also on exceptions)."""
        with self._lock:
            previous = self.active
            report = self.set(entries)
            try:
                yield report
            finally:
                self.set(previous)

    def close(self) -> None:
        """Remove every LoRA and release the target so another patcher may own it."""
        with self._lock:
            self.clear()
            self._backend.release()
            with _owners_lock:
                for module in self._modules.values():
                    if _owners.get(module) is not None and _owners[module]() is self:
                        del _owners[module]

    def step_callback(self, num_steps: int | None = None) -> "StepCallback":
        """A diffusers ``callback_on_step_end`` that moves the step clock of entries with ``start``/``stop``:
        ``pipe(..., callback_on_step_end=patcher.step_callback())``. The step count is read from the
        pipeline (``num_timesteps``), else ``num_steps``. The clock is at step 0 when this is called and
        goes back to step 0 after the last step, so one callback serves several pipeline calls."""
        clock = self._backend.clock
        if clock is None:
            raise LoraCompatError("start/stop step fractions need Patcher(mode='hot'): merge mode would rewrite "
                                  "the weights at every step")
        clock.fraction = 0.0
        return StepCallback(clock, num_steps)

    def memory(self) -> dict[str, int]:
        """Bytes held for restoring: ``pristine_copies`` (copies) and ``buffers`` (patched values written
        into fresh buffers while the originals stay untouched)."""
        return self._backend.memory()

    # -- internals ------------------------------------------------------------------------------------
    def _current_modules(self) -> dict[str, torch.nn.Module]:
        if isinstance(self._target, torch.nn.Module):
            name = self._component or component_of_class(type(self._target).__name__)
            return {name: self._target}
        return component_modules(self._target)

    def _claim(self, modules: Mapping[str, torch.nn.Module]) -> None:
        with _owners_lock:
            for name, module in modules.items():
                owner = _owners.get(module)
                if owner is not None and owner() is not None and owner() is not self:
                    raise LoraCompatError(f"component {name!r} ({type(module).__name__}) is already owned by "
                                          "another Patcher; close() that one first")
            for module in modules.values():
                _owners[module] = weakref.ref(self)

    def _refresh_modules(self) -> dict[str, torch.nn.Module]:
        """Re-read the target's components; forget the state of any component object that was replaced."""
        modules = self._current_modules()
        for name, old in list(self._modules.items()):
            if modules.get(name) is not old:
                for target in [t for t in self._applied if t.partition(".")[0] == name]:
                    self._backend.apply(target, old.get_submodule(target.partition(".")[2]), [], [])
                    del self._applied[target]
                self._cache.clear()
                with _owners_lock:
                    if _owners.get(old) is not None and _owners[old]() is self:
                        del _owners[old]
        self._claim({k: m for k, m in modules.items() if self._modules.get(k) is not m})
        self._modules = modules
        return modules

    def _load(self, entry: Entry, index: "_LazyIndex") -> _Loaded:
        key = source_key(entry.source)
        cache_key = (key, tuple(id(m) for m in self._modules.values()))
        patchset = self._cache.get(cache_key)
        if patchset is None:
            patchset = self._read(entry.source, index.get())
            self._cache[cache_key] = patchset
        blocks = block_factors(patchset, index.get(), entry.blocks) if entry.blocks is not None else {}
        dora_strength = entry.dora_strength or self.dora_strength
        return _Loaded(entry, key, patchset.with_dora_strength(dora_strength), dora_strength, blocks)

    def _keep_recent(self, active: set[str]) -> None:
        """Keep the active sources' PatchSets and the most recently used others, so switching back and forth
        does not parse and map a file again (a changed file has another key: size and mtime are in it)."""
        for cache_key in [k for k in self._cache if k[0] in active]:
            self._cache.move_to_end(cache_key)
        while len(self._cache) > max(RECENT_SOURCES, len(active)):
            self._cache.popitem(last=False)

    def _read(self, source: SourceLike, index: ModuleIndex) -> PatchSet:
        patchset = resolve_patchset(source, index)
        check_patchset(patchset, index, self.strict)  # raises on a wrong base; warns loudly on unmatched keys
        return patchset

    def _desired(self, loaded: list[_Loaded]) -> dict[str, _Stack]:
        """target → its stack, summed in a fixed order independent of the list order."""
        order = sorted(range(len(loaded)), key=lambda i: (loaded[i].key, loaded[i].entry.strength, i))
        desired: dict[str, tuple[list[Contribution], list[TermSource]]] = {}
        for i in order:
            item = loaded[i]
            entry = item.entry
            for target, patch in item.patchset.items():
                strength = entry.strength_for(target.partition(".")[0])
                if strength is None:
                    continue
                strength *= item.blocks.get(target, 1.0)
                contributions, sources = desired.setdefault(target, ([], []))
                contributions.append(Contribution(patch, strength))
                sources.append(TermSource(item.key, entry.start, entry.stop, item.dora_strength))
        return {t: _Stack(_signature(contribs, sources), contribs, sources)
                for t, (contribs, sources) in desired.items()}

    def _submodule(self, modules: Mapping[str, torch.nn.Module], target: str) -> torch.nn.Module:
        """The module of ``target``, looked up once per ``set``."""
        module = self._submodules.get(target)
        if module is None:
            component, _, path = target.partition(".")
            table = self._tables.get(component)
            if table is None:
                table = self._tables[component] = dict(modules[component].named_modules(remove_duplicate=False))
            module = table.get(path)
            if module is None:
                module = modules[component].get_submodule(path)
            self._submodules[target] = module
        return module

    def _adopt_external_changes(self, modules: Mapping[str, torch.nn.Module]) -> set[str]:
        stale = set()
        for target in list(self._applied):
            if self._backend.adopt_external_changes(target, self._submodule(modules, target), self._warned):
                stale.add(target)
        return stale

    def _transaction(self, modules: Mapping[str, torch.nn.Module], changed: list[str],
                     desired: Mapping[str, _Stack], names: Mapping[str, str]) -> None:
        done: list[tuple[str, _Stack | None]] = []
        try:
            for target in changed:
                module = self._submodule(modules, target)
                previous = self._applied.get(target)
                done.append((target, previous))
                wanted = desired.get(target)
                stack = wanted or _NOTHING
                self._backend.apply(target, module, stack.contributions, stack.sources)
                if wanted:
                    self._applied[target] = wanted
                else:
                    self._applied.pop(target, None)
        except BaseException as exc:
            self._rollback(modules, done)
            if isinstance(exc, LoraCompatError):
                raise
            target = done[-1][0] if done else "?"
            sources = ", ".join(names[key] for key, *_ in desired.get(target, _NOTHING).signature) or "(restoring)"
            raise LoraCompatError(f"applying {sources} failed at {target}: {type(exc).__name__}: {exc}; "
                                  "every parameter was restored to its state before set()") from exc

    def _rollback(self, modules: Mapping[str, torch.nn.Module], done: list[tuple[str, _Stack | None]]) -> None:
        """Recompute every module touched by the failed ``set`` from its previous stack (deterministic, so
        bit-identical); a module whose previous stack cannot be read any more goes back to pristine."""
        for target, previous in reversed(done):
            component, _, path = target.partition(".")
            module = modules[component].get_submodule(path)
            try:
                stack = previous or _NOTHING
                self._backend.apply(target, module, stack.contributions, stack.sources)
            except Exception:
                self._backend.apply(target, module, [], [])
                previous = None
            if previous:
                self._applied[target] = previous
            else:
                self._applied.pop(target, None)


class _LazyIndex:
    """The components' :class:`ModuleIndex`, built on first use: a ``set`` whose sources are all cached and
    need no block weights never walks the model for it."""

    def __init__(self, modules: Mapping[str, torch.nn.Module]):
        self._modules, self._index = modules, None

    def get(self) -> ModuleIndex:
        if self._index is None:
            self._index = ModuleIndex.from_modules(self._modules)
        return self._index


def _signature(contributions: list[Contribution], sources: list[TermSource]) -> tuple:
    """What decides whether a module must be recomputed: each source with its strength, step window and DoRA
    strength convention."""
    return tuple((src.key, term.strength, src.start, src.stop, src.dora_strength)
                 for term, src in zip(contributions, sources))


class StepCallback:
    """``callback_on_step_end`` for diffusers pipelines: after step ``i`` of ``n`` the clock moves to
    ``(i + 1) / n``; after the last step it goes back to 0."""

    def __init__(self, clock: StepClock, num_steps: int | None = None):
        self.clock = clock
        self.num_steps = num_steps

    def __call__(self, pipe: object, step: int, timestep: object, callback_kwargs: dict) -> dict:
        total = getattr(pipe, "num_timesteps", None) or self.num_steps
        if not total:
            raise LoraCompatError("the step callback cannot tell the number of steps: the pipeline has no "
                                  "num_timesteps; pass step_callback(num_steps=N)")
        done = step + 1
        self.clock.fraction = done / total if done < total else 0.0
        return callback_kwargs


__all__ = ["Patcher", "Entry", "SetReport", "StepCallback"]
