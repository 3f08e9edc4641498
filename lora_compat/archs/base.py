"""Architectures: the module names and parameter shapes a LoRA's keys are resolved against."""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

Shape = tuple[int, ...]
ParamShapes = dict[str, Shape]

TABLES = Path(__file__).parent / "tables"


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
                 alias_makers: Mapping[str, Callable[[Iterable[str]], dict[str, str]]] | None = None):
        self.components = {c: dict(mods) for c, mods in components.items()}
        self._alias_makers = dict(alias_makers or {})
        #: kohya-style name prefix → component (set by the architecture; dialects fall back to SD's)
        self.kohya_prefixes: dict[str, str] = {}
        #: False: resolve by name only (used when no full-size base fits, e.g. tiny test models)
        self.check_shapes = True

    def names_only(self) -> "ModuleIndex":
        """A view of this index that skips shape checks."""
        view = ModuleIndex.__new__(ModuleIndex)
        view.__dict__.update(self.__dict__)
        view.check_shapes = False
        return view

    @classmethod
    def from_modules(cls, modules: Mapping[str, torch.nn.Module]) -> "ModuleIndex":
        from .sd import sgm_aliases  # the UNet alias rule is the only one that needs no config

        table = {}
        for component, module in modules.items():
            table[component] = {
                name: {p: tuple(t.shape) for p, t in sub.named_parameters(recurse=False)}
                for name, sub in module.named_modules()
                if any(True for _ in sub.parameters(recurse=False))
            }
        return cls(table, {"unet": sgm_aliases})

    def resolve(self, target: str) -> tuple[str, str] | None:
        """``(component, module path)`` of a canonical target in this index, or ``None``."""
        component, _, path = target.partition(".")
        modules = self.components.get(component)
        if modules is None:
            return None
        for candidate in _text_model_variants(path):
            if candidate in modules:
                return component, candidate
        return None

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

    @cached_property
    def index(self) -> ModuleIndex:
        with gzip.open(TABLES / self.table_file, "rt") as f:
            raw = json.load(f)
        table = {c: {m: {p: tuple(s) for p, s in params.items()} for m, params in mods.items()}
                 for c, mods in raw["components"].items()}
        index = ModuleIndex(table, self.alias_makers)
        index.kohya_prefixes = dict(self.kohya_prefixes)
        return index

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(self.index.components)
