"""What a ``Patcher.set`` call asks for: entries, their sources, and the cache of read PatchSets."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterable, Mapping, Union

from ..files import LoraFile
from ..patches.dora import check_dora_strength
from ..patchset import PatchSet

SourceLike = Union[str, "os.PathLike[str]", LoraFile, PatchSet]
ComponentFilter = Union[Collection[str], Mapping[str, float], None]


@dataclass(frozen=True)
class Entry:
    """One LoRA in a stack. ``components`` limits it to some components (a collection of names) or gives
    per-component strength multipliers (``{"unet": 1.0, "text_encoder": 0.5}``). ``blocks``: per-block
    weights in the LoRA Block Weight syntax (a preset name like ``"INS"``, 12/17/20/26 values for SD, 61 for
    Flux, or ``{"IN04": 0.5, ...}``; see :mod:`lora_compat.tools.block_weights`). ``start``/``stop``: the fraction of the
    denoising steps the LoRA runs in (hot mode, with ``Patcher.step_callback()``); it runs at step ``i`` of
    ``n`` when ``start <= i / n < stop``. ``dora_strength``: how its DoRA modules read the strength
    (``"interpolate"`` or ``"library"``, see :mod:`lora_compat.patches.dora`); ``None`` takes the Patcher's."""

    source: SourceLike
    strength: float = 1.0
    components: ComponentFilter = None
    blocks: object = None
    start: float = 0.0
    stop: float = 1.0
    dora_strength: str | None = None

    def __post_init__(self) -> None:
        if self.dora_strength is not None:
            check_dora_strength(self.dora_strength)
        if not 0.0 <= self.start < self.stop <= 1.0:
            raise ValueError(f"{source_name(self.source)}: start/stop must satisfy 0 <= start < stop <= 1 "
                             f"(fractions of the denoising steps), got start={self.start}, stop={self.stop}")

    @property
    def scheduled(self) -> bool:
        """True when the entry runs only in part of the denoising steps."""
        return (self.start, self.stop) != (0.0, 1.0)

    def strength_for(self, component: str) -> float | None:
        """The effective strength on ``component``, or ``None`` when the entry does not apply there."""
        if self.components is None:
            return self.strength
        if isinstance(self.components, Mapping):
            multiplier = self.components.get(component)
            return None if multiplier is None else self.strength * float(multiplier)
        return self.strength if component in self.components else None


def as_entries(entries: Iterable[Entry | tuple]) -> list[Entry]:
    out = []
    for item in entries:
        if isinstance(item, Entry):
            out.append(item)
        elif isinstance(item, tuple) and 1 <= len(item) <= 6:
            out.append(Entry(*item))
        elif isinstance(item, (str, os.PathLike, LoraFile, PatchSet)):
            out.append(Entry(item))
        else:
            raise TypeError(f"expected (source, strength) pairs or Entry objects, got {item!r}")
    return out


def source_key(source: SourceLike) -> str:
    """Identity of a source: a path with its size and mtime (an edited file is a new source), or the object."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).resolve()
        try:
            stat = path.stat()
        except OSError:
            return f"path:{path}"
        return f"path:{path}:{stat.st_size}:{stat.st_mtime_ns}"
    return f"{type(source).__name__}:{id(source)}"


def changes_key_with_content(key: str) -> bool:
    """Whether a source with this key gets a new key when its content changes (a path: size and mtime are in
    it), so what was read from it may be kept; an object in memory may be changed in place under one key."""
    return key.startswith("path:")


def source_name(source: SourceLike) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, LoraFile):
        return source.header.display_name
    return source.source
