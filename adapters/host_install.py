"""Install lora_compat into a host's own Python from the host folder's own source, never from a package index.

The host folder (``extensions/lora-compat`` of a webui, ``custom_nodes/lora-compat`` of ComfyUI) is either a link
made by ``lora-compat install`` (it resolves into ``adapters/<host>`` of a lora-compat checkout) or a copy made by
``lora-compat install --copy`` (it carries the package source in ``lora_compat_src/``). Each host folder's
``install.py`` loads this file by path (lora_compat is not importable yet) and calls :func:`run`.

Standard library only: this runs in the host's Python before lora_compat is installed there.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Callable

#: the folder of a ``--copy`` install that holds the package source
BUNDLE = "lora_compat_src"
#: source folders of the package (checkout layout) → where they live inside an installed ``lora_compat``
PARTS = ("lora_compat", "hooks", "adapters")
_SKIP = {"__pycache__", "build", "dist"}


class NoSourceError(Exception):
    """The host folder carries no source of lora_compat and lora_compat is not installed."""


def is_source(root: Path) -> bool:
    """A folder pip can install lora_compat from: a pyproject naming lora-compat beside the package folders."""
    pyproject = root / "pyproject.toml"
    return (pyproject.is_file() and 'name = "lora-compat"' in pyproject.read_text(encoding="utf-8")
            and all((root / part / "__init__.py").is_file() for part in PARTS))


def find_source(folder: Path) -> Path | None:
    """The source inside a ``--copy`` folder, or the checkout a linked folder resolves into."""
    folder = Path(folder).resolve()
    for root in (folder / BUNDLE, folder.parent.parent):
        if is_source(root):
            return root
    return None


def installed_package() -> Path | None:
    """The folder of the ``lora_compat`` this Python imports (without importing it), or None."""
    spec = importlib.util.find_spec("lora_compat")
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).resolve().parent


def _installed_parts(package: Path) -> dict[str, Path]:
    """Where each source part lives in an installed package: inside it (wheel), or beside it (a checkout that is
    installed in editable mode)."""
    inside = (package / "hooks" / "__init__.py").is_file()
    base = package if inside else package.parent
    return {"lora_compat": package, "hooks": base / "hooks", "adapters": base / "adapters"}


def _files(root: Path, skip: set[Path]) -> dict[str, Path]:
    found = {}
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if (path.is_file() and not _SKIP.intersection(relative.parts) and path.suffix != ".pyc"
                and not any(path == s or s in path.parents for s in skip)):
            found[relative.as_posix()] = path
    return found


def up_to_date(source: Path, package: Path) -> bool:
    """The installed package is this source: the same Python files, and the same content of every data file
    both have (a wheel holds only the data files its package-data lists)."""
    if package == (source / "lora_compat").resolve():
        return True
    installed = _installed_parts(package)
    nested = {installed["hooks"], installed["adapters"]}
    for part in PARTS:
        ours = _files(source / part, set())
        theirs = _files(installed[part], nested if part == "lora_compat" else set())
        if {k for k in ours if k.endswith(".py")} != {k for k in theirs if k.endswith(".py")}:
            return False
        if any(ours[k].read_bytes() != theirs[k].read_bytes() for k in ours.keys() & theirs.keys()):
            return False
    return True


def run(folder: Path, pip_install: Callable[[Path], object], say: Callable[[str], object] = print) -> str:
    """Install lora_compat from the folder's source with ``pip_install(source)`` unless this Python already
    imports an up-to-date lora_compat. Returns ``"installed"`` or ``"up to date"``; raises NoSourceError."""
    folder = Path(folder)
    source = find_source(folder)
    package = installed_package()
    if source is None:
        if package is not None:  # e.g. a link into an installed (non-editable) lora_compat: nothing to compare
            return "up to date"
        raise NoSourceError(
            f"cannot install lora_compat into {sys.executable}: {folder} carries no lora_compat source (no "
            f"{BUNDLE}/ from `lora-compat install --copy`, and it is not a link into a lora-compat checkout); "
            "reinstall the folder with `lora-compat install <webui|comfyui> DIR --copy`")
    if package is not None and up_to_date(source, package):
        return "up to date"
    say(f"[lora_compat] installing lora_compat from {source} into {sys.executable}")
    pip_install(source)
    return "installed"
