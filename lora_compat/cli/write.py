"""Commands that write LoRA files and checkpoints: ``convert`` (another dialect; ControlNet checkpoints to
diffusers), ``bake`` (LoRAs into a checkpoint) and ``merge`` (LoRAs into one)."""
from __future__ import annotations

import argparse
import sys
from typing import NamedTuple, Sequence

from ..errors import LoraCompatError
from .parsing import Argument, Command, arg

#: the dialects ``convert`` and ``merge`` write
TARGETS = ["kohya", "webui", "diffusers", "peft", "bfl"]


class Weighted(NamedTuple):
    """A ``PATH[:NUMBER]`` argument: a LoRA and its strength (bake) or weight (merge)."""

    path: str
    weight: float


def weighted(specs: Sequence[str]) -> list[Weighted]:
    """``PATH[:NUMBER]`` arguments; a path without a number (or with a colon of its own) gets 1.0."""
    out = []
    for spec in specs:
        path, sep, number = spec.rpartition(":")
        try:
            out.append(Weighted(path, float(number)) if sep and path else Weighted(spec, 1.0))
        except ValueError:
            out.append(Weighted(spec, 1.0))
    return out


def _refuse_unmatched(exc: Exception) -> LoraCompatError:
    return LoraCompatError(f"{exc}; nothing written (--drop-unmatched writes the file without them)")


def _print_svd(errors: dict[str, float], overall: float | None, rank: int | None) -> None:
    if not errors:
        return
    for module, error in sorted(errors.items()):
        print(f"  svd rank {rank}: {module}: relative error {error:.3e}")
    print(f"  svd overall relative error {overall:.3e} over {len(errors)} modules")


