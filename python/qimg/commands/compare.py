"""``qimg compare [-f fmt] [-F fmt] [--image-opts] [-p] [-q] [-s] [-U] [--events FILE]
filename1 filename2``"""

from __future__ import annotations

import argparse
import sys

from qimg.commands._common import (
    Progress,
    add_events_arg,
    add_image_opts_arg,
    add_share_arg,
    add_source_cache_arg,
    event_hub,
)
from qimg.commands._parser import examples
from qimg.comparison import compare_open
from qimg.errors import QimgError, UsageError
from qimg.events import EventCallback
from qimg.image import Image, check_cache_mode, open_image

NAME = "compare"

# qemu-img's exit statuses.
IDENTICAL, DIFFERENT, OPEN_FAILED, READ_FAILED = 0, 1, 2, 4


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        NAME,
        help="check whether two images have the same contents",
        description=(
            "Compare the guest contents of two images, as qemu-img compare does: "
            "exit 0 when identical, 1 when different, 2 when an image cannot be opened, "
            "4 when reading fails."
        ),
        epilog=examples(
            "qimg compare disk.qcow2 disk.raw",
            "qimg compare -s -f qcow2 -F qcow2 a.qcow2 b.qcow2",
        ),
        allow_abbrev=False,
    )
    p.add_argument(
        "-f", dest="fmt1", metavar="FMT", help="format of the first image (default: probe)"
    )
    p.add_argument(
        "-F", dest="fmt2", metavar="FMT", help="format of the second image (default: probe)"
    )
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("-q", dest="quiet", action="store_true", help="print nothing, just exit")
    p.add_argument(
        "-s", dest="strict", action="store_true", help="strict: sizes and allocation must match too"
    )
    add_share_arg(p)
    add_source_cache_arg(p)
    add_image_opts_arg(p, "each file name is")
    add_events_arg(p)
    p.add_argument("filenames", nargs="*", metavar="FILE", help="the two images to compare")
    p.set_defaults(run=run)


def _fail(err: QimgError, status: int) -> int:
    where = f"{err.subject}: " if err.subject else ""
    print(f"qimg: {where}{err}", file=sys.stderr)
    return status


def run(args: argparse.Namespace) -> int:
    if len(args.filenames) != 2:
        raise UsageError("Expecting two image file names")
    name1, name2 = args.filenames
    try:
        check_cache_mode(args.source_cache, source=True)
    except UsageError as err:
        return _fail(err, OPEN_FAILED)  # qemu-img's status for it
    with event_hub(args) as events:
        return _compare(args, name1, name2, events)


def _compare(args: argparse.Namespace, name1: str, name2: str, events: EventCallback | None) -> int:
    say = (lambda text: None) if args.quiet else print

    def opened(name: str, fmt: str | None) -> Image:
        return open_image(
            name,
            fmt,
            image_opts=args.image_opts,
            events=events,
            cache=args.source_cache,
            force_share=args.force_share,
        )

    try:
        img1 = opened(name1, args.fmt1)
        try:
            img2 = opened(name2, args.fmt2)
        except BaseException:
            img1.close()
            raise
    except QimgError as err:
        return _fail(err, OPEN_FAILED)
    progress = Progress(args.progress and not args.quiet)
    with img1, img2:
        progress.start()
        try:
            result = compare_open(img1, img2, strict=args.strict, progress=progress)
        except QimgError as err:
            return _fail(err, READ_FAILED)
    if result.warns_about_size:
        say("Warning: Image size mismatch!")
    say(result.message())
    progress.finish_line()
    return IDENTICAL if result.identical else DIFFERENT
