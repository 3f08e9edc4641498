"""The architecture modules import each other without cycles, and each imports first in a fresh interpreter."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ARCHS = Path(__file__).resolve().parents[1] / "lora_compat" / "archs"
MODULES = sorted(p.stem for p in ARCHS.glob("*.py") if p.stem != "__init__")


def _archs_imports(module: str) -> set[str]:
    """Sibling modules of ``lora_compat.archs`` that ``module`` imports anywhere (top level or in a function)."""
    tree = ast.parse((ARCHS / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("lora_compat.archs."):
                found.add(node.module.split(".")[2])
    return found & set(MODULES)


def test_archs_import_graph_has_no_cycle():
    graph = {m: _archs_imports(m) for m in MODULES}
    assert graph["routes"] == set()
    assert "flux" not in graph["base"] and "sd" not in graph["base"]
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != "open", f"import cycle: {' -> '.join(path + [node, nxt])}"
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = "done"

    for module in MODULES:
        if module not in state:
            visit(module, [])


@pytest.mark.parametrize("module", MODULES)
def test_each_archs_module_imports_first(module):
    result = subprocess.run([sys.executable, "-c", f"import lora_compat.archs.{module}"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
