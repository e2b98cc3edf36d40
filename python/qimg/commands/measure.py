"""``qimg measure [--output=ofmt] [-O fmt] [-o options]
[--size N | [-f fmt | --image-opts] [-U] [--events FILE] filename]``"""

from __future__ import annotations

import argparse
import json

from qimg.commands._common import (
    add_events_arg,
    add_image_opts_arg,
    add_options_arg,
    add_output_arg,
    add_share_arg,
    event_hub,
    output_mode,
)
from qimg.commands._parser import examples
from qimg.formats import format_info
from qimg.measurement import measure_items
from qimg.options import parse_image_size, parse_option_lists
from qimg.snapshot_ref import SnapshotRef

NAME = "measure"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        NAME,
        help="size a new image would need",
        description=(
            "Print the file size a new image needs, as qemu-img measure does: an empty one "
            "of --size bytes, or one converted from an existing image."
        ),
        epilog=examples(
            "qimg measure -O qcow2 --size 10G",
            "qimg measure -O qcow2 -o cluster_size=2M disk.raw",
        ),
        allow_abbrev=False,
    )
    add_output_arg(p)
    p.add_argument(
        "-O", dest="out_fmt", default="raw", metavar="FMT", help="target format (default raw)"
    )
    add_options_arg(p, "options of the target format, as for create")
    p.add_argument(
        "-s", "--size", dest="size", metavar="SIZE", help="measure an empty image of this size"
    )
    p.add_argument(
        "-f", dest="fmt", metavar="FMT", help="format of the source image (default: probe)"
    )
    add_image_opts_arg(p)
    add_share_arg(p)
    add_events_arg(p)
    p.add_argument(
        "-l",
        dest="snapshot",
        metavar="SNAPSHOT",
        help="measure an internal snapshot: snapshot.id=ID,snapshot.name=NAME, or an ID or name",
    )
    p.add_argument("filename", nargs="?", help="the image to measure a converted copy of")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    output_mode(args)
    items = parse_option_lists(args.options)
    if any(item.is_help for item in items):
        print(format_info(args.out_fmt).help_text(with_protocol=True))
        return 0
    size = parse_image_size(args.size) if args.size is not None else None
    with event_hub(args) as events:
        result = measure_items(
            args.out_fmt,
            items,
            size=size,
            filename=args.filename,
            fmt=args.fmt,
            image_opts=args.image_opts,
            events=events,
            force_share=args.force_share,
            snapshot=None if args.snapshot is None else SnapshotRef.parse(args.snapshot),
        )
    if args.output == "json":
        print(json.dumps(result.as_json(), indent=4))
    else:
        print(result.human())
    return 0
