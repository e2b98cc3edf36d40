"""``qimg bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)...
[-g SIZE] [-b SRC_FILE [-F SRC_FMT]] [-f FMT] FILENAME BITMAP``"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from qimg.commands._common import add_format_arg
from qimg.commands._parser import examples, refused_by_name
from qimg.errors import UsageError
from qimg.image import BitmapChange, Image, open_image
from qimg.options import parse_size

NAME = "bitmap"

_SIMPLE: dict[str, BitmapChange] = {
    "remove": "remove",
    "clear": "clear",
    "enable": "enable",
    "disable": "disable",
}


class _Op(argparse.Action):
    """Appends (operation, value) to ``args.ops``, keeping the command line's order."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        ops = list(getattr(namespace, "ops", None) or [])
        ops.append((self.const, values))
        namespace.ops = ops


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        NAME,
        help="add, remove, clear, enable, disable or merge persistent bitmaps",
        description=(
            "Change the persistent dirty bitmap BITMAP of a qcow2 image, as qemu-img "
            "bitmap does: the operations apply in the order given. Unlike qemu-img, "
            "nothing is written unless every operation succeeds. While qimg writes to "
            "an image, every enabled bitmap records the ranges written."
        ),
        epilog=examples(
            "qimg bitmap --add disk.qcow2 backup-0",
            "qimg bitmap --add -g 128K --disable disk.qcow2 frozen",
            "qimg bitmap --merge backup-0 -b old.qcow2 disk.qcow2 backup-1",
            "qimg bitmap --clear --enable disk.qcow2 backup-0",
        ),
        allow_abbrev=False,
    )
    for flag, what in (
        ("--add", "create BITMAP, enabled (recording writes)"),
        ("--remove", "delete BITMAP"),
        ("--clear", "clear every bit of BITMAP"),
        ("--enable", "make BITMAP record writes"),
        ("--disable", "stop BITMAP recording writes"),
    ):
        p.add_argument(flag, nargs=0, action=_Op, const=flag[2:], dest="ops", help=what)
    p.add_argument(
        "--merge",
        metavar="SOURCE",
        action=_Op,
        const="merge",
        dest="ops",
        help="set the bits set in bitmap SOURCE (of -b SRC_FILE, or of this image)",
    )
    p.add_argument("-g", "--granularity", metavar="SIZE", help="granularity for --add")
    p.add_argument("-b", "--source-file", dest="source", metavar="SRC_FILE", help="for --merge")
    p.add_argument("-F", "--source-format", dest="source_fmt", metavar="SRC_FMT", help="of -b")
    add_format_arg(p)
    refused_by_name(p, "--image-opts", dest="image_opts")
    p.add_argument("filename", nargs="?", help="the image")
    p.add_argument("bitmap", nargs="?", help="the bitmap's name")
    p.set_defaults(run=run, ops=None)


def run(args: argparse.Namespace) -> int:
    ops: list[tuple[str, object]] = args.ops or []
    if args.image_opts:
        raise UsageError("bitmap --image-opts is not supported by qimg; give the file name")
    if not ops:
        raise UsageError(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge"
        )
    kinds = {kind for kind, _ in ops}
    if args.granularity is not None and "add" not in kinds:
        raise UsageError("granularity only supported with --add")
    if args.source is not None and "merge" not in kinds:
        raise UsageError("Merge bitmap source file only supported with --merge")
    if args.source_fmt is not None and args.source is None:
        raise UsageError("-F only supported with -b")
    if args.filename is None or args.bitmap is None:
        raise UsageError("Expecting filename and bitmap name")
    granularity = None if args.granularity is None else parse_size(args.granularity, "granularity")
    with open_image(args.filename, args.fmt, backing=False, writable=True) as image:
        source: Image | None = None
        if args.source is not None:
            source = open_image(args.source, args.source_fmt, backing=False)
        try:
            changes: list[BitmapChange] = []
            for kind, value in ops:
                if kind == "add":
                    changes.append(("add", granularity))
                elif kind == "merge":
                    changes.append(("merge", str(value), source))
                else:
                    changes.append(_SIMPLE[kind])
            image.change_bitmap(args.bitmap, *changes)
        finally:
            if source is not None:
                source.close()
    return 0
