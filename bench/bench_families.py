"""Patcher vs diffusers on the newer families at their real width, reduced depth, random init: a rank-32 LoRA on
every Linear of the transformer blocks. Medians of ``--runs``: first apply, switch A -> B, clear, against
diffusers' load+fuse / unfuse+unload+load+fuse / unfuse+unload in the same run, and the switch against the
memory-bandwidth bound (touched bytes read + written once, the GEMMs, reading the file: ``bench_patcher``'s).

- ``wan``: ``WanTransformer3DModel`` at Wan 14B width (dim 5120, ffn 13824; 40 blocks at full depth), the LoRA in
  ComfyUI's native names (``diffusion_model.blocks.N.self_attn.q`` + ``lora_down``/``lora_up``/``alpha``), which
  diffusers reads with its own Wan converter.
- ``qwen-image``: ``QwenImageTransformer2DModel`` at the 20B block shapes (width 3072 = 24 heads x 128, joint
  width 3584, 60 blocks at full depth), the LoRA in diffusers names. HOOK: runs once the ``qwen-image`` family is
  registered (another branch adds it); until then it is skipped with a note.

Each block of Wan 14B is ~1.4 GB of fp32 weights (0.7 GB bf16), a Qwen-Image block ~0.85 GB: ``--gb`` picks the
depth that touches about that many GB (``--blocks`` overrides).

Usage: python bench/bench_families.py [--family wan qwen-image] [--dtype bfloat16 float32] [--runs 3] [--gb 1.0]
"""
from __future__ import annotations

import argparse
import gc
import math
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from bench_flux import bench_patcher, diffusers_cycle, print_rows  # noqa: E402
from bench_patcher import measure_bound  # noqa: E402

warnings.filterwarnings("ignore")
RANK = 32


@dataclass(frozen=True)
class Family:
    """What the bench needs of a family: its model at ``blocks`` blocks, its pipeline around a model, the LoRA
    name of a block Linear (``None``: not trained), and the block prefix."""

    build: Callable[[int], torch.nn.Module]
    pipeline: Callable[[torch.nn.Module], object]
    lora_name: Callable[[str], str | None]
    blocks: str


def _wan(blocks: int) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    from lora_compat.archs.wan import WAN_VARIANTS

    return WanTransformer3DModel(**{**WAN_VARIANTS["wan21-t2v-14b"], "num_layers": blocks})


def _wan_pipe(model: torch.nn.Module) -> object:
    from diffusers import WanPipeline

    return WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=model)


def _wan_name(path: str) -> str | None:
    from lora_compat.archs.wan import native_name

    native = native_name(path)
    return f"diffusion_model.{native}" if native else None


def _qwen(blocks: int) -> torch.nn.Module:  # HOOK: the 20B config, as the qwen-image family states it
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=blocks,
                                       attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584,
                                       guidance_embeds=False, axes_dims_rope=(16, 56, 56))


def _qwen_pipe(model: torch.nn.Module) -> object:
    from diffusers import QwenImagePipeline

    return QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=model)


FAMILIES = {
    "wan": Family(_wan, _wan_pipe, _wan_name, "blocks."),
    "qwen-image": Family(_qwen, _qwen_pipe, lambda path: f"transformer.{path}", "transformer_blocks."),
}


def block_linears(model: torch.nn.Module, family: Family) -> dict[str, str]:
    """Module path → LoRA module name, for every Linear in the blocks."""
    return {path: name for path, module in model.named_modules()
            if path.startswith(family.blocks) and isinstance(module, torch.nn.Linear)
            and (name := family.lora_name(path)) is not None}


def write_lora(path: Path, model: torch.nn.Module, names: dict[str, str], seed: int) -> Path:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    kohya = any(n.startswith("diffusion_model.") for n in names.values())
    down_s, up_s = ("lora_down.weight", "lora_up.weight") if kohya else ("lora_A.weight", "lora_B.weight")
    for module_path, name in names.items():
        out, inp = model.get_submodule(module_path).weight.shape
        tensors[f"{name}.{down_s}"] = (torch.randn(RANK, inp, generator=gen) * 0.01).bfloat16()
        tensors[f"{name}.{up_s}"] = (torch.randn(out, RANK, generator=gen) * 0.01).bfloat16()
        if kohya:
            tensors[f"{name}.alpha"] = torch.tensor(float(RANK))
    save_file(tensors, str(path))
    return path


def depth(model_one: torch.nn.Module, family: Family, dtype: torch.dtype, gb: float) -> int:
    """Blocks that touch about ``gb`` GB of Linear weights in ``dtype`` (from a one-block model on ``meta``)."""
    per_block = sum(model_one.get_submodule(p).weight.numel() for p in block_linears(model_one, family))
    return max(1, math.ceil(gb * 1e9 / (per_block * torch.empty((), dtype=dtype).element_size())))


def run(name: str, dtype: torch.dtype, args: argparse.Namespace, tmp: Path) -> None:
    family = FAMILIES[name]
    if args.blocks:
        blocks = args.blocks
    else:
        with torch.device("meta"):
            blocks = depth(family.build(1), family, dtype, args.gb)
    torch.manual_seed(0)
    model = family.build(blocks).to(dtype).eval().requires_grad_(False)
    names = block_linears(model, family)
    a = write_lora(tmp / f"{name}_a.safetensors", model, names, seed=1)
    b = write_lora(tmp / f"{name}_b.safetensors", model, names, seed=2)
    bound = measure_bound(model, {p: model.get_submodule(p).weight.shape for p in names}, a, rank=RANK)
    ours = bench_patcher(model, a, b, args.runs)
    theirs = diffusers_cycle(family.pipeline(model), a, b, args.runs)
    print(f"\n== {name} {str(dtype).removeprefix('torch.')}: {blocks} blocks, {len(names)} Linear layers, "
          f"{bound['touched_gb']:.2f} GB touched; bound {bound['bound_s']:.3f} s (medians of {args.runs})")
    print_rows(ours, theirs, bound)
    del model
    gc.collect()


def main() -> None:
    from lora_compat import plugins

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--gb", type=float, default=1.0, help="about this many GB of weights touched")
    parser.add_argument("--blocks", type=int, default=0, help="number of blocks (overrides --gb)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.family:
            if name not in plugins.archs():
                print(f"\n== {name}: skipped, the {name} family is not registered in this branch (hook)")
                continue
            for dtype in args.dtype:
                run(name, getattr(torch, dtype), args, Path(tmp))


if __name__ == "__main__":
    main()
