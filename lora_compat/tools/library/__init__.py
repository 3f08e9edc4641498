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

The parts: :mod:`.schema` (the database and its migrations), :mod:`.entries` (what is recorded for a file),
:mod:`.documents` (what is searched, and a hit), :mod:`.store` (the :class:`Library`).
"""
from __future__ import annotations

from .retrieval import (SEMANTIC_DIMENSION, SEMANTIC_INSTALL, SEMANTIC_MIN, SEMANTIC_MODEL_ID, EmbeddingKey,
                         file_sha256, load_embedder, semantic_available)
from .documents import SearchResult
from .entries import EXTENSIONS, autov2, catalog_base
from .schema import MIGRATIONS, default_db
from .store import IndexReport, Library

__all__ = ["Library", "IndexReport", "SearchResult", "MIGRATIONS", "EXTENSIONS", "catalog_base", "default_db",
           "autov2", "SEMANTIC_DIMENSION", "SEMANTIC_INSTALL", "SEMANTIC_MIN", "SEMANTIC_MODEL_ID", "EmbeddingKey",
           "file_sha256", "load_embedder", "semantic_available"]
