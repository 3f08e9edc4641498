"""Benchmark: one whole ``lora-compat inspect --json`` process on a full-size SDXL kohya LoRA, with and without torch.

The file has the key names and shapes of the corpus layout ``derived_sdxl_kohya_lora_full_sgm_names.json``
(2958 tensors, 986 modules, from the corpus shipped in ``lora_compat/corpus``; ``--rank`` rescales it) and an
F16 data section that is a hole in a sparse file, so a multi-GB LoRA costs no disk and no time to write
(``inspect`` reads only the header). Measured, each in fresh processes (wall time
of the subprocess, ``--runs`` times, interleaved):

* ``python -c pass``: the interpreter's own start;
* ``lora-compat inspect --json FILE``: the console script, as a user runs it (torch is never imported);
* the same command in a process that imports torch first: what every call cost while the header path imported
  torch (2.4 s on a quiet machine before this was fixed).

Target: under 0.5 s per inspect process. Run: ``python bench/bench_cli_inspect.py`` (``--keep``/``--path``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAYOUT = "derived_sdxl_kohya_lora_full_sgm_names.json"
NOMINAL_RANK = 16  # the layout's linear rank (3x3 convs use half of it)
TARGET_S = 0.5
WITH_TORCH = "import sys, torch; from lora_compat.cli import main; sys.exit(main(sys.argv[1:]))"


def layout_keys(rank: int) -> tuple[dict[str, list[int]], str]:
    """Key → shape of a full-size SDXL kohya LoRA at ``rank``, and where the layout came from."""
    from lora_compat import corpus

    keys = corpus.load(LAYOUT)["keys"]
    return {k: _rescaled(k, s, rank) for k, s in keys.items()}, f"lora_compat/corpus/{LAYOUT}"


def _rescaled(key: str, shape: list[int], rank: int) -> list[int]:
    if key.endswith(".alpha") or rank == NOMINAL_RANK:
        return shape
    conv3 = len(shape) == 4 and shape[2:] != [1, 1]
    scaled = list(shape)
    scaled[0 if key.endswith(".lora_down.weight") else 1] = max(1, rank // 2) if conv3 else rank
    return scaled


def write_sparse_lora(path: Path, keys: dict[str, list[int]], rank: int) -> int:
    """A safetensors file with these F16 shapes whose data section is a hole; returns its size in bytes."""
    header: dict = {"__metadata__": {
        "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
        "ss_base_model_version": "sdxl_base_v1-0", "ss_output_name": "bench",
        "ss_tag_frequency": json.dumps({"1_bench": {f"tag{i}": 100 - i for i in range(50)}})}}
    offset = 0
    for key, shape in keys.items():
        size = math.prod(shape) * 2
        header[key] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return 8 + len(raw) + offset


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Wall time, CPU time (user + system) and output of one process."""
    cpu, start = _children_cpu(), time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    elapsed, cpu = time.perf_counter() - start, _children_cpu() - cpu
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr}")
    return elapsed, cpu, done.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", type=Path, help="where to write the file (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the file afterwards")
    parser.add_argument("--rank", type=int, default=NOMINAL_RANK, help="linear rank (3x3 convs get half)")
    parser.add_argument("--runs", type=int, default=10, help="processes of each kind")
    args = parser.parse_args(argv)

    tmpdir = Path(tempfile.mkdtemp(prefix="lora_compat_bench_")) if args.path is None else None
    path: Path = args.path or tmpdir / "sdxl_kohya_full.safetensors"
    script = Path(sys.executable).parent / "lora-compat"
    cli = [str(script)] if script.is_file() else [sys.executable, "-m", "lora_compat"]
    try:
        keys, source = layout_keys(args.rank)
        size = write_sparse_lora(path, keys, args.rank)
        print(f"wrote {path}: {len(keys)} tensors, rank {args.rank}, {size / 1e9:.2f} GB (sparse); layout: {source}")
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "lora-compat inspect --json": [*cli, "inspect", "--json", str(path)],
            "  the same, torch imported first": [sys.executable, "-c", WITH_TORCH, "inspect", "--json", str(path)],
        }
        # as an installed package runs: with its bytecode cached (written by the warm-up runs if need be)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        outputs = {name: timed(argv, env)[2] for name, argv in commands.items()}  # warm-up; check the output
        if json.loads(outputs["lora-compat inspect --json"]) != json.loads(outputs["  the same, torch imported first"]):
            raise SystemExit("inspect printed something else with torch imported")
        wall: dict[str, list[float]] = {name: [] for name in commands}
        cpu: dict[str, list[float]] = {name: [] for name in commands}
        load = os.getloadavg()[0]
        for _ in range(args.runs):
            for name, argv in commands.items():
                elapsed, used, _ = timed(argv, env)
                wall[name].append(elapsed)
                cpu[name].append(used)

        print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {args.runs} processes each, load average "
              f"{load:.1f} before / {os.getloadavg()[0]:.1f} after (wall times grow with it, CPU times hardly)\n")
        print(f"{'process':36} {'median s':>9} {'min s':>9} {'max s':>9} {'CPU s (median)':>15}")
        for name, values in wall.items():
            print(f"{name:36} {statistics.median(values):9.3f} {min(values):9.3f} {max(values):9.3f} "
                  f"{statistics.median(cpu[name]):15.3f}")
        inspect_s = statistics.median(wall["lora-compat inspect --json"])
        torch_s = statistics.median(wall["  the same, torch imported first"])
        print(f"\nwith torch / without (median wall): {torch_s / inspect_s:.1f}x; target inspect < {TARGET_S} s per "
              f"process: {'met' if inspect_s < TARGET_S else 'MISSED'} ({inspect_s:.3f} s)")
        return 0 if inspect_s < TARGET_S else 1
    finally:
        if args.keep:
            print(f"kept {path}")
        else:
            path.unlink(missing_ok=True)
            if tmpdir is not None:
                tmpdir.rmdir()


if __name__ == "__main__":
    sys.exit(main())
