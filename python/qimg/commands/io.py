"""``qimg io [-f fmt | --image-opts] [-r] [-U] [--events FILE] [-c command]... filename``:
qemu-io's commands on an image.

The commands and their output are qemu-io's (see :mod:`qimg.qemu_io`). Where qimg io differs
from qemu-io 10.0, on purpose:

- Without ``-c``, command lines are read from standard input without a prompt (qemu-io prints
  ``qemu-io> `` before each; QEMU's iotests filter removes it); on a terminal the prompt is
  ``qimg io> ``. There is no line editing or history.
- A filename is required (a ``json:{...}`` spec, or an option string with ``--image-opts``,
  opens a node tree such as a quorum; ``--events FILE`` writes its events as JSON lines as
  soon as the request that caused them returns); ``-t``/``-n`` take qemu-io's cache modes;
  ``--object`` and qemu-io's discard, AIO, snapshot, copy-on-read, misalignment and trace
  options are refused by name, as are qemu-io commands qimg does not implement
  (``readv``, ``truncate``, ``open``, ...) and the options ``read -b/-r`` and
  ``write -b/-n/-r``. ``-c`` lines are checked before the image is opened, so
  nothing runs; a refused line from standard input ends the run.
- Usage lines and ``help`` texts are qimg's own words and list only what qimg implements.
- Messages qemu-io starts with ``qemu-io:`` start with ``qimg:``. Standard output is flushed
  before anything goes to standard error, so a merged transcript is in order (qemu-io's
  buffered stdout can land after its stderr).
- A failed ``flush`` says so on stderr (qemu-io only sets the exit status); an image that is
  damaged is explained on stderr before the ``... failed: Input/output error`` line.
- ``-U`` opens a read-only image (``-r``) whatever other processes hold, as in qemu-io.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from qimg.commands._common import (
    add_events_arg,
    add_format_arg,
    add_image_opts_arg,
    add_share_arg,
    event_hub,
)
from qimg.commands._parser import examples
from qimg.errors import UsageError
from qimg.events import EventCallback
from qimg.image import check_cache_mode, open_image
from qimg.qemu_io import Interpreter, refusal

NAME = "io"

# qemu-io's options that qimg io does not implement: (spellings, takes a value, what it does).
_REFUSED_OPTIONS: tuple[tuple[tuple[str, ...], bool, str], ...] = (
    (("--object",), True, "QEMU objects"),
    (("-s", "--snapshot"), False, "temporary snapshots"),
    (("-C", "--copy-on-read"), False, "copy-on-read"),
    (("-m", "--misalign"), False, "misaligned buffers"),
    (("-k", "--native-aio"), False, "native AIO"),
    (("-i", "--aio"), True, "AIO modes"),
    (("-d", "--discard"), True, "discard modes"),
    (("-T", "--trace"), True, "tracing"),
)


_REFUSED_WHAT = {
    spelling: what for spellings, _, what in _REFUSED_OPTIONS for spelling in spellings
}


class _Refuse(argparse.Action):
    """Records a qemu-io option that qimg io refuses, for ``run`` to report."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        name = option_string or self.option_strings[0]
        earlier: list[tuple[str, str]] = getattr(namespace, self.dest, None) or []
        setattr(namespace, self.dest, [*earlier, (name, _REFUSED_WHAT[name])])


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        NAME,
        help="read, write, discard and map an image with qemu-io's commands",
        description=(
            "Run qemu-io commands (read, write, discard, flush, map, alloc, length, help, "
            "quit) on an image and print what qemu-io prints. Each -c is one command; "
            "without -c, commands are read from standard input, one per line. The exit "
            "status is 1 when any command failed. The image is opened read-write unless "
            "-r is given. qemu-io commands and options that qimg io does not implement are "
            "refused by name: -c lines before the image is opened, lines from standard "
            "input when they are reached (which ends the run)."
        ),
        epilog=examples(
            "qimg io -c 'write -P 0xab 0 64k' -c 'read -P 0xab 0 64k' disk.qcow2",
            "qimg io -r -c map disk.qcow2",
        ),
        allow_abbrev=False,
    )
    p.add_argument(
        "-c",
        "--cmd",
        dest="commands",
        action="append",
        default=[],
        metavar="COMMAND",
        help="a command to run, e.g. 'write -P 0x11 0 64k' (repeatable; run in order)",
    )
    add_format_arg(p)
    p.add_argument("--format", dest="fmt", help=argparse.SUPPRESS)
    p.add_argument(
        "-r", "--read-only", dest="read_only", action="store_true", help="open read-only"
    )
    add_share_arg(p)
    p.add_argument(
        "-t",
        "--cache",
        dest="cache",
        default="writeback",
        metavar="MODE",
        help="cache mode: writeback (default), unsafe, none, directsync or writethrough",
    )
    p.add_argument(
        "-n", "--nocache", dest="cache", action="store_const", const="none", help="-t none"
    )
    add_image_opts_arg(p)
    add_events_arg(p)
    for spellings, takes_value, _ in _REFUSED_OPTIONS:
        p.add_argument(
            *spellings,
            dest="refused",
            action=_Refuse,
            nargs=1 if takes_value else 0,
            help=argparse.SUPPRESS,  # parsed only to be refused by name
        )
    p.set_defaults(refused=[])
    p.add_argument("filename", nargs="?", help="the image to run the commands on")
    p.set_defaults(run=run)


def _stdin_lines() -> Iterator[str]:
    """Command lines from standard input, one per line (a prompt only for a terminal)."""
    prompt = sys.stdin.isatty()
    while True:
        if prompt:
            sys.stdout.write("qimg io> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            return
        yield line.removesuffix("\n")


def run(args: argparse.Namespace) -> int:
    if args.refused:
        option, what = args.refused[0]
        raise UsageError(f"qemu-io option '{option}' ({what}) is not supported by qimg io")
    if args.filename is None:
        raise UsageError("Expecting one image file name")
    for command in args.commands:
        reason = refusal(command)
        if reason is not None:
            raise UsageError(reason)
    with event_hub(args) as events:
        return _run(args, events)


def _run(args: argparse.Namespace, events: EventCallback | None) -> int:
    writable = not args.read_only
    cache = check_cache_mode(args.cache)
    if args.force_share and writable:
        raise UsageError(
            f"can't open device {args.filename}: "
            "force-share=on can only be used with read-only images"
        )
    image = open_image(
        args.filename,
        args.fmt,
        writable=writable,
        image_opts=args.image_opts,
        events=events,
        cache=cache,
        force_share=args.force_share,
    )
    if writable and args.fmt is None and image.spec is None and image.format == "raw":
        print(
            f"qimg: warning: the format of '{args.filename}' was probed as raw; writes that "
            "would make its first 512 bytes look like another format fail (use -f raw)",
            file=sys.stderr,
        )
    with image:
        interpreter = Interpreter(image, sys.stdout, sys.stderr, read_only=args.read_only)
        # A command line qimg io refuses (only possible from stdin, -c lines were checked
        # above) ends the run, as does quit.
        for line in args.commands or _stdin_lines():
            if not interpreter.run(line):
                break
    sys.stdout.flush()
    return 1 if interpreter.failed else 0
