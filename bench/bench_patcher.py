"""Patcher vs diffusers/PEFT on a full-size SD1.5 UNet (random init from the official config).

A rank-32 kohya LoRA on all 192 attention / feed-forward / proj layers (about 1.07 GB of fp32 weights
touched). Measured in the same run, interleaved (a lora_compat run, then a diffusers run, ...; each switch
right after a pass of the floor), medians of ``--runs`` repetitions and of the per-run ratios:

- diffusers: ``load_lora_weights`` + ``fuse_lora``; ``unfuse_lora`` + ``unload_lora_weights``; the switch
  A -> B = unfuse + unload + load(B) + fuse.
- lora_compat: first ``Patcher.set([A])`` (how much of it is allocating the buffers is printed),
  ``set([B])`` (switch: A -> B -> A -> B; the first goes to a LoRA not used before and reads its file, the
  others go back to LoRAs whose scaled factors the Patcher kept), ``clear()``.
- the bound: touched bytes read and written once at the measured copy bandwidth + the LoRA GEMMs timed on
  the real layer shapes in fp32 + reading the file.
- the floor (issue 13): one fused ``torch.addmm(original, up, down, out=buffer)`` per touched weight (conv
  weights flattened to 2-D, the scale folded into ``up``), timed as a whole. In fp32 it runs in the weight's
  dtype; for fp16/bf16 it is the same floor done in fp32 and rounded once (``addmm`` into an fp32 buffer, then
  ``copy_`` into the half-precision buffer). Targets: fp32 switch <= 1.1x floor, fp16/bf16 switch <= 1.5x
  floor, first apply >= 1.5x faster than diffusers' load + fuse.
- hot mode: UNet forward with one LoRA vs a plain forward vs diffusers/PEFT unfused adapters.

Usage: python bench/bench_patcher.py [--dtype float32 float16 bfloat16] [--runs 3] [--no-hot]
"""
from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

warnings.filterwarnings("ignore")
LEAVES = (".to_q", ".to_k", ".to_v", ".to_out.0", ".ff.net.0.proj", ".ff.net.2", ".proj_in", ".proj_out")


def build_unet(dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    from lora_compat.archs.sd import OFFICIAL_CONFIGS

    torch.manual_seed(0)
    return UNet2DConditionModel(**OFFICIAL_CONFIGS["sd15"]["unet"]).to(dtype).eval().requires_grad_(False)


def targets(unet: torch.nn.Module) -> dict[str, torch.Size]:
    return {name: m.weight.shape for name, m in unet.named_modules()
            if name.endswith(LEAVES) and "attentions" in name and hasattr(m, "weight")}


def write_lora(path: Path, shapes: dict[str, torch.Size], seed: int, rank: int = 32) -> Path:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        key = "lora_unet_" + name.replace(".", "_")
        kernel = tuple(shape[2:])
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, shape[1], *kernel, generator=gen).half() * 0.01
        tensors[f"{key}.lora_up.weight"] = torch.randn(shape[0], rank, *([1] * len(kernel)), generator=gen).half() * 0.01
        tensors[f"{key}.alpha"] = torch.tensor(float(rank / 2))
    save_file(tensors, str(path))
    return path


def timed(fn) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values)


