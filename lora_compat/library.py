"""A LoRA library: index folders of LoRA files (header only) into SQLite, search them for a prompt with BM25,
filtered by base model, and recommend a ready stack.

- ``Library(db).index(dirs)``: recursive, incremental (size + mtime), each file's ``inspect`` (dialect, base,
  kinds, ranks, targets, triggers), its metadata (``ss_tag_frequency``, ``ss_output_name``,
  ``ss_dataset_dirs``, ``modelspec.*``) and sidecars (A1111 ``<name>.json``, Civitai ``.civitai.info``,
  previews). The A1111/Civitai "AutoV2" hash (first 10 hex digits of the file's SHA-256) is computed once per
  file version. Corrupt and non-LoRA files are recorded with their error. Rows are committed as they are
  indexed, so an interrupted run resumes where it stopped, without duplicates.
- ``Library.search(prompt, base=None, k=5)``: BM25 (``bm25s``) over triggers, tags, titles, descriptions,
  file names and sidecar prompts. With ``base``, only LoRAs for that base are returned.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import LoraCompatError, NotALoraError

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
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:10].upper()


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
    """A SQLite-backed index of LoRA files (WAL mode; safe to read while another process indexes)."""

    def __init__(self, db: str | os.PathLike | None = None):
        self.path = Path(db) if db is not None else default_db()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.row_factory = sqlite3.Row
        self._migrate()
        self._bm25: tuple[int, object, list[str]] | None = None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Library":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def _migrate(self) -> None:
        version = self.schema_version
        if version > len(MIGRATIONS):
            raise LoraCompatError(f"{self.path}: library schema {version} is newer than this lora-compat "
                                  f"({len(MIGRATIONS)}); upgrade lora-compat")
        for number, statement in enumerate(MIGRATIONS[version:], start=version + 1):
            with self.db:
                self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version = {number}")

    # -- indexing ---------------------------------------------------------------------------------------------
    def index(self, dirs: Iterable[str | os.PathLike], *, hashes: bool = True, progress: bool = False,
              on_file: Callable[[Path], None] | None = None) -> IndexReport:
        """Index every LoRA file under ``dirs`` (recursively); only new or changed files are read."""
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
        with self.db:
            self.db.executemany("DELETE FROM loras WHERE path = ?", [(p,) for p in gone])
        report.removed = len(gone)
        report.seconds = time.perf_counter() - start
        self._bm25 = None
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
        row.update({
            "status": "ok", "error": None, "dialect": info.dialect, "base": info.base or side["base"],
            "kinds": json.dumps(info.kinds), "rank_min": (info.rank or {}).get("min"),
            "rank_max": (info.rank or {}).get("max"), "targets": info.targets, "triggers": json.dumps(info.triggers),
            "tags": json.dumps(_top_tags(metadata)),
            "title": metadata.get("modelspec.title") or side["title"] or metadata.get("ss_output_name") or path.stem,
            "description": " ".join(filter(None, [metadata.get("modelspec.description", ""), side["description"]])),
            "output_name": metadata.get("ss_output_name"), "dataset_dirs": json.dumps(dataset_dirs),
            "preferred_weight": side["preferred_weight"], "prompts": json.dumps(side["prompts"][:5]),
            "preview": side.get("preview"), "autov2": autov2(path) if hashes else None,
        })
        return row

    def rows(self, status: str | None = "ok") -> list[sqlite3.Row]:
        query = "SELECT * FROM loras" + (" WHERE status = ?" if status else "") + " ORDER BY path"
        return self.db.execute(query, (status,) if status else ()).fetchall()

    # -- search -------------------------------------------------------------------------------------------------
    def _retriever(self):
        """The BM25 index over the library's LoRAs, rebuilt only when the database changed."""
        import bm25s

        version = self.db.execute("SELECT COUNT(*), COALESCE(MAX(indexed_at), 0) FROM loras").fetchone()
        stamp = hash(tuple(version))
        if self._bm25 is None or self._bm25[0] != stamp:
            rows = self.rows()
            documents = [_document(row) for row in rows]
            retriever = bm25s.BM25()
            if documents:
                retriever.index(bm25s.tokenize(documents, stopwords="en", show_progress=False), show_progress=False)
            self._bm25 = (stamp, retriever, [row["path"] for row in rows])
            self._rows = {row["path"]: row for row in rows}
        return self._bm25[1], self._bm25[2]

    def search(self, prompt: str, base: str | None = None, k: int = 5) -> list[SearchResult]:
        """The ``k`` LoRAs that best match ``prompt`` (BM25), only LoRAs for ``base`` when given."""
        import bm25s

        retriever, paths = self._retriever()
        if not paths:
            return []
        query = bm25s.tokenize([prompt], stopwords="en", show_progress=False)
        if not query.vocab:
            return []
        indices, scores = retriever.retrieve(query, k=len(paths), show_progress=False)
        words = set(_WORD.findall(prompt.lower()))
        results = []
        for index, score in zip(indices[0], scores[0]):
            if score <= 0:
                break
            row = self._rows[paths[int(index)]]
            if base is not None and row["base"] != base:
                continue
            results.append(_result(row, float(score), words))
            if len(results) == k:
                break
        return results

    def recommend(self, prompt: str, base: str, k: int = 3) -> dict:
        """A ready stack for ``prompt`` on ``base``: entries (path, strength) and the prompt with triggers."""
        results = self.search(prompt, base=base, k=k)
        triggers = [t for r in results for t in r.triggers[:2] if t.lower() not in prompt.lower()]
        share = 1.0 if len(results) <= 1 else 0.8  # several LoRAs together: a little less each
        return {"base": base, "prompt": ", ".join([prompt, *dict.fromkeys(triggers)]),
                "stack": [{"path": r.path, "strength": round(r.strength * share, 3), "why": r.why} for r in results]}


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


def _result(row: sqlite3.Row, score: float, words: set[str]) -> SearchResult:
    why = []
    for name, text in _fields(row).items():
        hits = sorted(words & set(_WORD.findall(text.lower())))
        if hits:
            why.append(f"{name}: {', '.join(hits)}")
    return SearchResult(path=row["path"], score=round(score, 4), base=row["base"], dialect=row["dialect"],
                        triggers=json.loads(row["triggers"] or "[]"), strength=row["preferred_weight"] or 1.0,
                        why=why, title=row["title"] or "")
