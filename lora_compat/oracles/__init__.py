"""Numerical oracles: real LoRA files written by the reference libraries (lycoris-lora, peft, diffusers) on tiny
random-config models, with what each library itself computes from them. The tests and ``lora-compat matrix``
use them; they need the ``[test]`` extra's libraries (``pip install "lora-compat[test]"``), and importing an
oracle module without them raises :class:`~lora_compat.errors.LoraCompatError` naming the missing package.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util

from ..errors import LoraCompatError

#: distribution → the module it provides
LIBRARIES = {"lycoris-lora": "lycoris", "toml": "toml", "peft": "peft", "diffusers": "diffusers",
             "transformers": "transformers"}


def require(*distributions: str) -> None:
    """Raise LoraCompatError naming every distribution (of ``LIBRARIES``, default all) that is not installed,
    and a peft older than the installed transformers or diffusers accept."""
    wanted = distributions or tuple(LIBRARIES)
    missing = [d for d in wanted if importlib.util.find_spec(LIBRARIES[d]) is None]
    if missing:
        raise LoraCompatError(f"the reference-library oracles need {', '.join(missing)} (not installed); "
                              'install them with: pip install "lora-compat[test]"')
    if "peft" in wanted:
        _check_peft()


def _check_peft() -> None:
    """transformers and diffusers refuse (ValueError, deep inside a run) a peft older than their minimum."""
    from packaging.version import Version

    peft = importlib.metadata.version("peft")
    for library, module in (("transformers", "transformers.integrations.peft"),
                            ("diffusers", "diffusers.utils.constants")):
        if importlib.util.find_spec(library) is None:
            continue
        try:
            minimum = getattr(importlib.import_module(module), "MIN_PEFT_VERSION", None)
        except ImportError:
            minimum = None
        if minimum is not None and Version(peft) < Version(minimum):
            raise LoraCompatError(f"{library} {importlib.metadata.version(library)} needs peft >= {minimum}, "
                                  f"but peft {peft} is installed: install peft >= {minimum} or a {library} that accepts "
                                  f"peft {peft}")
