"""The package layout: the pipeline, the tools and the hosts apart; the modules' earlier names still import."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import lora_compat

PACKAGE = Path(lora_compat.__file__).parent
#: the pipeline: files, detection, dialects, kinds, families, the patcher and what they share
PIPELINE = [p for p in PACKAGE.glob("*.py")] + [p for d in ("dialects", "patches", "archs", "patcher")
                                                 for p in (PACKAGE / d).rglob("*.py")]


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (module level or inside functions), as absolute names."""
    package = ".".join(("lora_compat",) + path.relative_to(PACKAGE).parent.parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("path", sorted(PIPELINE), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_pipeline_imports_no_host(path: Path) -> None:
    """The core never imports a host adapter nor what is written for the hosts."""
    hosts = sorted(m for m in _imports(path) if m.startswith(("lora_compat.adapters", "lora_compat.hosts")))
    assert hosts == []


@pytest.mark.parametrize("earlier, now, name", [
    ("lora_compat.bake", "lora_compat.tools.bake", "bake"),
    ("lora_compat.fuse", "lora_compat.tools.merge", "merge"),
    ("lora_compat.library", "lora_compat.tools.library", "Library"),
    ("lora_compat.core", "lora_compat.detection", "detect"),
    ("lora_compat.apply", "lora_compat.models", "patched_weights"),
    ("lora_compat.conversion", "lora_compat.tools.convert", "convert_state_dict"),
    ("lora_compat.hostkeys", "lora_compat.hosts.convert", "convert_for_host"),
])
def test_earlier_module_names_still_import(earlier: str, now: str, name: str) -> None:
    assert importlib.import_module(earlier) is importlib.import_module(now)
    assert getattr(importlib.import_module(earlier), name) is getattr(importlib.import_module(now), name)


def test_a_submodule_under_an_earlier_name_is_the_same_module() -> None:
    import lora_compat.library.store as earlier
    import lora_compat.tools.library.store as now

    assert earlier is now
