"""The library's SQLite database: where it lives, its schema (numbered migrations) and how a new one is created
whole."""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from ...errors import LoraCompatError

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


def default_db() -> Path:
    return Path(os.environ.get("LORA_COMPAT_DB", Path.home() / ".cache" / "lora-compat" / "library.sqlite"))


def schema_version(db: sqlite3.Connection) -> int:
    return db.execute("PRAGMA user_version").fetchone()[0]


def create(path: Path) -> None:
    """A new, empty library database (schema applied), written under a temporary name beside ``path`` and
    linked into place when complete; if another process created ``path`` meanwhile, its database is kept."""
    from ...outputs import atomic_output

    try:
        with atomic_output(path, replace=False) as temporary:
            db = sqlite3.connect(temporary)
            try:
                _apply_migrations(db, 0)
            finally:
                db.close()
    except FileExistsError:
        pass


def upgrade(db: sqlite3.Connection, path: Path) -> None:
    """Apply the migrations ``db`` (the database at ``path``) lacks; refuse a schema newer than this code."""
    version = schema_version(db)
    if version > len(MIGRATIONS):
        raise LoraCompatError(f"{path}: library schema {version} is newer than this lora-compat "
                              f"({len(MIGRATIONS)}); upgrade lora-compat")
    _apply_migrations(db, version)


def _apply_migrations(db: sqlite3.Connection, version: int) -> None:
    """Apply the migrations after ``version``, each in its own transaction with its version number."""
    for number, statement in enumerate(MIGRATIONS[version:], start=version + 1):
        with db:
            db.execute(statement)
            db.execute(f"PRAGMA user_version = {number}")
