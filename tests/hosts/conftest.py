"""The real-host tests: lora_compat's adapters driven through the real LoRA code of ComfyUI, A1111 v1.8.0, Forge
and SD.Next (the pinned copies in ``shared/hosts``), not through doubles.

Run separately from the self-contained suite, with the hosts' folder given explicitly:
``python -m pytest -q tests/hosts --hosts-dir ../shared/hosts`` (or ``LORA_COMPAT_HOSTS=../shared/hosts``).
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))  # the shared test helpers (flux_models, corpus, ...)

#: a file each host folder must hold (the pinned copies' README lists them)
HOST_MARKERS = {"comfyui": "comfy/lora.py", "a1111": "extensions-builtin/Lora/networks.py",
                "forge": "backend/patcher/lora.py", "sdnext": "modules/lora/extra_networks_lora.py"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--hosts-dir", default=os.environ.get("LORA_COMPAT_HOSTS"),
                     help="folder holding the pinned real host code (comfyui/, a1111/, forge/, sdnext/); "
                          "default: $LORA_COMPAT_HOSTS")


def pytest_configure(config: pytest.Config) -> None:
    value = config.getoption("--hosts-dir", default=None)
    if not value:
        raise pytest.UsageError("tests/hosts drives the real host code: pass --hosts-dir ../shared/hosts "
                                "(or set LORA_COMPAT_HOSTS)")
    root = Path(value).resolve()
    missing = [f"{host}/{marker}" for host, marker in HOST_MARKERS.items() if not (root / host / marker).is_file()]
    if missing:
        raise pytest.UsageError(f"--hosts-dir {root}: not the pinned host code; missing {', '.join(missing)}")
    config.lora_compat_hosts = root  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def hosts_dir(request: pytest.FixtureRequest) -> Path:
    return request.config.lora_compat_hosts  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def comfy(hosts_dir):
    """ComfyUI's real LoRA code, imported with stubs for the rest of ComfyUI (one environment per test module)."""
    from hoststubs import comfy_env

    env, host = comfy_env(hosts_dir)
    yield host
    env.close()


@pytest.fixture(scope="session")
def sd15():
    from lora_compat.oracles.models import make_sd15_components

    return make_sd15_components(seed=100)


@pytest.fixture(scope="session")
def sd_files(sd15, tmp_path_factory) -> dict[str, Path]:
    """Every LyCORIS algorithm and the diffusers/PEFT variants, written by the real libraries for ``sd15``."""
    from hostmodels import SD_FILES
    from lora_compat.oracles.lycoris_oracle import write_lycoris_file
    from lora_compat.oracles.peft_oracle import write_peft_file

    import lora_compat

    warnings.filterwarnings("ignore", category=lora_compat.LoraCompatWarning)
    root = tmp_path_factory.mktemp("host-files")
    files = {}
    for library, variant in SD_FILES:
        (root / variant).mkdir()
        writer = write_lycoris_file if library == "lycoris" else write_peft_file
        files[variant] = writer(root / variant, sd15, variant)[0]
    return files
