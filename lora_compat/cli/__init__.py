"""The ``lora-compat`` command line: :func:`main` parses the command and runs it through the one error path
(:mod:`.errors`); each command lives with its group (:mod:`.describe`, :mod:`.write`, :mod:`.library`,
:mod:`.hosts`). Nothing here imports torch: the header commands run without it."""
from __future__ import annotations

import argparse
from typing import Sequence

from .. import __version__
from . import describe, hosts, library, write
from .describe import cmd_demo, cmd_dialects, cmd_inspect, cmd_matrix, format_inspection
from .errors import describe_error, run_command
from .hosts import cmd_install
from .library import cmd_index, cmd_recommend, cmd_search
from .parsing import add_command
from .write import cmd_bake, cmd_convert, cmd_merge

# the names cli.py had, kept importable from here
__all__ = ["main", "build_parser", "format_inspection", "describe_error", "cmd_inspect", "cmd_dialects", "cmd_demo",
           "cmd_convert", "cmd_bake", "cmd_matrix", "cmd_index", "cmd_search", "cmd_recommend", "cmd_merge",
           "cmd_install"]

#: the subcommands, in the order ``--help`` lists them
COMMANDS = (describe.INSPECT, describe.DIALECTS, describe.DEMO, write.CONVERT, write.BAKE, describe.MATRIX,
            library.INDEX, library.SEARCH, library.RECOMMEND, write.MERGE, hosts.INSTALL)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-compat", description="Read, detect and apply every LoRA dialect.")
    parser.add_argument("--version", action="version", version=f"lora-compat {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also: LORA_COMPAT_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        add_command(sub, command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Every error ends in :func:`.errors.run_command`: one line on stderr and exit 2
    (``--debug`` or ``LORA_COMPAT_DEBUG=1`` adds the traceback); Ctrl-C exits 130, SIGTERM 143 (outputs in
    progress are removed either way), a closed stdout pipe (``| head``) 141 in silence."""
    return run_command(build_parser().parse_args(argv))
