"""``bake``: merge LoRAs into a full checkpoint, streamed tensor by tensor.

Each patched parameter is computed from the checkpoint's value in fp32 (all LoRAs summed in a fixed order,
the patcher's own computation) and written in the checkpoint's dtype; everything else is copied as is. The
output is written while reading, so peak memory stays near one module, not one checkpoint.

Checkpoints: a diffusers folder (``unet/``, ``transformer/``, ``text_encoder*/`` safetensors, sharded or not)
or a single-file safetensors (SD UNet under ``model.diffusion_model.`` with SGM names, SD1 CLIP under
``cond_stage_model.transformer.``, SDXL CLIP-L under ``conditioner.embedders.0.transformer.``, Flux BFL names
and Qwen-Image's own names bare or under ``model.diffusion_model.``).
"""
from __future__ import annotations

import json
import shutil
import struct
import sys
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from .. import plugins
from ..models import check_patchset, resolve_patchset
from ..archs import ModuleIndex
from ..archs.base import alias_makers
from ..archs.routes import FusedLayout, Route
from ..errors import LoraCompatError
from ..files import SAFETENSORS_DTYPES, LoraFile
from ..outputs import atomic_output, refuse_inputs
from ..patcher.values import merged_values
from ..patches.dora import check_dora_strength
from ..patcher.entries import source_key
from ..patches.fused import route_view

COMPONENT_FOLDERS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass
class BakeReport:
    path: str
    tensors: int = 0
    patched: int = 0
    unmatched: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class _Part:
    """One component of a checkpoint: its tensors (key → file holding it) and how keys map to modules."""

    component: str
    prefix: str
    files: dict[str, LoraFile] = field(default_factory=dict)

    def host_table(self) -> dict[str, dict[str, tuple[int, ...]]]:
        table: dict[str, dict[str, tuple[int, ...]]] = {}
        for key, file in self.files.items():
            module, _, param = key[len(self.prefix):].rpartition(".")
            table.setdefault(module, {})[param] = file.header.shapes[key]
        return table


def bake(checkpoint: str | Path, loras: Sequence[tuple[object, float]], out: str | Path, *,
         strict: bool = False, progress: bool = True, dora_strength: str = "interpolate") -> BakeReport:
    """Merge ``loras`` (``(source, strength)`` pairs) into ``checkpoint`` and write the result at ``out``
    (written under a temporary name beside ``out`` and renamed into place when complete; an output that is
    the checkpoint or one of the LoRAs is refused). ``dora_strength``: how DoRA modules read the strength
    (``"interpolate"``: ``W + s·(W_dora − W)``, as the webuis and ComfyUI do; ``"library"``: LyCORIS'
    multiplier / PEFT's scaling)."""
    check_dora_strength(dora_strength)
    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.exists():
        raise FileNotFoundError(f"{checkpoint}: no such file or folder")
    refuse_inputs(out, [checkpoint, *(s for s, _ in loras if isinstance(s, (str, PathLike)))])
    if checkpoint.is_dir() and checkpoint.resolve() in out.resolve().parents:
        raise LoraCompatError(f"{out}: is inside the checkpoint folder {checkpoint}; write the output elsewhere")
    files, parts = open_checkpoint(checkpoint)
    index = _index(parts)
    report = BakeReport(str(out))
    contributions = _contributions(loras, index, strict, report, dora_strength)
    by_file: dict[Path, dict[str, tuple[str, str]]] = {}
    for part in parts:
        for key, file in part.files.items():
            module, _, param = key[len(part.prefix):].rpartition(".")
            by_file.setdefault(file.header.path, {})[key] = (f"{part.component}.{module}", param)
    with atomic_output(out, directory=checkpoint.is_dir()) as written:
        if checkpoint.is_dir():
            for item in checkpoint.rglob("*"):
                target = written / item.relative_to(checkpoint)
                if item.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                elif item.suffix != ".safetensors" or item not in by_file:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(item, target)
            jobs = [(files[p], written / p.relative_to(checkpoint)) for p in by_file]
        else:
            jobs = [(files[checkpoint], written)]
        _write_jobs(jobs, by_file, contributions, parts, report, progress)
    return report


def _write_jobs(jobs: Sequence[tuple[LoraFile, Path]], by_file: Mapping[Path, Mapping[str, tuple[str, str]]],
                contributions: Mapping[str, list], parts: Sequence[_Part], report: BakeReport,
                progress: bool) -> None:
    total = sum(len(f.header.shapes) for f, _ in jobs)
    done = 0
    for file, target in jobs:
        modules = by_file.get(file.header.path, {})
        cache = _ModuleValues(contributions, params_by_module(parts))
        with _StreamWriter(target, file) as writer:
            for key in writer.keys:
                module, param = modules.get(key, (None, None))
                if module is not None and module in contributions:
                    writer.write(key, cache.value(module, param, file.header.dtypes[key]))
                    report.patched += 1
                else:
                    writer.write(key, file.tensor(key))
                done += 1
                report.tensors += 1
                if progress and (done % 64 == 0 or done == total):
                    print(f"\rbake: {done}/{total} tensors", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)


