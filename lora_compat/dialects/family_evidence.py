"""LoRA modules only another family has: what keeps a file whose other names fit FLUX.1 from being read as a
FLUX.1 LoRA. Qwen-Image's ``transformer_blocks.N.attn.to_q`` at width 3072, FLUX.2's BFL ``double_blocks`` and a
HunyuanVideo diffusers file are FLUX.1 names and shapes too; only their family's own modules tell them apart."""
from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import repeat
from typing import Collection

from ..files import Header


#: metadata entries trainers name the base model in (sd-scripts/musubi, the modelspec)
METADATA_KEYS = ("ss_base_model_version", "modelspec.architecture")


@dataclass(frozen=True)
class Evidence:
    """Keys matching one of ``patterns`` are modules (``what``) that no base in ``vetoes`` has; a value matching
    ``named`` in :data:`METADATA_KEYS` names the family. ``base``: the family's base id; once that base is
    registered, shapes decide between it and the others and this entry stands down. Each pattern starts with
    a literal, which keeps the search over a whole file's keys a fast scan."""

    what: str
    base: str | None
    patterns: tuple[re.Pattern[str], ...]
    named: re.Pattern[str] | None = None
    #: FLUX.2 has FLUX.1's attention names too (Klein 4B at FLUX.1's width) and none of these families' modules
    vetoes: tuple[str, ...] = ("flux1", "flux2")


def _patterns(*sources: str) -> tuple[re.Pattern[str], ...]:
    return tuple(map(re.compile, sources))


#: block indices FLUX.1 lacks: 19 double-stream blocks (0-18) and 38 single-stream ones (0-37)
_PAST_18, _PAST_37 = r"[._](?:19|[2-9]\d|\d{3,})[._]", r"[._](?:3[89]|[4-9]\d|\d{3,})[._]"

EVIDENCE: tuple[Evidence, ...] = (
    Evidence("FLUX.2 modules", "flux2", _patterns(r"stream_modulation(?:_img|_txt)?[._]lin", r"to_qkv_mlp_proj"),
             re.compile(r"flux[-_. ]?2", re.I)),
    Evidence("Qwen-Image modules", "qwen-image", _patterns(r"transformer_blocks[._]\d+[._](?:img|txt)_(?:mlp|mod)[._]"),
             re.compile(r"qwen[-_ ]?image", re.I)),
    Evidence("Chroma modules", "chroma", _patterns(r"distilled_guidance_layer[._]"), re.compile(r"chroma", re.I)),
    Evidence("HunyuanVideo modules", "hunyuan-video", _patterns(r"token_refiner[._]"),
             re.compile(r"hunyuan[-_ ]?video", re.I)),
    Evidence("blocks deeper than FLUX.1 has", None, _patterns(
        "double_blocks" + _PAST_18, "transformer_blocks(?<!single_transformer_blocks)" + _PAST_18,
        "single_blocks" + _PAST_37, "single_transformer_blocks" + _PAST_37), vetoes=("flux1",)),
)


def foreign_modules(header: Header, bases: Collection[str], registered: Collection[str]) -> list[tuple[Evidence, str]]:
    """``(evidence, the key or metadata entry that shows it)`` for each family (not registered) that the file's
    own modules or metadata name and that rules out one of ``bases``. One search per entry over the keys joined
    into one text."""
    entries = [e for e in EVIDENCE if (e.base is None or e.base not in registered) and set(e.vetoes) & set(bases)]
    if not entries:
        return []
    text = "\n".join(header.keys())
    named = [(k, str(header.metadata[k])) for k in METADATA_KEYS if k in header.metadata]
    found = []
    for entry in entries:
        hit = next((h for h in map(re.Pattern.search, entry.patterns, repeat(text)) if h is not None), None)
        if hit is not None:
            start = text.rfind("\n", 0, hit.start()) + 1
            end = text.find("\n", hit.end())
            found.append((entry, text[start:end if end >= 0 else len(text)]))
            continue
        shown = next((f"{k}={v}" for k, v in named if entry.named is not None and entry.named.search(v)), None)
        if shown is not None:
            found.append((entry, shown))
    return found
