"""Install a one-module plugin distribution with a ``lora_compat`` entry point, as a third party would ship it."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from lora_compat.hooks import ENTRY_POINT_GROUP


def install_plugin(tmp_path: Path, module: str, source: str, entry: str) -> dict[str, str]:
    """Build ``module`` (``source`` as its ``__init__.py``) into a distribution whose entry point ``entry`` names
    it, install it into a target folder, and return an environment whose Python finds it."""
    package = tmp_path / "src"
    (package / module).mkdir(parents=True)
    (package / module / "__init__.py").write_text(source)
    (package / "pyproject.toml").write_text(textwrap.dedent(f"""
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "{module.replace("_", "-")}"
        version = "1.0"
        [project.entry-points.{ENTRY_POINT_GROUP}]
        {entry} = "{module}"
        [tool.setuptools]
        packages = ["{module}"]
    """))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(package)], check=True, capture_output=True)
    return {**os.environ, "PYTHONPATH": str(target)}
