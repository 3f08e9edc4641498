"""The library itself: :class:`Library`, a SQLite-backed index of LoRA files that indexes folders
incrementally, keeps the BM25 index and the document embeddings in step with its rows, and searches them."""
from __future__ import annotations

import os
import sqlite3
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np

from ...errors import LoraCompatError
from .retrieval import (SEMANTIC_DIMENSION, SEMANTIC_INSTALL, SEMANTIC_MODEL_ID, EmbeddingKey, _Bm25Index,
                         _build_bm25, _load_bm25, _rank, _save_bm25, load_embedder, semantic_available)
from . import schema
from .documents import WORD, SearchResult, bm25_document, embedding_entry, search_result
from .entries import describe_file, walk


@dataclass
class IndexReport:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    failed: int = 0
    removed: int = 0
    seconds: float = 0.0
    errors: dict[str, str] = field(default_factory=dict)


class _Vectors(NamedTuple):
    """The document embeddings of one BM25 index (its stamp), one row per path."""

    stamp: str
    matrix: np.ndarray


class Library:
    """A SQLite-backed index of LoRA files (WAL mode; safe to read while another process indexes).

    ``semantic``: fuse BM25 with MiniLM similarity in :meth:`search` and embed new files in :meth:`index`;
    None uses it when the ``[semantic]`` extra is installed, True requires it.
    """

    def __init__(self, db: str | os.PathLike | None = None, *, semantic: bool | None = None):
        if semantic and not semantic_available():
            raise LoraCompatError(f"semantic search needs the [semantic] extra: {SEMANTIC_INSTALL}")
        self.semantic = semantic
        self.path = Path(db) if db is not None else schema.default_db()
        if self.path.is_dir():
            raise LoraCompatError(f"{self.path}: is a folder; --db names the library's database file")
        if not self.path.exists():
            schema.create(self.path)
        self.db = sqlite3.connect(self.path)
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.row_factory = sqlite3.Row
            schema.upgrade(self.db, self.path)
        except sqlite3.DatabaseError as exc:
            self.db.close()
            raise LoraCompatError(f"{self.path}: not a lora-compat library database ({exc})") from exc
        self._bm25: _Bm25Index | None = None
        self._vectors: _Vectors | None = None
        #: where the BM25 index in use came from: "built", "loaded" (from the saved copy) or None (not yet)
        self.bm25_source: str | None = None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Library":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        return schema.schema_version(self.db)

    @property
    def generation(self) -> str:
        """``<library id>-<counter>``: changes whenever :meth:`index` adds, changes or removes a row."""
        state = {row["key"]: row["value"] for row in self.db.execute(
            "SELECT key, value FROM library_state WHERE key IN ('library_id', 'generation')")}
        return f"{state.get('library_id', '')}-{state.get('generation', '0')}"

    @property
    def bm25_cache(self) -> Path:
        """The folder where the BM25 index is saved between processes."""
        return self.path.with_name(self.path.name + ".bm25")

    def _bump_generation(self) -> None:
        """Called inside the transaction that changes rows, so no reader sees the change without the bump."""
        self.db.execute("INSERT INTO library_state (key, value) VALUES ('generation', '1') ON CONFLICT (key) "
                        "DO UPDATE SET value = CAST(value AS INTEGER) + 1")

    @contextmanager
    def _snapshot(self) -> Iterator[None]:
        """One read transaction, so the generation and the rows read within it belong together."""
        if self.db.in_transaction:
            yield
            return
        self.db.execute("BEGIN")
        try:
            yield
        finally:
            self.db.execute("COMMIT")

    def _use_semantic(self, semantic: bool | None) -> bool:
        choice = self.semantic if semantic is None else semantic
        if choice is None:
            return semantic_available()
        if choice and not semantic_available():
            raise LoraCompatError(f"semantic search needs the [semantic] extra: {SEMANTIC_INSTALL}")
        return choice

    # -- indexing ---------------------------------------------------------------------------------------------
    def index(self, dirs: Iterable[str | os.PathLike], *, hashes: bool = True, progress: bool = False,
              on_file: Callable[[Path], None] | None = None) -> IndexReport:
        """Index every LoRA file under ``dirs`` (recursively); only new or changed files are read. With semantic
        search on, the new documents are embedded too. A folder (or file) that does not exist is refused
        before anything is read or changed."""
        dirs = list(dirs)
        missing = [str(d) for d in dirs if not Path(d).exists()]
        if missing:
            raise LoraCompatError(f"{', '.join(missing)}: no such folder or file; nothing indexed")
        start = time.perf_counter()
        report = IndexReport()
        known = {row["path"]: (row["size"], row["mtime_ns"]) for row in
                 self.db.execute("SELECT path, size, mtime_ns FROM loras")}
        seen: set[str] = set()
        files = sorted(walk(dirs))
        for number, path in enumerate(files, 1):
            key = str(path)
            seen.add(key)
            stat = path.stat()
            if known.get(key) == (stat.st_size, stat.st_mtime_ns):
                report.unchanged += 1
            else:
                if on_file is not None:
                    on_file(path)
                row = describe_file(path, stat, hashes)
                with self.db:
                    self.db.execute(f"INSERT OR REPLACE INTO loras ({', '.join(row)}) VALUES "
                                    f"({', '.join('?' for _ in row)})", list(row.values()))
                    self._bump_generation()
                if row["status"] != "ok":
                    report.failed += 1
                    report.errors[key] = row["error"]
                elif key in known:
                    report.updated += 1
                else:
                    report.added += 1
            if progress and (number % 50 == 0 or number == len(files)):
                print(f"\rindex: {number}/{len(files)} files", end="", file=sys.stderr, flush=True)
        if progress and files:
            print(file=sys.stderr)
        roots = [str(Path(d).resolve()) for d in dirs]
        gone = [p for p in known if p not in seen and any(p.startswith(r + os.sep) for r in roots)]
        if gone:
            with self.db:
                self.db.executemany("DELETE FROM loras WHERE path = ?", [(p,) for p in gone])
                self._bump_generation()
        report.removed = len(gone)
        if report.added or report.updated or report.removed or report.failed:
            self._prune_embeddings()
            self._index()  # build and save the BM25 index now, so the next search (process) just loads it
        if self._use_semantic(None):
            self._ensure_embeddings(self.rows(), progress=progress)
        report.seconds = time.perf_counter() - start
        return report

    def rows(self, status: str | None = "ok") -> list[sqlite3.Row]:
        query = "SELECT * FROM loras" + (" WHERE status = ?" if status else "") + " ORDER BY path"
        return self.db.execute(query, (status,) if status else ()).fetchall()

    # -- embeddings -------------------------------------------------------------------------------------------
    def _ensure_embeddings(self, rows: list[sqlite3.Row], progress: bool = False) -> dict[EmbeddingKey, np.ndarray]:
        """Embed the documents of ``rows`` that have no cached embedding; returns the new ones (also stored,
        unless the database cannot be written now). The model is loaded only when something is missing."""
        return self._embed_missing(dict(embedding_entry(row) for row in rows), progress)

    def _embed_missing(self, wanted: dict[EmbeddingKey, str], progress: bool = False) -> dict[EmbeddingKey, np.ndarray]:
        stored = {tuple(key) for key in self.db.execute(
            "SELECT file_key, doc_digest FROM embeddings WHERE model = ?", (SEMANTIC_MODEL_ID,))}
        missing = [key for key in wanted if key not in stored]
        if not missing:
            return {}
        if progress:
            print(f"embedding {len(missing)} documents for semantic search", file=sys.stderr, flush=True)
        vectors = load_embedder().encode([wanted[key] for key in missing])
        records = [(*key, SEMANTIC_MODEL_ID, vector.tobytes()) for key, vector in zip(missing, vectors)]
        try:
            with self.db:
                self.db.executemany("INSERT OR REPLACE INTO embeddings (file_key, doc_digest, model, vector) "
                                    "VALUES (?, ?, ?, ?)", records)
        except sqlite3.Error:
            pass  # read-only or busy: this process still uses them
        return dict(zip(missing, vectors))

    def _prune_embeddings(self) -> None:
        """Drop embeddings no row needs any more (files removed or changed, documents edited)."""
        wanted = {embedding_entry(row).key for row in self.rows()}
        stale = [tuple(key) for key in self.db.execute("SELECT file_key, doc_digest FROM embeddings")
                 if tuple(key) not in wanted]
        if stale:
            with self.db:
                self.db.executemany("DELETE FROM embeddings WHERE file_key = ? AND doc_digest = ?", stale)

    def _vector_matrix(self, index: _Bm25Index) -> np.ndarray:
        """The document embeddings, one row per path of ``index`` (zeros where a row has gone meanwhile)."""
        if self._vectors is not None and self._vectors.stamp == index.stamp:
            return self._vectors.matrix
        entries = {row["path"]: embedding_entry(row) for row in self.rows()}
        vectors = self._embed_missing(dict(entries.values()))
        for file_key, digest, blob in self.db.execute(
                "SELECT file_key, doc_digest, vector FROM embeddings WHERE model = ?", (SEMANTIC_MODEL_ID,)):
            vectors.setdefault((file_key, digest), np.frombuffer(blob, np.float32))
        matrix = np.zeros((len(index.paths), SEMANTIC_DIMENSION), np.float32)
        for number, path in enumerate(index.paths):
            vector = vectors.get(entries[path].key) if path in entries else None
            if vector is not None and len(vector) == SEMANTIC_DIMENSION:
                matrix[number] = vector
        self._vectors = _Vectors(index.stamp, matrix)
        return matrix

    # -- search -------------------------------------------------------------------------------------------------
    def _index(self) -> _Bm25Index:
        """The BM25 index of the current generation: kept in memory, else loaded from the saved copy, else
        built (and saved for the next process)."""
        with self._snapshot():
            stamp = self.generation
            if self._bm25 is not None and self._bm25.stamp == stamp:
                return self._bm25
            entries = self.db.execute("SELECT path, base FROM loras WHERE status = 'ok' ORDER BY path").fetchall()
            paths = [row["path"] for row in entries]
            retriever, self.bm25_source = None, None
            if paths:
                retriever, self.bm25_source = _load_bm25(self.bm25_cache / stamp, stamp, paths), "loaded"
            if retriever is None and paths:
                retriever, self.bm25_source = _build_bm25([bm25_document(row) for row in self.rows()]), "built"
                _save_bm25(self.bm25_cache, stamp, retriever, paths)
        self._bm25 = _Bm25Index(stamp, retriever, paths, np.array([row["base"] for row in entries], dtype=object))
        return self._bm25

    def _bm25_scores(self, index: _Bm25Index, prompt: str) -> np.ndarray:
        import bm25s

        tokens = bm25s.tokenize([prompt], stopwords="en", return_ids=False, show_progress=False)[0]
        tokens = [t for t in tokens if t in index.retriever.vocab_dict]
        if not tokens:
            return np.zeros(len(index.paths), np.float32)
        return np.asarray(index.retriever.get_scores(tokens), np.float32)

    def search(self, prompt: str, base: str | None = None, k: int = 5,
               semantic: bool | None = None) -> list[SearchResult]:
        """The ``k`` LoRAs that best match ``prompt``, only LoRAs for ``base`` when given.

        BM25 alone, or with ``semantic`` BM25 and embedding similarity fused by reciprocal rank (``score`` is
        then the fused score, 1.0 for a LoRA first in both rankings; ``why`` ends with "semantic: 0.xx" when
        the similarity counts). ``semantic=None`` follows the library's setting, by default on when the
        ``[semantic]`` extra is installed."""
        use_semantic = self._use_semantic(semantic)
        index = self._index()
        if base is not None and base not in set(index.bases):
            self.check_base(base)
        if not index.paths:
            return []
        allowed = np.ones(len(index.paths), bool) if base is None else index.bases == base
        lexical = self._bm25_scores(index, prompt)
        similarity = None
        if use_semantic:
            similarity = load_embedder().similarities(self._vector_matrix(index), prompt)
        ranked = _rank(lexical, similarity, allowed, k)
        rows = self._rows_for([index.paths[i] for i, _ in ranked])
        words = set(WORD.findall(prompt.lower()))
        return [search_result(rows[index.paths[i]], score, words, None if similarity is None else float(similarity[i]))
                for i, score in ranked if index.paths[i] in rows]

    def check_base(self, base: str) -> None:
        """Raise unless ``base`` is a registered base or a base of some indexed LoRA (checked on the rare path
        only: the registry imports the architectures)."""
        indexed = {row[0] for row in self.db.execute("SELECT DISTINCT base FROM loras WHERE base IS NOT NULL")}
        if base in indexed:
            return
        from ... import plugins

        known = sorted(set(plugins.archs()) | indexed)
        if base not in known:
            raise LoraCompatError(f"unknown base {base!r}; known bases: {', '.join(known)}")

    def _rows_for(self, paths: list[str]) -> dict[str, sqlite3.Row]:
        if not paths:
            return {}
        query = f"SELECT * FROM loras WHERE path IN ({', '.join('?' for _ in paths)})"
        return {row["path"]: row for row in self.db.execute(query, paths)}

    def recommend(self, prompt: str, base: str, k: int = 3, semantic: bool | None = None) -> dict:
        """A ready stack for ``prompt`` on ``base``: entries (path, strength) and the prompt with triggers."""
        results = self.search(prompt, base=base, k=k, semantic=semantic)
        triggers = [t for r in results for t in r.triggers[:2] if t.lower() not in prompt.lower()]
        share = 1.0 if len(results) <= 1 else 0.8  # several LoRAs together: a little less each
        return {"base": base, "prompt": ", ".join([prompt, *dict.fromkeys(triggers)]),
                "stack": [{"path": r.path, "strength": round(r.strength * share, 3), "why": r.why} for r in results]}
