"""Run by the webui at launch (a subprocess): install the lora-compat package into the webui's environment."""
from __future__ import annotations

import importlib.util

if importlib.util.find_spec("lora_compat") is None:
    import launch  # the webui's own installer helpers

    launch.run_pip("install lora-compat", "lora-compat (LoRA dialects for the webui)")
