"""``inspect``: everything the header says about a LoRA file, without reading tensor data."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .. import plugins
from ..detection import Source, detect
from ..patchset import PatchSet
from ..errors import UnmatchedKeysError

TOP_TAGS = 5


@dataclass
class Inspection:
    file: str
    format: str
    dialect: str
    base: str | None
    base_candidates: list[str]
    base_reason: str
    kinds: list[str]
    targets: int
    components: dict[str, int]
    rank: dict[str, int] | None
    tensors: int
    metadata: dict[str, str]
    triggers: list[str]
    unmatched: list[str]
    unmatched_reasons: dict[str, str]
    warnings: list[str] = field(default_factory=list)
    #: fused modules (BFL ``qkv``/``linear1``) the file covers only in part: present and absent parts
    partial: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    #: the variant of the base the shapes tell (``wan21-t2v-1.3b``, ``wan21-i2v-14b``); ``None`` when they cannot
    variant: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)


def inspect(source: Source, base: str | None = None, strict: bool = False) -> Inspection:
    """Dialect, base, kinds, targets, ranks, triggers and unmatched keys of a LoRA file, from its header.

    Raises :class:`NotALoraError` for textual inversions, checkpoints and the like, and
    :class:`CorruptFileError` / :class:`UnsafeFileError` for bad files. With ``strict``, unmatched keys raise.
    """
    detection = detect(source, base)
    patchset = detection.patchset
    file = detection.file
    ranks = [r for p in patchset.values() if (r := p.rank) is not None]
    unmatched = sorted(patchset.unmatched)
    if strict and unmatched:
        raise UnmatchedKeysError(f"{file.header.display_name}: {len(unmatched)} keys map to no module of "
                                 f"{detection.base or 'any known base'}: {', '.join(unmatched[:5])}", unmatched)
    return Inspection(
        file=file.header.display_name,
        format=file.format,
        dialect=detection.dialect.id,
        base=detection.base,
        base_candidates=detection.base_candidates,
        base_reason=detection.base_reason,
        kinds=patchset.kinds,
        targets=len(patchset),
        components=patchset.components(),
        rank={"min": min(ranks), "max": max(ranks)} if ranks else None,
        tensors=len(file),
        metadata=dict(file.metadata),
        triggers=triggers(file.metadata, file.path),
        unmatched=unmatched,
        unmatched_reasons=dict(sorted(patchset.unmatched.items())),
        warnings=list(dict.fromkeys(patchset.warnings)),
        partial=partial_groups(patchset, detection.base or next(iter(detection.base_candidates), None)),
        variant=detection.variant,
    )


def partial_groups(patchset: PatchSet, base: str | None) -> dict[str, dict[str, list[str]]]:
    """Fused modules of which the file patches some parts but not all (the rest are zero deltas)."""
    arch = plugins.archs().get(base) if base else None
    if arch is None:
        return {}
    result = {}
    for component in arch.index.components:
        for fused, parts in arch.index.fused_modules(component).items():
            if len(parts) < 2:
                continue
            present = [p.target for p in parts if f"{component}.{p.target}" in patchset.patches]
            if present and len(present) < len(parts):
                result[f"{component}.{fused}"] = {"present": present,
                                                  "absent": [p.target for p in parts if p.target not in present]}
    return result


def triggers(metadata: Mapping[str, str], path: Path | None = None) -> list[str]:
    """Trigger words: sidecar activation text / Civitai trainedWords, modelspec.trigger_phrase, top tags."""
    found: list[str] = []
    if path is not None:
        found += _sidecar_triggers(path)
    phrase = metadata.get("modelspec.trigger_phrase", "")
    found += [p.strip() for p in phrase.split(",") if p.strip()]
    found += _top_tags(metadata.get("ss_tag_frequency", ""))
    return list(dict.fromkeys(found))


def _top_tags(raw: str) -> list[str]:
    try:
        frequency = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return []
    counts: Counter[str] = Counter()
    if isinstance(frequency, dict):
        for tags in frequency.values():
            if isinstance(tags, dict):
                for tag, count in tags.items():
                    if isinstance(count, (int, float)):
                        counts[tag.strip()] += count
    return [tag for tag, _ in counts.most_common(TOP_TAGS) if tag]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _sidecar_triggers(path: Path) -> list[str]:
    found: list[str] = []
    a1111 = _read_json(path.with_suffix(".json"))
    if isinstance(a1111, dict) and isinstance(a1111.get("activation text"), str):
        found += [t.strip() for t in a1111["activation text"].split(",") if t.strip()]
    civitai = _read_json(path.with_suffix(".civitai.info"))
    if isinstance(civitai, dict) and isinstance(civitai.get("trainedWords"), list):
        found += [str(t).strip() for t in civitai["trainedWords"] if str(t).strip()]
    return found
