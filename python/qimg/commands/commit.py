"""``qimg commit [-f fmt] [-t cache] [-b base] [-d] [-p] [-q] filename``"""

from __future__ import annotations

import argparse

from qimg.commands._common import Progress, add_cache_arg, add_format_arg
from qimg.commands._parser import examples, refused_by_name
from qimg.committing import commit
from qimg.errors import UsageError
from qimg.image import check_cache_mode

NAME = "commit"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        NAME,
        help="write an image's data into its backing file",
        description=(
            "Write what a qcow2 image holds into its backing file, as qemu-img commit "
            "does, then empty the image so that it reads everything from the backing "
            "file (-d keeps it as it is). -b commits into a backing file further down "
            "the chain, through the layers between, whose data is then stale; -b "
            "implies -d. A backing file smaller than the image grows to its size."
        ),
        epilog=examples(
            "qimg commit -p overlay.qcow2",
            "qimg commit -b base.qcow2 top.qcow2",
        ),
        allow_abbrev=False,
    )
    add_format_arg(p)
    add_cache_arg(p, "writeback")
    p.add_argument("-b", dest="base", metavar="BASE", help="the backing file to commit into")
    p.add_argument("-d", dest="keep", action="store_true", help="do not empty the image")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("-q", dest="quiet", action="store_true", help="print nothing on success")
    refused_by_name(p, "-r", dest="rate_limit", takes_value=True)
    refused_by_name(p, "--image-opts", dest="image_opts")
    p.add_argument("filename", nargs="?", help="the image to commit")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.rate_limit is not None:
        raise UsageError("commit -r (rate limits) is not supported by qimg")
    if args.image_opts:
        raise UsageError("commit --image-opts is not supported by qimg; give the file name")
    if args.filename is None:
        raise UsageError("Expecting one image file name")
    check_cache_mode(args.cache)
    with Progress(args.progress and not args.quiet).around() as progress:
        commit(
            args.filename,
            args.base,
            keep=args.keep,
            format=args.fmt,
            cache=args.cache,
            progress=progress,
        )
    if not args.quiet:
        print("Image committed.")
    return 0
