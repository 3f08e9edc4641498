"""What is searched for a LoRA: the text fields of its row, the BM25 document and the embedded text made from
them, and a search hit with the words that made it match."""
from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

from .retrieval import SEMANTIC_MIN, EmbeddingKey

WORD = re.compile(r"[a-z0-9]+")


@dataclass
class SearchResult:
    path: str
    score: float
    base: str | None
    dialect: str | None
    triggers: list[str]
    strength: float
    why: list[str]
    title: str

    def to_dict(self) -> dict:
        return asdict(self)


class EmbeddingEntry(NamedTuple):
    """A row's embedding cache key (file key, document digest) and the text embedded for it."""

    key: EmbeddingKey
    text: str


def _fields(row: sqlite3.Row) -> dict[str, str]:
    return {
        "trigger": " ".join(json.loads(row["triggers"] or "[]")),
        "tag": " ".join(json.loads(row["tags"] or "[]")),
        "title": row["title"] or "",
        "file name": re.sub(r"[_\-.]+", " ", Path(row["path"]).stem),
        "dataset": " ".join(json.loads(row["dataset_dirs"] or "[]")),
        "description": row["description"] or "",
        "example prompt": " ".join(json.loads(row["prompts"] or "[]")),
    }


def bm25_document(row: sqlite3.Row) -> str:
    fields = _fields(row)
    # triggers and titles count twice: they name what the LoRA is for
    return " ".join([fields["trigger"], fields["trigger"], fields["title"], fields["title"], *fields.values()])


def _semantic_text(row: sqlite3.Row) -> str:
    """What is embedded for a LoRA: its fields once each, in order of importance, without duplicates."""
    parts = [text.strip() for text in _fields(row).values() if text.strip()]
    return ". ".join(dict.fromkeys(parts))


def embedding_entry(row: sqlite3.Row) -> EmbeddingEntry:
    """The file key: the file's SHA-256, or without one (indexed with hashes off) a digest of its size, mtime and
    path; the digest of the embedded text (sidecars can change it); the text."""
    file_key = row["sha256"] or "stat:" + hashlib.sha256(
        f"{row['size']}:{row['mtime_ns']}:{row['path']}".encode("utf-8", "surrogateescape")).hexdigest()
    text = _semantic_text(row)
    return EmbeddingEntry((file_key, hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]), text)


def search_result(row: sqlite3.Row, score: float, words: set[str], similarity: float | None = None) -> SearchResult:
    why = []
    for name, text in _fields(row).items():
        hits = sorted(words & set(WORD.findall(text.lower())))
        if hits:
            why.append(f"{name}: {', '.join(hits)}")
    if similarity is not None and similarity >= SEMANTIC_MIN:
        why.append(f"semantic: {similarity:.2f}")
    return SearchResult(path=row["path"], score=round(score, 4), base=row["base"], dialect=row["dialect"],
                        triggers=json.loads(row["triggers"] or "[]"), strength=row["preferred_weight"] or 1.0,
                        why=why, title=row["title"] or "")
