"""Atomic outputs: every file or folder lora-compat writes appears complete or not at all.

:func:`atomic_output` yields a temporary path beside the target (same folder, so the final rename never
crosses a file system); the caller writes there; on success the temporary gets ordinary permissions
(``0o666 & ~umask`` for a file, ``0o777 & ~umask`` for a folder and, in an output folder, the same for
everything inside) and is renamed into place; on any
exception (``KeyboardInterrupt`` and :class:`Terminated` included) it is removed. The CLI turns SIGTERM into
:class:`Terminated` (see :func:`terminate_by_exception`) so a killed command unwinds through these context
managers instead of leaving a partial output.

Replacing: an existing *file* is replaced (atomically, by the rename). An existing *folder* is replaced only
when it is empty; a folder with content is refused, never deleted. A folder where a file is expected (or a
file where a folder is expected) is refused.
"""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from .errors import LoraCompatError


class Terminated(BaseException):
    """Raised in the main thread by the CLI's SIGTERM handler, so that outputs in progress are removed.

    A ``BaseException`` (like ``KeyboardInterrupt``): an ``except Exception`` on the way must not swallow it.
    """

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


def current_umask() -> int:
    """The process umask (read by setting and restoring it; the CLI is single-threaded here)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def refuse_inputs(out: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> None:
    """Raise when the output would overwrite one of the inputs: the same file (``samefile``: also through
    links), or a folder that holds an input."""
    out = Path(out)
    if not out.exists():
        return
    for source in inputs:
        source = Path(source)
        if not source.exists():
            continue
        if os.path.samefile(out, source):
            raise LoraCompatError(f"{out}: is the input {source}; refusing to overwrite an input "
                                  "(choose another output path)")
        if out.is_dir() and out.resolve() in source.resolve().parents:
            raise LoraCompatError(f"{out}: holds the input {source}; refusing to replace a folder holding an "
                                  "input (choose another output path)")


def _check_target(target: Path, directory: bool) -> None:
    if directory:
        if target.exists() and not target.is_dir():
            raise LoraCompatError(f"{target}: exists and is not a folder (the output here is a folder)")
        if target.is_dir() and any(target.iterdir()):
            raise LoraCompatError(f"{target}: the output folder exists and is not empty; remove it or choose "
                                  "another output path")
    elif target.is_dir():
        raise LoraCompatError(f"{target}: is a folder; the output here is a file (give a file name)")


@contextmanager
def atomic_output(target: str | os.PathLike, *, directory: bool = False, replace: bool = True) -> Iterator[Path]:
    """A temporary file (or, with ``directory``, an empty folder) beside ``target``, renamed to ``target``
    when the block completes and removed when it raises. Missing parent folders are created. With
    ``replace=False`` (files only) an existing ``target`` is kept: ``FileExistsError`` is raised at the end
    and the temporary removed (two processes creating the same file: the first one wins)."""
    target = Path(target)
    _check_target(target, directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}."
    if directory:
        temporary = Path(tempfile.mkdtemp(prefix=prefix, suffix=".partial", dir=target.parent))
    else:
        handle, name = tempfile.mkstemp(prefix=prefix, suffix=".partial", dir=target.parent)
        os.close(handle)
        temporary = Path(name)
    try:
        yield temporary
        _ordinary_permissions(temporary)
        _check_target(target, directory)  # written meanwhile by someone else: do not clobber a folder
        if not replace and not directory:
            _link_new(temporary, target)
            return
        if directory and target.is_dir():
            target.rmdir()  # empty (checked above); os.replace cannot replace a folder
        os.replace(temporary, target)
    except BaseException:
        remove(temporary)
        raise


def _link_new(temporary: Path, target: Path) -> None:
    """Move ``temporary`` to ``target`` unless ``target`` exists (``FileExistsError``): a hard link fails
    if the target exists meanwhile, where a rename would replace it."""
    try:
        os.link(temporary, target)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: check, then rename (a tiny window)
        if target.exists():
            raise FileExistsError(target) from None
        os.replace(temporary, target)
        return
    temporary.unlink()


def _ordinary_permissions(path: Path) -> None:
    """``0o666 & ~umask`` for files, ``0o777 & ~umask`` for folders, as for anything the user creates:
    mkstemp/mkdtemp create 0600/0700, and safetensors' writer 0600."""
    mask = current_umask()
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
    if path.is_dir():
        for root, folders, files in os.walk(path):
            for name in folders:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
            for name in files:
                if not os.path.islink(os.path.join(root, name)):
                    os.chmod(os.path.join(root, name), 0o666 & ~mask)


def remove(path: Path) -> None:
    """Remove a file or folder if present (never raises)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


@contextmanager
def terminate_by_exception(signals: Iterable[int] = (signal.SIGTERM,)) -> Iterator[None]:
    """While the block runs, each of ``signals`` raises :class:`Terminated` in the main thread (so
    ``finally`` blocks and :func:`atomic_output` clean up); the previous handlers are restored after."""
    def handler(signum: int, frame: object) -> None:
        raise Terminated(signum)

    previous = {}
    try:
        for number in signals:
            try:
                previous[number] = signal.signal(number, handler)
            except ValueError:  # not the main thread: leave the signal alone
                pass
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


__all__ = ["Terminated", "atomic_output", "refuse_inputs", "terminate_by_exception", "current_umask"]
