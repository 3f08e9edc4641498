"""Run by the webui at launch (``python install.py``, with the webui's own Python): install lora_compat into the
webui's environment from this extension's own source (``lora_compat_src/`` of a ``lora-compat install --copy``
folder, or the checkout a ``lora-compat install`` link resolves into) through the webui's ``launch.run_pip``.
Nothing is fetched from a package index by name; an up-to-date lora_compat is left alone."""
from __future__ import annotations

import importlib.util
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


def main() -> int:
    installer = load_installer()
    if installer is None:
        print(f"[lora_compat] cannot install lora_compat: {FOLDER} carries no lora_compat source; reinstall the "
              "extension with `lora-compat install webui DIR --copy`", file=sys.stderr)
        return 1
    import launch  # the webui's own installer helpers

    def pip_install(source: Path) -> None:
        launch.run_pip(f'install "{source}"', f"lora_compat from {source}")

    try:
        installer.run(FOLDER, pip_install)
    except installer.NoSourceError as exc:
        print(f"[lora_compat] {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
