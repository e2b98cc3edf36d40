"""``qimg rebase [-f fmt | --image-opts] [-t cache] [-T src_cache] [-p] [-q] [-c] [-U] [-u]
[-F backing_fmt] [-b backing_file] filename``"""

from __future__ import annotations

import argparse

from qimg.commands._common import (
    Progress,
    add_cache_arg,
    add_format_arg,
    add_image_opts_arg,
    add_source_cache_arg,
)
from qimg.commands._parser import examples
from qimg.errors import UsageError
from qimg.image import check_cache_mode
from qimg.rebasing import rebase

NAME = "rebase"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        NAME,
        help="change the backing file of an image",
        description=(
            "Change the backing file a qcow2 image names, as qemu-img rebase does. The "
            "safe mode (the default) first copies into the image whatever would read "
            "differently over the new backing file, so the guest content stays the same; "
            "-u rewrites only the header, so the guest content changes unless the new "
            "backing file holds what the old one held. -b '' (or no -b) removes the "
            "backing file. A relative backing file name is found from the image's directory."
        ),
        epilog=examples(
            "qimg rebase -b base-v2.qcow2 -F qcow2 overlay.qcow2",
            "qimg rebase -p -b '' standalone.qcow2",
            "qimg rebase -u -b renamed-base.qcow2 -F qcow2 overlay.qcow2",
        ),
        allow_abbrev=False,
    )
    add_format_arg(p)
    add_image_opts_arg(p)
    add_cache_arg(p, "writeback")
    add_source_cache_arg(p)  # the backing files' (-u opens none)
    p.add_argument("-u", dest="unsafe", action="store_true", help="rewrite only the header")
    p.add_argument("-b", dest="backing_file", metavar="FILE", help="the new backing file")
    p.add_argument("-F", dest="backing_fmt", metavar="FMT", help="format of the new backing file")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("-q", dest="quiet", action="store_true", help="print nothing on success")
    p.add_argument("-c", dest="compress", action="store_true", help="compress the copied clusters")
    p.add_argument(
        "-U",
        "--force-share",
        dest="force_share",
        action="store_true",
        help="open the backing files shared, read-only",
    )
    p.add_argument("filename", nargs="?", help="the overlay to rebase")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.filename is None:
        raise UsageError("Expecting one image file name")
    check_cache_mode(args.source_cache, source=True)
    with Progress(args.progress and not args.quiet).around() as progress:
        rebase(
            args.filename,
            args.backing_file,
            backing_format=args.backing_fmt,
            unsafe=args.unsafe,
            compress=args.compress,
            format=args.fmt,
            image_opts=args.image_opts,
            cache=args.cache,
            source_cache=args.source_cache,
            force_share=args.force_share,
            progress=progress,
        )
    return 0
