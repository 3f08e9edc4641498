"""The ``lora-compat`` command line."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Sequence

from . import __version__
from .errors import LoraCompatError

if TYPE_CHECKING:
    from .inspection import Inspection


def format_inspection(result: Inspection) -> str:
    """The human-readable `inspect` table."""
    rank = f"{result.rank['min']}-{result.rank['max']}" if result.rank else "-"
    if result.rank and result.rank["min"] == result.rank["max"]:
        rank = str(result.rank["min"])
    base = result.base or f"undetermined (candidates: {', '.join(result.base_candidates) or 'none'})"
    rows = [
        ("file", result.file),
        ("dialect", result.dialect),
        ("base", base),
        ("kinds", ", ".join(result.kinds) or "-"),
        ("targets", f"{result.targets} ({', '.join(f'{k} {v}' for k, v in result.components.items()) or '-'})"),
        ("rank", rank),
        ("tensors", str(result.tensors)),
        ("triggers", ", ".join(result.triggers) or "-"),
        ("unmatched", str(len(result.unmatched))),
    ]
    if result.partial:
        sample = next(iter(result.partial.items()))
        rows.insert(5, ("partial", f"{len(result.partial)} fused modules in part, e.g. {sample[0]}: "
                                   f"{', '.join(sample[1]['present'])} present (absent parts unchanged)"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    for key in result.unmatched[:10]:
        lines.append(f"{'':<{width}}    {key}: {result.unmatched_reasons[key]}")
    if len(result.unmatched) > 10:
        lines.append(f"{'':<{width}}    ... {len(result.unmatched) - 10} more (use --json)")
    lines += [f"{'warning':<{width}}  {w}" for w in result.warnings]
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspection import inspect

    status = 0
    for index, path in enumerate(args.paths):
        try:
            result = inspect(path, base=args.base, strict=args.strict)
        except (LoraCompatError, OSError) as exc:  # one line per bad file; the other files are still read
            sys.stdout.flush()
            print(f"lora-compat: {describe_error(exc)}", file=sys.stderr, flush=True)
            status = 2
            continue
        if args.json:
            print(result.to_json())
        else:
            print(("\n" if index else "") + format_inspection(result))
    return status


def cmd_dialects(args: argparse.Namespace) -> int:
    from . import plugins

    registry = plugins.registry()
    if args.json:
        print(json.dumps({
            "dialects": [{"id": k, "plugin": r.plugin, "refuses": r.obj.refuses, "description": r.obj.description}
                         for k, r in registry.dialects.items()],
            "bases": [{"id": k, "plugin": r.plugin, "title": r.obj.title} for k, r in registry.archs.items()],
            "kinds": [{"id": k, "plugin": r.plugin, "description": _kind_description(r.obj)}
                      for k, r in registry.kinds.items()],
        }))
        return 0
    width = max(len(k) for k in registry.dialects)
    print("dialects:")
    for key, reg in registry.dialects.items():
        note = " (recognised and refused)" if reg.obj.refuses else ""
        print(f"  {key:<{width}}  [{reg.plugin}] {reg.obj.description}{note}")
    print("bases:")
    for key, reg in registry.archs.items():
        print(f"  {key:<{width}}  [{reg.plugin}] {reg.obj.title}")
    print("patch kinds:")
    for key, reg in registry.kinds.items():
        print(f"  {key:<{width}}  [{reg.plugin}] {_kind_description(reg.obj)}")
    return 0


def _kind_description(kind: type) -> str:
    """A patch kind's ``description``, else the first line of its module's docstring."""
    doc = getattr(kind, "description", "") or getattr(sys.modules.get(kind.__module__), "__doc__", None) or ""
    return doc.strip().partition("\n")[0]


def cmd_demo(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from .examples import write_examples

    directory = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="lora-compat-demo-"))
    if args.dir:
        directory.mkdir(parents=True, exist_ok=True)
    paths = write_examples(directory)
    print(f"wrote {len(paths)} example files to {directory}; inspecting them "
          "(the last two must be refused: an embedding and a truncated download)\n")
    status = cmd_inspect(argparse.Namespace(paths=[str(p) for p in paths], json=False, base=None, strict=False))
    expected_refusals = 2
    print(f"\ndemo: {len(paths) - expected_refusals} LoRAs understood, {expected_refusals} bad files refused "
          "with a clear message (exit status 2 is what `inspect` returns for them)")
    return 0 if status == 2 else 1


def _convert_control(args: argparse.Namespace, kind: str) -> int:
    """ControlNet / Control-LoRA / T2I-Adapter checkpoints → a diffusers model folder."""
    from . import controlnet
    from .outputs import atomic_output, refuse_inputs

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


def _weighted(specs: Sequence[str]) -> list[tuple[str, float]]:
    """``PATH[:NUMBER]`` arguments → ``(path, number)``; a path without a number (or with a colon of its
    own) gets 1.0."""
    out = []
    for spec in specs:
        path, sep, number = spec.rpartition(":")
        try:
            out.append((path, float(number)) if sep and path else (spec, 1.0))
        except ValueError:
            out.append((spec, 1.0))
    return out


def _print_svd(errors: dict[str, float], overall: float | None, rank: int | None) -> None:
    if not errors:
        return
    for module, error in sorted(errors.items()):
        print(f"  svd rank {rank}: {module}: relative error {error:.3e}")
    print(f"  svd overall relative error {overall:.3e} over {len(errors)} modules")


def cmd_convert(args: argparse.Namespace) -> int:
    from .conversion import convert
    from .errors import NotALoraError, UnmatchedKeysError

    try:
        report = convert(args.src, args.to, args.out, base=args.base, rank=args.rank, checkpoint=args.checkpoint,
                         strict=not args.drop_unmatched)
    except NotALoraError as exc:
        if exc.kind in ("controlnet", "control-lora", "t2i-adapter"):
            return _convert_control(args, exc.kind)
        raise
    except UnmatchedKeysError as exc:
        raise LoraCompatError(f"{exc}; nothing written (--drop-unmatched writes the file without them)") from exc
    print(f"wrote {report.path}: {report.source_dialect} -> {report.target}, base {report.base}, "
          f"{report.modules} modules, {report.tensors} tensors")
    _print_svd(report.svd_errors, report.overall_error, args.rank)
    if report.unmatched:
        print(f"  {len(report.unmatched)} keys of the source matched no module and were left out "
              "(--drop-unmatched)", file=sys.stderr)
    return 0


def cmd_bake(args: argparse.Namespace) -> int:
    from .bake import bake

    loras = _weighted(args.loras)
    report = bake(args.checkpoint, loras, args.out, strict=args.strict, dora_strength=args.dora_strength)
    print(f"wrote {report.path}: {report.patched} of {report.tensors} tensors patched by {len(loras)} LoRA(s)")
    for source, keys in report.unmatched.items():
        print(f"  {source}: {len(keys)} keys matched no module", file=sys.stderr)
    return 0


def cmd_matrix(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import corpus as corpus_data
    from . import matrix
    from .adapters.routes import host_routes

    # the CLI puts the pieces together: the matrix measures the host columns with the host adapters' own routing
    matrix.use_host_routes(host_routes)
    corpus = Path(args.corpus) if args.corpus else matrix.default_corpus()
    if not corpus_data.has_index(corpus):
        print(f"lora-compat matrix: {corpus}: no corpus INDEX.json", file=sys.stderr)
        return 2
    stream = sys.stderr  # bound now: the reference libraries' own output is silenced while the matrix is built

    def progress(line: str) -> None:
        print(f"lora-compat matrix: {line}", file=stream, flush=True)

    out = Path(args.out)
    try:
        if args.check:
            stale = matrix.check(out, corpus, progress)
        else:
            matrix.write(out, corpus, progress)
    except LoraCompatError as exc:
        print(f"lora-compat matrix: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if stale:
            print(f"lora-compat matrix: {', '.join(stale)} in {out} differ from a fresh run; run "
                  "`lora-compat matrix` and commit the result", file=sys.stderr)
            return 1
        print(f"{out}: up to date")
        return 0
    print(f"wrote {out / 'MATRIX.md'} and {out / 'matrix.json'}")
    return 0


def _dora_strength_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--dora-strength", choices=["interpolate", "library"], default="interpolate",
                        help=f"how DoRA modules read {what}: interpolate (default) W + s*(W_dora - W) as the webuis "
                             "and ComfyUI do (0 = off); library: LyCORIS' multiplier / PEFT's scaling")


def _semantic_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--semantic", action=argparse.BooleanOptionalAction, default=None,
                        help=f"{what} (default: when the [semantic] extra is installed)")


def _with_library(args: argparse.Namespace, call):
    """``call(library)`` on the library of ``--db``."""
    from .library import Library

    with Library(args.db, semantic=args.semantic) as library:
        return call(library)


def _announce_semantic(library, args: argparse.Namespace) -> None:
    """Say on stderr when the semantic model is about to be loaded: a cold start takes seconds (torch,
    sentence-transformers and the MiniLM weights) and would otherwise pass in silence."""
    from .retrieval import SEMANTIC_MODEL_ID, load_embedder

    has_rows = library.db.execute("SELECT 1 FROM loras WHERE status = 'ok' LIMIT 1").fetchone() is not None
    if has_rows and library._use_semantic(None) and load_embedder.cache_info().currsize == 0:
        print(f"lora-compat {args.command}: loading the semantic search model ({SEMANTIC_MODEL_ID}, "
              "sentence-transformers; --no-semantic skips it)...", file=sys.stderr, flush=True)


def _search(library, args: argparse.Namespace):
    _announce_semantic(library, args)
    return library.search(args.prompt, base=args.base, k=args.k)


def _recommend(library, args: argparse.Namespace) -> dict:
    _announce_semantic(library, args)
    return library.recommend(args.prompt, base=args.base, k=args.k)


def cmd_index(args: argparse.Namespace) -> int:
    path, report = _with_library(args, lambda library: (library.path, library.index(
        args.dirs, hashes=not args.no_hash, progress=not args.quiet)))
    print(f"{path}: {report.added} added, {report.updated} updated, {report.unchanged} unchanged, "
          f"{report.removed} removed, {report.failed} not indexed ({report.seconds:.1f} s)")
    for path, error in sorted(report.errors.items())[:20]:
        print(f"  {path}: {error}", file=sys.stderr)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    results = _with_library(args, lambda library: _search(library, args))
    if args.json:
        print(json.dumps([r.to_dict() for r in results]))
        return 0
    if not results:
        print("no match" + (f" for base {args.base}" if args.base else ""))
    for rank, r in enumerate(results, 1):
        print(f"{rank}. {r.path}  [{r.base or '?'}, {r.dialect}]  score {r.score:.2f}, strength {r.strength:g}")
        if r.triggers:
            print(f"   triggers: {', '.join(r.triggers[:8])}")
        print(f"   why: {'; '.join(r.why) or '-'}")
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    stack = _with_library(args, lambda library: _recommend(library, args))
    if args.json:
        print(json.dumps(stack))
        return 0
    print(f"prompt: {stack['prompt']}")
    for entry in stack["stack"]:
        print(f"  {entry['path']}:{entry['strength']:g}")
    if not stack["stack"]:
        print(f"  (no LoRA for {args.base} matches)")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .fuse import merge

    from .errors import UnmatchedKeysError

    sources = _weighted(args.loras)
    try:
        report = merge(sources, args.out, args.method, to=args.to, rank=args.rank, density=args.density,
                       seed=args.seed, base=args.base, checkpoint=args.checkpoint, dora_strength=args.dora_strength,
                       strict=not args.drop_unmatched)
    except UnmatchedKeysError as exc:
        raise LoraCompatError(f"{exc}; nothing written (--drop-unmatched writes the file without them)") from exc
    print(f"wrote {report.path}: {args.method} of {len(sources)} LoRAs, {report.modules} modules, dialect {args.to}")
    _print_svd(report.svd_errors, report.overall_error, args.rank)
    for source, keys in report.unmatched.items():
        print(f"  {source}: {len(keys)} keys matched no module and were left out (--drop-unmatched)",
              file=sys.stderr)
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    from .install_host import install

    target, state = install(args.host, args.dir, copy=args.copy)
    print(f"{state}: {target}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-compat", description="Read, detect and apply every LoRA dialect.")
    parser.add_argument("--version", action="version", version=f"lora-compat {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also: LORA_COMPAT_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="describe LoRA files from their headers (dialect, base, kinds, ranks...)",
                       description="Describe LoRA files from their headers alone; no tensor data is read.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="LoRA files (.safetensors, .ckpt, .pt, .pth, .bin)")
    p.add_argument("--json", action="store_true", help="print one JSON object per file, one per line")
    p.add_argument("--base", help="read against this base instead of detecting it (sd15, sd2, sdxl, ...)")
    p.add_argument("--strict", action="store_true", help="treat unmatched keys as an error (exit 2)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("dialects", help="list every registered dialect, base and patch kind, and the plugin "
                       "providing it",
                       description="List every registered dialect, base and patch kind, with the plugin that "
                       "provides it.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_dialects)

    p = sub.add_parser("demo", help="write built-in example files (several dialects, two bad files) and inspect them",
                       description="Write built-in example LoRA files of several dialects plus two files that must "
                                   "be refused, and inspect them all.")
    p.add_argument("--dir", help="where to write the examples (default: a new temporary directory)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("convert", help="write a LoRA in another dialect (exact; --rank R compresses by SVD); "
                                       "ControlNet / Control-LoRA / T2I-Adapter to diffusers",
                       description="Write SRC in another dialect. Exact where the target can hold the patches; "
                                   "kinds diffusers/PEFT cannot hold are refused unless --rank R compresses them "
                                   "by truncated SVD (the error per module and overall is printed).")
    p.add_argument("src", metavar="SRC")
    p.add_argument("--to", required=True, choices=["kohya", "webui", "diffusers", "peft", "bfl"])
    p.add_argument("-o", "--out", required=True, help="output file (peft: a folder)")
    p.add_argument("--base", help="read against this base instead of detecting it")
    p.add_argument("--rank", type=int, help="compress kinds the target cannot hold to LoRAs of this rank")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="the base model (diffusers folder or single-file safetensors): --rank needs its weights "
                        "for DoRA, OFT/BOFT, IA3 and GLoRA; modules are named and shaped after it")
    p.add_argument("--drop-unmatched", action="store_true",
                   help="write the file without the source's keys that match no module (default: refuse)")
    p.add_argument("--unet", help="a diffusers UNet folder: the base a Control-LoRA is built on")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("bake", help="merge LoRAs into a checkpoint (diffusers folder or single-file safetensors)",
                       description="Merge one or more LoRAs into a full checkpoint, computed in fp32 and written in "
                                   "the checkpoint's dtype, streamed tensor by tensor.")
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("loras", nargs="+", metavar="LORA[:STRENGTH]")
    p.add_argument("-o", "--out", required=True, help="output folder or file")
    p.add_argument("--strict", action="store_true", help="refuse LoRAs with unmatched keys")
    _dora_strength_option(p, "STRENGTH")
    p.set_defaults(func=cmd_bake)

    p = sub.add_parser("matrix", help="generate the compatibility matrix (compat_matrix/MATRIX.md, matrix.json)",
                       description="Run every corpus layout through detection, full-size mapping and each host "
                                   "adapter's route; write MATRIX.md and matrix.json. --check: fail if the "
                                   "committed files differ from a fresh run.")
    p.add_argument("--out", default="compat_matrix", help="output folder (default: compat_matrix)")
    p.add_argument("--corpus", help="corpus folder with an INDEX.json (default: the corpus shipped in the package)")
    p.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    p.set_defaults(func=cmd_matrix)

    p = sub.add_parser("index", help="index folders of LoRA files into a searchable library (header only)",
                       description="Index LoRA files (recursively) into a SQLite library: dialect, base, kinds, "
                                   "triggers, tags, sidecars, AutoV2 hash. Incremental; resumes after interruption.")
    p.add_argument("dirs", nargs="+", metavar="DIR")
    p.add_argument("--db", help="library database (default: ~/.cache/lora-compat/library.sqlite or $LORA_COMPAT_DB)")
    p.add_argument("--no-hash", action="store_true", help="skip the AutoV2 hash (reads every file whole)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    _semantic_option(p, "embed new files for semantic search")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="find LoRAs for a prompt (BM25 over triggers, tags, titles...)",
                       description="Find indexed LoRAs for a prompt; --base keeps only LoRAs for that base. "
                                   "With the [semantic] extra, BM25 is fused with MiniLM similarity.")
    p.add_argument("prompt")
    p.add_argument("--base")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.add_argument("--db")
    _semantic_option(p, "fuse BM25 with semantic similarity")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("recommend", help="a ready LoRA stack for a prompt and a base",
                       description="Search the library and print a stack (paths:strengths) and the prompt with "
                                   "the trigger words added; --json for the patcher / host adapters.")
    p.add_argument("prompt")
    p.add_argument("--base", required=True)
    p.add_argument("-k", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.add_argument("--db")
    _semantic_option(p, "fuse BM25 with semantic similarity")
    p.set_defaults(func=cmd_recommend)

    p = sub.add_parser("merge", help="merge LoRAs into one (concat exact, svd, ties, dare, linear where exact)",
                       description="Merge LoRAs with weights into one file: concat (exact, ranks add up), svd to "
                                   "--rank (errors printed), ties/dare on full deltas (PEFT's definitions, "
                                   "seeded), linear only where exact.")
    p.add_argument("loras", nargs="+", metavar="LORA[:WEIGHT]")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--method", choices=["concat", "svd", "ties", "dare", "linear"], default="concat")
    p.add_argument("--to", choices=["kohya", "webui", "diffusers", "peft", "bfl"], default="kohya")
    p.add_argument("--rank", type=int, help="svd rank (required for svd; ties/dare: compress to a LoRA)")
    p.add_argument("--density", type=float, default=0.5, help="ties/dare: fraction kept (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="dare: random seed")
    p.add_argument("--base", help="read against this base instead of detecting it")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="the base model (diffusers folder or single-file safetensors): svd/ties/dare need its "
                        "weights for DoRA, OFT/BOFT, IA3 and GLoRA; modules are named and shaped after it")
    p.add_argument("--drop-unmatched", action="store_true",
                   help="write the merged file without the keys that map to no module (default: refuse, exit 2)")
    _dora_strength_option(p, "WEIGHT")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("install", help="add lora-compat to a webui (extensions/) or ComfyUI (custom_nodes/)",
                       description="Link (or copy) lora-compat's host folder into a webui's extensions/ "
                                   "(AUTOMATIC1111, Forge, SD.Next) or ComfyUI's custom_nodes/. Idempotent.")
    p.add_argument("host", choices=["webui", "comfyui"])
    p.add_argument("dir", metavar="DIR", help="the webui or ComfyUI directory")
    p.add_argument("--copy", action="store_true", help="copy the folder instead of linking it")
    p.set_defaults(func=cmd_install)
    return parser


def _expected(exc: BaseException) -> bool:
    """Errors of the input or the environment, not lora-compat's own: one line, no "internal error"."""
    import sqlite3

    # safetensors' Rust errors (a full disk, a bad header) have no Python base class to import cheaply
    return isinstance(exc, (LoraCompatError, OSError, sqlite3.Error, MemoryError)) or \
        type(exc).__name__ == "SafetensorError"


