"""How a command is declared: a :class:`Command` record (its name, the function that runs it, its arguments),
turned into an ``argparse`` subcommand by :func:`add_command`. The function's docstring is the command's help:
its first paragraph the line ``lora-compat --help`` shows, the rest the description of ``COMMAND --help``."""
from __future__ import annotations

import argparse
import inspect
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Argument:
    """One ``add_argument`` call: its flags (or positional name) and its options."""

    flags: tuple[str, ...]
    options: dict[str, Any]


def arg(*flags: str, **options: Any) -> Argument:
    return Argument(flags, options)


@dataclass(frozen=True)
class Command:
    """A subcommand: ``run(args)`` returns the exit status."""

    name: str
    run: Callable[[argparse.Namespace], int]
    arguments: tuple[Argument, ...] = ()

    def _doc(self) -> list[str]:
        # argparse fills both texts itself: the docstring's line breaks do not reach the output
        return [" ".join(part.split()) for part in inspect.cleandoc(self.run.__doc__ or "").split("\n\n")]

    @property
    def help(self) -> str:
        return self._doc()[0]

    @property
    def description(self) -> str:
        return " ".join(self._doc()[1:])


def add_command(sub: argparse._SubParsersAction, command: Command) -> argparse.ArgumentParser:
    parser = sub.add_parser(command.name, help=command.help, description=command.description)
    for argument in command.arguments:
        parser.add_argument(*argument.flags, **argument.options)
    parser.set_defaults(func=command.run)
    return parser
