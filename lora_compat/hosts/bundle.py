"""An installable copy of the package source, for ``lora-compat install --copy``: the host folder then carries
what its ``install.py`` installs into the host's Python (no package index has lora-compat).

The copy has the checkout's layout (``pyproject.toml``, ``lora_compat/``, ``hooks/``, ``adapters/``). From a
checkout (an editable install) the files are copied as they are; from an installed wheel, which has no
pyproject, the package is split back into that layout and a minimal ``pyproject.toml`` is written from the
installed distribution's metadata (name, version, Python, dependencies, entry points, package data).
"""
from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
from pathlib import Path

from ..errors import LoraCompatError

DISTRIBUTION = "lora-compat"
#: the folder of a ``--copy`` host folder that holds the source (adapters/host_install.py looks for this name)
BUNDLE = "lora_compat_src"
#: package → its folder in the checkout layout
PACKAGE_DIRS = {"lora_compat": "lora_compat", "lora_compat.hooks": "hooks", "lora_compat.adapters": "adapters"}
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")


def checkout_root() -> Path | None:
    """The checkout this lora_compat is imported from (editable install), or None for an installed wheel."""
    import lora_compat

    root = Path(lora_compat.__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and 'name = "lora-compat"' in pyproject.read_text(encoding="utf-8") and all(
            (root / folder / "__init__.py").is_file() for folder in PACKAGE_DIRS.values()):
        return root
    return None


def write_source(dest: Path) -> Path:
    """Write an installable copy of the running lora_compat into ``dest`` (created; must not exist)."""
    dest = Path(dest)
    root = checkout_root()
    if root is not None:
        dest.mkdir(parents=True)
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (root / name).is_file():
                shutil.copy2(root / name, dest / name)
        for folder in PACKAGE_DIRS.values():
            shutil.copytree(root / folder, dest / folder, ignore=_IGNORE)
        return dest
    import lora_compat

    package = Path(lora_compat.__file__).resolve().parent

    def ignore(folder: str, names: list[str]) -> set[str]:  # hooks/ and adapters/ go beside lora_compat/
        nested = {"hooks", "adapters"} if Path(folder) == package else set()
        return set(_IGNORE(folder, names)) | (nested & set(names))

    dest.mkdir(parents=True)
    shutil.copytree(package, dest / "lora_compat", ignore=ignore)
    for name in ("hooks", "adapters"):
        shutil.copytree(package / name, dest / name, ignore=_IGNORE)
    (dest / "pyproject.toml").write_text(minimal_pyproject(dest), encoding="utf-8")
    return dest


def _toml(value: object) -> str:
    """A TOML value for strings, lists of strings and tables of those (JSON strings are TOML basic strings)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


def _packages(dest: Path) -> dict[str, list[str]]:
    """Every package of the checkout-layout tree in ``dest`` → its data files (the files that are not its
    modules, relative to its folder, e.g. ``tables/sd15.json.gz`` or ``scripts/lora_compat_script.py``)."""
    owners: dict[Path, str] = {}
    for package, folder in PACKAGE_DIRS.items():
        for init in (dest / folder).rglob("__init__.py"):
            owners[init.parent] = ".".join([package, *init.parent.relative_to(dest / folder).parts])
    found: dict[str, list[str]] = {name: [] for name in sorted(owners.values())}
    for folder in PACKAGE_DIRS.values():
        for path in sorted((dest / folder).rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            owner = next(parent for parent in path.parents if parent in owners)
            if not (path.suffix == ".py" and path.parent == owner):
                found[owners[owner]].append(path.relative_to(owner).as_posix())
    return found


def minimal_pyproject(dest: Path) -> str:
    """A pyproject.toml for the checkout-layout tree in ``dest``, from the installed distribution's metadata."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise LoraCompatError(f"cannot copy lora_compat's source: it is neither a checkout nor an installed "
                              f"{DISTRIBUTION} distribution") from None
    requires = [r for r in dist.requires or [] if not re.search(r"extra\s*==", r)]
    scripts: dict[str, str] = {}
    groups: dict[str, dict[str, str]] = {}
    for entry in dist.entry_points:
        if entry.group == "console_scripts":
            scripts[entry.name] = entry.value
        else:
            groups.setdefault(entry.group, {})[entry.name] = entry.value
    packages = _packages(dest)
    lines = ["# written by `lora-compat install --copy` from the installed distribution's metadata",
             "[build-system]", 'requires = ["setuptools>=68"]', 'build-backend = "setuptools.build_meta"', "",
             "[project]", f'name = "{DISTRIBUTION}"', f"version = {_toml(dist.version)}"]
    if dist.metadata.get("Requires-Python"):
        lines.append(f"requires-python = {_toml(dist.metadata['Requires-Python'])}")
    lines += [f"dependencies = {_toml(requires)}", ""]
    if scripts:
        lines += ["[project.scripts]", *(f"{_toml(k)} = {_toml(v)}" for k, v in scripts.items()), ""]
    for group, entries in groups.items():
        lines += [f"[project.entry-points.{_toml(group)}]", *(f"{_toml(k)} = {_toml(v)}" for k, v in entries.items()),
                  ""]
    lines += ["[tool.setuptools]", f"package-dir = {_toml(PACKAGE_DIRS)}", f"packages = {_toml(list(packages))}",
              "", "[tool.setuptools.package-data]",
              *(f"{_toml(k)} = {_toml(v)}" for k, v in packages.items() if v)]
    return "\n".join(lines) + "\n"
