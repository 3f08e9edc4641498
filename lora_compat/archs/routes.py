"""Generic pieces of an architecture, shared by every family: parameter shapes, row ranges of fused modules
(:class:`Part`, :class:`Route`) and the description of a fused layout (:class:`FusedLayout`).

This module imports nothing from the family modules, so ``base`` and every family can import it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

Shape = tuple[int, ...]
ParamShapes = dict[str, Shape]
ModuleTable = Mapping[str, ParamShapes]


@dataclass(frozen=True)
class Part:
    """Rows ``[start, stop)`` of a fused host module that one canonical module occupies."""

    target: str
    start: int
    stop: int
    swap: bool = False


@dataclass(frozen=True)
class Route:
    """Where a canonical module lives in a fused host: rows of a host module, and the host's names for its
    parameters (``weight`` → ``scale`` for the BFL norms)."""

    host: str
    start: int
    stop: int
    swap: bool = False
    param_names: tuple[tuple[str, str], ...] = ()

    def host_param(self, param: str) -> str:
        return dict(self.param_names).get(param, param)


@dataclass(frozen=True)
class FusedLayout:
    """A family whose component exists in two layouts: canonical (split, one module per projection) and fused
    (several canonical modules stacked by rows in one host module, e.g. BFL's ``qkv``)."""

    #: the component's modules are in the canonical (split) layout of this family
    is_split: Callable[[ModuleTable], bool]
    #: the component's modules are in the fused layout of this family
    is_fused: Callable[[ModuleTable], bool]
    #: split layout → {fused module name: its canonical parts, with row ranges}
    parts: Callable[[ModuleTable], dict[str, list[Part]]]
    #: fused host → (the equivalent canonical table, canonical module → its route into the host)
    canonical: Callable[[ModuleTable], tuple[dict[str, ParamShapes], dict[str, Route]]]
