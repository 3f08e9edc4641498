"""Architectures: the module names and parameter shapes a LoRA's keys are resolved against."""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

from .names import HostNames, kohya_convention
from .routes import BlockLayout, FusedLayout, ModuleTable, ParamShapes, Part, Route, Shape

TABLES = Path(__file__).parent / "tables"

if TYPE_CHECKING:
    import torch

__all__ = ["Arch", "HostNames", "ModuleIndex", "ParamShapes", "Shape", "TABLES", "most_specific"]


def _registered_archs() -> list["Arch"]:
    from ..plugins import archs  # the registry sits above this package; imported when first asked

    return list(archs().values())


def alias_makers(archs: Iterable["Arch"] | None = None) -> dict[str, Callable[[Iterable[str]], dict[str, str]]]:
    """Component → the alias names of its modules (SD's SGM names, Wan's native names): those of every family
    that gives aliases for the component, an earlier family's winning where two name the same alias (``archs``:
    default every registered family). Each family's maker names only the modules it knows."""
    found: dict[str, list[Callable[[Iterable[str]], dict[str, str]]]] = {}
    for arch in _registered_archs() if archs is None else archs:
        for component, maker in arch.alias_makers.items():
            if maker not in found.setdefault(component, []):
                found[component].append(maker)
    return {c: makers[0] if len(makers) == 1 else _union(makers) for c, makers in found.items()}


def _union(makers: Sequence[Callable[[Iterable[str]], dict[str, str]]]) -> Callable[[Iterable[str]], dict[str, str]]:
    def aliases(paths: Iterable[str]) -> dict[str, str]:
        paths = list(paths)
        merged: dict[str, str] = {}
        for maker in makers:
            for alias, path in maker(paths).items():
                merged.setdefault(alias, path)
        return merged
    return aliases


def most_specific(archs: Iterable["Arch"]) -> "Arch | None":
    """The first of ``archs`` that none of the others derives from (a Chroma model looks like FLUX.1 too)."""
    archs = list(archs)
    derived = {a.derives_from for a in archs}
    return next((a for a in archs if a.id not in derived), archs[0] if archs else None)


def _layouts(archs: Iterable["Arch"]) -> list[FusedLayout]:
    return [a.fused_layout for a in archs if a.fused_layout is not None]


def _text_model_variants(path: str) -> Iterable[str]:
    """transformers 5 dropped CLIPTextModel's ``text_model.`` level: try the name with and without it."""
    yield path
    if path.startswith("text_model."):
        yield path[len("text_model."):]
    else:
        yield "text_model." + path


