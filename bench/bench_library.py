"""The LoRA library: indexing speed (header only, AutoV2 hashing and embedding excluded) on generated files;
BM25 search time at 10,000 entries, in process and in a fresh process that loads the saved index; with the
[semantic] extra, the model's load time and search time with semantic re-ranking at 10,000 entries.
Targets: >= 200 files/s; BM25 search < 50 ms; semantic search < 200 ms.

Usage: python bench/bench_library.py [--files 1000] [--entries 10000] [--cold-runs 5]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from library_files import BASES, PARAPHRASES, QUERIES, TOPICS, write_lora  # noqa: E402

from lora_compat import library as library_module  # noqa: E402
from lora_compat.tools.library import retrieval  # noqa: E402
from lora_compat.tools.library import Library, semantic_available  # noqa: E402
from lora_compat.tools.library.documents import embedding_entry  # noqa: E402

#: a fresh process: open the library, run one search (the BM25 index comes from the saved copy), report timings
COLD_SEARCH = """
import json, sys, time
start = time.perf_counter()
from lora_compat.tools.library import Library
imported = time.perf_counter()
with Library(sys.argv[1], semantic=sys.argv[2] == "1") as library:
    results = library.search("a knight in plate armor holding a sword", base="sdxl", k=5)
    done = time.perf_counter()
    print(json.dumps({"import": imported - start, "search": done - imported, "source": library.bm25_source,
                      "hits": len(results)}))
