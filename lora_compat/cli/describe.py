"""Commands that describe: ``inspect`` (files, from their headers), ``dialects`` (the registry), ``demo`` and
``matrix`` (the compatibility matrix of the corpus)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from ..errors import LoraCompatError
from .errors import FAILED, describe_error, print_error
from .parsing import Command, arg

if TYPE_CHECKING:
    from ..tools.inspection import Inspection


def format_inspection(result: Inspection) -> str:
    """The human-readable `inspect` table."""
    rank = f"{result.rank['min']}-{result.rank['max']}" if result.rank else "-"
    if result.rank and result.rank["min"] == result.rank["max"]:
        rank = str(result.rank["min"])
    base = result.base or f"undetermined (candidates: {', '.join(result.base_candidates) or 'none'})"
    if result.base and result.variant:
        base = f"{result.base} (variant {result.variant})"
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
    """describe LoRA files from their headers (dialect, base, kinds, ranks...)

    Describe LoRA files from their headers alone; no tensor data is read."""
    from ..tools.inspection import inspect

    status = 0
    for index, path in enumerate(args.paths):
        try:
            result = inspect(path, base=args.base, strict=args.strict)
        except (LoraCompatError, OSError) as exc:  # one line per bad file; the other files are still read
            print_error(f"lora-compat: {describe_error(exc)}")
            status = FAILED
            continue
        if args.json:
            print(result.to_json())
        else:
            print(("\n" if index else "") + format_inspection(result))
    return status


def cmd_dialects(args: argparse.Namespace) -> int:
    """list every registered dialect, base and patch kind, and the plugin providing it

    List every registered dialect, base and patch kind, with the plugin that provides it."""
    from .. import plugins

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
    """write built-in example files (several dialects, two bad files) and inspect them

    Write built-in example LoRA files of several dialects plus two files that must be refused, and inspect them all."""
    import tempfile
    from pathlib import Path

    from ..tools.examples import write_examples

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
    return 0 if status == FAILED else 1


def cmd_matrix(args: argparse.Namespace) -> int:
    """generate the compatibility matrix (compat_matrix/MATRIX.md, matrix.json)

    Run every corpus layout through detection, full-size mapping and each host adapter's route; write MATRIX.md and
    matrix.json. --check: fail if the committed files differ from a fresh run."""
    from pathlib import Path

    from .. import corpus as corpus_data
    from ..tools import matrix
    from ..adapters.routes import host_routes

    # the CLI puts the pieces together: the matrix measures the host columns with the host adapters' own routing
    matrix.use_host_routes(host_routes)
    corpus = Path(args.corpus) if args.corpus else matrix.default_corpus()
    if not corpus_data.has_index(corpus):
        raise LoraCompatError(f"{corpus}: no corpus INDEX.json")
    stream = sys.stderr  # bound now: the reference libraries' own output is silenced while the matrix is built

    def progress(line: str) -> None:
        print(f"lora-compat matrix: {line}", file=stream, flush=True)

    out = Path(args.out)
    if not args.check:
        matrix.write(out, corpus, progress)
        print(f"wrote {out / 'MATRIX.md'} and {out / 'matrix.json'}")
        return 0
    stale = matrix.check(out, corpus, progress)
    if stale:
        print(f"lora-compat matrix: {', '.join(stale)} in {out} differ from a fresh run; run "
              "`lora-compat matrix` and commit the result", file=sys.stderr)
        return 1
    print(f"{out}: up to date")
    return 0


INSPECT = Command("inspect", cmd_inspect, (
    arg("paths", nargs="+", metavar="PATH", help="LoRA files (.safetensors, .ckpt, .pt, .pth, .bin)"),
    arg("--json", action="store_true", help="print one JSON object per file, one per line"),
    arg("--base", help="read against this base instead of detecting it (sd15, sd2, sdxl, ...)"),
    arg("--strict", action="store_true", help="treat unmatched keys as an error (exit 2)"),
))
DIALECTS = Command("dialects", cmd_dialects, (
    arg("--json", action="store_true", help="machine-readable output"),
))
DEMO = Command("demo", cmd_demo, (
    arg("--dir", help="where to write the examples (default: a new temporary directory)"),
))
MATRIX = Command("matrix", cmd_matrix, (
    arg("--out", default="compat_matrix", help="output folder (default: compat_matrix)"),
    arg("--corpus", help="corpus folder with an INDEX.json (default: the corpus shipped in the package)"),
    arg("--check", action="store_true", help="compare with the committed files instead of writing"),
))