def describe_error(exc: BaseException) -> str:
    """One line for an error: ``PATH: reason`` for an OS error, the message otherwise."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"
    return " ".join(str(exc).split()) or type(exc).__name__


def _debug(args: argparse.Namespace | None) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("LORA_COMPAT_DEBUG", "") not in ("", "0")


def _silence_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null so the interpreter's final flush does not complain
    (the recipe of the Python docs, "Note on SIGPIPE")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # stdout is not a real file (captured, closed)
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Every error ends here: one line on stderr and exit 2 (``--debug`` or
    ``LORA_COMPAT_DEBUG=1`` adds the traceback); Ctrl-C exits 130, SIGTERM 143 (outputs in progress are
    removed either way), a closed stdout pipe (``| head``) 141 in silence."""
    from .outputs import Terminated, terminate_by_exception

    args = build_parser().parse_args(argv)
    command = f"lora-compat {args.command}"
    try:
        with terminate_by_exception():
            status = args.func(args)
            sys.stdout.flush()  # inside: a closed pipe is noticed here, not at exit
        return status
    except BrokenPipeError:
        _silence_stdout()
        return 141
    except KeyboardInterrupt:
        _report(args, f"{command}: interrupted")
        return 130
    except Terminated as exc:
        _report(args, f"{command}: terminated")
        return 128 + exc.signum
    except Exception as exc:  # noqa: BLE001 - the single error path: no traceback reaches the user
        if _expected(exc):
            _report(args, f"{command}: {describe_error(exc)}")
        else:
            _report(args, f"{command}: internal error: {type(exc).__name__}: {describe_error(exc)} (run with "
                          "--debug or LORA_COMPAT_DEBUG=1 for the traceback, and please report it)")
        return 2


def _report(args: argparse.Namespace, line: str) -> None:
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        _silence_stdout()
    if _debug(args):
        import traceback

        traceback.print_exc()
    print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
