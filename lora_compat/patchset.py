"""PatchSet: the canonical form of a LoRA file (canonical target → patch) with what did not map."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator, Mapping

from typing import TYPE_CHECKING

from .patches import Patch
from .patches.fused import FusedPatch

if TYPE_CHECKING:
    from .archs import ModuleIndex


@dataclass
class PatchSet(Mapping[str, Patch]):
    """Canonical target (``"<component>.<module path>"``) → :class:`~lora_compat.patches.Patch`.

    ``unmatched`` maps each file key that maps to no module to the reason; ``warnings`` are
    human-readable notes (stripped embeddings, base uncertainty...).
    """

    patches: dict[str, Patch] = field(default_factory=dict)
    source: str = "<memory>"
    dialect: str | None = None
    base: str | None = None
    #: bases whose names the file matches when its shapes decided none
    base_candidates: list[str] = field(default_factory=list)
    unmatched: dict[str, str] = field(default_factory=dict)
    #: targets found by name whose shapes do not fit the patch (also listed key by key in ``unmatched``)
    misfits: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    metadata: Mapping[str, str] = field(default_factory=dict)

    def fitted(self, index: "ModuleIndex") -> "PatchSet":
        """A copy keyed by ``index`` 's real module names, without the patches whose shapes do not fit
        (those go to ``misfits`` and their keys to ``unmatched``). With ``index.check_shapes`` False,
        names alone decide."""
        fitted = PatchSet(source=self.source, dialect=self.dialect, base=self.base,
                          base_candidates=list(self.base_candidates), unmatched=dict(self.unmatched),
                          misfits=dict(self.misfits), warnings=list(self.warnings), metadata=self.metadata)
        fused: dict[tuple[str, str], list] = {}
        components, check_shapes, routed = index.components, index.check_shapes, bool(index.routes)
        for target, patch in self.patches.items():
            found = index.resolve(target)
            reason = "no such module" if found is None else None
            if found is not None and check_shapes:
                reason = patch.misfit(components[found[0]][found[1]])
            if reason:
                fitted.misfits[target] = reason
                for ref in patch.refs().values():
                    fitted.unmatched[ref.name or target] = f"{target}: {reason}"
                continue
            name = f"{found[0]}.{found[1]}"
            route = index.route(name) if routed else None  # an index without routes has no fused host
            if route is None:
                fitted.patches[name] = patch
            else:
                fused.setdefault((found[0], route.host), []).append((route, patch))
        for (component, host), parts in fused.items():
            route, patch = parts[0]
            rows = next(iter(index.host_rows(component, host).values()))[0]
            whole = len(parts) == 1 and not route.swap and not route.param_names and route.stop - route.start == rows
            fitted.patches[f"{component}.{host}"] = patch if whole else FusedPatch(parts)
        return fitted

    def with_dora_strength(self, mode: str) -> "PatchSet":
        """This PatchSet with its DoRA patches reading the strength by ``mode`` (``"interpolate"``:
        ``W + s·(W_dora − W)``, or ``"library"``; see :mod:`lora_compat.patches.dora`): itself when nothing
        changes, else a copy sharing every other patch."""
        patches = {target: patch.with_dora_strength(mode) for target, patch in self.patches.items()}
        if all(patches[t] is p for t, p in self.patches.items()):
            return self
        return replace(self, patches=patches)

    def __getitem__(self, target: str) -> Patch:
        return self.patches[target]

    def __iter__(self) -> Iterator[str]:
        return iter(self.patches)

    def __len__(self) -> int:
        return len(self.patches)

    @property
    def kinds(self) -> list[str]:
        return sorted({k for p in self.patches.values() for k in p.kinds})

    def components(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for target in self.patches:
            component = target.partition(".")[0]
            counts[component] = counts.get(component, 0) + 1
        return dict(sorted(counts.items()))

    def __repr__(self) -> str:
        return (f"PatchSet({self.source!r}, dialect={self.dialect}, base={self.base}, "
                f"{len(self)} targets, kinds={self.kinds}, {len(self.unmatched)} unmatched)")
