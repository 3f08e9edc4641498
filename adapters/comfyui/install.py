"""Install lora_compat into ComfyUI's Python from this node folder's own source (``lora_compat_src/`` of a
``lora-compat install --copy`` folder, or the checkout a ``lora-compat install`` link resolves into) with
``sys.executable -m pip``. ComfyUI-Manager runs it (``python install.py``); the node package runs :func:`ensure`
on its first import when lora_compat is missing. Nothing is fetched from a package index by name; an
up-to-date lora_compat is left alone."""
from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

FOLDER = Path(__file__).absolute().parent  # as the host sees it (a link or a copy)
HERE = FOLDER.resolve()


def load_installer():
    """``adapters/host_install.py`` of the bundled source or of the checkout this folder links into."""
    for path in (HERE / "lora_compat_src" / "adapters" / "host_install.py", HERE.parent / "host_install.py"):
        if path.is_file():
            spec = importlib.util.spec_from_file_location("lora_compat_host_install", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    return None


def pip_install(source: Path) -> None:
    subprocess.check_call([sys.executable, "-m", "pip", "install", str(source)])


def install() -> str:
    """``"installed"`` or ``"up to date"``; raises RuntimeError with one line when there is nothing to install."""
    installer = load_installer()
    if installer is None:
        raise RuntimeError(f"cannot install lora_compat: {FOLDER} carries no lora_compat source; reinstall the node "
                           "folder with `lora-compat install comfyui DIR --copy`")
    try:
        return installer.run(FOLDER, pip_install)
    except installer.NoSourceError as exc:
        raise RuntimeError(str(exc)) from None


def ensure() -> None:
    """Make ``import lora_compat`` work in this process, installing it first; ImportError with one line if not."""
    try:
        install()
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        raise ImportError(f"[lora_compat] {exc}") from None
    importlib.invalidate_caches()
    importlib.import_module("lora_compat")


if __name__ == "__main__":
    try:
        install()
    except RuntimeError as exc:
        print(f"[lora_compat] {exc}", file=sys.stderr)
        sys.exit(1)
