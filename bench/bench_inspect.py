"""Benchmark: ``lora_compat.inspect`` on a ~1 GB kohya LoRA vs. reading the same file naively.

Writes a LoRA with the full-size key names and shapes of a corpus layout (SD1.5 kohya by default:
``derived_sd15_kohya_lora_full.json``; ``--layout sdxl`` for the SGM-named SDXL one; ``wan``, ``qwen-image``,
``flux2``, ``chroma``, ``sd3``, ``z-image``, ``lumina2`` for the newer families' full-size layouts, each in its most
common file layout), its rank scaled up until the file is ``--size-gb`` large, then measures:

* ``inspect`` warm, in this process (one warm-up, then ``--runs`` calls: median and min);
* ``inspect`` cold: the first call in a fresh interpreter (after ``import lora_compat``), and the peak RSS
  that call adds (``ru_maxrss`` after minus before) plus its traced Python allocations (tracemalloc peak);
* ``safetensors.safe_open``: listing names, shapes and metadata (the header, as the reference reader does it);
* ``safetensors.torch.load_file``: mapped only (it maps the file lazily), and with every tensor read into
  memory, which is what a tool that loads the state dict to detect the format ends up doing; with the RSS it
  adds and the ratio to ``inspect``. The file was just written, so both read from the page cache.

Targets: inspect < 30 ms and < 50 MB extra RSS on a 1 GB file. Run: ``python bench/bench_inspect.py``
(``--keep`` keeps the file, ``--path`` puts it somewhere, ``--reuse`` uses an existing one and keeps it).
``--baseline DIR`` also times warm in-process ``inspect`` of another checkout of the package (e.g. the main
branch's), in fresh interpreters taking turns with this one, and prints both medians and their ratio: on a
loaded machine only figures taken in the same minute compare.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lora_compat
from lora_compat import corpus

LAYOUTS = {"sd15": "derived_sd15_kohya_lora_full.json", "sdxl": "derived_sdxl_kohya_lora_full_sgm_names.json",
           "flux": "derived_flux1_kohya_lora_full.json",
           # the newer families' full-size layouts, each in its most common file layout (tests/derive_corpus.py)
           "wan": "derived_wan_native_lora_full.json", "qwen-image": "derived_qwen_image_musubi_lora_full.json",
           "flux2": "derived_flux2_dev_aitoolkit_lora_full.json", "chroma": "derived_chroma_kohya_lora_full.json",
           "sd3": "derived_sd35_large_kohya_lora_full.json", "z-image": "derived_z_image_native_fused_lora_full.json",
           "lumina2": "derived_lumina2_native_fused_lora_full.json"}
#: sd-scripts' ``ss_base_model_version`` of the layouts that carry one (the others get no such key)
BASE_VERSIONS = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0", "flux": "flux1"}
DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.weight")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
NOMINAL_RANK = 16  # the corpus's linear rank (3x3 convs use half of it)
TARGET_MS = 30.0
TARGET_MB = 50.0

#: peak-RSS helpers for the fresh interpreters: Linux resets the peak (VmHWM) to the current RSS when "5" is
#: written to /proc/self/clear_refs, so ``peak_after - rss_before`` is what the measured call added. ru_maxrss
#: (a lifetime peak, usually set by ``import torch``) is reported too; its growth is only a lower bound.
RSS_HELPERS = r"""
import json, resource, sys, time
def status_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
def maxrss_kb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
"""

#: runs in a fresh interpreter: the first inspect call's time, and what it adds to the peak RSS
COLD_SCRIPT = RSS_HELPERS + r"""
import tracemalloc
t0 = time.perf_counter()
import lora_compat
t1 = time.perf_counter()
max_before, rss_before, reset = maxrss_kb(), status_kb("VmRSS"), reset_peak()
t2 = time.perf_counter()
result = lora_compat.inspect(sys.argv[1])
t3 = time.perf_counter()
peak_after, max_after = status_kb("VmHWM"), maxrss_kb()
tracemalloc.start()
lora_compat.inspect(sys.argv[1])
traced = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
print(json.dumps({"import_s": t1 - t0, "first_s": t3 - t2, "peak_added_kb": peak_after - rss_before if reset else None,
                  "maxrss_added_kb": max_after - max_before, "traced_peak_b": traced, "dialect": result.dialect,
                  "base": result.base, "targets": result.targets, "tensors": result.tensors, "rank": result.rank}))
"""

#: the naive reader in a fresh interpreter: time and RSS added by loading every tensor into memory
LOAD_SCRIPT = RSS_HELPERS + r"""
import torch
from safetensors.torch import load_file
max_before, rss_before, reset = maxrss_kb(), status_kb("VmRSS"), reset_peak()
t0 = time.perf_counter()
tensors = {k: v.clone() for k, v in load_file(sys.argv[1]).items()}
t1 = time.perf_counter()
peak_after, max_after = status_kb("VmHWM"), maxrss_kb()
print(json.dumps({"load_s": t1 - t0, "peak_added_kb": peak_after - rss_before if reset else None,
                  "maxrss_added_kb": max_after - max_before, "tensors": len(tensors)}))
