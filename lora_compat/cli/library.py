"""Commands of the LoRA library: ``index`` (folders into the SQLite library), ``search`` (LoRAs for a prompt)
and ``recommend`` (a ready stack)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Callable, TypeVar

from .parsing import Argument, Command, arg

if TYPE_CHECKING:
    from ..tools.library import Library

T = TypeVar("T")


def _with_library(args: argparse.Namespace, call: Callable[[Library], T]) -> T:
    """``call(library)`` on the library of ``--db``."""
    from ..tools.library import Library

    with Library(args.db, semantic=args.semantic) as library:
        return call(library)


def _announce_semantic(library: Library, args: argparse.Namespace) -> None:
    """Say on stderr when the semantic model is about to be loaded: a cold start takes seconds (torch,
    sentence-transformers and the MiniLM weights) and would otherwise pass in silence."""
    from ..tools.library.retrieval import SEMANTIC_MODEL_ID, load_embedder

    has_rows = library.db.execute("SELECT 1 FROM loras WHERE status = 'ok' LIMIT 1").fetchone() is not None
    if has_rows and library._use_semantic(None) and load_embedder.cache_info().currsize == 0:
        print(f"lora-compat {args.command}: loading the semantic search model ({SEMANTIC_MODEL_ID}, "
              "sentence-transformers; --no-semantic skips it)...", file=sys.stderr, flush=True)


def _search(library: Library, args: argparse.Namespace) -> list:
    _announce_semantic(library, args)
    return library.search(args.prompt, base=args.base, k=args.k)


def _recommend(library: Library, args: argparse.Namespace) -> dict:
    _announce_semantic(library, args)
    return library.recommend(args.prompt, base=args.base, k=args.k)


def cmd_index(args: argparse.Namespace) -> int:
    """index folders of LoRA files into a searchable library (header only)

    Index LoRA files (recursively) into a SQLite library: dialect, base, kinds, triggers, tags, sidecars, AutoV2
    hash. Incremental; resumes after interruption."""
    path, report = _with_library(args, lambda library: (library.path, library.index(
        args.dirs, hashes=not args.no_hash, progress=not args.quiet)))
    print(f"{path}: {report.added} added, {report.updated} updated, {report.unchanged} unchanged, "
          f"{report.removed} removed, {report.failed} not indexed ({report.seconds:.1f} s)")
    for path, error in sorted(report.errors.items())[:20]:
        print(f"  {path}: {error}", file=sys.stderr)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    """find LoRAs for a prompt (BM25 over triggers, tags, titles...)

    Find indexed LoRAs for a prompt; --base keeps only LoRAs for that base. With the [semantic] extra, BM25 is fused
    with MiniLM similarity."""
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
    """a ready LoRA stack for a prompt and a base

    Search the library and print a stack (paths:strengths) and the prompt with the trigger words added; --json for
    the patcher / host adapters."""
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


def _semantic(what: str) -> Argument:
    return arg("--semantic", action=argparse.BooleanOptionalAction, default=None,
               help=f"{what} (default: when the [semantic] extra is installed)")


def _query(base: Argument, k: int) -> tuple[Argument, ...]:
    """The arguments of ``search`` and ``recommend``: a prompt, a base, how many LoRAs, the library."""
    return (arg("prompt"), base, arg("-k", type=int, default=k), arg("--json", action="store_true"), arg("--db"),
            _semantic("fuse BM25 with semantic similarity"))


INDEX = Command("index", cmd_index, (
    arg("dirs", nargs="+", metavar="DIR"),
    arg("--db", help="library database (default: ~/.cache/lora-compat/library.sqlite or $LORA_COMPAT_DB)"),
    arg("--no-hash", action="store_true", help="skip the AutoV2 hash (reads every file whole)"),
    arg("--quiet", action="store_true", help="no progress line"),
    _semantic("embed new files for semantic search"),
))
SEARCH = Command("search", cmd_search, _query(arg("--base"), k=5))
RECOMMEND = Command("recommend", cmd_recommend, _query(arg("--base", required=True), k=3))
