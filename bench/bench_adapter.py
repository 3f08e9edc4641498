"""``lora_compat.adapters.diffusers.load`` vs diffusers' ``load_lora_weights`` of the same file, in the same run.

Full-size SD1.5 UNet (random init, official config) in a pipeline, the rank-32 kohya LoRA of
``bench_patcher.py``; medians of ``--runs`` loads (each followed by an unload, not timed).

Usage: python bench/bench_adapter.py [--runs 5]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_patcher import build_unet, median, targets, timed, write_lora  # noqa: E402

warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    from diffusers import StableDiffusionPipeline

    from lora_compat.adapters import diffusers as adapter

    unet = build_unet(torch.float32)
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=None,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with tempfile.TemporaryDirectory() as tmp:
        lora = write_lora(Path(tmp) / "a.safetensors", targets(unet), seed=1)
        ours, theirs = [], []
        for _ in range(args.runs):
            theirs.append(timed(lambda: pipe.load_lora_weights(str(lora), adapter_name="theirs")))
            pipe.unload_lora_weights()
            ours.append(timed(lambda: adapter.load(pipe, lora, "ours")))
            adapter.unload(pipe)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {args.runs}")
        print(f"diffusers load_lora_weights   {median(theirs):.3f} s")
        print(f"lora_compat adapters.load      {median(ours):.3f} s   ratio {median(theirs) / median(ours):.2f}x")


if __name__ == "__main__":
    main()
