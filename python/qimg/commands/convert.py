"""``qimg convert [-f fmt] [-O raw] [-S sparse_size] [-n] [-p] [-q] [-U] filename output``"""

from __future__ import annotations

import argparse

from qimg import _core
from qimg.commands._common import Progress, add_share_arg
from qimg.errors import UsageError
from qimg.image import open_image
from qimg.options import parse_size

NAME = "convert"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        NAME,
        help="copy an image's contents into a raw image",
        description="Convert a qcow2 or raw image to raw, as qemu-img convert -O raw does.",
        allow_abbrev=False,
    )
    p.add_argument("-f", dest="fmt", help="source format (default: probe)")
    p.add_argument("-O", dest="out_fmt", default="raw", help="output format (raw)")
    p.add_argument(
        "-S",
        dest="sparse",
        default="4k",
        help="zero runs at least this long become holes (default 4k; 0 writes all data)",
    )
    p.add_argument("-n", dest="existing", action="store_true", help="write into an existing file")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("-q", dest="quiet", action="store_true", help="print nothing")
    add_share_arg(p)
    for flag, what in (
        ("-o", "output options"),
        ("-B", "a backing file for the output"),
        ("-m", "parallel coroutines"),
        ("-t", "a cache mode"),
        ("-T", "a source cache mode"),
        ("-l", "snapshots"),
    ):
        p.add_argument(flag, dest=f"unsupported{flag}", help=f"{what}: not supported yet")
    for flag in ("-c", "-W", "-C"):
        p.add_argument(
            flag, dest=f"unsupported{flag}", action="store_true", help="not supported yet"
        )
    p.add_argument("filenames", nargs="*")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    for key, value in vars(args).items():
        if key.startswith("unsupported") and value not in (None, False):
            raise UsageError(
                f"convert option {key.removeprefix('unsupported')} is not supported by qimg yet"
            )
    if args.out_fmt != "raw":
        raise UsageError(f"convert -O {args.out_fmt} is not supported by qimg yet; only -O raw is")
    if len(args.filenames) < 2:
        raise UsageError("Expecting a source image and an output file name")
    if len(args.filenames) > 2:
        raise UsageError("Converting several source images into one is not supported by qimg yet")
    src, dst = args.filenames
    sparse = parse_size(args.sparse, "-S")
    progress = Progress(args.progress and not args.quiet)
    with open_image(src, args.fmt) as image:
        progress.start()
        _core.convert_to_raw(
            image._img, dst, existing=args.existing, sparse_size=sparse, progress=progress
        )
    progress.end()
    return 0