"""


# -- the file -------------------------------------------------------------------------------------------------
def _scaled(shape: list[int], key: str, linear_rank: int) -> tuple[int, ...]:
    """The shape at ``linear_rank`` (3x3 convs keep the corpus's half rank ratio)."""
    if key.endswith(".alpha"):
        return tuple(shape)
    conv3 = len(shape) == 4 and shape[2:] != [1, 1]
    rank = max(1, linear_rank // 2) if conv3 else linear_rank
    scaled = list(shape)
    scaled[0 if key.endswith(DOWN_SUFFIXES) else 1] = rank
    return tuple(scaled)


def rank_for_size(keys: dict[str, list[int]], target_bytes: int, itemsize: int) -> int:
    """The smallest linear rank whose file is at least ``target_bytes`` (ignoring the small header)."""
    def size(rank: int) -> int:
        return sum(math.prod(_scaled(shape, key, rank)) for key, shape in keys.items()) * itemsize

    rank = max(1, round(NOMINAL_RANK * target_bytes / size(NOMINAL_RANK)))
    while size(rank) < target_bytes:
        rank += 1
    return rank


def write_lora(path: Path, layout: str, target_bytes: int, dtype: torch.dtype) -> int:
    """A LoRA with the layout's names (kohya, native or BFL) at the rank that makes it ``target_bytes``; returns
    the rank."""
    data = corpus.load(LAYOUTS[layout])
    keys: dict[str, list[int]] = data["keys"]
    itemsize = torch.empty((), dtype=dtype).element_size()
    rank = rank_for_size(keys, target_bytes, itemsize)
    tensors = {key: (torch.tensor(float(rank), dtype=dtype) if key.endswith(".alpha")
                     else torch.zeros(_scaled(shape, key, rank), dtype=dtype))
               for key, shape in keys.items()}
    metadata = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
        **({"ss_base_model_version": BASE_VERSIONS[layout]} if layout in BASE_VERSIONS else {}),
        "ss_output_name": "bench", "ss_training_comment": "lora_compat benchmark file",
        "ss_tag_frequency": json.dumps({"1_bench": {f"tag{i}": 100 - i for i in range(50)}}),
    }
    save_file(tensors, str(path), metadata=metadata)
    return rank


# -- measuring ------------------------------------------------------------------------------------------------
def repeat(fn: Callable[[], object], runs: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def in_fresh_interpreter(script: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", script, str(path)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


#: runs in a fresh interpreter (PYTHONPATH picks the checkout): warm in-process inspect times, in seconds
WARM_SCRIPT = r"""
import json, sys, time
if sys.argv[3] == "torch":
    import torch  # a host has it: its objects are what a cycle collection walks
import lora_compat
lora_compat.inspect(sys.argv[1])
times = []
for _ in range(int(sys.argv[2])):
    start = time.perf_counter()
    lora_compat.inspect(sys.argv[1])
    times.append(time.perf_counter() - start)
print(json.dumps({"times": times, "package": lora_compat.__file__}))
"""


def warm_turns(path: Path, baseline: Path, runs: int, turns: int = 3, with_torch: bool = False
               ) -> tuple[list[float], list[float]]:
    """Warm inspect times of this checkout and of ``baseline``, in fresh interpreters taking turns."""
    here = Path(lora_compat.__file__).resolve().parent.parent
    times: dict[Path, list[float]] = {here: [], baseline: []}
    for _ in range(turns):
        for root in times:
            env = {**os.environ, "PYTHONPATH": str(root)}
            out = subprocess.run([sys.executable, "-c", WARM_SCRIPT, str(path), str(runs),
                                  "torch" if with_torch else "-"], check=True,
                                 capture_output=True, text=True, env=env, cwd=root)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            if Path(result["package"]).resolve().parent.parent != root.resolve():
                raise SystemExit(f"the baseline run imported {result['package']}, not the checkout in {root}")
            times[root] += result["times"]
    return times[here], times[baseline]


def load_everything(path: Path) -> int:
    """What a naive detector does: the state dict in memory (load_file maps lazily; the clone reads it)."""
    return len({key: tensor.clone() for key, tensor in load_file(str(path)).items()})


def list_header(path: Path) -> int:
    with safe_open(str(path), framework="pt") as f:
        f.metadata()
        return len({key: f.get_slice(key).get_shape() for key in f.keys()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", type=Path, help="where to write the file (default: a temp dir)")
    parser.add_argument("--reuse", action="store_true", help="use the file at --path as it is")
    parser.add_argument("--keep", action="store_true", help="keep the file afterwards")
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="sd15")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--runs", type=int, default=30, help="warm inspect / safe_open runs")
    parser.add_argument("--load-runs", type=int, default=3, help="load_file runs")
    parser.add_argument("--baseline", type=Path, help="another checkout (holding lora_compat/) to time beside this one")
    parser.add_argument("--turns", type=int, default=3, help="turns each checkout takes with --baseline")
    parser.add_argument("--torch", action="store_true", help="import torch first in the --baseline turns (as a host)")
    args = parser.parse_args(argv)

    tmpdir = None
    if args.path is None:
        tmpdir = Path(tempfile.mkdtemp(prefix="lora_compat_bench_"))
        args.path = tmpdir / "bench_lora.safetensors"
    path: Path = args.path
    reused = args.reuse and path.is_file()
    try:
        if reused:
            print(f"using {path}")
        else:
            start = time.perf_counter()
            rank = write_lora(path, args.layout, int(args.size_gb * 1e9), DTYPES[args.dtype])
            print(f"wrote {path}: {args.layout} LoRA ({LAYOUTS[args.layout]}), rank {rank}, {args.dtype}, "
                  f"{time.perf_counter() - start:.1f} s")
        size = path.stat().st_size

        warm = repeat(lambda: lora_compat.inspect(path), args.runs)
        cold = in_fresh_interpreter(COLD_SCRIPT, path)
        header = repeat(lambda: list_header(path), args.runs)
        mapped = repeat(lambda: load_file(str(path)), args.runs)
        load = repeat(lambda: load_everything(path), args.load_runs)
        load_fresh = in_fresh_interpreter(LOAD_SCRIPT, path)

        inspect_ms = statistics.median(warm) * 1e3
        rss_kb = cold["peak_added_kb"] if cold["peak_added_kb"] is not None else cold["maxrss_added_kb"]
        rss_mb = rss_kb / 1024
        print(f"\nfile: {size / 1e9:.3f} GB, {cold['tensors']} tensors, dialect {cold['dialect']}, "
              f"base {cold['base']}, {cold['targets']} targets, rank {cold['rank']}")
        print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {os.cpu_count()} CPUs\n")
        rows = [
            ("inspect, warm (in-process)", f"{inspect_ms:9.2f}", f"{min(warm) * 1e3:9.2f}", "-"),
            ("inspect, first call in a fresh process", f"{cold['first_s'] * 1e3:9.2f}", "-",
             f"{rss_mb:.1f} (ru_maxrss +{cold['maxrss_added_kb'] / 1024:.1f}, "
             f"traced {cold['traced_peak_b'] / 2**20:.1f})"),
            ("  (import lora_compat before it)", f"{cold['import_s'] * 1e3:9.2f}", "-", "-"),
            ("safe_open: names, shapes, metadata", f"{statistics.median(header) * 1e3:9.2f}",
             f"{min(header) * 1e3:9.2f}", "-"),
            ("load_file, mapped only (tensors untouched)", f"{statistics.median(mapped) * 1e3:9.2f}",
             f"{min(mapped) * 1e3:9.2f}", "-"),
            ("load_file + read every tensor (naive)", f"{statistics.median(load) * 1e3:9.2f}",
             f"{min(load) * 1e3:9.2f}", "-"),
            ("  the same, fresh process", f"{load_fresh['load_s'] * 1e3:9.2f}", "-",
             f"{(load_fresh['peak_added_kb'] or load_fresh['maxrss_added_kb']) / 1024:.1f}"),
        ]
        print(f"{'what':44} {'median ms':>9} {'min ms':>9}  peak RSS added, MB")
        for row in rows:
            print(f"{row[0]:44} {row[1]:>9} {row[2]:>9}  {row[3]}")
        print(f"\nnaive load / inspect (warm medians): {statistics.median(load) / statistics.median(warm):.0f}x; "
              f"fresh processes: {load_fresh['load_s'] / cold['first_s']:.0f}x; "
              f"inspect / safe_open: {statistics.median(warm) / statistics.median(header):.1f}x")
        if args.baseline is not None:
            ours, theirs = warm_turns(path, args.baseline.resolve(), args.runs, args.turns, args.torch)
            where = "fresh interpreters" + (" with torch" if args.torch else "")
            print(f"\nwarm inspect, {where} taking turns: this checkout {statistics.median(ours) * 1e3:.2f} ms "
                  f"(min {min(ours) * 1e3:.2f}), {args.baseline} {statistics.median(theirs) * 1e3:.2f} ms "
                  f"(min {min(theirs) * 1e3:.2f}): {statistics.median(theirs) / statistics.median(ours):.2f}x faster; "
                  f"target {TARGET_MS:.0f} ms")
        ok_time = inspect_ms < TARGET_MS
        ok_rss = rss_mb < TARGET_MB
        print(f"targets: inspect < {TARGET_MS:.0f} ms: {'met' if ok_time else 'MISSED'} ({inspect_ms:.2f} ms warm, "
              f"{cold['first_s'] * 1e3:.2f} ms cold); < {TARGET_MB:.0f} MB extra RSS: "
              f"{'met' if ok_rss else 'MISSED'} ({rss_mb:.1f} MB)")
        return 0 if ok_time and ok_rss else 1
    finally:
        if args.keep or reused:
            print(f"kept {path}")
        else:
            path.unlink(missing_ok=True)
            if tmpdir is not None:
                tmpdir.rmdir()


if __name__ == "__main__":
    sys.exit(main())
