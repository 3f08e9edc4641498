"""A LoRA library: index folders of LoRA files (header only) into SQLite, search them for a prompt with BM25
(optionally fused with semantic similarity), filtered by base model, and recommend a ready stack.

- ``Library(db).index(dirs)``: recursive, incremental (size + mtime), each file's ``inspect`` (dialect, base,
  kinds, ranks, targets, triggers), its metadata (``ss_tag_frequency``, ``ss_output_name``,
  ``ss_dataset_dirs``, ``modelspec.*``) and sidecars (A1111 ``<name>.json``, Civitai ``.civitai.info``,
  previews). The file's SHA-256 (and from it the A1111/Civitai "AutoV2" hash, its first 10 hex digits) is
  computed once per file version. Corrupt and non-LoRA files are recorded with their error. Rows are committed
  as they are indexed, so an interrupted run resumes where it stopped, without duplicates. Every change bumps
  the library's *generation* in the same transaction. A new database is created with its schema under a
  temporary name beside its path and linked into place when complete (an existing one is opened as is: its
  rows are committed one by one, so an interrupted run leaves a consistent, resumable library). A folder
  that does not exist is refused before anything changes.
- ``Library.search(prompt, base=None, k=5, semantic=None)``: BM25 (``bm25s``) over triggers, tags, titles,
  descriptions, file names and sidecar prompts. With ``base``, only LoRAs for that base are returned. The BM25
  index is saved next to the database (``<db>.bm25/<library id>-<generation>/``) and loaded by the next
  process instead of being rebuilt. With the ``[semantic]`` extra, the BM25 ranking is fused (reciprocal rank
  fusion) with the cosine similarity of all-MiniLM-L6-v2 embeddings, so paraphrases with no shared word still
  match; document embeddings are cached in SQLite. A ``base`` that is neither registered nor in the
  library is refused, naming the known bases.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from .errors import LoraCompatError, NotALoraError
from .retrieval import (SEMANTIC_DIMENSION, SEMANTIC_INSTALL, SEMANTIC_MIN, SEMANTIC_MODEL_ID, EmbeddingKey,
                        _Bm25Index, _build_bm25, _load_bm25, _rank, _save_bm25, file_sha256, load_embedder,
                        semantic_available)

EXTENSIONS = (".safetensors", ".ckpt", ".pt")
#: schema migrations, applied in order; ``PRAGMA user_version`` is the number applied
MIGRATIONS = (
    """CREATE TABLE loras (
        path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
        status TEXT NOT NULL, error TEXT, dialect TEXT, base TEXT, kinds TEXT, rank_min INTEGER,
        rank_max INTEGER, targets INTEGER, triggers TEXT, tags TEXT, title TEXT, description TEXT,
        output_name TEXT, dataset_dirs TEXT, preferred_weight REAL, prompts TEXT, preview TEXT,
        indexed_at REAL)""",
    "CREATE INDEX loras_base ON loras(base)",
    "ALTER TABLE loras ADD COLUMN autov2 TEXT",
    "CREATE TABLE library_state (key TEXT PRIMARY KEY, value TEXT)",
    # a random id: with the generation counter it names the saved BM25 index, so a deleted and re-created
    # database never picks up the old database's index
    "INSERT OR IGNORE INTO library_state (key, value) VALUES ('library_id', lower(hex(randomblob(8))))",
    "ALTER TABLE loras ADD COLUMN sha256 TEXT",
    """CREATE TABLE embeddings (
        file_key TEXT NOT NULL, doc_digest TEXT NOT NULL, model TEXT NOT NULL, vector BLOB NOT NULL,
        PRIMARY KEY (file_key, doc_digest, model))""",
)
#: Civitai ``baseModel`` names → bases
CIVITAI_BASES = {"sd 1.5": "sd15", "sd 1.4": "sd15", "sd 2.0": "sd2", "sd 2.1": "sd2", "sdxl 1.0": "sdxl",
                 "sdxl 0.9": "sdxl", "pony": "sdxl", "illustrious": "sdxl", "flux.1 d": "flux1", "flux.1 s": "flux1"}
_WORD = re.compile(r"[a-z0-9]+")
@dataclass
class IndexReport:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    failed: int = 0
    removed: int = 0
    seconds: float = 0.0
    errors: dict[str, str] = field(default_factory=dict)


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


def default_db() -> Path:
    return Path(os.environ.get("LORA_COMPAT_DB", Path.home() / ".cache" / "lora-compat" / "library.sqlite"))


def autov2(path: Path) -> str:
    """The A1111 / Civitai "AutoV2" short hash: the first 10 hex digits of the file's SHA-256, upper case."""
    return _autov2(file_sha256(path))