class ModuleIndex:
    """Modules that hold parameters, per component: ``{component: {module path: {param: shape}}}``.

    Canonical targets are ``"<component>.<module path>"``. Built from an architecture table (header-only
    work, no model needed) or from real ``nn.Module`` s (:meth:`from_modules`).
    """

    def __init__(self, components: Mapping[str, Mapping[str, ParamShapes]],
                 alias_makers: Mapping[str, Callable[[Iterable[str]], dict[str, str]]] | None = None,
                 routes: Mapping[str, Mapping[str, "Route"]] | None = None,
                 layouts: Sequence[FusedLayout] | None = None):
        self.components = {c: dict(mods) for c, mods in components.items()}
        self._alias_makers = dict(alias_makers or {})
        #: component → canonical module path → where it lives in a fused (BFL-layout) host module
        self.routes = {c: dict(r) for c, r in (routes or {}).items()}
        #: kohya-style name prefix → component (set by the architecture; see :meth:`read_prefixes`)
        self.kohya_prefixes: dict[str, str] = {}
        #: the family these modules are (``None``: not said; :attr:`family` then asks the families' hints)
        self.arch: Arch | None = None
        #: False: resolve by name only (used when no full-size base fits, e.g. tiny test models)
        self.check_shapes = True
        #: the fused layouts known for these components (``None``: those of every registered architecture)
        self._layouts = None if layouts is None else list(layouts)

    def names_only(self) -> "ModuleIndex":
        """A view of this index that skips shape checks."""
        view = ModuleIndex.__new__(ModuleIndex)
        view.__dict__.update(self.__dict__)
        view.check_shapes = False
        return view

    def with_components(self, components: Mapping[str, Mapping[str, ParamShapes]]) -> "ModuleIndex":
        """This index (same aliases, routes, kohya prefixes and shape checking) over other module tables."""
        other = ModuleIndex(components, self._alias_makers, self.routes, self._layouts)
        other.kohya_prefixes, other.check_shapes, other.arch = dict(self.kohya_prefixes), self.check_shapes, self.arch
        return other

    @classmethod
    def from_modules(cls, modules: Mapping[str, torch.nn.Module],
                     archs: Sequence["Arch"] | None = None) -> "ModuleIndex":
        """The index of real modules. A component in a family's fused layout (a BFL-layout Flux transformer) is
        indexed by the canonical (split) modules it is equivalent to, with a route from each to its rows of the
        host module. ``archs``: the families asked (default: every registered one)."""
        archs = _registered_archs() if archs is None else list(archs)
        layouts = _layouts(archs)
        table, routes = {}, {}
        for component, module in modules.items():
            table[component], wrapped = _module_table(module)
            if wrapped:
                routes[component] = wrapped
            layout = next((lay for lay in layouts if lay.is_fused(table[component])), None)
            if layout is not None:
                host = table[component]
                table[component], routes[component] = layout.canonical(host)
                table[component].update({path: shapes for path, shapes in host.items()
                                         if not any(r.host == path for r in routes[component].values())})
        family = most_specific(a for a in archs if a.looks_like(table))
        # the family the modules are names them first
        index = cls(table, alias_makers(archs if family is None else [family, *archs]), routes, layouts)
        if family is not None:
            index.arch, index.kohya_prefixes = family, dict(family.kohya_prefixes)
        return index

    @cached_property
    def family(self) -> "Arch | None":
        """The family these modules are: the one that made the index, else the first registered family they look
        like by structure (:meth:`Arch.looks_like`), else ``None``."""
        if self.arch is not None:
            return self.arch
        return most_specific(a for a in _registered_archs() if a.looks_like(self.components))

    def read_prefixes(self) -> dict[str, str]:
        """kohya-style prefix → component that names in this index are read with: the family's; for modules no
        family claims, every prefix a registered family reads, naming the component of the first family whose
        component for it these modules have (else of the first family that reads it)."""
        if self.kohya_prefixes:
            return self.kohya_prefixes
        if self.family is not None:
            return dict(self.family.kohya_prefixes)
        merged: dict[str, str] = {}
        for arch in _registered_archs():
            for prefix, component in arch.kohya_prefixes.items():
                if prefix not in merged or (merged[prefix] not in self.components and component in self.components):
                    merged[prefix] = component
        return merged

    def host_names(self, component: str) -> HostNames:
        """How the hosts name ``component`` 's modules: as its family says (:meth:`Arch.names_for`); for a
        component no family names, sd-scripts' convention (:func:`kohya_convention`)."""
        modules = self.components.get(component, {})
        naming = self.family.names_for(component) if self.family is not None else None
        return naming if naming is not None and naming.fits(modules) else kohya_convention(component, self.components)

    def split_layout(self, component: str) -> FusedLayout | None:
        """The fused layout whose split (canonical) form ``component`` 's modules are in, if any."""
        layouts = _layouts(_registered_archs()) if self._layouts is None else self._layouts
        modules = self.components.get(component, {})
        return next((lay for lay in layouts if lay.is_split(modules)), None)

    def route(self, target: str) -> "Route | None":
        """Where a canonical target lives in a fused host, or ``None`` when the host has the module itself."""
        component, _, path = target.partition(".")
        return self.routes.get(component, {}).get(path)

    def host_rows(self, component: str, host_path: str) -> dict[str, Shape]:
        """Parameter shapes of a fused host module (from the routes that point into it)."""
        shapes: dict[str, Shape] = {}
        for path, route in self.routes.get(component, {}).items():
            if route.host != host_path:
                continue
            for param, shape in self.components[component][path].items():
                name = route.host_param(param)
                rows = max(shapes.get(name, (0,))[0], route.stop)
                shapes[name] = (rows, *shape[1:])
        return shapes

    def split_names(self, component: str) -> dict[str, list["Part"]]:
        """BFL module names (dotted and ``_``-flattened) → the canonical modules they fuse, with row ranges."""
        return self._split_maps.get(component, {})

    def fused_modules(self, component: str) -> dict[str, list["Part"]]:
        """BFL module name (dotted) → its canonical parts, for a diffusers-layout Flux component."""
        return self._fused_maps.get(component, {})

    @cached_property
    def _fused_maps(self) -> dict[str, dict[str, list["Part"]]]:
        maps: dict[str, dict[str, list[Part]]] = {}
        for component, modules in self.components.items():
            layout = self.split_layout(component)
            if layout is not None:
                maps[component] = layout.parts(modules)
        return maps

    @cached_property
    def _split_maps(self) -> dict[str, dict[str, list["Part"]]]:
        return {c: {**{k.replace(".", "_"): v for k, v in parts.items()}, **parts}
                for c, parts in self._fused_maps.items()}

    def resolve(self, target: str) -> tuple[str, str] | None:
        """``(component, module path)`` of a canonical target in this index, or ``None``."""
        component, _, path = target.partition(".")
        modules = self.components.get(component)
        if modules is None:
            return None
        if path in modules:  # the common case, before the variants
            return component, path
        for candidate in _text_model_variants(path):
            if candidate in modules:
                return component, candidate
        wrapped = self._wrapped_hosts.get(component, {}).get(path)  # a PEFT ``base_layer`` named directly
        return (component, wrapped) if wrapped else None

    @cached_property
    def _wrapped_hosts(self) -> dict[str, dict[str, str]]:
        return {c: {r.host: path for path, r in routes.items() if r.host.endswith(".base_layer")}
                for c, routes in self.routes.items()}

    def shapes(self, target: str) -> ParamShapes | None:
        found = self.resolve(target)
        return self.components[found[0]][found[1]] if found else None

    def has_component(self, component: str) -> bool:
        return component in self.components

    def aliases(self, component: str) -> dict[str, str]:
        """Flattened (``.`` → ``_``) names → module path, incl. the component's alias names (e.g. SGM)."""
        return self._flat_maps.get(component, {})

    @cached_property
    def _flat_maps(self) -> dict[str, dict[str, str]]:
        maps: dict[str, dict[str, str]] = {}
        for component, modules in self.components.items():
            flat: dict[str, str] = {}
            for path in modules:
                for variant in _text_model_variants(path):
                    flat.setdefault(variant.replace(".", "_"), path)
            maker = self._alias_makers.get(component)
            if maker is not None:
                for alias, path in maker(modules).items():
                    flat.setdefault(alias.replace(".", "_"), path)
            maps[component] = flat
        return maps


