"""Merge mode: patched values are written into the parameters; originals are kept, never subtracted."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import torch

from .entries import changes_key_with_content
from .factors import FactorCache, scaled_factors
from .values import Contribution, merged_values

PristineMode = Literal["cpu", "same-device"]


@dataclass
class ParamRecord:
    """A parameter the patcher changed: its original value and how it looked right after our write."""

    param: torch.nn.Parameter
    pristine: torch.Tensor
    #: True: ``pristine`` IS the original tensor and the parameter points at a buffer of ours
    #: (restore = point back, no copy). False: ``pristine`` is a copy (on the CPU) and we wrote in place.
    swapped: bool
    data_ptr: int = 0
    version: int = 0

    def seal(self) -> None:
        self.data_ptr = self.param.data_ptr()
        self.version = self.param._version

    def changed_outside(self, current: torch.nn.Parameter) -> bool:
        return current is not self.param or current.data_ptr() != self.data_ptr or current._version != self.version


class MergeBackend:
    """Computes each touched parameter from its pristine value in fp32 and writes the rounded result."""

    #: no step clock: merged weights cannot change between denoising steps
    clock = None

    def __init__(self, pristine: PristineMode):
        self.pristine_mode = pristine
        self.records: dict[str, dict[str, ParamRecord]] = {}
        #: the scaled fp32 factors of recently used LoRAs: switching back does not read their files again
        self.factors = FactorCache()

    def bind(self, modules: Mapping[str, torch.nn.Module]) -> None:
        """Nothing to map onto the modules (the hot backend maps its fusion gates here)."""

    def adopt_external_changes(self, target: str, module: torch.nn.Module, warned: set[str]) -> bool:
        """Forget parameters someone else replaced or wrote (their current value becomes the original).
        True when the module lost any record, so it must be recomputed."""
        records = self.records.get(target, {})
        lost = False
        for name, record in list(records.items()):
            current = getattr(module, name, None)
            if isinstance(current, torch.nn.Parameter) and not record.changed_outside(current):
                continue
            key = f"{target}.{name}"
            if key not in warned:
                warned.add(key)
                warnings.warn(f"{key} was replaced or written outside the patcher (a new checkpoint?); its current "
                              "value is adopted as the original and the old one is never written back",
                              RuntimeWarning, stacklevel=4)
            del records[name]
            lost = True
        if not records:
            self.records.pop(target, None)
        return lost

    @torch.no_grad()
    def apply(self, target: str, module: torch.nn.Module, contributions: Sequence[Contribution],
              sources: Sequence[object] = ()) -> None:
        records = self.records.setdefault(target, {})
        params = dict(module.named_parameters(recurse=False))
        new: dict[str, torch.Tensor] = {}
        buffers: dict[str, torch.Tensor] = {}
        if contributions:
            touched = {name for patch, _ in contributions for name in patch.params}
            base = {name: (records[name].pristine if name in records else p.detach()).to(p.device)
                    for name, p in params.items()}
            shapes = new_shapes(base, contributions)
            buffers = {name: self._buffer(records.get(name), params[name], shapes[name])
                       for name in touched if name in params}
            out = {name: b for name, b in buffers.items() if b is not None and name == "weight" and b.is_contiguous()}
            new = merged_values(base, contributions, out, self._factor_source(sources, len(contributions)))
        for name in list(records):
            if name not in new:
                self._restore(records.pop(name))
        for name, value in new.items():
            self._write(records, name, params[name], value, buffers.get(name))
        if isinstance(module, torch.nn.Linear):  # an input-widening patch may have changed the shape
            shape = module.weight.shape
            if (module.out_features, module.in_features) != shape:  # nn.Module.__setattr__ is slow
                module.out_features, module.in_features = shape
        if not records:
            self.records.pop(target, None)

    def _factor_source(self, sources: Sequence[object], count: int):
        """The cache when every term comes from a file (an edited file is a new source with new patches);
        tensors in memory are read afresh, as they may have been changed in place."""
        keys = [getattr(source, "key", None) for source in sources]
        if len(keys) == count and all(isinstance(k, str) and changes_key_with_content(k) for k in keys):
            return self.factors
        return scaled_factors

    def _buffer(self, record: ParamRecord | None, param: torch.nn.Parameter, shape: torch.Size) -> torch.Tensor | None:
        """Where the new value goes: our own buffer (fresh at first touch or when the shape changes) or
        ``None`` to write in place."""
        if param.shape != shape:
            return torch.empty(shape, dtype=param.dtype, device=param.device)
        if record is not None:
            return param.data if record.swapped else None
        if self.pristine_mode == "same-device" or param.device.type == "cpu":
            return torch.empty_like(param.data)
        return None

    def _write(self, records: dict[str, ParamRecord], name: str, param: torch.nn.Parameter,
               value: torch.Tensor, buffer: torch.Tensor | None) -> None:
        record = records.get(name)
        if record is None:
            original = param.data
            if buffer is not None:  # keep the original tensor untouched as the pristine value
                record = ParamRecord(param, original, swapped=True)
            else:
                record = ParamRecord(param, original.to("cpu", copy=True), swapped=False)
            records[name] = record
        if buffer is not None:
            if value is not buffer:
                buffer.copy_(value)
            if param.data_ptr() != buffer.data_ptr():
                param.data = buffer
        else:
            param.copy_(value)
        record.seal()

    @staticmethod
    def _restore(record: ParamRecord) -> None:
        if record.swapped:
            record.param.data = record.pristine
        elif record.param.shape != record.pristine.shape:
            record.param.data = record.pristine.to(record.param.device)
        else:
            with torch.no_grad():
                record.param.copy_(record.pristine)

    def release(self) -> None:
        self.records.clear()
        self.factors.clear()

    def memory(self) -> dict[str, int]:
        return {"pristine_copies": self.pristine_bytes(), "buffers": self.buffer_bytes()}

    def pristine_bytes(self) -> int:
        """Bytes held only for restoring: copies (not the originals the model would hold anyway)."""
        return sum(r.pristine.numel() * r.pristine.element_size()
                   for recs in self.records.values() for r in recs.values() if not r.swapped)

    def buffer_bytes(self) -> int:
        return sum(r.param.numel() * r.param.element_size()
                   for recs in self.records.values() for r in recs.values() if r.swapped)


def new_shapes(base: dict[str, torch.Tensor], contributions: Sequence[Contribution]) -> dict[str, torch.Size]:
    """Each parameter's shape after the patches: input-widening patches widen the weight."""
    shapes = {name: t.shape for name, t in base.items()}
    widths = [widening[0] for widening in (patch.widening() for patch, _ in contributions) if widening is not None]
    if widths and "weight" in shapes:
        weight = shapes["weight"]
        shapes["weight"] = torch.Size((weight[0], max(widths), *weight[2:]))
    return shapes
