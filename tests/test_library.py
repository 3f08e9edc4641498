"""The LoRA library: a generated library of a few hundred small files across dialects and bases, with sidecars;
full, incremental and resumed indexing; search quality on a labelled query set; triggers and strengths from
the right sources; the base filter; the BM25 index saved between processes (reused, rebuilt on change or
damage); semantic re-ranking with the [semantic] extra (paraphrases, cached embeddings, pinned weights)."""
from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_compat.cli import main
from lora_compat.tools.library import store as library_module
from lora_compat.tools.library import retrieval
from lora_compat.errors import LoraCompatError
from lora_compat.tools.library import MIGRATIONS, Library

from library_files import BASES, PARAPHRASES, QUERIES, TOPICS, write_lora


@pytest.fixture(scope="module")
def library_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loras")
    for base in BASES:
        for topic in TOPICS:
            for variant in range(8):
                folder = root / base / topic
                folder.mkdir(parents=True, exist_ok=True)
                write_lora(folder / f"{topic}_{base}_{variant}.safetensors", base, topic, variant)
    (root / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    save_file({"emb_params": torch.zeros(2, 768)}, str(root / "embedding.safetensors"))
    return root


def test_index_search_and_resume(tmp_path: Path, library_dir: Path, capsys) -> None:
    files = 3 * len(TOPICS) * 8
    with Library(tmp_path / "lib.sqlite", semantic=False) as library:
        assert library.schema_version == len(MIGRATIONS)
        report = library.index([library_dir])
        assert (report.added, report.failed) == (files, 2)
        assert "broken.safetensors" in " ".join(report.errors) and "textual-inversion" in " ".join(report.errors.values())
        again = library.index([library_dir])
        assert (again.added, again.updated, again.unchanged) == (0, 0, files + 2)
        rows = library.rows()
        assert sorted({r["base"] for r in rows}) == sorted(BASES) and len(rows) == files

        hits1 = hits5 = 0
        for topic, query in QUERIES.items():
            for base in BASES:
                results = library.search(query, base=base, k=5)
                assert results and all(r.base == base for r in results)  # the base filter never fails
                names = [Path(r.path).parent.name for r in results]
                hits1 += names[0] == topic
                hits5 += topic in names
        total = len(QUERIES) * len(BASES)
        print(f"top-1 {hits1 / total:.2f}, top-5 {hits5 / total:.2f} over {total} labelled queries")
        assert hits5 == total and hits1 / total >= 0.9


def test_interrupted_index_resumes_without_duplicates(tmp_path: Path, library_dir: Path) -> None:
    seen = []

    def stop_after_40(path: Path) -> None:
        seen.append(path)
        if len(seen) == 40:
            raise KeyboardInterrupt

    db = tmp_path / "lib.sqlite"
    with Library(db, semantic=False) as library, pytest.raises(KeyboardInterrupt):
        library.index([library_dir], on_file=stop_after_40)
    with Library(db, semantic=False) as library:
        assert library.db.execute("SELECT COUNT(*) FROM loras").fetchone()[0] == 39
        report = library.index([library_dir])
        total = 3 * len(TOPICS) * 8 + 2
        assert report.added + report.failed == total - 39 and report.unchanged == 39
        count, distinct = library.db.execute("SELECT COUNT(*), COUNT(DISTINCT path) FROM loras").fetchone()
        assert count == distinct == total


def test_changed_and_removed_files_are_noticed(tmp_path: Path) -> None:
    root = tmp_path / "loras"
    root.mkdir()
    write_lora(root / "a.safetensors", "sd15", "cat", 0)
    write_lora(root / "b.safetensors", "sd15", "knight", 0)
    with Library(tmp_path / "lib.sqlite", semantic=False) as library:
        assert library.index([root]).added == 2
        write_lora(root / "a.safetensors", "sd15", "watercolor", 4)
        (root / "b.safetensors").unlink()
        report = library.index([root])
        assert (report.updated, report.removed) == (1, 1)
        assert library.search("watercolor painting")[0].path == str(root / "a.safetensors")


def test_triggers_strength_and_hash_come_from_the_right_sources(tmp_path: Path) -> None:
    root = tmp_path / "loras"
    root.mkdir()
    for variant in range(4):
        write_lora(root / f"cat{variant}.safetensors", "sd15", "cat", variant)
    with Library(tmp_path / "lib.sqlite", semantic=False) as library:
        library.index([root])
        rows = {Path(r["path"]).stem: r for r in library.rows()}
    triggers = {stem: json.loads(r["triggers"]) for stem, r in rows.items()}
    assert triggers["cat0"][:3] == ["cat", "fluffy fur", "whiskers"]  # ss_tag_frequency, most frequent first
    assert triggers["cat1"] == ["mochi_cat"]  # modelspec.trigger_phrase
    assert triggers["cat2"] == ["mochi_cat"] and rows["cat2"]["preferred_weight"] == 0.65  # A1111 sidecar
    assert triggers["cat3"] == ["mochi_cat"] and rows["cat3"]["title"] == "fluffy cat character"  # Civitai
    data = (root / "cat0.safetensors").read_bytes()
    assert rows["cat0"]["autov2"] == hashlib.sha256(data).hexdigest()[:10].upper()


def test_an_older_schema_is_migrated(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "old.sqlite")
    db.execute(MIGRATIONS[0])
    db.execute(MIGRATIONS[1])
    db.execute("PRAGMA user_version = 2")
    db.execute("INSERT INTO loras (path, size, mtime_ns, status) VALUES ('x', 1, 1, 'ok')")
    db.commit()
    db.close()
    with Library(tmp_path / "old.sqlite", semantic=False) as library:
        assert library.schema_version == len(MIGRATIONS)
        assert library.db.execute("SELECT path, autov2 FROM loras").fetchall()[0][:] == ("x", None)


def test_cli_index_search_recommend(tmp_path: Path, library_dir: Path, capsys, monkeypatch) -> None:
    db = str(tmp_path / "lib.sqlite")
    assert main(["index", str(library_dir / "sdxl"), "--db", db, "--quiet", "--no-hash", "--no-semantic"]) == 0
    assert "96 added" in capsys.readouterr().out
    assert main(["search", "neon lights at night", "--base", "sdxl", "-k", "2", "--json", "--db", db,
                 "--no-semantic"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 2 and all("cyberpunk" in r["path"] for r in results)
    assert results[0]["why"] and results[0]["base"] == "sdxl"
    _no_build(monkeypatch)  # each command opens the library anew: the saved BM25 index is loaded, not rebuilt
    assert main(["recommend", "a knight in armor", "--base", "sdxl", "--json", "--db", db, "--no-semantic"]) == 0
    stack = json.loads(capsys.readouterr().out)
    assert stack["prompt"].startswith("a knight in armor, ") and "sir_knight" in stack["prompt"]
    assert all("knight" in entry["path"] for entry in stack["stack"])
    assert main(["search", "a knight", "--base", "sd15", "--db", db, "--no-semantic"]) == 0
    assert capsys.readouterr().out.strip() == "no match for base sd15"


# -- the BM25 index saved between processes -------------------------------------------------------------------
def _all_results(library: Library) -> list[list[dict]]:
    return [[r.to_dict() for r in library.search(query, base=base, k=5)] for query in QUERIES.values()
            for base in (None, *BASES)]


def _no_build(monkeypatch) -> None:
    def build(documents):
        raise AssertionError("the BM25 index was rebuilt")

    monkeypatch.setattr(library_module, "_build_bm25", build)


def test_a_new_library_loads_the_saved_bm25_index(tmp_path: Path, library_dir: Path, monkeypatch) -> None:
    db = tmp_path / "lib.sqlite"
    with Library(db, semantic=False) as library:
        library.index([library_dir], hashes=False)
        fresh = _all_results(library)
        assert library.bm25_source == "built"
        generation = library.generation
    assert [p.name for p in (tmp_path / "lib.sqlite.bm25").iterdir()] == [generation]
    _no_build(monkeypatch)  # the next "process" must not rebuild
    with Library(db, semantic=False) as library:
        assert library.generation == generation
        assert _all_results(library) == fresh and library.bm25_source == "loaded"


def test_changes_rebuild_the_saved_index(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "loras"
    root.mkdir()
    write_lora(root / "a.safetensors", "sd15", "cat", 0)
    write_lora(root / "b.safetensors", "sd15", "knight", 0)
    db = tmp_path / "lib.sqlite"
    with Library(db, semantic=False) as library:
        library.index([root])
        first = library.generation
        assert library.search("fluffy cat")[0].path.endswith("a.safetensors")
        assert library.index([root]).unchanged == 2 and library.generation == first  # nothing changed: same index
    with Library(db, semantic=False) as library:
        write_lora(root / "a.safetensors", "sd15", "watercolor", 4)
        assert library.index([root]).updated == 1
        second = library.generation
        assert second != first
        assert library.search("watercolor painting")[0].path.endswith("a.safetensors")
        assert library.bm25_source == "built" and not library.search("fluffy cat")
    assert [p.name for p in (tmp_path / "lib.sqlite.bm25").iterdir()] == [second]  # the old one is pruned
    with Library(db, semantic=False) as library:
        (root / "b.safetensors").unlink()
        assert library.index([root]).removed == 1
        assert library.generation not in (first, second)
        assert not library.search("knight in plate armor") and library.bm25_source == "built"


def test_a_deleted_and_recreated_database_does_not_reuse_the_old_index(tmp_path: Path) -> None:
    root = tmp_path / "loras"
    root.mkdir()
    write_lora(root / "a.safetensors", "sd15", "cat", 0)
    db = tmp_path / "lib.sqlite"
    with Library(db, semantic=False) as library:
        library.index([root])
        library.search("cat")
        old = library.generation
    db.unlink()
    write_lora(root / "a.safetensors", "sd15", "knight", 1)
    with Library(db, semantic=False) as library:
        library.index([root])
        assert library.generation != old  # same counter, other library id
        assert library.search("knight")[0].path.endswith("a.safetensors") and library.bm25_source == "built"


def _truncate(folder: Path) -> None:
    target = folder / "data.csc.index.npy"
    target.write_bytes(target.read_bytes()[:100])


def _flip(folder: Path) -> None:
    target = folder / "data.csc.index.npy"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0xFF  # still a well-formed array: only the checksum can tell
    target.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [
    _truncate, _flip,
    lambda folder: (folder / "vocab.index.json").write_text("{not json"),
    lambda folder: (folder / "lora_compat.json").write_text("[]"),
    lambda folder: (folder / "indices.csc.index.npy").unlink(),
    lambda folder: [f.unlink() for f in folder.iterdir()],
], ids=["truncated", "bit-flip", "bad-vocab", "bad-meta", "missing-file", "empty"])
def test_a_damaged_saved_index_is_rebuilt(tmp_path: Path, damage) -> None:
    root = tmp_path / "loras"
    for topic in ("cat", "knight", "watercolor"):
        (root / topic).mkdir(parents=True)
        for variant in range(4):
            write_lora(root / topic / f"{topic}{variant}.safetensors", "sdxl", topic, variant)
    db = tmp_path / "lib.sqlite"
    with Library(db, semantic=False) as library:
        library.index([root], hashes=False)
        fresh = _all_results(library)
        folder = library.bm25_cache / library.generation
    damage(folder)
    with Library(db, semantic=False) as library:
        assert _all_results(library) == fresh and library.bm25_source == "built"
    with Library(db, semantic=False) as library:  # the damaged copy was replaced
        assert _all_results(library) == fresh and library.bm25_source == "loaded"


def test_a_failed_save_leaves_no_partial_index(tmp_path: Path, monkeypatch) -> None:
    import bm25s

    root = tmp_path / "loras"
    root.mkdir()
    write_lora(root / "a.safetensors", "sd15", "cat", 0)

    def crash(self, save_dir, **kwargs):
        (Path(save_dir) / "params.index.json").write_text("{")
        raise OSError("disk full")

    db = tmp_path / "lib.sqlite"
    monkeypatch.setattr(bm25s.BM25, "save", crash)
    with Library(db, semantic=False) as library:
        library.index([root])  # builds and tries to save the index
        assert library.search("fluffy cat") and library.bm25_source == "built"  # the search itself is unaffected
    assert list(library.bm25_cache.iterdir()) == []  # nothing half-written under the final name, no temp folder
    monkeypatch.undo()
    (library.bm25_cache / ".tmp-from-a-crash").mkdir()  # a crashed writer's leftovers are never read
    with Library(db, semantic=False) as library:
        assert library.search("fluffy cat") and library.bm25_source == "built"
    with Library(db, semantic=False) as library:
        assert library.search("fluffy cat") and library.bm25_source == "loaded"


# -- semantic re-ranking ([semantic] extra) ------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedder():
    """The MiniLM model, loaded once for the module (every Library in the process shares it)."""
    return library_module.load_embedder()


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory) -> Path:
    """48 LoRAs: every topic for sd15 and sdxl, with kohya metadata (variant 0) or a Civitai sidecar (3)."""
    root = tmp_path_factory.mktemp("small")
    for base in ("sd15", "sdxl"):
        for topic in TOPICS:
            for variant in (0, 3):
                write_lora(root / f"{topic}_{base}_{variant}.safetensors", base, topic, variant)
    return root


def _topic(result) -> str:
    return Path(result.path).stem.split("_")[0]


def test_semantic_search_finds_paraphrases(tmp_path: Path, small_dir: Path, embedder) -> None:
    with Library(tmp_path / "lib.sqlite", semantic=True) as library:
        before = embedder.encoded
        library.index([small_dir])
        assert embedder.encoded - before == 48  # embedded at index time
        for topic, query in PARAPHRASES.items():
            title, triggers, tags = TOPICS[topic]
            target = set(re.findall(r"[a-z0-9]+", " ".join([title, topic, *triggers, *tags]).lower()))
            assert not target & set(re.findall(r"[a-z0-9]+", query.lower())), query
            assert library.search(query, semantic=False) == []  # BM25 alone finds nothing
            for base in ("sd15", "sdxl"):
                results = library.search(query, base=base, k=3, semantic=True)
                assert all(r.base == base for r in results)  # the base filter still holds
                assert topic in [_topic(r) for r in results], (query, [r.path for r in results])
                hit = next(r for r in results if _topic(r) == topic)
                assert re.fullmatch(r"semantic: 0\.\d\d", hit.why[-1])
        keyword = library.search("neon lights cyberpunk", base="sdxl", k=2, semantic=True)  # words still count
        assert [_topic(r) for r in keyword] == ["cyberpunk"] * 2 and keyword[0].why[0].startswith("trigger: ")


def test_embeddings_are_computed_once_and_cached(tmp_path: Path, small_dir: Path, embedder) -> None:
    db = tmp_path / "lib.sqlite"
    with Library(db, semantic=False) as library:
        before = embedder.encoded
        library.index([small_dir])
        assert embedder.encoded == before  # semantic off: nothing embedded at index time
        assert library.search(PARAPHRASES["cat"], semantic=True)
        assert embedder.encoded - before == 48 + 1  # lazily, on the first semantic search
        library.search(PARAPHRASES["knight"], semantic=True)
        assert embedder.encoded - before == 48 + 2  # only the query
        stored = library.db.execute("SELECT file_key, model, vector FROM embeddings").fetchall()
    files = {file_key for file_key, _, _ in stored}
    assert files == {hashlib.sha256(p.read_bytes()).hexdigest() for p in small_dir.glob("*.safetensors")}
    assert {model for _, model, _ in stored} == {library_module.SEMANTIC_MODEL_ID}
    assert all(len(vector) == 384 * 4 for _, _, vector in stored)  # float32
    with Library(db) as library:  # another process: vectors come from SQLite, semantic on by default
        before = embedder.encoded
        assert _topic(library.search(PARAPHRASES["cat"], k=1)[0]) == "cat"
        assert embedder.encoded - before == 1


def test_embeddings_without_file_hashes_and_after_changes(tmp_path: Path, embedder) -> None:
    root = tmp_path / "loras"
    root.mkdir()
    write_lora(root / "a.safetensors", "sd15", "cat", 0)
    write_lora(root / "b.safetensors", "sd15", "knight", 0)
    with Library(tmp_path / "lib.sqlite", semantic=True) as library:
        library.index([root], hashes=False)
        keys = [key for (key,) in library.db.execute("SELECT file_key FROM embeddings")]
        assert len(keys) == 2 and all(key.startswith("stat:") for key in keys)
        write_lora(root / "a.safetensors", "sd15", "steampunk", 0)
        (root / "b.safetensors").unlink()
        before = embedder.encoded
        library.index([root], hashes=False)
        assert embedder.encoded - before == 1
        assert library.db.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0] == 1  # stale ones dropped
        assert _topic(library.search(PARAPHRASES["steampunk"], k=1)[0]) == "a"


def test_semantic_without_the_extra_is_a_clear_error(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(library_module, "semantic_available", lambda: False)
    db = tmp_path / "lib.sqlite"
    with pytest.raises(LoraCompatError, match=re.escape('pip install "lora-compat[semantic]"')):
        Library(db, semantic=True)
    root = tmp_path / "loras"
    root.mkdir()
    write_lora(root / "a.safetensors", "sd15", "cat", 0)
    with Library(db) as library:  # default: BM25 only, no error
        library.index([root])
        assert library.search("fluffy cat") and not library.search(PARAPHRASES["cat"])
        with pytest.raises(LoraCompatError, match="semantic"):
            library.search("fluffy cat", semantic=True)
    assert main(["search", "fluffy cat", "--semantic", "--db", str(db)]) == 2
    assert "lora-compat[semantic]" in capsys.readouterr().err


def test_weights_with_another_hash_are_refused(monkeypatch) -> None:
    monkeypatch.setattr(retrieval, "SEMANTIC_WEIGHTS_SHA256", "0" * 64)
    with pytest.raises(LoraCompatError, match="refusing to load"):
        retrieval.Embedder()


def test_cli_semantic_search(tmp_path: Path, small_dir: Path, embedder, capsys) -> None:
    db = str(tmp_path / "lib.sqlite")
    assert main(["index", str(small_dir), "--db", db, "--quiet", "--no-hash"]) == 0
    capsys.readouterr()
    query = PARAPHRASES["claymation"]
    assert main(["search", query, "--base", "sdxl", "-k", "3", "--json", "--db", db]) == 0
    results = json.loads(capsys.readouterr().out)
    assert any("claymation" in r["path"] and r["why"][-1].startswith("semantic: ") for r in results)
    assert all(r["base"] == "sdxl" for r in results)
    assert main(["search", query, "--base", "sdxl", "--no-semantic", "--db", db]) == 0
    assert capsys.readouterr().out.strip() == "no match for base sdxl"
