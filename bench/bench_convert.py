"""``lora_compat.convert`` of a ~1 GB kohya LoRA (SD1.5 full-size layout) to diffusers, in a fresh process:
peak RSS it adds vs the file size, and its time vs reading plus writing the file once (``read_bytes`` +
``write_bytes`` measured in the same run). Targets: peak RSS < 1.5x the file, time < 2x read + write.

Usage: python bench/bench_convert.py [--size-gb 1.0] [--to diffusers]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_inspect import DTYPES, write_lora  # noqa: E402

SCRIPT = """
import json, sys, time, warnings
warnings.filterwarnings("ignore")
def peak():  # VmHWM: ru_maxrss would carry the parent's peak across exec
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024

import lora_compat
before = peak()
start = time.perf_counter()
lora_compat.convert(sys.argv[1], sys.argv[3], sys.argv[2])
seconds = time.perf_counter() - start
after = peak()
print(json.dumps({"seconds": seconds, "added_bytes": after - before}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--to", default="diffusers")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "kohya.safetensors", Path(tmp) / "out.safetensors"
        write_lora(source, "sd15", int(args.size_gb * 1e9), DTYPES["fp16"])
        size = source.stat().st_size
        copies, runs = [], []
        for _ in range(args.runs):
            start = time.perf_counter()
            (Path(tmp) / "copy.safetensors").write_bytes(source.read_bytes())
            copies.append(time.perf_counter() - start)
            result = subprocess.run([sys.executable, "-c", SCRIPT, str(source), str(out), args.to], check=True,
                                    capture_output=True, text=True)
            runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
        copy_s = sorted(copies)[len(copies) // 2]
        seconds = sorted(r["seconds"] for r in runs)[len(runs) // 2]
        added = sorted(r["added_bytes"] for r in runs)[len(runs) // 2]
        print(f"file {size / 1e9:.2f} GB; medians of {args.runs}")
        print(f"read + write once:  {copy_s:.2f} s")
        print(f"convert -> {args.to}: {seconds:.2f} s  ({seconds / copy_s:.2f}x of read + write; target < 2x)")
        print(f"peak RSS added: {added / 1e9:.2f} GB ({added / size:.2f}x the file; target < 1.5x)")


if __name__ == "__main__":
    main()
