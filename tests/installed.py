"""A non-editable install of this checkout (``pip install --target``, from a copy of its source so the
checkout gets no build/ or egg-info), built once per test session; and the environment for running a Python that
has torch & co. but not the editable lora_compat."""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: this venv's packages, put on PYTHONPATH under ``python -S``: importable, but their .pth files (the editable
#: lora_compat's finder among them) are not run
PURELIB = Path(sysconfig.get_paths()["purelib"])


def pip_install(source: Path, target: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(source)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@lru_cache(maxsize=None)
def installed_site() -> Path:
    """A folder holding a non-editable install of the checkout (lora_compat and its dist-info)."""
    folder = Path(tempfile.mkdtemp(prefix="lora-compat-installed-"))
    atexit.register(shutil.rmtree, folder, True)
    source = folder / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("lora_compat", "hooks", "adapters"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip_install(source, folder / "site")
    return folder / "site"


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without PYTHON*/LORA_COMPAT* variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "LORA_COMPAT"))}
    env.update(extra)
    return env
