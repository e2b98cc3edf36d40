"""The ``qimg(1)`` man page, generated from the command line's parser.

``python -m qimg.manpage`` prints it; ``python -m qimg.manpage -o docs/qimg.1``
rewrites the copy kept in the repository (a test checks that it is current). The
page is plain ``man`` macros, so ``man -l docs/qimg.1`` and ``groff -man`` read it.
"""

from __future__ import annotations

import argparse
import re
import sys

from qimg.cli import build_parser
from qimg.commands._parser import (
    DESCRIPTION,
    commands_of,
    example_lines,
    positionals,
    takes_value,
    visible_options,
)

__all__ = ["main", "render"]

# Environment variables qimg reads, with what they do.
ENVIRONMENT = (
    (
        "QIMG_LOG",
        "Log to standard error as -v does: info shows what is opened and which way the "
        "work goes, debug adds details; warning and error are accepted too. -v and "
        "QIMG_LOG together show the more detailed of the two.",
    ),
    (
        "QIMG_DEBUG",
        "When set, an internal error prints its Python traceback instead of one line.",
    ),
    (
        "COLUMNS",
        "The width --help fills its text to (default: the terminal's).",
    ),
)


def _text(text: str) -> str:
    """Text for roff: backslashes escaped, every hyphen a minus sign (options in the
    text can be copied), break points in option lists, and no line that roff would take
    for a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    # A long option list (a=1,b=2,...) may break after a comma, as \: allows.
    text = re.sub(r",(?=\S)", ",\\:", text)
    lines = [("\\&" + line if line.startswith((".", "'")) else line) for line in text.split("\n")]
    return "\n".join(lines)


_literal = _text


def _option_words(action: argparse.Action) -> str:
    """``\\fB-f\\fR \\fIFMT\\fR, \\fB--format\\fR \\fIFMT\\fR``, as a ``.TP`` label."""
    metavar = str(action.metavar or action.dest.upper())
    spellings = []
    for flag in action.option_strings:
        word = f"\\fB{_literal(flag)}\\fR"
        if takes_value(action):
            word += f"\\ \\fI{_literal(metavar)}\\fR"
        spellings.append(word)
    return ", ".join(spellings)


def _synopsis(name: str, p: argparse.ArgumentParser) -> list[str]:
    words = [f"\\fBqimg {_literal(name)}\\fR"]
    for action in visible_options(p):
        if action.dest == "help":
            continue
        flag = f"\\fB{_literal(action.option_strings[0])}\\fR"
        if takes_value(action):
            flag += f"\\ \\fI{_literal(str(action.metavar or action.dest.upper()))}\\fR"
        words.append(f"[{flag}]")
    for action in positionals(p):
        metavar = f"\\fI{_literal(str(action.metavar or action.dest))}\\fR"
        if action.nargs == "?":
            words.append(f"[{metavar}]")
        elif action.nargs in ("*", "+"):
            words.append(f"{metavar} ...")
        elif action.choices is not None:
            words.append("|".join(f"\\fB{_literal(str(c))}\\fR" for c in action.choices))
        else:
            words.append(metavar)
    # One word per line: roff fills them, and breaks only between words.
    return [".PP", *words]


def _options(p: argparse.ArgumentParser, *, skip_help: bool) -> list[str]:
    lines = []
    for action in [*positionals(p), *visible_options(p)]:
        if skip_help and action.dest == "help":
            continue
        if action.option_strings:
            label = _option_words(action)
        else:
            label = f"\\fI{_literal(str(action.metavar or action.dest))}\\fR"
        lines += [".TP", label, _text(action.help or "")]
    return lines


def _examples(p: argparse.ArgumentParser) -> list[str]:
    found = example_lines(p)
    if not found:
        return []
    # Filled, one example a line: a long one wraps at a space rather than overflowing.
    lines = [".PP", "Examples:", ".PP", ".RS 4"]
    for line in found:
        lines += [_literal(line), ".br"]
    return [*lines, ".RE"]


def render() -> str:
    """The man page, in roff."""
    parser = build_parser()
    commands = commands_of(parser)
    lines = [
        ".\\\" qimg(1), generated from qimg's argument parser by python -m qimg.manpage;",
        '.\\" edit the parser (python/qimg/commands) and regenerate, not this file.',
        '.TH QIMG 1 "" "qimg" "User Commands"',
        # Left-aligned and not hyphenated: long option strings in the text can neither be
        # spread to both margins nor split.
        ".ad l",
        ".nh",
        ".SH NAME",
        "qimg \\- create, inspect, compare and convert qcow2 and raw disk images",
        ".SH SYNOPSIS",
        ".B qimg",
        "[\\fB\\-v\\fR]",
        "\\fICOMMAND\\fR",
        "[\\fIOPTION\\fR]...",
        "[\\fIFILE\\fR]...",
        ".br",
        ".B qimg \\-\\-version",
        ".br",
        ".B qimg",
        "\\fICOMMAND\\fR \\fB\\-\\-help\\fR",
        ".SH DESCRIPTION",
        _text(DESCRIPTION),
        ".PP",
        "Options may come before, between and after file names, as qemu-img takes them. "
        "Options of qemu-img that qimg does not implement are refused by name, never "
        "ignored. Errors are one line on standard error, starting with qimg:, and the exit "
        "status is 1 unless a command says otherwise.",
        ".SH OPTIONS",
        "These come before the command; \\fB\\-v\\fR may also follow it.",
        *_options(parser, skip_help=False),
        ".SH COMMANDS",
    ]
    for name, _, p in commands:
        lines.append(f".SS {name}")
        lines += _synopsis(name, p)
        lines += [".PP", _text(p.description or "")]
        lines += _options(p, skip_help=True)
        lines += _examples(p)
    lines.append(".SH ENVIRONMENT")
    for variable, meaning in ENVIRONMENT:
        lines += [".TP", f".B {variable}", _text(meaning)]
    lines += [
        ".SH SEE ALSO",
        ".BR qemu\\-img (1),",
        ".BR qemu\\-io (1)",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m qimg.manpage", description="Print qimg's man page (roff)."
    )
    ap.add_argument("-o", "--output", metavar="FILE", help="write it to FILE instead")
    args = ap.parse_args(argv)
    page = render()
    if args.output:
        with open(args.output, "w", encoding="utf-8") as out:
            out.write(page)
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
