"""Classify a module's tensors by their key suffixes and build the matching patch kind.

Files mix algorithms per module, so the kind is decided per module from its suffix set. The suffixes and the
kinds come from the registered kinds (the ``register_kinds`` hook, :mod:`lora_compat.plugins`): every dialect
shares this table; a dialect only decides how names resolve and how the rank scale is found.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal, Mapping

from .base import BuildContext, IncompletePatch, Patch, Ref, Scale
from .oft import OftStyle


@dataclass(frozen=True)
class KindTable:
    """The registered kinds put together: every suffix's role, the kinds in the order they are tried."""

    builders: tuple[type[Patch], ...]
    wrappers: tuple[type[Patch], ...]
    #: key suffix → role
    roles: Mapping[str, str]
    #: role → the fewest dimensions its tensor needs
    min_dims: Mapping[str, int]
    #: suffixes matched at the end of dotted names, longest first (``lora_B.bias`` before shorter endings)
    ordered: tuple[str, ...] = field(default=())

    @classmethod
    def of(cls, kinds: Iterable[type[Patch]]) -> "KindTable":
        """The table of ``kinds`` (in registration order). Two kinds giving one suffix different roles is a
        ``ValueError``; a role's minimum dimensions is the largest any kind asks."""
        kinds = list(kinds)
        roles: dict[str, str] = {}
        owner: dict[str, str] = {}
        min_dims: dict[str, int] = {}
        for kind in kinds:
            for suffix, role in kind.suffixes.items():
                if roles.get(suffix, role) != role:
                    raise ValueError(f"kind {kind.kind!r} reads suffix {suffix!r} as role {role!r}, kind "
                                     f"{owner[suffix]!r} as {roles[suffix]!r}")
                roles[suffix], owner[suffix] = role, owner.get(suffix, kind.kind)
            for role, dims in kind.min_dims.items():
                min_dims[role] = max(dims, min_dims.get(role, 0))
        ordered = tuple(sorted((s for s in roles if s != "weight"), key=len, reverse=True))
        by_order = sorted(range(len(kinds)), key=lambda i: (kinds[i].order, i))
        return cls(builders=tuple(kinds[i] for i in by_order if not kinds[i].wraps),
                   wrappers=tuple(kinds[i] for i in by_order if kinds[i].wraps),
                   roles=roles, min_dims=min_dims, ordered=ordered)


#: the registry's table, kept here by :mod:`lora_compat.plugins` (asked once per key: the lookup must be cheap)
_table: KindTable | None = None


def kind_table() -> KindTable:
    """The table of every registered kind (cached with the plugin registry)."""
    table = _table
    if table is None:
        from .. import plugins  # the registry imports the dialects, which import this module

        table = plugins.kind_table()
    return table


def split_key(key: str, dotted: bool, table: KindTable | None = None) -> tuple[str, str] | None:
    """``(module name, suffix)``. kohya-style module names have no dots; dotted ones need suffix matching."""
    table = table or kind_table()
    if not dotted:
        module, _, suffix = key.partition(".")
        if suffix in table.roles or suffix == "weight":
            return module, suffix
        return None
    for suffix in table.ordered:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


def suffix_role(suffix: str, table: KindTable | None = None) -> str | None:
    """The role of a key suffix (``weight`` is its own role), or ``None`` when no kind reads it."""
    return "weight" if suffix == "weight" else (table or kind_table()).roles.get(suffix)


def build_patch(parts: Mapping[str, Ref], *, scale: Scale | None = None,
                dora_convention: Literal["lycoris", "peft"] = "lycoris",
                oft_style: OftStyle = "lycoris", lora_diff_b: bool = False) -> Patch:
    """Build the patch a module's tensors describe. ``parts`` maps roles (see :func:`suffix_role`) to tensors.

    ``scale`` overrides the rank scale (diffusers/PEFT keep alpha outside the file); otherwise it is
    ``alpha / rank`` from the module's own ``alpha`` tensor (none → 1). The first kind (lowest ``order``) that
    recognises the roles builds the patch; wrapper kinds (DoRA) then wrap it.
    """
    table = kind_table()
    flat = sorted(role for role, ref in parts.items() if len(ref.shape) < table.min_dims.get(role, 0))
    if flat:
        raise IncompletePatch("too few dimensions for their role: "
                              + ", ".join(f"{role} {list(parts[role].shape)}" for role in flat))
    context = BuildContext(scale, parts.get("alpha"), dora_convention, oft_style, lora_diff_b)
    for kind in table.builders:
        patch = kind.from_parts(parts, context)
        if patch is not None:
            break
    else:
        raise IncompletePatch(f"tensors {sorted(parts)} form no known patch kind")
    for kind in table.wrappers:
        wrapped = kind.wrap(patch, parts, context)
        if wrapped is not None:
            patch = wrapped
    return patch


def __getattr__(name: str) -> object:
    """The former module-level tables, now read from the registered kinds."""
    if name == "SUFFIX_ROLES":
        return {s: r for s, r in kind_table().roles.items() if s != "weight"}
    if name == "ORDERED_SUFFIXES":
        return list(kind_table().ordered)
    if name == "MIN_DIMS":
        return dict(kind_table().min_dims)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["IncompletePatch", "KindTable", "build_patch", "kind_table", "split_key", "suffix_role"]
