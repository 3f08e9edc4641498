"""What the library records for one LoRA file: the files it indexes, its ``inspect``, its metadata (tags,
dataset folders, titles), its sidecars (A1111 ``<name>.json``, Civitai ``.civitai.info``, previews) and its
hashes, as one row of the ``loras`` table."""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from ...errors import LoraCompatError, NotALoraError
from .retrieval import file_sha256

EXTENSIONS = (".safetensors", ".ckpt", ".pt")


def catalog_base(name: object) -> str | None:
    """The base a catalogue name gives (Civitai's ``baseModel``, the A1111 sidecar's ``sd version``), as the
    registered families name themselves (``Arch.catalog_names``)."""
    from ...plugins import archs

    wanted = str(name).lower()
    return next((arch.id for arch in archs().values() if wanted in arch.catalog_names), None)


@dataclass
class Sidecars:
    """What the A1111 ``<name>.json`` and Civitai ``<name>.civitai.info`` sidecars say, and a preview image."""

    prompts: list[str] = field(default_factory=list)
    description: str = ""
    preferred_weight: float | None = None
    base: str | None = None
    title: str = ""
    preview: str | None = None


def autov2(path: Path) -> str:
    """The A1111 / Civitai "AutoV2" short hash: the first 10 hex digits of the file's SHA-256, upper case."""
    return _autov2(file_sha256(path))


def _autov2(sha256: str) -> str:
    return sha256[:10].upper()


def walk(dirs: Iterable[str | os.PathLike]) -> Iterator[Path]:
    """The LoRA files under ``dirs`` (recursively; a file named in ``dirs`` is taken as it is)."""
    for root in dirs:
        root = Path(root).resolve()
        if root.is_file():
            yield root
            continue
        for dirpath, _, names in os.walk(root):
            for name in names:
                if name.lower().endswith(EXTENSIONS):
                    yield Path(dirpath) / name


def describe_file(path: Path, stat: os.stat_result, hashes: bool) -> dict:
    """The ``loras`` row of ``path``: status ``ok`` with what the file says, or ``not-lora``/``error`` and why."""
    from ..inspection import inspect

    row: dict = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "indexed_at": time.time()}
    try:
        info = inspect(path)
    except NotALoraError as exc:
        return {**row, "status": "not-lora", "error": f"{exc.kind}: {exc}"}
    except (LoraCompatError, OSError) as exc:
        return {**row, "status": "error", "error": str(exc)}
    side = read_sidecars(path)
    metadata = info.metadata
    dataset_dirs = _dataset_dirs(metadata.get("ss_dataset_dirs", ""))
    sha256 = file_sha256(path) if hashes else None
    row.update({
        "status": "ok", "error": None, "dialect": info.dialect, "base": info.base or side.base,
        "kinds": json.dumps(info.kinds), "rank_min": (info.rank or {}).get("min"),
        "rank_max": (info.rank or {}).get("max"), "targets": info.targets, "triggers": json.dumps(info.triggers),
        "tags": json.dumps(_top_tags(metadata)),
        "title": metadata.get("modelspec.title") or side.title or metadata.get("ss_output_name") or path.stem,
        "description": " ".join(filter(None, [metadata.get("modelspec.description", ""), side.description])),
        "output_name": metadata.get("ss_output_name"), "dataset_dirs": json.dumps(dataset_dirs),
        "preferred_weight": side.preferred_weight, "prompts": json.dumps(side.prompts[:5]),
        "preview": side.preview, "sha256": sha256, "autov2": _autov2(sha256) if sha256 else None,
    })
    return row


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def read_sidecars(path: Path) -> Sidecars:
    found = Sidecars()
    a1111 = _read_json(path.with_suffix(".json"))
    if isinstance(a1111, dict):
        weight = a1111.get("preferred weight")
        if isinstance(weight, (int, float)) and weight:
            found.preferred_weight = float(weight)
        if isinstance(a1111.get("description"), str):
            found.description = a1111["description"]
        found.base = catalog_base(a1111.get("sd version", ""))
    civitai = _read_json(path.with_suffix(".civitai.info"))
    if isinstance(civitai, dict):
        found.base = found.base or catalog_base(civitai.get("baseModel", ""))
        if isinstance(civitai.get("description"), str):
            found.description = " ".join(filter(None, [found.description, civitai["description"]]))
        model = civitai.get("model")
        if isinstance(model, dict) and isinstance(model.get("name"), str):
            found.title = model["name"]
        for image in civitai.get("images") or []:
            meta = image.get("meta") if isinstance(image, dict) else None
            if isinstance(meta, dict) and isinstance(meta.get("prompt"), str):
                found.prompts.append(meta["prompt"])
    for suffix in (".preview.png", ".png", ".preview.jpg", ".jpg", ".webp"):
        preview = path.with_name(path.stem + suffix)
        if preview.is_file():
            found.preview = str(preview)
            break
    return found


def _top_tags(metadata: dict, n: int = 20) -> list[str]:
    from ..inspection import _top_tags as top

    return top(metadata.get("ss_tag_frequency", ""))[:n] if metadata.get("ss_tag_frequency") else []


def _dataset_dirs(raw: str) -> list[str]:
    try:
        dirs = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return []
    return [re.sub(r"^\d+_", "", name) for name in dirs] if isinstance(dirs, dict) else []
