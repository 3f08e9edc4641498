"""Patcher vs diffusers on a FLUX.1-shaped transformer of reduced depth (full width 3072, one double block,
``--single`` single blocks), random init. A rank-16 kohya-flux LoRA (BFL names: fused qkv / linear1, split
exactly by lora_compat) on every Linear of the blocks. Same measurements as ``bench_patcher.py``, medians of
``--runs``: first apply, switch A -> B, clear, against diffusers' load+fuse / unfuse+unload+load+fuse /
unfuse+unload, and the bound (touched bytes read + written once, the GEMMs, reading the file).

Usage: python bench/bench_flux.py [--dtype float32 bfloat16] [--runs 3] [--single 0]
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from bench_patcher import measure_bound, median, timed  # noqa: E402

warnings.filterwarnings("ignore")


def build_flux(dtype: torch.dtype, single: int) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    from lora_compat.archs.flux import FLUX1_CONFIGS

    torch.manual_seed(0)
    config = {**FLUX1_CONFIGS["transformer"], "num_layers": 1, "num_single_layers": single}
    return FluxTransformer2DModel(**config).to(dtype).eval().requires_grad_(False)


def bfl_modules(model: torch.nn.Module) -> dict[str, list[str]]:
    """BFL module (kohya name without prefix) → the diffusers Linear modules it fuses."""
    from lora_compat.archs.flux import bfl_groups

    names = {n for n, _ in model.named_modules()}
    return {bfl: list(parts) for bfl, parts in bfl_groups(names).items()
            if bfl.startswith(("double_blocks", "single_blocks")) and all(p in names for p in parts)
            and isinstance(model.get_submodule(parts[0]), torch.nn.Linear)}


def write_kohya_flux(path: Path, model: torch.nn.Module, seed: int, rank: int = 16) -> Path:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for bfl, parts in bfl_modules(model).items():
        weights = [model.get_submodule(p).weight for p in parts]
        key = "lora_unet_" + bfl.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = (torch.randn(rank, weights[0].shape[1], generator=gen) * 0.01).bfloat16()
        tensors[f"{key}.lora_up.weight"] = (torch.randn(sum(w.shape[0] for w in weights), rank, generator=gen)
                                            * 0.01).bfloat16()
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))
    return path


def bench_diffusers(model: torch.nn.Module, a: Path, b: Path, runs: int) -> dict:
    from diffusers import FluxPipeline

    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=model)
    return diffusers_cycle(pipe, a, b, runs)


def diffusers_cycle(pipe, a: Path, b: Path, runs: int) -> dict:
    """diffusers' load+fuse, switch (unfuse+unload+load+fuse) and unfuse+unload of a pipeline's transformer."""
    load, fuse, unfuse, unload, switch = [], [], [], [], []
    for _ in range(runs):
        load.append(timed(lambda: pipe.load_lora_weights(str(a), adapter_name="a")))
        fuse.append(timed(lambda: pipe.fuse_lora(components=["transformer"])))

        def do_switch():
            pipe.unfuse_lora(components=["transformer"])
            pipe.unload_lora_weights()
            pipe.load_lora_weights(str(b), adapter_name="b")
            pipe.fuse_lora(components=["transformer"])
        switch.append(timed(do_switch))
        unfuse.append(timed(lambda: pipe.unfuse_lora(components=["transformer"])))
        unload.append(timed(lambda: pipe.unload_lora_weights()))
    return {"load+fuse": median(load) + median(fuse), "switch": median(switch),
            "unfuse+unload": median(unfuse) + median(unload)}


def bench_patcher(model: torch.nn.Module, a: Path, b: Path, runs: int) -> dict:
    from lora_compat import Patcher

    first, switch, clear = [], [], []
    for _ in range(runs):
        patcher = Patcher(model)
        first.append(timed(lambda: patcher.set([(a, 1.0)])))
        switch.append(median([timed(lambda s=s: patcher.set([(s, 1.0)])) for s in (b, a, b)]))
        clear.append(timed(patcher.clear))
        patcher.close()
    return {"first": median(first), "switch": median(switch), "clear": median(clear)}


def print_rows(ours: dict, theirs: dict, bound: dict) -> None:
    """The table: lora_compat against diffusers, the speed-up, and the switch against the bound."""
    rows = [("first apply", "set([A])", ours["first"], "load_lora_weights + fuse_lora", theirs["load+fuse"]),
            ("switch A -> B", "set([B])", ours["switch"], "unfuse + unload + load + fuse", theirs["switch"]),
            ("remove", "clear()", ours["clear"], "unfuse_lora + unload_lora_weights", theirs["unfuse+unload"])]
    print(f"{'':15} {'lora_compat':>22} {'diffusers':>40} {'speed-up':>9}")
    for label, ours_name, ours_s, theirs_name, theirs_s in rows:
        print(f"{label:15} {ours_name:>10} {ours_s:9.3f} s {theirs_name:>32} {theirs_s:6.3f} s "
              f"{theirs_s / ours_s:8.1f}x")
    print(f"switch / bound: {ours['switch'] / bound['bound_s']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--single", type=int, default=0, help="single-stream blocks (each adds ~0.57 GB fp32)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.dtype:
            dtype = getattr(torch, name)
            model = build_flux(dtype, args.single)
            a = write_kohya_flux(Path(tmp) / "a.safetensors", model, seed=1)
            b = write_kohya_flux(Path(tmp) / "b.safetensors", model, seed=2)
            linears = [p for parts in bfl_modules(model).values() for p in parts]
            bound = measure_bound(model, {p: model.get_submodule(p).weight.shape for p in linears}, a, rank=16)
            ours = bench_patcher(model, a, b, args.runs)
            theirs = bench_diffusers(model, a, b, args.runs)
            print(f"\n== {name}: {len(linears)} Linear layers, {bound['touched_gb']:.2f} GB touched; "
                  f"bound {bound['bound_s']:.3f} s (medians of {args.runs})")
            print_rows(ours, theirs, bound)
            del model
            gc.collect()


if __name__ == "__main__":
    main()
