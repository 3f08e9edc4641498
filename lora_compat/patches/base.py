"""Patch kinds: each maps a module's base parameters to new values, computed in fp32.

A patch holds :class:`Ref` s (lazy tensors: shape known from the header, data read on demand), so a
``PatchSet`` can be built and shape-checked from a file header alone.

A kind is one :class:`Patch` subclass in one module, registered through the ``register_kinds`` hook. It owns
its whole life: the key suffixes it recognises (:attr:`Patch.suffixes`), building from a module's tensors
(:meth:`Patch.from_parts`), its change (:meth:`Patch.delta`), and the optional answers below.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Iterable, Mapping, Sequence

from .._lazy import torch

if TYPE_CHECKING:
    from torch import Tensor

    from ..archs.routes import Route
else:  # only annotations (deferred in every patch module) name it: building patches must not import torch
    Tensor = "torch.Tensor"

Shape = tuple[int, ...]


class Ref:
    """A tensor known by its shape until :meth:`load` reads it (as fp32)."""

    __slots__ = ("shape", "loader", "name")

    def __init__(self, shape: Shape, loader: Callable[[], Tensor], name: str = ""):
        self.shape, self.loader, self.name = tuple(shape), loader, name

    def __repr__(self) -> str:
        return f"Ref({self.name!r}, {list(self.shape)})"

    @classmethod
    def of(cls, tensor: Tensor, name: str = "") -> "Ref":
        return cls(tuple(tensor.shape), lambda: tensor, name)

    def load(self) -> Tensor:
        return self.loader().to(torch.float32)

    def item(self) -> float:
        return float(self.loader().float().reshape(-1)[0])


@dataclass(frozen=True)
class Scale:
    """A rank scale: ``alpha / rank`` (``alpha / sqrt(rank)`` for rsLoRA); no alpha means 1."""

    alpha: Ref | float | None
    rank: int
    rs: bool = False

    def value(self) -> float:
        if self.alpha is None or self.rank == 0:
            return 1.0
        alpha = self.alpha.item() if isinstance(self.alpha, Ref) else float(self.alpha)
        return alpha / (math.sqrt(self.rank) if self.rs else self.rank)


ONE = Scale(None, 0)


@dataclass(frozen=True)
class LowRank:
    """A patch's low-rank form: ``ΔW = scale · up @ down`` (``up`` ``[out, r]``, ``down`` ``[r, in·k·k]`` once
    flattened) and, when ``bias`` is set, ``Δb = scale · bias``. Nothing else changes: a kind returns this only
    when these factors are its whole change (a LoRA with a Tucker ``mid`` has no low-rank form)."""

    up: Ref
    down: Ref
    scale: Scale = ONE
    bias: Ref | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def factors(self) -> tuple[Tensor, Tensor, float]:
        """``(up [out, r], down [r, in·k·k], scale)`` in fp32: ΔW = scale · up @ down."""
        return flat(self.up.load()), flat(self.down.load()), self.scale.value()

    def peft_factors(self, weight: Shape | None = None) -> tuple[Tensor, Tensor]:
        """``(lora_A, lora_B)`` in their stored dtype, shaped as PEFT's layers hold them for a module whose weight
        has shape ``weight`` (``None``: a conv when ``down`` has kernel dims): Linear ``[r, in]`` / ``[out, r]``;
        Conv ``[r, in, kh, kw]`` / ``[out, r, 1, 1]``. LyCORIS DyLoRA stores a conv's up 2-D ``[out, r]``."""
        down, up = self.down.loader(), self.up.loader()
        kernel = tuple(weight[2:]) if weight is not None else tuple(down.shape[2:])
        if not kernel:
            return down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1)
        return (down.reshape(down.shape[0], -1, *kernel),
                up.reshape(up.shape[0], up.shape[1], *(1 for _ in kernel)))