def _autov2(sha256: str) -> str:
    return sha256[:10].upper()


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _sidecars(path: Path) -> dict:
    """What the A1111 ``<name>.json`` and Civitai ``<name>.civitai.info`` sidecars say, and a preview image."""
    found: dict = {"prompts": [], "description": "", "preferred_weight": None, "base": None, "title": ""}
    a1111 = _read_json(path.with_suffix(".json"))
    if isinstance(a1111, dict):
        weight = a1111.get("preferred weight")
        if isinstance(weight, (int, float)) and weight:
            found["preferred_weight"] = float(weight)
        if isinstance(a1111.get("description"), str):
            found["description"] = a1111["description"]
        version = str(a1111.get("sd version", "")).lower()
        found["base"] = {"sd1": "sd15", "sd2": "sd2", "sdxl": "sdxl"}.get(version)
    civitai = _read_json(path.with_suffix(".civitai.info"))
    if isinstance(civitai, dict):
        found["base"] = found["base"] or CIVITAI_BASES.get(str(civitai.get("baseModel", "")).lower())
        if isinstance(civitai.get("description"), str):
            found["description"] = " ".join(filter(None, [found["description"], civitai["description"]]))
        model = civitai.get("model")
        if isinstance(model, dict) and isinstance(model.get("name"), str):
            found["title"] = model["name"]
        for image in civitai.get("images") or []:
            meta = image.get("meta") if isinstance(image, dict) else None
            if isinstance(meta, dict) and isinstance(meta.get("prompt"), str):
                found["prompts"].append(meta["prompt"])
    for suffix in (".preview.png", ".png", ".preview.jpg", ".jpg", ".webp"):
        preview = path.with_name(path.stem + suffix)
        if preview.is_file():
            found["preview"] = str(preview)
            break
    return found


def _top_tags(metadata: dict, n: int = 20) -> list[str]:
    from .inspection import _top_tags as top

    return top(metadata.get("ss_tag_frequency", ""))[:n] if metadata.get("ss_tag_frequency") else []