"""
MODEL_LOAD = """
import json, time
start = time.perf_counter()
from lora_compat.tools.library import load_embedder
load_embedder()
print(json.dumps({"load": time.perf_counter() - start}))
"""


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def _fresh_process(script: str, *args: str) -> dict:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", script, *args], check=True, capture_output=True, text=True).stdout
    return {**json.loads(out.strip().splitlines()[-1]), "wall": time.perf_counter() - start}


def _grow(library: Library, entries: int) -> None:
    """Copy rows until the library has ``entries`` entries (the same documents, other paths)."""
    rows = [dict(r) for r in library.rows()]
    rng = random.Random(0)
    with library.db:
        for n in range(entries - len(rows)):
            row = dict(rng.choice(rows))
            row["path"] = f"{row['path']}.copy{n}"
            library.db.execute(f"INSERT INTO loras ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})",
                               list(row.values()))
        library._bump_generation()  # rows written behind index()'s back: say the library changed


def _timed_searches(library: Library, queries: list[str], semantic: bool) -> list[float]:
    times = []
    for query in queries * 3:
        start = time.perf_counter()
        library.search(query, base="sdxl", k=5, semantic=semantic)
        times.append(time.perf_counter() - start)
    return times


def bench_index(root: Path, db: Path) -> None:
    with Library(db, semantic=False) as library:
        report = library.index([root], hashes=False)
    rate = (report.added + report.failed) / report.seconds
    print(f"index: {report.added} files in {report.seconds:.2f} s = {rate:.0f} files/s (target >= 200)")


def bench_bm25(db: Path, cold_runs: int) -> None:
    with Library(db, semantic=False) as library:
        start = time.perf_counter()
        library.search("warm-up")
        build = time.perf_counter() - start
        assert library.bm25_source == "built"
        times = _timed_searches(library, list(QUERIES.values()), semantic=False)
        count = library.db.execute("SELECT COUNT(*) FROM loras").fetchone()[0]
    print(f"BM25 search at {count} entries, in process: median {_ms(statistics.median(times))}, max "
          f"{_ms(max(times))} (target < 50 ms); building and saving the index once per library change: {build:.2f} s")
    runs = [_fresh_process(COLD_SEARCH, str(db), "0") for _ in range(cold_runs)]
    assert all(run["source"] == "loaded" and run["hits"] for run in runs), runs
    search = statistics.median(run["search"] for run in runs)
    print(f"BM25 search at {count} entries, fresh process, index loaded from {db.name}.bm25/: open + load + query "
          f"median {_ms(search)} (max {_ms(max(run['search'] for run in runs))}) over {cold_runs} processes; "
          f"importing lora_compat {statistics.median(run['import'] for run in runs):.2f} s; whole process "
          f"(interpreter start to exit) {statistics.median(run['wall'] for run in runs):.2f} s")


def bench_semantic(db: Path, encoded_rows: int, cold_runs: int) -> None:
    loads = [_fresh_process(MODEL_LOAD) for _ in range(2)]
    start = time.perf_counter()
    library_module.file_sha256(retrieval._model_folder() / "model.safetensors")
    check = time.perf_counter() - start
    print(f"semantic model load, fresh process (imports torch, sentence-transformers; checks the weights' SHA-256 in "
          f"{check:.2f} s): {min(run['load'] for run in loads):.2f}-{max(run['load'] for run in loads):.2f} s")
    embedder = library_module.load_embedder()
    with Library(db, semantic=True) as library:
        rows = library.rows()
        originals = [row for row in rows if ".copy" not in row["path"]][:encoded_rows]
        start = time.perf_counter()
        encoded = library._ensure_embeddings(originals)
        seconds = time.perf_counter() - start
        print(f"embedding {len(originals)} documents: {seconds:.2f} s = {len(originals) / seconds:.0f} documents/s")
        # the copies get their original's vector, inserted directly (encoding 10,000 documents takes minutes here)
        vectors = {row["path"]: encoded[embedding_entry(row).key] for row in originals}
        records = [(*embedding_entry(row).key, library_module.SEMANTIC_MODEL_ID,
                    vectors[row["path"].split(".copy")[0]].tobytes()) for row in rows if ".copy" in row["path"]]
        with library.db:
            library.db.executemany("INSERT OR REPLACE INTO embeddings (file_key, doc_digest, model, vector) "
                                   "VALUES (?, ?, ?, ?)", records)
        encoded_before = embedder.encoded
        start = time.perf_counter()
        library.search("warm-up", semantic=True)
        first = time.perf_counter() - start
        assert embedder.encoded - encoded_before == 1, "every document should have its embedding already"
        times = _timed_searches(library, list(QUERIES.values()) + list(PARAPHRASES.values()), semantic=True)
        count = len(rows)
    print(f"semantic search at {count} entries ({len(originals)} documents encoded, the {count - len(originals)} "
          f"copies given their original's vector), in process: median {_ms(statistics.median(times))}, max "
          f"{_ms(max(times))} (target < 200 ms); the first search of a process also reads the {count} vectors "
          f"from SQLite: {_ms(first)}")
    runs = [_fresh_process(COLD_SEARCH, str(db), "1") for _ in range(cold_runs)]
    print(f"semantic search at {count} entries, fresh process: open + model load + query median "
          f"{statistics.median(run['search'] for run in runs):.2f} s; whole process "
          f"{statistics.median(run['wall'] for run in runs):.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--entries", type=int, default=10000)
    parser.add_argument("--cold-runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "loras"
        topics = list(TOPICS)
        for i in range(args.files):
            base, topic = BASES[i % len(BASES)], topics[i % len(topics)]
            folder = root / base / topic
            folder.mkdir(parents=True, exist_ok=True)
            write_lora(folder / f"{topic}_{i}.safetensors", base, topic, i)
        bench_index(root, Path(tmp) / "index.sqlite")

        db = Path(tmp) / "search.sqlite"
        with Library(db, semantic=False) as library:
            library.index([root], hashes=False)
            _grow(library, args.entries)
        bench_bm25(db, args.cold_runs)
        if semantic_available():
            bench_semantic(db, args.files, args.cold_runs)
        else:
            print(f"semantic search: not measured, the [semantic] extra is not installed "
                  f"({library_module.SEMANTIC_INSTALL})")


if __name__ == "__main__":
    main()
