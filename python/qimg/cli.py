"""The ``qimg`` command line: qemu-img's syntax, one module per command."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import NoReturn

from qimg._core import __version__
from qimg.errors import QimgError

__all__ = ["main"]

# In the order `--help` lists them. Command modules are imported when used:
# a command line pays only for the command it runs.
COMMANDS = (
    "create",
    "info",
    "map",
    "check",
    "compare",
    "convert",
    "measure",
    "resize",
    "amend",
    "io",
    "scrub",
)


def _command(name: str) -> ModuleType:
    return importlib.import_module(f"qimg.commands.{name}")


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like Ctrl-C, so that clean-up runs."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with errors on one ``qimg:`` line and exit status 1."""

    def error(self, message: str) -> NoReturn:
        self.exit(1, f"qimg: {message} (see '{self.prog} --help')\n")


def build_parser() -> ArgumentParser:
    parser, _ = _build(COMMANDS)
    return parser


def _build(names: Sequence[str]) -> tuple[ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = ArgumentParser(
        prog="qimg",
        description=(
            "Create, inspect, compare and convert qcow2 and raw disk images "
            "with qemu-img's command lines."
        ),
        allow_abbrev=False,
    )
    parser.add_argument("-V", "--version", action="version", version=f"qimg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    for name in names:
        _command(name).add_parser(sub)
    return parser, dict(sub.choices)


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    known = words[0] if words and words[0] in COMMANDS else None
    parser, commands = _build([known] if known else COMMANDS)
    if known == "resize":
        words = _command("resize").fix_argv(words)
    if words and words[0] in commands:
        # Options may come between and after file names, as qemu-img allows
        # (`qimg convert src.qcow2 -O raw dst.raw`).
        args = commands[words[0]].parse_intermixed_args(words[1:])
        args.command = words[0]
    else:
        args = parser.parse_args(words)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 1
    try:
        status: int = args.run(args)
    except QimgError as err:
        where = f"{err.subject}: " if err.subject else ""
        print(f"qimg: {where}{err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Terminated:
        return 128 + signal.SIGTERM
    except BrokenPipeError:
        # Output went to a closed pipe (`qimg ... | head`): nothing left to say.
        sys.stderr.close()
        return 1
    except Exception as err:
        if os.environ.get("QIMG_DEBUG"):
            raise
        print(
            f"qimg: internal error: {type(err).__name__}: {err} "
            "(please report it; QIMG_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 1
    except BaseException as err:
        # A panic in the core arrives as pyo3's PanicException, which is no
        # Exception; anything else of this kind (SystemExit) goes on.
        if type(err).__name__ != "PanicException" or os.environ.get("QIMG_DEBUG"):
            raise
        print(f"qimg: internal error: {err} (please report it)", file=sys.stderr)
        return 1
    return status


def entry() -> NoReturn:
    """The ``qimg`` program (console script and ``python -m qimg``): SIGTERM
    unwinds like Ctrl-C, so a new output file is removed either way."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    sys.exit(main())
