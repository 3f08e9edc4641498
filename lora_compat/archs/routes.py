"""Generic pieces of an architecture, shared by every family: parameter shapes, row ranges of fused modules
(:class:`Part`, :class:`Route`) and the description of a fused layout (:class:`FusedLayout`).

This module imports nothing from the family modules, so ``base`` and every family can import it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

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
    #: split layout + the output rows a LoRA's own patches have (module path → rows) → the table laid out for
    #: the width the LoRA was made for (``None``: the table's own rows). Raises ``ValueError`` when the rows
    #: disagree within one fused module
    sized: Callable[[ModuleTable, Mapping[str, int]], dict[str, ParamShapes]] | None = None


@dataclass(frozen=True)
class BlockLayout:
    """A family's blocks in the webui "LoRA Block Weight" syntax (hako-mikan/sd-webui-lora-block-weight)."""

    #: the LBW vector the family's blocks are named in: ``"sd"`` (BASE, IN00-IN11, M00, OUT00-OUT11) or ``"flux"``
    #: (CLIP, T5, IN, D00-D18, S00-S37, OUT)
    vector: str
    #: (component, module path, the model's ``ModuleIndex``) → the module's block id, ``None``: in no block
    block_of: Callable[[str, str, Any], "str | None"]


def stacked_parts(modules: Mapping[str, ParamShapes], groups: Mapping[str, tuple[str, ...]],
                  swapped: Callable[[str, int], bool] = lambda name, rows: False) -> dict[str, list[Part]]:
    """Fused module name → the canonical modules it stacks by rows, with their row ranges from ``modules`` '
    shapes (only groups whose canonical modules all exist). ``swapped(name, rows)``: whether a one-part module's
    output halves swap between the layouts (an adaLN modulation chunked (shift, scale) in one, (scale, shift) in
    the other)."""
    result: dict[str, list[Part]] = {}
    for fused, canonical in groups.items():
        if not all(c in modules for c in canonical):
            continue
        parts, row = [], 0
        for c in canonical:
            shapes = modules[c]
            rows = (shapes.get("weight") or next(iter(shapes.values())))[0]
            parts.append(Part(c, row, row + rows, swapped(fused, rows)))
            row += rows
        result[fused] = parts
    return result


def scaled_parts(parts: list[Part], rows: int, width: tuple[int, int] | None = None) -> list[Part] | None:
    """The parts of a fused module laid out for a patch of ``rows`` output rows, when the model is another width
    than the table's: a layout that keeps its proportions at any width (FLUX.1: q, k, v equal, the MLP part 4x)
    has the table's boundaries scaled by ``width`` = (the patch's input columns, the table's). The parts the rows
    cover are kept (xlabs' single-block qkv covers q, k, v of ``linear1``). Without ``width``, the whole module is tried first,
    then its first parts. ``None`` when no layout gives whole rows."""
    if width is not None:
        new, old = width
        if any((p.start * new) % old or (p.stop * new) % old for p in parts):
            return None
        scaled = [Part(p.target, p.start * new // old, p.stop * new // old, p.swap) for p in parts]
        covered = [p for p in scaled if p.stop <= rows]
        return covered if covered and covered[-1].stop == rows else None
    for count in range(len(parts), 0, -1):
        if count == 1 and len(parts) > 1:
            break  # one part of a fused module alone is no layout a trainer writes
        end = parts[count - 1].stop
        if any((rows * p.start) % end or (rows * p.stop) % end for p in parts[:count]):
            continue
        return [Part(p.target, rows * p.start // end, rows * p.stop // end, p.swap) for p in parts[:count]]
    return None