def open_checkpoint(checkpoint: Path) -> tuple[dict[Path, LoraFile], list[_Part]]:
    """The checkpoint's safetensors files (headers only) and its components (see the module docstring)."""
    if checkpoint.is_dir():
        files = {p: LoraFile.open(p) for p in sorted(checkpoint.rglob("*.safetensors"))}
        return files, _folder_parts(checkpoint, files)
    files = {checkpoint: LoraFile.open(checkpoint)}
    return files, _single_file_parts(files[checkpoint])


class Checkpoint:
    """A checkpoint's base weights by canonical target, read on demand: what ``convert --rank`` and the
    ``svd``/``ties``/``dare`` merges need for kinds whose delta depends on the weight (DoRA, OFT, IA3...)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such checkpoint file or folder")
        self.files, self.parts = open_checkpoint(self.path)
        #: canonical names with routes to the checkpoint's own names (SGM, BFL fused rows)
        self.routed = _index(self.parts)
        self.params = params_by_module(self.parts)
        #: the same modules without routes: the index LoRAs are read against (names and shapes)
        self.index = ModuleIndex(self.routed.components, alias_makers())

    def __call__(self, target: str) -> dict[str, torch.Tensor] | None:
        """The fp32 parameters of the canonical module ``target`` (rows of a fused module), or ``None``."""
        found = self.routed.resolve(target)
        if found is None:
            return None
        route = self.routed.route(f"{found[0]}.{found[1]}")
        host = f"{found[0]}.{route.host if route is not None else found[1]}"
        params = {p: f.tensor(k).float() for p, (f, k) in self.params.get(host, {}).items()}
        return route_view(route, params) if route is not None else params


def params_by_module(parts: Sequence[_Part]) -> dict[str, dict[str, tuple[LoraFile, str]]]:
    """host module → param → (file, key), over every file of the checkpoint (a module may span shards)."""
    found: dict[str, dict[str, tuple[LoraFile, str]]] = {}
    for part in parts:
        for key, file in part.files.items():
            module_path, _, param = key[len(part.prefix):].rpartition(".")
            found.setdefault(f"{part.component}.{module_path}", {})[param] = (file, key)
    return found


class _ModuleValues:
    """New values of a module's parameters, computed once when its first parameter is written."""

    def __init__(self, contributions: Mapping[str, list], params: Mapping[str, dict[str, tuple[LoraFile, str]]]):
        self.contributions, self.params = contributions, params
        self.current: tuple[str, dict[str, torch.Tensor]] | None = None

    def value(self, module: str, param: str, dtype_name: str) -> torch.Tensor:
        if self.current is None or self.current[0] != module:
            base = {p: f.tensor(k) for p, (f, k) in self.params[module].items()}
            self.current = (module, merged_values(base, self.contributions[module]))
        new = self.current[1].get(param)
        if new is None:
            file, key = self.params[module][param]
            return file.tensor(key)
        return new.to(SAFETENSORS_DTYPES[dtype_name][0])


def _contributions(loras: Sequence[tuple[object, float]], index: ModuleIndex, strict: bool,
                   report: BakeReport, dora_strength: str = "interpolate") -> dict[str, list]:
    order = sorted(range(len(loras)), key=lambda i: (source_key(loras[i][0]), loras[i][1], i))
    found: dict[str, list] = {}
    for i in order:
        source, strength = loras[i]
        patchset = resolve_patchset(source, index).with_dora_strength(dora_strength)
        check_patchset(patchset, index, strict)
        if patchset.unmatched:
            report.unmatched[patchset.source] = sorted(patchset.unmatched)
        for target, patch in patchset.items():
            found.setdefault(target, []).append((patch, strength))
    return found


def _folder_parts(root: Path, files: Mapping[Path, LoraFile]) -> list[_Part]:
    parts: dict[str, _Part] = {}
    for path, file in files.items():
        component = path.relative_to(root).parts[0] if len(path.relative_to(root).parts) > 1 else None
        if component not in COMPONENT_FOLDERS:
            continue
        part = parts.setdefault(component, _Part(component, ""))
        for key in file.header.shapes:
            part.files[key] = file
    if not parts:
        raise LoraCompatError(f"{root}: no unet/, transformer/ or text_encoder*/ safetensors weights found")
    return list(parts.values())


def _single_file_parts(file: LoraFile) -> list[_Part]:
    prefixes = _checkpoint_prefixes()
    keys = list(file.header.shapes)
    bare = [k for k in keys if not k.startswith(tuple(prefixes))]
    bare_model = bool(bare) and _bare_transformer(_Part("transformer", "", dict.fromkeys(bare, file)).host_table())
    parts: dict[str, _Part] = {}
    for key in keys:
        prefix = next((p for p in prefixes if key.startswith(p)), "" if bare_model else None)
        if prefix is None:
            continue
        part = parts.setdefault(prefix, _Part(prefixes.get(prefix, "transformer"), prefix))
        part.files[key] = file
    if not parts:
        raise LoraCompatError(f"{file.header.display_name}: no known checkpoint layout (expected "
                              f"{', '.join(p + '*' for p in prefixes)}, or a bare transformer in a family's fused "
                              "layout, e.g. Flux double_blocks.*)")
    return list(parts.values())


