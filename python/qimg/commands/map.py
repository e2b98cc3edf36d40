"""``qimg map [-f fmt | --image-opts] [--output=ofmt] [--start-offset=N] [--max-length=N] [-U]
[--events FILE] filename``"""

from __future__ import annotations

import argparse

from qimg.commands._common import (
    add_events_arg,
    add_format_arg,
    add_image_opts_arg,
    add_output_arg,
    add_share_arg,
    event_hub,
    output_mode,
)
from qimg.commands._parser import examples
from qimg.errors import InvalidImageError, UsageError
from qimg.image import MapExtent, open_image
from qimg.options import parse_size

NAME = "map"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        NAME,
        help="show where each range of an image is stored",
        description="Print the allocation map of an image, as qemu-img map does.",
        epilog=examples(
            "qimg map disk.qcow2",
            "qimg map --output=json --start-offset=1G --max-length=64M disk.qcow2",
        ),
        allow_abbrev=False,
    )
    add_format_arg(p)
    add_output_arg(p)
    add_share_arg(p)
    add_image_opts_arg(p)
    add_events_arg(p)
    p.add_argument("-s", "--start-offset", dest="start", metavar="OFFSET", help="first byte to map")
    p.add_argument(
        "-l", "--max-length", dest="length", metavar="LENGTH", help="bytes to map at most"
    )
    p.add_argument("filename", nargs="?", help="the image to map")
    p.set_defaults(run=run)


def _json_line(e: MapExtent) -> str:
    def b(v: bool) -> str:
        return "true" if v else "false"

    text = (
        f'{{ "start": {e.start}, "length": {e.length}, "depth": {e.depth},'
        f' "present": {b(e.present)}, "zero": {b(e.zero)}, "data": {b(e.data)},'
        f' "compressed": {b(e.compressed)}'
    )
    if e.offset is not None:
        text += f', "offset": {e.offset}'
    return text + "}"


def _hex(v: int) -> str:
    return f"{v:#x}" if v else "0"


def run(args: argparse.Namespace) -> int:
    mode = output_mode(args)
    if args.filename is None:
        raise UsageError("Expecting one image file name")
    start = parse_size(args.start, "start-offset") if args.start is not None else 0
    length = parse_size(args.length, "max-length") if args.length is not None else None
    with (
        event_hub(args) as events,
        open_image(
            args.filename,
            args.fmt,
            image_opts=args.image_opts,
            events=events,
            force_share=args.force_share,
        ) as image,
    ):
        extents = image.map(start, length)
    if mode == "json":
        print("[" + ",\n".join(_json_line(e) for e in extents) + "]")
        return 0
    # Only ranges with data stored plainly in a file have a line; zero
    # ranges (even preallocated ones) do not.
    print(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File", flush=True)
    for e in extents:
        if not e.data or e.zero:
            continue
        if e.offset is None:
            raise InvalidImageError(
                f"the range at {e.start:#x} is compressed or not stored plainly, "
                "so it has no host offset to show; use --output=json"
            ).about(args.filename)
        print(f"{_hex(e.start):<16}{_hex(e.length):<16}{_hex(e.offset):<16}{e.filename}")
    return 0