def flat(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


def numel(shape: Shape) -> int:
    return math.prod(shape)


class IncompletePatch(ValueError):
    """The module's tensors do not form any known patch kind."""


@dataclass(frozen=True)
class BuildContext:
    """What the dialect reading a file tells the kinds building its patches.

    ``scale`` overrides the rank scale (diffusers/PEFT keep alpha outside the file); otherwise a kind's scale is
    ``alpha / rank`` from the module's own ``alpha`` tensor (:meth:`rank_scale`). ``dora_convention`` and
    ``oft_style`` are read by the DoRA and OFT kinds. ``lora_diff_b``: a ``diff_b`` beside a LoRA's factors is the
    module's bias change, added as it is (lightx2v files, as ComfyUI and diffusers read them), read by the LoRA kind.
    """

    scale: Scale | None = None
    alpha: Ref | None = None
    dora_convention: str = "lycoris"
    oft_style: str = "lycoris"
    lora_diff_b: bool = False

    def rank_scale(self, rank: int | None) -> Scale:
        """The override if any, else ``alpha / rank`` (no alpha or no rank: 1)."""
        if self.scale is not None:
            return self.scale
        return Scale(self.alpha, rank) if rank else Scale(None, 0)


class Patch(ABC):
    """One patch on one module. Subclasses set ``kind`` and implement :meth:`delta` and :meth:`misfit`.

    A kind read from files also declares :attr:`suffixes` and implements :meth:`from_parts`, and is registered
    with the ``register_kinds`` hook. Wrappers built by lora_compat itself (row slices, fused modules, input
    widening) are not registered.
    """

    kind: ClassVar[str]
    #: True when ``delta`` is linear in the strength (the patcher's hot mode may then use it directly)
    linear_in_strength: ClassVar[bool] = True
    #: key suffix → role (``"lora_up.weight": "up"``); :meth:`from_parts` gets the module's tensors by role. A bare
    #: ``weight`` suffix is only recognised in undotted (kohya-style) names, where it cannot be the module's own.
    suffixes: ClassVar[Mapping[str, str]] = {}
    #: role → the fewest dimensions its tensor needs (checked before any kind builds)
    min_dims: ClassVar[Mapping[str, int]] = {}
    #: kinds are tried lowest ``order`` first (the built-ins use 10-100), the first that builds wins
    order: ClassVar[int] = 1000
    #: a wrapper kind (DoRA) is asked through :meth:`wrap` after another kind built the module's patch; its
    #: patches hold the wrapped one as ``inner``
    wraps: ClassVar[bool] = False
    #: one line for ``lora-compat dialects`` (empty: the first line of the kind's module docstring)
    description: ClassVar[str] = ""
    #: whether the change depends on the base weight (DoRA, OFT/BOFT, IA3, GLoRA, norms...); a kind that does not
    #: implements :meth:`shaped_delta`
    needs_base: ClassVar[bool] = True
    #: whether the kind stores a conv's kernel flattened into its input columns (LoHa, LoKr): the shape its tensors
    #: imply is then 2-D, and the base's module tells the kernel
    flat_kernel: ClassVar[bool] = False
    #: a kind with no kohya/LyCORIS tensor form, linear in the strength (PEFT's OFT/BOFT/IA3): converters write its
    #: exact change of given base weights as a LyCORIS ``diff``, and webui hosts get the patch's own tensors so that
    #: they make a module of it for lora_compat's module type to compute
    written_as_diff: ClassVar[bool] = False

    @classmethod
    def from_parts(cls, parts: Mapping[str, Ref], context: BuildContext) -> "Patch | None":
        """The patch of this kind that a module's tensors (by role) form; ``None`` when they are not this kind's.
        Raise :class:`IncompletePatch` (its message names what is missing) when they are, but incompletely."""
        return None

    @classmethod
    def wrap(cls, inner: "Patch", parts: Mapping[str, Ref], context: BuildContext) -> "Patch | None":
        """For a wrapper kind: ``inner`` wrapped when ``parts`` hold this kind's tensors, else ``None``."""
        return None

    @property
    def params(self) -> tuple[str, ...]:
        """Names of the module parameters this patch changes."""
        return ("weight",)

    @property
    def rank(self) -> int | None:
        return None

    @property
    def kinds(self) -> tuple[str, ...]:
        return (self.kind,)

    @abstractmethod
    def refs(self) -> dict[str, Ref]:
        """The patch's tensors by role (``up``, ``down``, ``alpha``...)."""

    @abstractmethod
    def misfit(self, shapes: Mapping[str, Shape]) -> str | None:
        """Why this patch cannot apply to a module with these parameter shapes, or ``None`` if it fits."""

    @abstractmethod
    def delta(self, base: Mapping[str, Tensor], strength: float = 1.0) -> dict[str, Tensor]:
        """fp32 change of each parameter in :attr:`params`, given the fp32 base parameters."""

    def with_dora_strength(self, mode: str) -> "Patch":
        """This patch with its DoRA parts reading the strength by ``mode`` (see :mod:`.dora`); a kind
        without DoRA returns itself, a wrapper maps the patches it holds."""
        return self

    def host_native(self) -> bool:
        """Whether ComfyUI-style hosts (ComfyUI, Forge) compute this patch exactly as lora_compat does at every
        strength (otherwise it is handed over as an exact diff or computed by lora_compat)."""
        return False

    @property
    def reads_dora_strength(self) -> bool:
        """Whether the DoRA strength convention (:meth:`with_dora_strength`) changes this patch's delta."""
        return False

    def implied_weight_shape(self) -> Shape | None:
        """The weight shape the patch's own tensors imply (2-D ``[out, in·k·k]`` when a conv kernel is stored
        flattened), or ``None`` when they do not tell."""
        return None

    def shaped_delta(self, shape: Shape) -> "tuple[Tensor, Tensor | None]":
        """``(ΔW, Δb or None)`` at strength 1 for a weight of ``shape``, for kinds whose change does not depend on
        the base (:attr:`needs_base` false)."""
        raise ValueError(f"a {self.kind} patch's change depends on the base weight")

    def widening(self) -> "tuple[int, Patch] | None":
        """For a patch that widens the module's input: the new input width and the patch applied to the weight
        zero-padded to it; ``None`` for every other patch."""
        return None

    def replacement(self) -> "tuple[str, Ref] | None":
        """For a patch that replaces a parameter with a stored value: ``(parameter, value)``; else ``None``."""
        return None

    @property
    def row_parts(self) -> "Sequence[tuple[Route, Patch]] | None":
        """For a patch on a fused host module: each canonical module's route (its rows) and patch; else ``None``."""
        return None

    @property
    def sliced_from(self) -> "Patch | None":
        """For rows sliced out of a patch made for a fused weight (materialised, :class:`~.rows.RowsOf`): that
        patch; else ``None``."""
        return None

    def low_rank(self) -> "LowRank | None":
        """The patch's change as plain low-rank factors (see :class:`LowRank`: mind its ``bias``), or ``None``
        when it has no such form. Fast paths (one GEMM, factor concatenation, diffusers/PEFT LoRA layers) ask
        this; ``None`` sends the patch through :meth:`delta`."""
        return None

    def weight_low_rank(self) -> "LowRank | None":
        """:meth:`low_rank` when the patch changes the weight alone (no bias change), else ``None``: what can be
        written as a bare ``up``/``down`` pair (fused-module LoRAs, factor merges)."""
        low_rank = self.low_rank()
        return low_rank if low_rank is not None and low_rank.bias is None else None

    def peft_lora(self) -> "tuple[LowRank, Ref | None] | None":
        """The patch as a PEFT LoRA layer holds it: its low-rank form and PEFT's DoRA magnitude
        (``lora_magnitude_vector``, ``None`` without DoRA), or ``None`` when a PEFT LoRA cannot hold it."""
        low_rank = self.low_rank()
        return None if low_rank is None else (low_rank, None)

    def peft_loha(self) -> "tuple[Mapping[str, Ref], Scale] | None":
        """The patch as PEFT's LoHa layer holds it: ``{"hada_w1_a": ..., "hada_w1_b": ..., "hada_w2_a": ...,
        "hada_w2_b": ...}`` and the rank scale, or ``None`` when a PEFT LoHa layer cannot hold it."""
        return None

    def to_tensors(self) -> dict[str, Tensor]:
        """The patch's tensors under kohya/LyCORIS suffixes (``lora_down.weight``, ``hada_w1_a``, ``diff``...), in
        their stored dtype: what :attr:`suffixes` and :meth:`from_parts` read back. ``ValueError`` for a patch
        that has no such form."""
        raise ValueError(f"a {self.kind} patch has no kohya/LyCORIS tensor form")

    def out_rows(self) -> int | None:
        """Output rows of the weight the patch was made for, when its tensors tell and it splits by rows
        (how the parts of a fused module are found)."""
        return None

    def in_columns(self) -> int | None:
        """Input columns per output row (kernel included) of the weight the patch was made for, when its
        tensors tell."""
        return None

    def rows(self, start: int, stop: int, total: int, swap: bool = False) -> "Patch":
        """The part of this patch (made for a fused weight of ``total`` rows, halves swapped first when ``swap``)
        on rows ``[start, stop)``. ``ValueError`` for kinds whose change does not split by rows."""
        raise ValueError(f"a {self.kind} patch on a fused weight cannot be split into the modules it fuses")


class FactorisedPatch(Patch):
    """A kind whose change is an additive ``ΔW`` built from factors (LoRA, LoHa, LoKr): DoRA can wrap it."""

    needs_base = False

    def shaped_delta(self, shape: Shape) -> "tuple[Tensor, Tensor | None]":
        return self.weight_delta(torch.Size(shape)), None

    @abstractmethod
    def weight_delta(self, weight_shape: torch.Size) -> Tensor:
        """``ΔW`` in the weight's shape with the rank scale applied and strength 1."""

    def delta(self, base: Mapping[str, Tensor], strength: float = 1.0) -> dict[str, Tensor]:
        return {"weight": self.weight_delta(base["weight"].shape) * strength}

    def rows(self, start: int, stop: int, total: int, swap: bool = False) -> "Patch":
        """Materialised and sliced (a kind that slices its own factors exactly overrides this)."""
        from .fused import RowsOf

        return RowsOf(self, start, stop, total, swap)


def stored(pairs: "Iterable[tuple[str, Ref | None]]") -> dict[str, Tensor]:
    """``{suffix: tensor as stored}`` for the pairs whose tensor is present (for :meth:`Patch.to_tensors`)."""
    return {suffix: ref.loader() for suffix, ref in pairs if ref is not None}


def alpha_tensors(scale: Scale) -> dict[str, Tensor]:
    """``{"alpha": tensor}`` that reads back as ``scale`` with the same rank (nothing for scale 1 without alpha):
    the file's own alpha as stored, else the value (rsLoRA's ``alpha/sqrt(r)`` re-expressed as ``alpha/r``)."""
    if scale.alpha is None or scale.rank == 0:
        return {}
    if isinstance(scale.alpha, Ref) and not scale.rs:
        return {"alpha": scale.alpha.loader()}
    return {"alpha": torch.tensor(scale.value() * scale.rank, dtype=torch.float32)}


def conv_or_linear_misfit(weight: Shape | None, out: int, inner: int, what: str) -> str | None:
    """Common check for factorised kinds: ``out`` rows and ``inner`` = in x kernel elements."""
    if weight is None:
        return "module has no weight"
    if weight[0] != out or numel(weight[1:]) != inner:
        return f"{what} implies a weight of {out} x {inner} elements per row, module weight is {list(weight)}"
    return None