def measure_bound(unet: torch.nn.Module, shapes: dict[str, torch.Size], lora: Path, rank: int = 32) -> dict:
    """Touched bytes read + written once at copy bandwidth, plus the GEMMs, plus reading the file.

    The GEMM time is measured on the real layer shapes (``up @ down`` of every touched layer, into a
    cache-sized fp32 block, so no memory traffic is counted twice), median of 5 passes."""
    touched = sum(unet.get_submodule(n).weight.numel() * unet.get_submodule(n).weight.element_size()
                  for n in shapes)
    src = torch.randn(64 * 1024 * 1024 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    copy_s = median([timed(lambda: dst.copy_(src)) for _ in range(5)])
    bandwidth = 2 * src.numel() * 4 / copy_s  # bytes read + written per second
    factors = [(torch.randn(s[0], rank), torch.randn(rank, s.numel() // s[0])) for s in shapes.values()]
    block = torch.empty(1 << 19)

    def gemms() -> None:
        for up, down in factors:
            step = max(1, block.numel() // down.shape[1])
            for start in range(0, up.shape[0], step):
                rows = up[start:start + step]
                torch.mm(rows, down, out=block[: rows.shape[0] * down.shape[1]].view(rows.shape[0], -1))

    gemms()
    gemm_s = median([timed(gemms) for _ in range(5)])
    gemm_flops = sum(2 * s[0] * rank * (s.numel() // s[0]) for s in shapes.values())
    file_s = median([timed(lambda: lora.read_bytes()) for _ in range(3)])
    total = 2 * touched / bandwidth + gemm_s + file_s
    return {"touched_gb": touched / 1e9, "bandwidth_gbs": bandwidth / 1e9, "gflops": gemm_flops / gemm_s / 1e9,
            "bound_s": total}


def prepare_floor(unet: torch.nn.Module, shapes: dict[str, torch.Size], rank: int = 32):
    """One fused ``addmm(original, up, down, out=buffer)`` per touched weight, all weights timed as a whole.

    fp32: in the weight's dtype. fp16/bf16: done in fp32 (fp32 originals, an fp32 buffer) and rounded once by a
    ``copy_`` into a half-precision buffer of the weight's shape. Buffers are allocated and faulted in here
    (one warm-up pass); returns the pass, timed between the Patcher's switches."""
    gen = torch.Generator().manual_seed(3)
    scale = 0.5  # alpha / rank of the bench's LoRA, folded into up
    jobs = []
    for name, shape in shapes.items():
        weight = unet.get_submodule(name).weight.detach()
        rows = shape[0]
        original = weight.reshape(rows, -1).float()  # a copy for halves; the weight itself (a view) for fp32
        up = torch.randn(rows, rank, generator=gen) * (0.01 * scale)
        down = torch.randn(rank, original.shape[1], generator=gen) * 0.01
        buffer = torch.zeros_like(original)
        rounded = None if weight.dtype == torch.float32 else torch.zeros_like(weight).reshape(rows, -1)
        jobs.append((original, up, down, buffer, rounded))

    def floor() -> None:
        for original, up, down, buffer, rounded in jobs:
            torch.addmm(original, up, down, out=buffer)
            if rounded is not None:
                rounded.copy_(buffer)

    floor()
    return floor


def bench_diffusers(unet: torch.nn.Module, a: Path, b: Path, runs: int = 1) -> dict:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=None,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    load, fuse, unfuse, unload, switch = [], [], [], [], []
    for _ in range(runs):
        load.append(timed(lambda: pipe.load_lora_weights(str(a), adapter_name="a")))
        fuse.append(timed(lambda: pipe.fuse_lora(components=["unet"])))

        def do_switch():
            pipe.unfuse_lora(components=["unet"])
            pipe.unload_lora_weights()
            pipe.load_lora_weights(str(b), adapter_name="b")
            pipe.fuse_lora(components=["unet"])
        switch.append(timed(do_switch))
        unfuse.append(timed(lambda: pipe.unfuse_lora(components=["unet"])))
        unload.append(timed(lambda: pipe.unload_lora_weights()))
    return {"load+fuse": median(load) + median(fuse), "switch": median(switch),
            "unfuse+unload": median(unfuse) + median(unload), "load": median(load), "fuse": median(fuse)}


def bench_patcher(unet: torch.nn.Module, a: Path, b: Path, floor) -> dict:
    """One run: first apply, then switches A -> B -> A -> B, each right after a pass of the floor.

    The first switch goes to B for the first time (its file is read); the next ones go back to LoRAs used
    just before, whose scaled factors the Patcher kept."""
    from lora_compat import Patcher

    patcher = Patcher(unet)
    shapes = [unet.get_submodule(n).weight for n in targets(unet)]
    alloc = timed(lambda: [torch.empty_like(w).fill_(0) for w in shapes])  # what first touch costs
    first = timed(lambda: patcher.set([(a, 1.0)]))
    memory = patcher.memory()
    floors, switches = [], []
    for source in (b, a, b, a):
        floors.append(timed(floor))
        switches.append(timed(lambda: patcher.set([(source, 1.0)])))
    clear = timed(patcher.clear)
    patcher.close()
    return {"first": first, "alloc": alloc, "floor": median(floors), "new": switches[0],
            "new/floor": switches[0] / floors[0], "switch": median(switches[1:]),
            "switch/floor": median([s / f for s, f in zip(switches[1:], floors[1:])]), "clear": clear,
            "memory": memory}


def bench_hot(dtype: torch.dtype, a: Path, runs: int) -> dict:

    from lora_compat import Patcher

    sample = torch.randn(1, 4, 64, 64).to(dtype)
    states = torch.randn(1, 77, 768).to(dtype)
    unet = build_unet(dtype)

    def forward():
        with torch.no_grad():
            unet(sample, 10, encoder_hidden_states=states)

    forward()
    plain = median([timed(forward) for _ in range(runs)])
    hot = Patcher(unet, mode="hot")
    hot.set([(a, 1.0)])
    forward()
    ours = median([timed(forward) for _ in range(runs)])
    hot.close()
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=None,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(a), adapter_name="a")
    forward()
    peft = median([timed(forward) for _ in range(runs)])
    pipe.unload_lora_weights()
    return {"plain": plain, "hot": ours, "peft": peft}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", nargs="+", default=["float32", "float16"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-hot", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.dtype:
            dtype = getattr(torch, name)
            unet = build_unet(dtype)
            shapes = targets(unet)
            a = write_lora(Path(tmp) / "a.safetensors", shapes, seed=1)
            b = write_lora(Path(tmp) / "b.safetensors", shapes, seed=2)
            bound = measure_bound(unet, shapes, a)
            floor = prepare_floor(unet, shapes)
            ours_runs, theirs_runs = [], []
            for _ in range(args.runs):  # interleaved: one lora_compat run, one diffusers run, ...
                ours_runs.append(bench_patcher(unet, a, b, floor))
                theirs_runs.append(bench_diffusers(unet, a, b))
            ours = {k: median([r[k] for r in ours_runs]) for k in ours_runs[0] if k != "memory"}
            ours["memory"] = ours_runs[-1]["memory"]
            theirs = {k: median([r[k] for r in theirs_runs]) for k in theirs_runs[0]}
            first_ratio = median([t["load+fuse"] / o["first"] for o, t in zip(ours_runs, theirs_runs)])
            del floor
            gc.collect()
            print(f"\n== {name}: {len(shapes)} layers, {bound['touched_gb']:.2f} GB touched; copy bandwidth "
                  f"{bound['bandwidth_gbs']:.1f} GB/s, fp32 GEMM {bound['gflops']:.0f} GFLOP/s; "
                  f"bound {bound['bound_s']:.3f} s; floor {ours['floor']:.3f} s (one addmm per weight"
                  f"{'' if dtype == torch.float32 else ' in fp32, rounded once'}) (medians of {args.runs})")
            rows = [
                ("first apply", "set([A])", ours["first"], "load_lora_weights + fuse_lora", theirs["load+fuse"]),
                ("switch A -> B", "set([B])", ours["switch"], "unfuse + unload + load + fuse", theirs["switch"]),
                ("remove", "clear()", ours["clear"], "unfuse_lora + unload_lora_weights", theirs["unfuse+unload"]),
            ]
            print(f"{'':15} {'lora_compat':>22} {'diffusers':>40} {'speed-up':>9}")
            for label, ours_name, ours_s, theirs_name, theirs_s in rows:
                print(f"{label:15} {ours_name:>10} {ours_s:9.3f} s {theirs_name:>32} {theirs_s:6.3f} s "
                      f"{theirs_s / ours_s:8.1f}x")
            target = 1.1 if dtype == torch.float32 else 1.5
            print(f"switch / floor (each switch right after a floor pass, back to a LoRA used before): "
                  f"{ours['switch/floor']:.2f}x (target <= {target}x); to a LoRA not used before (its file read): "
                  f"{ours['new/floor']:.2f}x; first apply: diffusers / lora_compat {first_ratio:.2f}x (target >= 1.5x)")
            print(f"switch / bound: {ours['switch'] / bound['bound_s']:.2f}x; first apply includes ~"
                  f"{ours['alloc']:.3f} s of allocating and faulting in fresh buffers")
            touched = bound["touched_gb"] * 1e9
            print(f"memory held: pristine copies {ours['memory']['pristine_copies'] / touched:.2f}x of touched bytes; "
                  f"patched buffers {ours['memory']['buffers'] / touched:.2f}x (the originals are kept as they are)")
            del unet
            gc.collect()
            if not args.no_hot and dtype == torch.float32:  # half-precision CPU forwards are ~100x slower
                hot = bench_hot(dtype, a, args.runs)
                print(f"hot mode forward (64x64 latent): plain {hot['plain']:.3f} s, lora_compat hot "
                      f"{hot['hot']:.3f} s (+{hot['hot'] - hot['plain']:.3f}), PEFT unfused {hot['peft']:.3f} s "
                      f"(+{hot['peft'] - hot['plain']:.3f}); overhead ratio "
                      f"{(hot['hot'] - hot['plain']) / max(1e-9, hot['peft'] - hot['plain']):.2f}")


if __name__ == "__main__":
    main()
