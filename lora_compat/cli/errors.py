"""The CLI's one error path: every failing command ends here, with one line on stderr and exit 2 (``--debug`` or
``LORA_COMPAT_DEBUG=1`` adds the traceback); Ctrl-C exits 130, SIGTERM 143 (outputs in progress are removed
either way), a closed stdout pipe (``| head``) 141 in silence."""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import LoraCompatError

#: the exit status of a failed command
FAILED = 2


def describe_error(exc: BaseException) -> str:
    """One line for an error: ``PATH: reason`` for an OS error, the message otherwise."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"
    return " ".join(str(exc).split()) or type(exc).__name__


def print_error(line: str) -> None:
    """An error line of a command that goes on (``inspect`` of several files): after what stdout holds."""
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)


def run_command(args: argparse.Namespace) -> int:
    """``args.func(args)``, with every error turned into its one line and exit status."""
    from ..outputs import Terminated, terminate_by_exception

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
        return FAILED


def _expected(exc: BaseException) -> bool:
    """Errors of the input or the environment, not lora-compat's own: one line, no "internal error"."""
    import sqlite3

    # safetensors' Rust errors (a full disk, a bad header) have no Python base class to import cheaply
    return isinstance(exc, (LoraCompatError, OSError, sqlite3.Error, MemoryError)) or \
        type(exc).__name__ == "SafetensorError"


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


def _report(args: argparse.Namespace, line: str) -> None:
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        _silence_stdout()
    if _debug(args):
        import traceback

        traceback.print_exc()
    print(line, file=sys.stderr, flush=True)
