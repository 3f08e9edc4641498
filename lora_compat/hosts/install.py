"""``lora-compat install webui|comfyui DIR``: link (or copy) the host folder shipped in the package into the host.

A link resolves into the package's own folder (a checkout, for an editable install); a copy also carries an
installable copy of the package source (``lora_compat_src/``). Either way the folder's ``install.py`` installs
lora_compat into the host's own Python from that source, never from a package index.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import LoraCompatError

FOLDER_NAME = "lora-compat"
#: host → (package folder, sub-directory of the host, files/dirs that identify the host)
HOSTS = {
    "webui": ("webui", "extensions", (("launch.py", "webui.py"), ("modules",))),
    "comfyui": ("comfyui", "custom_nodes", (("main.py",), ("nodes.py",), ("comfy",))),
}


def source_folder(host: str) -> Path:
    from lora_compat import adapters

    return Path(adapters.__file__).parent / HOSTS[host][0]


def check_host(host: str, root: Path) -> None:
    """Refuse a directory that is not that host (each group of names needs one present)."""
    if not root.is_dir():
        raise LoraCompatError(f"{root}: no such directory")
    missing = [" or ".join(group) for group in HOSTS[host][2] if not any((root / name).exists() for name in group)]
    if missing:
        label = {"webui": "a stable-diffusion-webui (AUTOMATIC1111, Forge, SD.Next)", "comfyui": "a ComfyUI"}[host]
        raise LoraCompatError(f"{root} is not {label} directory: missing {', '.join(missing)}")


def install(host: str, root: str | Path, copy: bool = False) -> tuple[Path, str]:
    """Put the host folder at ``<root>/<extensions|custom_nodes>/lora-compat``. Idempotent; returns the path
    and what happened (``linked``, ``copied``, ``already installed``, ``updated``)."""
    if host not in HOSTS:
        raise LoraCompatError(f"unknown host {host!r}; choose from {', '.join(HOSTS)}")
    root = Path(root).expanduser().resolve()
    check_host(host, root)
    source = source_folder(host)
    target = root / HOSTS[host][1] / FOLDER_NAME
    target.parent.mkdir(exist_ok=True)
    if target.is_symlink():
        if not copy and target.resolve() == source.resolve():
            return target, "already installed"
        target.unlink()
        state = "updated"
    elif target.exists():
        if not (target / ".lora-compat").exists():
            raise LoraCompatError(f"{target} exists and was not installed by lora-compat; remove it first")
        shutil.rmtree(target)
        state = "updated"
    else:
        state = "copied" if copy else "linked"
    if copy:
        from .bundle import BUNDLE, write_source

        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        write_source(target / BUNDLE)
        (target / ".lora-compat").write_text("installed by `lora-compat install`\n")
    else:
        target.symlink_to(source, target_is_directory=True)
    return target, state
