"""The ``qimg`` command line: qemu-img's syntax, one module per command.

Start-up time is part of every command, so this module imports next to nothing:
``--version`` answers without argparse, and a command line builds the parser of its
own command only (see :mod:`qimg.commands._parser` for the parser itself).
"""

from __future__ import annotations

import os
import sys

# typing.TYPE_CHECKING without importing typing (mypy and ruff know the name).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence
    from typing import NoReturn

    from qimg.commands._parser import ArgumentParser

__all__ = ["COMMANDS", "build_parser", "entry", "main"]

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
    "rebase",
    "commit",
    "bitmap",
    "dd",
    "snapshot",
    "io",
    "scrub",
    "completion",
)

_VERSION_WORDS = ("-V", "--version")


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like Ctrl-C, so that clean-up runs."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


def build_parser() -> ArgumentParser:
    """The parser of the whole command line, every command included (for help, the
    man page and shell completion)."""
    from qimg.commands._parser import build

    parser, _ = build(COMMANDS)
    return parser


def _global_verbosity(words: list[str]) -> int:
    """Takes ``-v``/``-vv``/``--verbose`` off the front of ``words`` (before the
    command) and returns how many were given."""
    count = 0
    while words:
        word = words[0]
        if word == "--verbose":
            count += 1
        elif len(word) > 1 and word.startswith("-") and word[1:] == "v" * (len(word) - 1):
            count += len(word) - 1
        else:
            break
        del words[0]
    return count


def _start_logging(verbosity: int) -> None:
    """``-v`` shows what is opened and which way the work goes, ``-vv`` (or
    ``QIMG_LOG=debug``) the details too; ``logging`` is imported only then."""
    from qimg import _log

    levels = []
    if verbosity:
        levels.append(_log.LEVELS["info" if verbosity == 1 else "debug"])
    env = os.environ.get("QIMG_LOG")
    if env:
        level = _log.level_from_env(env)
        if level is None:
            names = ", ".join(_log.LEVELS)
            print(f"qimg: warning: QIMG_LOG={env} is not one of {names}; ignored", file=sys.stderr)
        else:
            levels.append(level)
    if levels:
        _log.configure(min(levels))


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if len(words) == 1 and words[0] in _VERSION_WORDS:
        from qimg import __version__

        print(f"qimg {__version__}")
        return 0
    verbosity = _global_verbosity(words)
    known = words[0] if words and words[0] in COMMANDS else None
    from qimg.commands._parser import build, command_module

    parser, commands = build([known] if known else COMMANDS)
    if known == "resize":
        words = command_module("resize").fix_argv(words)
    if known is not None:
        # Options may come between and after file names, as qemu-img allows
        # (`qimg convert src.qcow2 -O raw dst.raw`).
        args = commands[known].parse_intermixed_args(words[1:])
        args.command = known
    else:
        args = parser.parse_args(words)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 1
    verbosity += getattr(args, "verbose", 0)
    if verbosity or "QIMG_LOG" in os.environ:
        _start_logging(verbosity)
        from qimg import _log

        given = {k: v for k, v in sorted(vars(args).items()) if not callable(v)}
        _log.debug("command line: %s", given)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    from qimg.errors import QimgError

    try:
        status: int = args.run(args)
    except QimgError as err:
        where = f"{err.subject}: " if err.subject else ""
        print(f"qimg: {where}{err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Terminated:
        import signal

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
    words = sys.argv[1:]
    if len(words) == 1 and words[0] in _VERSION_WORDS:
        sys.exit(main(words))
    import signal

    signal.signal(signal.SIGTERM, _on_sigterm)
    sys.exit(main())