class Library:
    """A SQLite-backed index of LoRA files (WAL mode; safe to read while another process indexes).

    ``semantic``: fuse BM25 with MiniLM similarity in :meth:`search` and embed new files in :meth:`index`;
    None uses it when the ``[semantic]`` extra is installed, True requires it.
    """

    def __init__(self, db: str | os.PathLike | None = None, *, semantic: bool | None = None):
        if semantic and not semantic_available():
            raise LoraCompatError(f"semantic search needs the [semantic] extra: {SEMANTIC_INSTALL}")
        self.semantic = semantic
        self.path = Path(db) if db is not None else default_db()
        if self.path.is_dir():
            raise LoraCompatError(f"{self.path}: is a folder; --db names the library's database file")
        if not self.path.exists():
            _create(self.path)
        self.db = sqlite3.connect(self.path)
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.row_factory = sqlite3.Row
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self.db.close()
            raise LoraCompatError(f"{self.path}: not a lora-compat library database ({exc})") from exc
        self._bm25: _Bm25Index | None = None
        self._vectors: tuple[str, np.ndarray] | None = None
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
        return self.db.execute("PRAGMA user_version").fetchone()[0]

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

    def _migrate(self) -> None:
        version = self.schema_version
        if version > len(MIGRATIONS):
            raise LoraCompatError(f"{self.path}: library schema {version} is newer than this lora-compat "
                                  f"({len(MIGRATIONS)}); upgrade lora-compat")
        _apply_migrations(self.db, version)

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
        files = sorted(_walk(dirs))
        for number, path in enumerate(files, 1):
            key = str(path)
            seen.add(key)
            stat = path.stat()
            if known.get(key) == (stat.st_size, stat.st_mtime_ns):
                report.unchanged += 1
            else:
                if on_file is not None:
                    on_file(path)
                row = self._describe(path, stat, hashes)
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

    def _describe(self, path: Path, stat: os.stat_result, hashes: bool) -> dict:
        from .inspection import inspect

        row: dict = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "indexed_at": time.time()}
        try:
            info = inspect(path)
        except NotALoraError as exc:
            return {**row, "status": "not-lora", "error": f"{exc.kind}: {exc}"}
        except (LoraCompatError, OSError) as exc:
            return {**row, "status": "error", "error": str(exc)}
        side = _sidecars(path)
        metadata = info.metadata
        dataset_dirs = _dataset_dirs(metadata.get("ss_dataset_dirs", ""))
        sha256 = file_sha256(path) if hashes else None
        row.update({
            "status": "ok", "error": None, "dialect": info.dialect, "base": info.base or side["base"],
            "kinds": json.dumps(info.kinds), "rank_min": (info.rank or {}).get("min"),
            "rank_max": (info.rank or {}).get("max"), "targets": info.targets, "triggers": json.dumps(info.triggers),
            "tags": json.dumps(_top_tags(metadata)),
            "title": metadata.get("modelspec.title") or side["title"] or metadata.get("ss_output_name") or path.stem,
            "description": " ".join(filter(None, [metadata.get("modelspec.description", ""), side["description"]])),
            "output_name": metadata.get("ss_output_name"), "dataset_dirs": json.dumps(dataset_dirs),
            "preferred_weight": side["preferred_weight"], "prompts": json.dumps(side["prompts"][:5]),
            "preview": side.get("preview"), "sha256": sha256, "autov2": _autov2(sha256) if sha256 else None,
        })
        return row

    def rows(self, status: str | None = "ok") -> list[sqlite3.Row]:
        query = "SELECT * FROM loras" + (" WHERE status = ?" if status else "") + " ORDER BY path"
        return self.db.execute(query, (status,) if status else ()).fetchall()

    # -- embeddings -------------------------------------------------------------------------------------------
    def _ensure_embeddings(self, rows: list[sqlite3.Row], progress: bool = False) -> dict[EmbeddingKey, np.ndarray]:
        """Embed the documents of ``rows`` that have no cached embedding; returns the new ones (also stored,
        unless the database cannot be written now). The model is loaded only when something is missing."""
        return self._embed_missing(dict(_embedding_entry(row) for row in rows), progress)

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
        wanted = {_embedding_entry(row)[0] for row in self.rows()}
        stale = [tuple(key) for key in self.db.execute("SELECT file_key, doc_digest FROM embeddings")
                 if tuple(key) not in wanted]
        if stale:
            with self.db:
                self.db.executemany("DELETE FROM embeddings WHERE file_key = ? AND doc_digest = ?", stale)

    def _vector_matrix(self, index: _Bm25Index) -> np.ndarray:
        """The document embeddings, one row per path of ``index`` (zeros where a row has gone meanwhile)."""
        if self._vectors is not None and self._vectors[0] == index.stamp:
            return self._vectors[1]
        entries = {row["path"]: _embedding_entry(row) for row in self.rows()}
        vectors = self._embed_missing(dict(entries.values()))
        for file_key, digest, blob in self.db.execute(
                "SELECT file_key, doc_digest, vector FROM embeddings WHERE model = ?", (SEMANTIC_MODEL_ID,)):
            vectors.setdefault((file_key, digest), np.frombuffer(blob, np.float32))
        matrix = np.zeros((len(index.paths), SEMANTIC_DIMENSION), np.float32)
        for number, path in enumerate(index.paths):
            vector = vectors.get(entries[path][0]) if path in entries else None
            if vector is not None and len(vector) == SEMANTIC_DIMENSION:
                matrix[number] = vector
        self._vectors = (index.stamp, matrix)
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
                retriever, self.bm25_source = _build_bm25([_document(row) for row in self.rows()]), "built"
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
        words = set(_WORD.findall(prompt.lower()))
        return [_result(rows[index.paths[i]], score, words, None if similarity is None else float(similarity[i]))
                for i, score in ranked if index.paths[i] in rows]

    def check_base(self, base: str) -> None:
        """Raise unless ``base`` is a registered base or a base of some indexed LoRA (checked on the rare path
        only: the registry imports the architectures)."""
        indexed = {row[0] for row in self.db.execute("SELECT DISTINCT base FROM loras WHERE base IS NOT NULL")}
        if base in indexed:
            return
        from . import plugins

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