def _module_table(module: torch.nn.Module) -> tuple[dict[str, ParamShapes], dict[str, "Route"]]:
    """``{module path: {param: shape}}`` of the modules that hold parameters. Modules wrapped by a PEFT tuner
    layer (``to_q.base_layer`` next to ``to_q.lora_A``...) are listed under their own name with a route to the
    ``base_layer``; the adapters' own parameters are not model modules and are left out."""
    named = dict(module.named_modules())
    wrappers = {name[: -len(".base_layer")] for name in named if name.endswith(".base_layer")}
    table: dict[str, ParamShapes] = {}
    routes: dict[str, Route] = {}
    for name, sub in named.items():
        params = {p: tuple(t.shape) for p, t in sub.named_parameters(recurse=False)}
        if not params:
            continue
        parts = name.split(".")
        owner = next((".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in wrappers), None)
        if owner is None:
            table[name] = params
        elif name == f"{owner}.base_layer":
            table[owner] = params
            routes[owner] = Route(name, 0, next(iter(params.values()))[0] if params else 0)
    return table, routes


@dataclass
class Arch:
    """A base model family (``sd15``, ``sdxl``...): its components' module table and naming conventions."""

    id: str
    title: str
    table_file: str
    #: kohya-style name prefix → component
    kohya_prefixes: Mapping[str, str]
    #: metadata hints: a function of the file's metadata returning True when it names this base
    metadata_hint: Callable[[Mapping[str, str]], bool] = lambda md: False
    alias_makers: Mapping[str, Callable[[Iterable[str]], dict[str, str]]] = field(default_factory=dict)
    #: a component of this family that exists split and fused (FLUX.1's diffusers and BFL transformers)
    fused_layout: FusedLayout | None = None
    #: model structure hint: ``{component: module table}`` of real modules → True when they are this family
    #: (default: a component in this family's fused layout, either way)
    model_hint: Callable[[Mapping[str, ModuleTable]], bool] | None = None
    #: text-encoder component → ComfyUI's generic name prefix for it (``text_encoders.<clip state-dict prefix>``:
    #: comfy/sd1_clip.py, sd2_clip.py, sdxl_clip.py, flux.py); what the dialects read is its inverse
    comfy_text_encoders: Mapping[str, str] = field(default_factory=dict)
    #: component → the model class names (``type(model).__name__``) that hold it, for a bare model handed in
    component_classes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: component → how the hosts (webuis, ComfyUI, sd-scripts) name its modules; a component left out is named
    #: flat under the first kohya prefix that reads it (text encoders: sd-scripts' ``lora_te*_`` convention)
    host_names: Mapping[str, HostNames] = field(default_factory=dict)
    #: component → how the trainer (sd-scripts, ``convert --to kohya``) names its modules where it differs from
    #: the hosts (SD1/SD2: the UNet under its diffusers names)
    trainer_names: Mapping[str, HostNames] = field(default_factory=dict)
    #: how ``describe_components`` names a model of this family found by structure (default: "a <id>-family model")
    structure_title: str | None = None
    #: single-file checkpoint key prefix → the component it holds (``model.diffusion_model.`` → ``unet``)
    checkpoint_prefixes: Mapping[str, str] = field(default_factory=dict)
    #: ComfyUI's class names for a loaded model of this family: its model config (``comfy.supported_models``)
    #: and its text-encoder model (``clip.cond_stage_model``)
    comfy_classes: tuple[str, ...] = ()
    #: the family's blocks for per-block weights (LoRA Block Weight syntax); ``None``: text encoders are ``BASE``,
    #: other modules in no block
    blocks: BlockLayout | None = None
    #: how model catalogues and sidecars name this family, lower case: Civitai's ``baseModel`` ("sdxl 1.0",
    #: "pony") and the A1111 sidecar's ``sd version`` ("sdxl")
    catalog_names: tuple[str, ...] = ()
    #: other sizes of the family: variant id → its table file (Wan 1.3B and 5B beside the 14B table); a file whose
    #: names are the family's but whose shapes fit only a variant's table is detected against that table
    variant_tables: Mapping[str, str] = field(default_factory=dict)
    #: the variant a file is, from the targets it patches and the variant table its shapes fit (``None``: the main
    #: table); ``None`` when the shapes cannot tell
    variant_of: Callable[[Iterable[str], str | None], str | None] | None = None
    #: the base id of the family this one derives from (Chroma: ``flux1``), whose names and shapes it largely
    #: shares: a file that fits both no better on this one, with no metadata naming it, is the parent's; a model
    #: that looks like both is this one (:func:`most_specific`)
    derives_from: str | None = None

    def names_for(self, component: str) -> HostNames | None:
        """How the hosts name ``component`` 's modules in this family (``None``: the family does not say)."""
        declared = self.host_names.get(component)
        if declared is not None:
            return declared
        if component.startswith("text_encoder"):
            return None
        return next((HostNames(p) for p, c in self.kohya_prefixes.items() if c == component), None)

    def component_of(self, class_name: str) -> str | None:
        """The component a model of this class is, in this family (``None``: not one of its classes)."""
        return next((c for c, names in self.component_classes.items() if class_name in names), None)

    def describe(self) -> str:
        """How ``describe_components`` names a model of this family found by structure."""
        return self.structure_title or f"a {self.id}-family model"

    def looks_like(self, components: Mapping[str, ModuleTable]) -> bool:
        """Whether real modules (of any size) look like this family, by structure."""
        if self.model_hint is not None:
            return self.model_hint(components)
        layout = self.fused_layout
        return layout is not None and any(layout.is_split(m) or layout.is_fused(m) for m in components.values())

    @cached_property
    def index(self) -> ModuleIndex:
        return self._load(self.table_file)

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(self.index.components)

    def variant_index(self, variant: str) -> ModuleIndex:
        """The module index of one of :attr:`variant_tables`."""
        cache = self.__dict__.setdefault("_variant_indexes", {})
        if variant not in cache:
            cache[variant] = self._load(self.variant_tables[variant])
        return cache[variant]

    def _load(self, table_file: str) -> ModuleIndex:
        with gzip.open(TABLES / table_file, "rt") as f:
            raw = json.load(f)
        table = {c: {m: {p: tuple(s) for p, s in params.items()} for m, params in mods.items()}
                 for c, mods in raw["components"].items()}
        index = ModuleIndex(table, self.alias_makers, layouts=_layouts([self]))
        index.kohya_prefixes, index.arch = dict(self.kohya_prefixes), self
        return index