def _convert_control(args: argparse.Namespace, kind: str) -> int:
    """ControlNet / Control-LoRA / T2I-Adapter checkpoints → a diffusers model folder."""
    from ..tools import controlnet
    from ..outputs import atomic_output, refuse_inputs

    if args.to != "diffusers":
        raise LoraCompatError(f"a {kind} checkpoint converts --to diffusers only")
    refuse_inputs(args.out, [args.src])
    if kind == "t2i-adapter":
        model = controlnet.t2i_adapter_to_diffusers(args.src)
    else:
        unet = None
        if args.unet:
            from diffusers import UNet2DConditionModel

            unet = UNet2DConditionModel.from_pretrained(args.unet)
        model = controlnet.to_diffusers(args.src, base_unet=unet)
    with atomic_output(args.out, directory=True) as folder:
        model.save_pretrained(folder, safe_serialization=True)
    print(f"wrote {args.out}: {kind} -> diffusers {type(model).__name__}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """write a LoRA in another dialect (exact; --rank R compresses by SVD); ControlNet / Control-LoRA /
    T2I-Adapter to diffusers

    Write SRC in another dialect. Exact where the target can hold the patches; kinds diffusers/PEFT cannot hold are
    refused unless --rank R compresses them by truncated SVD (the error per module and overall is printed)."""
    from ..tools.convert import convert
    from ..errors import NotALoraError, UnmatchedKeysError

    try:
        report = convert(args.src, args.to, args.out, base=args.base, rank=args.rank, checkpoint=args.checkpoint,
                         strict=not args.drop_unmatched)
    except NotALoraError as exc:
        if exc.kind in ("controlnet", "control-lora", "t2i-adapter"):
            return _convert_control(args, exc.kind)
        raise
    except UnmatchedKeysError as exc:
        raise _refuse_unmatched(exc) from exc
    print(f"wrote {report.path}: {report.source_dialect} -> {report.target}, base {report.base}, "
          f"{report.modules} modules, {report.tensors} tensors")
    _print_svd(report.svd_errors, report.overall_error, args.rank)
    if report.unmatched:
        print(f"  {len(report.unmatched)} keys of the source matched no module and were left out "
              "(--drop-unmatched)", file=sys.stderr)
    return 0


def cmd_bake(args: argparse.Namespace) -> int:
    """merge LoRAs into a checkpoint (diffusers folder or single-file safetensors)

    Merge one or more LoRAs into a full checkpoint, computed in fp32 and written in the checkpoint's dtype, streamed
    tensor by tensor."""
    from ..tools.bake import bake

    loras = weighted(args.loras)
    report = bake(args.checkpoint, loras, args.out, strict=args.strict, dora_strength=args.dora_strength)
    print(f"wrote {report.path}: {report.patched} of {report.tensors} tensors patched by {len(loras)} LoRA(s)")
    for source, keys in report.unmatched.items():
        print(f"  {source}: {len(keys)} keys matched no module", file=sys.stderr)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """merge LoRAs into one (concat exact, svd, ties, dare, linear where exact)

    Merge LoRAs with weights into one file: concat (exact, ranks add up), svd to --rank (errors printed), ties/dare
    on full deltas (PEFT's definitions, seeded), linear only where exact."""
    from ..errors import UnmatchedKeysError
    from ..tools.merge import merge

    sources = weighted(args.loras)
    try:
        report = merge(sources, args.out, args.method, to=args.to, rank=args.rank, density=args.density,
                       seed=args.seed, base=args.base, checkpoint=args.checkpoint, dora_strength=args.dora_strength,
                       strict=not args.drop_unmatched)
    except UnmatchedKeysError as exc:
        raise _refuse_unmatched(exc) from exc
    print(f"wrote {report.path}: {args.method} of {len(sources)} LoRAs, {report.modules} modules, dialect {args.to}")
    _print_svd(report.svd_errors, report.overall_error, args.rank)
    for source, keys in report.unmatched.items():
        print(f"  {source}: {len(keys)} keys matched no module and were left out (--drop-unmatched)",
              file=sys.stderr)
    return 0


def _dora_strength(what: str) -> Argument:
    return arg("--dora-strength", choices=["interpolate", "library"], default="interpolate",
               help=f"how DoRA modules read {what}: interpolate (default) W + s*(W_dora - W) as the webuis and "
                    "ComfyUI do (0 = off); library: LyCORIS' multiplier / PEFT's scaling")


def _checkpoint(needs: str) -> Argument:
    return arg("--checkpoint", metavar="PATH",
               help=f"the base model (diffusers folder or single-file safetensors): {needs} its weights for DoRA, "
                    "OFT/BOFT, IA3 and GLoRA; modules are named and shaped after it")


_BASE = arg("--base", help="read against this base instead of detecting it")

CONVERT = Command("convert", cmd_convert, (
    arg("src", metavar="SRC"),
    arg("--to", required=True, choices=TARGETS),
    arg("-o", "--out", required=True, help="output file (peft: a folder)"),
    _BASE,
    arg("--rank", type=int, help="compress kinds the target cannot hold to LoRAs of this rank"),
    _checkpoint("--rank needs"),
    arg("--drop-unmatched", action="store_true",
        help="write the file without the source's keys that match no module (default: refuse)"),
    arg("--unet", help="a diffusers UNet folder: the base a Control-LoRA is built on"),
))
BAKE = Command("bake", cmd_bake, (
    arg("checkpoint", metavar="CHECKPOINT"),
    arg("loras", nargs="+", metavar="LORA[:STRENGTH]"),
    arg("-o", "--out", required=True, help="output folder or file"),
    arg("--strict", action="store_true", help="refuse LoRAs with unmatched keys"),
    _dora_strength("STRENGTH"),
))
MERGE = Command("merge", cmd_merge, (
    arg("loras", nargs="+", metavar="LORA[:WEIGHT]"),
    arg("-o", "--out", required=True),
    arg("--method", choices=["concat", "svd", "ties", "dare", "linear"], default="concat"),
    arg("--to", choices=TARGETS, default="kohya"),
    arg("--rank", type=int, help="svd rank (required for svd; ties/dare: compress to a LoRA)"),
    arg("--density", type=float, default=0.5, help="ties/dare: fraction kept (default 0.5)"),
    arg("--seed", type=int, default=0, help="dare: random seed"),
    _BASE,
    _checkpoint("svd/ties/dare need"),
    arg("--drop-unmatched", action="store_true",
        help="write the merged file without the keys that map to no module (default: refuse, exit 2)"),
    _dora_strength("WEIGHT"),
))
