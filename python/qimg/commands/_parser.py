"""The argparse parser of the ``qimg`` command line, built from the command modules.

Each module in :mod:`qimg.commands` has ``add_parser(sub)``, which adds its
sub-parser; only the commands a command line needs are imported and built.
"""

from __future__ import annotations

import argparse
import importlib

from qimg import __version__, _core
from qimg.prealloc import PreallocMode

# typing.TYPE_CHECKING without importing typing (mypy and ruff know the name).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from types import ModuleType
    from typing import Any, NoReturn

__all__ = [
    "ArgumentParser",
    "HelpFormatter",
    "build",
    "command_module",
    "examples",
    "refused_by_name",
]

DESCRIPTION = (
    "Create, inspect, compare and convert qcow2 and raw disk images with qemu-img's command lines."
)


def _columns() -> int:
    """The terminal's width as argparse would find it, without importing shutil
    (argparse does so for every option it adds)."""
    import os
    import sys

    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    stdout = sys.__stdout__
    if stdout is None:
        return 80
    try:
        return os.get_terminal_size(stdout.fileno()).columns or 80
    except (ValueError, OSError):
        return 80


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Fills a paragraph that has no line breaks (descriptions) to the terminal's
    width, and keeps text with line breaks (the examples) as written."""

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        if width is None:
            width = _columns() - 2
        super().__init__(prog, indent_increment, max_help_position, width)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return super()._fill_text(text, width, indent)
        import textwrap

        return textwrap.fill(
            " ".join(text.split()),
            width,
            initial_indent=indent,
            subsequent_indent=indent,
            break_on_hyphens=False,
            break_long_words=False,
        )

    def _split_lines(self, text: str, width: int) -> list[str]:
        # Lines break between words only: an option (--image-opts) or an option
        # string (driver=quorum,...) is never cut in two.
        import textwrap

        return textwrap.wrap(
            " ".join(text.split()), width, break_on_hyphens=False, break_long_words=False
        )


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with errors on one ``qimg:`` line and exit status 1, qimg's help
    layout and no abbreviated long options."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(1, f"qimg: {message} (see '{self.prog} --help')\n")


def examples(*lines: str) -> str:
    """An epilog of example command lines (``$ `` is put before each)."""
    return "examples:\n" + "\n".join(f"  $ {line}" for line in lines)


def refused_by_name(
    p: argparse.ArgumentParser, *flags: str, dest: str, takes_value: bool = False
) -> None:
    """Registers an option of qemu-img that qimg does not implement, so that it is
    refused by name (never ignored), and keeps it out of ``--help``."""
    p.add_argument(
        *flags,
        dest=dest,
        action="store" if takes_value else "store_true",
        help=argparse.SUPPRESS,
    )


def command_module(name: str) -> ModuleType:
    return importlib.import_module(f"qimg.commands.{name}")


def _add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help=(
            "log to standard error what is opened and which way the work goes; "
            "-vv adds details (also: QIMG_LOG=info or debug)"
        ),
    )


def build(names: Iterable[str]) -> tuple[ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser with the sub-parsers of ``names``, and those by name."""
    parser = ArgumentParser(
        prog="qimg",
        description=DESCRIPTION,
        epilog=examples(
            "qimg create -f qcow2 disk.qcow2 10G",
            "qimg info disk.qcow2",
            "qimg convert -O raw disk.qcow2 disk.raw",
            "qimg COMMAND --help",
        ),
    )
    parser.add_argument(
        "-V", "--version", action="version", version=f"qimg {__version__}", help="print the version"
    )
    _add_verbose(parser)
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=ArgumentParser, title="commands"
    )
    for name in names:
        command_module(name).add_parser(sub)
    commands: dict[str, argparse.ArgumentParser] = dict(sub.choices)
    for p in commands.values():
        _add_verbose(p)
    return parser, commands


# ---------------------------------------------------------------- the parser as data
# Shell completion and the man page are generated from the parser; these describe it.

#: Options whose value is an image format (-f, -O, -F): completed with the core
#: registry's formats.
_FORMAT_DESTS = frozenset({"fmt", "fmt1", "fmt2", "out_fmt", "backing_fmt"})

#: What the value of an option (by ``dest``) can be: words to offer, or FILE.
FILE = "FILE"
_VALUES: dict[str, tuple[str, ...] | str] = {
    "cache": _core.CACHE_MODES,
    "source_cache": _core.CACHE_MODES,
    "output": ("human", "json"),
    "preallocation": tuple(mode.value for mode in PreallocMode),
    "repair": _core.REPAIR_MODES,
    "backing_file": FILE,
    "events": FILE,
    "filename": FILE,
    "filenames": FILE,
    "spec": FILE,
}


def values_of(action: argparse.Action) -> tuple[str, ...] | str | None:
    """The words an argument takes (a tuple), FILE for a file name, or None for a value
    nothing can suggest (a size, an option list)."""
    if action.choices is not None:
        return tuple(str(c) for c in action.choices)
    if action.dest in _FORMAT_DESTS:
        # Imported here, not at start-up: only completion and the man page ask.
        from qimg.formats import FORMAT_NAMES

        return FORMAT_NAMES
    return _VALUES.get(action.dest)


def takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def visible_options(p: argparse.ArgumentParser) -> list[argparse.Action]:
    """The options ``--help`` shows (options refused by name are hidden)."""
    return [a for a in p._actions if a.option_strings and a.help != argparse.SUPPRESS]


def positionals(p: argparse.ArgumentParser) -> list[argparse.Action]:
    """The positional arguments of a command (not the command word itself)."""
    return [
        a
        for a in p._actions
        if not a.option_strings
        and a.help != argparse.SUPPRESS
        and not isinstance(a, argparse._SubParsersAction)
    ]


def commands_of(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """Each command of the top-level parser: (name, one-line help, its parser)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return [(name, helps.get(name, ""), p) for name, p in action.choices.items()]
    return []


def example_lines(p: argparse.ArgumentParser) -> list[str]:
    """The example command lines of a parser's epilog (see :func:`examples`)."""
    return [line[4:] for line in (p.epilog or "").splitlines() if line.startswith("  $ ")]
