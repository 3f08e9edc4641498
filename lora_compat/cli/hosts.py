"""``install``: lora-compat into a webui or ComfyUI."""
from __future__ import annotations

import argparse

from .parsing import Command, arg


def cmd_install(args: argparse.Namespace) -> int:
    """add lora-compat to a webui (extensions/) or ComfyUI (custom_nodes/)

    Link (or copy) lora-compat's host folder into a webui's extensions/ (AUTOMATIC1111, Forge, SD.Next) or ComfyUI's
    custom_nodes/. Idempotent."""
    from ..hosts.install import install

    target, state = install(args.host, args.dir, copy=args.copy)
    print(f"{state}: {target}")
    return 0


INSTALL = Command("install", cmd_install, (
    arg("host", choices=["webui", "comfyui"]),
    arg("dir", metavar="DIR", help="the webui or ComfyUI directory"),
    arg("--copy", action="store_true", help="copy the folder instead of linking it"),
))