def _checkpoint_prefixes() -> dict[str, str]:
    """Single-file key prefix → component, as the registered families hold them (the first family's wins; a
    component in another family's fused layout is found by its modules, :func:`_index`)."""
    prefixes: dict[str, str] = {}
    for arch in plugins.archs().values():
        for prefix, component in arch.checkpoint_prefixes.items():
            prefixes.setdefault(prefix, component)
    return prefixes


def _bare_transformer(host: Mapping[str, Mapping[str, tuple[int, ...]]]) -> bool:
    """Unprefixed keys that are a transformer: in a family's fused layout (BFL Flux), or a family's transformer by
    structure (ComfyUI's Qwen-Image ``diffusion_models/`` file: its own names, which are diffusers')."""
    return _fused_layout(host) is not None or any(
        a.model_hint is not None and "transformer" in a.component_classes and a.model_hint({"transformer": host})
        for a in plugins.archs().values())


def _fused_layout(host: Mapping[str, Mapping[str, tuple[int, ...]]]) -> FusedLayout | None:
    """The registered fused layout (BFL Flux) these host modules are in, or ``None``."""
    layouts = [a.fused_layout for a in plugins.archs().values() if a.fused_layout is not None]
    return next((lay for lay in layouts if lay.is_fused(host)), None)


def _index(parts: Iterable[_Part]) -> ModuleIndex:
    """The canonical (diffusers-named) index of the checkpoint, with routes to its own module names."""
    tables, routes = {}, {}
    for part in parts:
        host = part.host_table()
        component = part.component
        layout = _fused_layout(host)
        if layout is not None:  # a fused-layout transformer (BFL Flux): indexed by its canonical modules
            component = part.component = "transformer"
            tables[component], routes[component] = layout.canonical(host)
        elif (aliased := _aliased(component, host)) is not None:  # an SD UNet under SGM names
            tables[component], routes[component] = aliased
        else:
            tables[component] = host
    # names and prefixes as the family it looks like reads them (its alias names: SGM names of an SD UNet)
    return ModuleIndex(tables, alias_makers(), routes)


def _aliased(component: str, host: Mapping[str, Mapping[str, tuple[int, ...]]]) -> tuple[dict, dict] | None:
    """Canonical names for a component held under a family's alias names (an SD UNet under SGM names): the
    registered base whose aliases of its own table are these names (shapes preferred, names alone for models of
    another width). ``None`` when the host's names are no family's aliases."""
    candidates, aliased = [], False
    for arch in plugins.archs().values():
        maker = arch.alias_makers.get(component)
        table = arch.index.components.get(component) if maker is not None else None
        if not table:
            continue
        aliases = {s: p for s, p in maker(table).items() if s in host}
        # a name its own alias (Wan's patch_embedding) says nothing: a diffusers-named transformer is not aliased
        aliased = aliased or any(s != p for s, p in aliases.items())
        covered = len(aliases) / max(1, len(host))
        if covered >= 0.9:  # names alone decide for models of another width (a few shortcut convs may differ)
            exact = all(table[p] == host[s] for s, p in aliases.items())
            candidates.append((exact, covered, aliases))
    if not candidates:
        if aliased:
            raise LoraCompatError(f"the checkpoint's {component} (under a family's alias names, e.g. SGM) matches "
                                  "none of the registered bases")
        return None
    aliases = max(candidates, key=lambda c: (c[0], c[1]))[2]
    table = {path: dict(host[alias]) for alias, path in aliases.items()}
    routes = {path: Route(alias, 0, next(iter(host[alias].values()))[0]) for alias, path in aliases.items()}
    return table, routes


class _StreamWriter:
    """Writes a safetensors file tensor by tensor, in the source's key order, dtypes and shapes."""

    def __init__(self, path: Path, source: LoraFile):
        self.path, self.source = path, source
        shapes, dtypes = source.header.shapes, source.header.dtypes
        self.keys = list(shapes)
        header, offset = {}, 0
        for key in self.keys:
            size = SAFETENSORS_DTYPES[dtypes[key]][1] * _numel(shapes[key])
            header[key] = {"dtype": dtypes[key], "shape": list(shapes[key]), "data_offsets": [offset, offset + size]}
            offset += size
        if source.metadata:
            header["__metadata__"] = dict(source.metadata)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.header, self.sizes = raw, {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
                                        if k != "__metadata__"}

    def __enter__(self) -> "_StreamWriter":
        self.handle = open(self.path, "wb")
        self.handle.write(struct.pack("<Q", len(self.header)))
        self.handle.write(self.header)
        return self

    def write(self, key: str, tensor: torch.Tensor) -> None:
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        if data.nbytes != self.sizes[key]:
            raise LoraCompatError(f"{self.path}: {key} has {data.nbytes} bytes, the header says {self.sizes[key]}")
        self.handle.write(memoryview(data))

    def __exit__(self, *exc) -> None:
        self.handle.close()
        if exc[0] is not None:
            self.path.unlink(missing_ok=True)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
