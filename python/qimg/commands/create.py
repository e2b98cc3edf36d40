"""``qimg create [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options]
filename [size]``"""

from __future__ import annotations

import argparse

from qimg.commands._common import add_options_arg
from qimg.commands._parser import examples
from qimg.creation import plan_create
from qimg.errors import QimgError, UsageError
from qimg.formats import format_info
from qimg.options import parse_image_size, parse_option_lists

NAME = "create"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        NAME,
        help="create a new image",
        description="Create a qcow2 or raw image, as qemu-img create does.",
        epilog=examples(
            "qimg create -f qcow2 disk.qcow2 10G",
            "qimg create -f qcow2 -o preallocation=metadata,cluster_size=2M big.qcow2 1T",
            "qimg create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2",
            "qimg create -f qcow2 -o help",
        ),
        allow_abbrev=False,
    )
    p.add_argument("-q", dest="quiet", action="store_true", help="print nothing on success")
    p.add_argument(
        "-f",
        dest="fmt",
        default="raw",
        metavar="FMT",
        help="image format (qcow2 or raw; default raw)",
    )
    p.add_argument("-b", dest="backing_file", metavar="FILE", help="backing file of the new image")
    p.add_argument(
        "-F",
        "-B",
        "--backing-format",
        dest="backing_fmt",
        metavar="FMT",
        help="format of the backing file",
    )
    p.add_argument("-u", dest="unsafe", action="store_true", help="do not open the backing file")
    add_options_arg(p, "format options")
    p.add_argument("filename", nargs="?", help="the image to create")
    p.add_argument("size", nargs="?", help="virtual size, with optional k/M/G/T/P/E suffix")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    items = parse_option_lists(args.options)
    if any(item.is_help for item in items):
        info = format_info(args.fmt)
        print(info.help_text(with_protocol=args.filename is not None))
        return 0
    if args.filename is None:
        raise UsageError("Expecting image file name")
    size = parse_image_size(args.size) if args.size is not None else None
    filename: str = args.filename
    try:
        plan = plan_create(
            filename,
            args.fmt,
            items,
            size=size,
            backing_file=args.backing_file,
            backing_fmt=args.backing_fmt,
            unsafe=args.unsafe,
        )
        if not args.quiet:
            print(plan.formatting_line(), flush=True)
        plan.run()
    except UsageError:
        raise
    except QimgError as err:
        err.about(filename)
        raise
    return 0