def _create(path: Path) -> None:
    """A new, empty library database (schema applied), written under a temporary name beside ``path`` and
    linked into place when complete; if another process created ``path`` meanwhile, its database is kept."""
    from .outputs import atomic_output

    try:
        with atomic_output(path, replace=False) as temporary:
            db = sqlite3.connect(temporary)
            try:
                _apply_migrations(db, 0)
            finally:
                db.close()
    except FileExistsError:
        pass


def _apply_migrations(db: sqlite3.Connection, version: int) -> None:
    """Apply the migrations after ``version``, each in its own transaction with its version number."""
    for number, statement in enumerate(MIGRATIONS[version:], start=version + 1):
        with db:
            db.execute(statement)
            db.execute(f"PRAGMA user_version = {number}")


def _walk(dirs: Iterable[str | os.PathLike]) -> Iterator[Path]:
    for root in dirs:
        root = Path(root).resolve()
        if root.is_file():
            yield root
            continue
        for dirpath, _, names in os.walk(root):
            for name in names:
                if name.lower().endswith(EXTENSIONS):
                    yield Path(dirpath) / name


def _dataset_dirs(raw: str) -> list[str]:
    try:
        dirs = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return []
    return [re.sub(r"^\d+_", "", name) for name in dirs] if isinstance(dirs, dict) else []


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


def _document(row: sqlite3.Row) -> str:
    fields = _fields(row)
    # triggers and titles count twice: they name what the LoRA is for
    return " ".join([fields["trigger"], fields["trigger"], fields["title"], fields["title"], *fields.values()])


def _semantic_text(row: sqlite3.Row) -> str:
    """What is embedded for a LoRA: its fields once each, in order of importance, without duplicates."""
    parts = [text.strip() for text in _fields(row).values() if text.strip()]
    return ". ".join(dict.fromkeys(parts))


def _embedding_entry(row: sqlite3.Row) -> tuple[EmbeddingKey, str]:
    """((file key, document digest), text): the file's SHA-256, or without one (indexed with hashes off) a
    digest of its size, mtime and path; the digest of the embedded text (sidecars can change it); the text."""
    file_key = row["sha256"] or "stat:" + hashlib.sha256(
        f"{row['size']}:{row['mtime_ns']}:{row['path']}".encode("utf-8", "surrogateescape")).hexdigest()
    text = _semantic_text(row)
    return (file_key, hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]), text


def _result(row: sqlite3.Row, score: float, words: set[str], similarity: float | None = None) -> SearchResult:
    why = []
    for name, text in _fields(row).items():
        hits = sorted(words & set(_WORD.findall(text.lower())))
        if hits:
            why.append(f"{name}: {', '.join(hits)}")
    if similarity is not None and similarity >= SEMANTIC_MIN:
        why.append(f"semantic: {similarity:.2f}")
    return SearchResult(path=row["path"], score=round(score, 4), base=row["base"], dialect=row["dialect"],
                        triggers=json.loads(row["triggers"] or "[]"), strength=row["preferred_weight"] or 1.0,
                        why=why, title=row["title"] or "")
