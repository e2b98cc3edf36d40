"""``qimg info [-f fmt | --image-opts] [--output=ofmt] [--backing-chain] [-U] [--events FILE]
filename``"""

from __future__ import annotations

import argparse
from typing import cast

from qimg import qjson
from qimg.commands._common import (
    add_events_arg,
    add_format_arg,
    add_image_opts_arg,
    add_output_arg,
    add_share_arg,
    event_hub,
    output_mode,
)
from qimg.errors import UsageError
from qimg.image import info_human
from qimg.info import info as image_info

NAME = "info"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        NAME,
        help="show an image's format, sizes and settings",
        description=(
            "Show what qemu-img info shows for an image: a qcow2 or raw file, or a node tree "
            "given as json:{...} or with --image-opts (quorum, blkdebug, ...)."
        ),
        allow_abbrev=False,
    )
    add_format_arg(p)
    add_output_arg(p)
    add_share_arg(p)
    add_image_opts_arg(p)
    add_events_arg(p)
    p.add_argument("--backing-chain", action="store_true", help="also show every image below it")
    p.add_argument("filename", nargs="?")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    mode = output_mode(args)
    if args.filename is None:
        raise UsageError("Expecting one image file name")
    with event_hub(args) as events:
        found = image_info(
            args.filename,
            backing_chain=args.backing_chain,
            format=args.fmt,
            image_opts=args.image_opts,
            force_share=args.force_share,
            events=events,
        )
    infos = found if isinstance(found, list) else [found]
    if mode == "json":
        shown: object = found
        print(qjson.dumps(cast("qjson.JsonValue", shown)))
    else:
        print("\n\n".join(info_human(i) for i in infos))
    return 0
