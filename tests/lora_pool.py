"""A session-wide pool of real LoRA files of every kind for the tiny SD1.5 topology, written once."""
from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

import lora_compat
from lora_compat.files import LoraFile

from lora_compat.oracles.lycoris_oracle import write_lycoris_file
from lora_compat.oracles.models import make_sd15_components
from lora_compat.oracles.peft_oracle import write_peft_file

KINDS = ["lora", "lora_tucker", "loha", "lokr", "lokr_tucker", "ia3", "glora", "diag_oft", "boft", "full", "norm",
         "dora_out", "dora_in", "loha_dora"]


@lru_cache(maxsize=None)
def lora_files() -> dict[str, Path]:
    """One real file per kind (lycoris-lora), plus a PEFT DoRA file (diffusers save_lora_weights)."""
    root = Path(tempfile.mkdtemp(prefix="lora-pool-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    components = make_sd15_components(seed=100)
    files = {}
    for i, kind in enumerate(KINDS):
        (root / kind).mkdir()
        files[kind], _ = write_lycoris_file(root / kind, components, kind, seed=i)
    (root / "peft").mkdir()
    files["peft_dora"], _ = write_peft_file(root / "peft", components, "diffusers_dora")
    return files


def breaking_file(path: Path, fail_on: int) -> LoraFile:
    """The real file, whose ``fail_on``-th tensor read fails as a file truncated on disk would."""
    real = LoraFile.open(path)
    reads = {"n": 0}

    def load(name: str) -> torch.Tensor:
        reads["n"] += 1
        if reads["n"] >= fail_on:
            raise lora_compat.CorruptFileError(f"{path}: tensor {name!r} is truncated (0 of 64 bytes)")
        return real.tensor(name)

    return LoraFile(real.header, load, "safetensors")
