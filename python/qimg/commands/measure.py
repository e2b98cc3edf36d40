"""``qimg measure [--output=ofmt] [-O fmt] [-o options]
[--size N | [-f fmt | --image-opts] [-U] [--events FILE] filename]``"""

from __future__ import annotations

import argparse
import json

from qimg.commands._common import add_events_arg, add_image_opts_arg, add_share_arg, event_hub
from qimg.errors import UsageError
from qimg.formats import format_info
from qimg.measure import measure_items
from qimg.options import parse_image_size, parse_option_lists

NAME = "measure"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        NAME,
        help="size a new image would need",
        description="Print the file size a new image needs, as qemu-img measure does.",
        allow_abbrev=False,
    )
    p.add_argument("--output", default="human", help="human (default) or json")
    p.add_argument("-O", dest="out_fmt", default="raw", help="target format (default raw)")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS")
    p.add_argument("-s", "--size", dest="size", help="measure an empty image of this size")
    p.add_argument("-f", dest="fmt", help="format of the source image (default: probe)")
    add_image_opts_arg(p)
    add_share_arg(p)
    add_events_arg(p)
    p.add_argument("filename", nargs="?")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.output not in ("human", "json"):
        raise UsageError(f"--output expects 'human' or 'json', not '{args.output}'")
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
        )
    if args.output == "json":
        print(json.dumps(result.as_json(), indent=4))
    else:
        print(result.human())
    return 0
