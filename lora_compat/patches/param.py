"""A parameter-level target: a patch made for a module's ``weight`` applied to the one parameter of a module that has
no weight (Wan's ``blocks.N.modulation.diff`` / lightx2v's ``blocks.N.diff_m`` on diffusers' ``blocks.N``
``scale_shift_table``)."""
from __future__ import annotations

from typing import Mapping

from .base import Patch, Ref, Shape, Tensor


class ParamPatch(Patch):
    """The inner patch's ``weight`` change on parameter ``param`` (same shape). Only a change of the weight alone
    can be moved so (a ``diff`` without ``diff_b``); its delta needs no base but is no weight delta, so the paths
    that compress or merge weight deltas (``needs_base``) refuse it by name."""

    needs_base = True
    linear_in_strength = False  # the inner patch may be a DoRA

    def __init__(self, inner: Patch, param: str):
        self.inner, self.param = inner, param

    @property
    def kind(self) -> str:  # type: ignore[override]
        return self.inner.kind

    @property
    def kinds(self) -> tuple[str, ...]:
        return self.inner.kinds

    @property
    def params(self) -> tuple[str, ...]:
        return (self.param,)

    def refs(self) -> dict[str, Ref]:
        return self.inner.refs()

    def to_tensors(self) -> dict[str, Tensor]:
        return self.inner.to_tensors()

    def host_native(self) -> bool:
        return self.inner.host_native()

    def misfit(self, shapes: Mapping[str, Shape]) -> str | None:
        shape = shapes.get(self.param)
        if shape is None:
            return f"module has no parameter {self.param}"
        reason = self.inner.misfit({"weight": shape})
        return None if reason is None else f"{reason} (parameter {self.param})"

    def delta(self, base: Mapping[str, Tensor], strength: float = 1.0) -> dict[str, Tensor]:
        return {self.param: self.inner.delta({"weight": base[self.param]}, strength)["weight"]}


def on_param(patch: Patch, shapes: Mapping[str, Shape] | None) -> Patch | str:
    """``patch`` for a module with parameters ``shapes``: as it is, unless the module has no ``weight`` and one
    parameter, whose change the patch then is (a :class:`ParamPatch`; a reason when the patch changes more than
    a weight)."""
    if not shapes or "weight" in shapes or len(shapes) != 1:
        return patch
    (param,) = shapes
    low_rank = patch.low_rank()
    if tuple(patch.params) != ("weight",) or (low_rank is not None and low_rank.bias is not None):
        return f"the module's one parameter is {param}: a {patch.kind} patch changing {', '.join(patch.params)} " \
               "cannot apply to it"
    return ParamPatch(patch, param)
