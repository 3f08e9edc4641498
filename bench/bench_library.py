"""The LoRA library: indexing speed (header only, AutoV2 hashing excluded) on generated files, and BM25
search time at 10,000 entries. Targets: >= 200 files/s; search < 50 ms.

Usage: python bench/bench_library.py [--files 1000] [--entries 10000]
"""
from __future__ import annotations

import argparse

import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_library import BASES, QUERIES, TOPICS, write_lora  # noqa: E402

from lora_compat.library import Library  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--entries", type=int, default=10000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "loras"
        topics = list(TOPICS)
        for i in range(args.files):
            base, topic = BASES[i % len(BASES)], topics[i % len(topics)]
            folder = root / base / topic
            folder.mkdir(parents=True, exist_ok=True)
            write_lora(folder / f"{topic}_{i}.safetensors", base, topic, i)
        with Library(Path(tmp) / "index.sqlite") as library:
            report = library.index([root], hashes=False)
            rate = (report.added + report.failed) / report.seconds
            print(f"index: {report.added} files in {report.seconds:.2f} s = {rate:.0f} files/s (target >= 200)")

        # search: copy rows until the library has --entries entries (the same documents, other paths)
        with Library(Path(tmp) / "search.sqlite") as library:
            library.index([root], hashes=False)
            rows = [dict(r) for r in library.rows()]
            rng = random.Random(0)
            with library.db:
                for n in range(args.entries - len(rows)):
                    row = dict(rng.choice(rows))
                    row["path"] = f"{row['path']}.copy{n}"
                    library.db.execute(f"INSERT INTO loras ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})",
                                       list(row.values()))
            start = time.perf_counter()
            library.search("warm-up")
            build = time.perf_counter() - start
            times = []
            for query in list(QUERIES.values()) * 3:
                start = time.perf_counter()
                library.search(query, base="sdxl", k=5)
                times.append(time.perf_counter() - start)
            count = library.db.execute("SELECT COUNT(*) FROM loras").fetchone()[0]
            print(f"search at {count} entries: median {statistics.median(times) * 1e3:.1f} ms, max "
                  f"{max(times) * 1e3:.1f} ms (target < 50 ms); the BM25 index is built once per library change "
                  f"({build:.2f} s here)")



if __name__ == "__main__":
    main()
