"""``qimg convert [-f fmt | --image-opts] [-O fmt] [-o options] [-c]
[-B backing_file [-F backing_fmt]] [-n [--target-image-opts] [--target-is-zero]]
[-S sparse_size | -C] [-m num] [-W] [-p] [-q] [-U] [--events FILE]
filename [filename2 [...]] output``
"""

from __future__ import annotations

import argparse

from qimg.commands._common import (
    Progress,
    add_cache_arg,
    add_events_arg,
    add_image_opts_arg,
    add_options_arg,
    add_share_arg,
    add_source_cache_arg,
    event_hub,
)
from qimg.commands._parser import examples, refused_by_name
from qimg.conversion import ConvertRequest
from qimg.conversion import run as run_convert
from qimg.errors import QimgError, UsageError
from qimg.formats import format_info
from qimg.options import parse_option_lists, parse_size
from qimg.snapshot_ref import SnapshotRef

NAME = "convert"

# Options of qemu-img convert that qimg refuses by name rather than ignore (kept out
# of --help).
UNSUPPORTED_VALUE = (
    ("-r", "rate limits"),
    ("--object", "objects"),
)
UNSUPPORTED_FLAG = (("--salvage", "salvaging unreadable sources"),)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        NAME,
        help="copy one or more images into a new or existing image",
        description=(
            "Convert qcow2 and raw images, or node trees such as a quorum given as "
            "json:{...} or with --image-opts (several sources are concatenated), into a "
            "qcow2 or raw image, as qemu-img convert does."
        ),
        epilog=examples(
            "qimg convert -O raw disk.qcow2 disk.raw",
            "qimg convert -p -c -O qcow2 disk.raw small.qcow2",
            "qimg convert -O qcow2 -B base.qcow2 -F qcow2 disk.raw overlay.qcow2",
        ),
        allow_abbrev=False,
    )
    p.add_argument("-f", dest="fmt", metavar="FMT", help="source format (default: probe)")
    p.add_argument(
        "-O", dest="out_fmt", default="raw", metavar="FMT", help="output format (raw or qcow2)"
    )
    add_options_arg(p, "output format options, as for create")
    p.add_argument("-c", dest="compress", action="store_true", help="compress the output (qcow2)")
    p.add_argument(
        "-B",
        "-b",
        "--backing",
        dest="backing_file",
        metavar="FILE",
        help="backing file of the output",
    )
    p.add_argument("-F", dest="backing_fmt", metavar="FMT", help="format of the backing file")
    p.add_argument(
        "-S",
        dest="sparse",
        metavar="SIZE",
        help="zero runs at least this long become holes (default 4k; 0 writes all data)",
    )
    p.add_argument(
        "-C",
        "--copy-range-offloading",
        dest="copy_offload",
        action="store_true",
        help=(
            "copy data that lies plainly in local files into a raw local output inside the "
            "kernel (copy_file_range); no zero detection in it, so not with -S"
        ),
    )
    p.add_argument("-n", dest="existing", action="store_true", help="write into an existing image")
    p.add_argument(
        "--target-is-zero",
        action="store_true",
        help="with -n: the existing image reads as zeroes, skip writing zeroes",
    )
    p.add_argument(
        "-m", dest="workers", metavar="N", help="parallel workers, 1 to 16 (default: one per core)"
    )
    p.add_argument("-W", dest="out_of_order", action="store_true", help="allow out-of-order writes")
    add_cache_arg(p, "unsafe")
    add_source_cache_arg(p)
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("-q", dest="quiet", action="store_true", help="print nothing")
    add_share_arg(p)
    add_image_opts_arg(p, "each source file name is")
    p.add_argument(
        "--target-image-opts",
        dest="target_image_opts",
        action="store_true",
        help="with -n: the output file name is an option string (its driver replaces -O)",
    )
    p.add_argument(
        "-l",
        dest="snapshot",
        metavar="SNAPSHOT",
        help="copy an internal snapshot of the source: snapshot.id=ID,snapshot.name=NAME, "
        "or an ID or name",
    )
    p.add_argument(
        "--bitmaps", action="store_true", help="copy the persistent bitmaps (qcow2 to qcow2)"
    )
    p.add_argument(
        "--skip-broken-bitmaps",
        dest="skip_broken_bitmaps",
        action="store_true",
        help="with --bitmaps: leave out bitmaps a writer left inconsistent",
    )
    add_events_arg(p)
    for flag, _ in UNSUPPORTED_VALUE:
        refused_by_name(p, flag, dest=f"unsupported{flag}", takes_value=True)
    for flag, _ in UNSUPPORTED_FLAG:
        refused_by_name(p, flag, dest=f"unsupported{flag}")
    p.add_argument(
        "filenames",
        nargs="*",
        metavar="FILE",
        help="source images (one or more), then the output file",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    for key, value in vars(args).items():
        if key.startswith("unsupported") and value not in (None, False):
            raise UsageError(
                f"convert option {key.removeprefix('unsupported')} is not supported by qimg"
            )
    items = parse_option_lists(args.options)
    if any(item.is_help for item in items):
        info = format_info(args.out_fmt)
        print(info.help_text(with_protocol=len(args.filenames) > 0))
        return 0
    if len(args.filenames) < 2:
        raise UsageError("Expecting a source image and an output file name")
    *sources, target = args.filenames
    workers = None
    if args.workers is not None:
        try:
            workers = int(args.workers)
        except ValueError:
            workers = 0
    request = ConvertRequest(
        sources=sources,
        target=target,
        fmt=args.fmt,
        out_fmt=args.out_fmt,
        options=items,
        compress=args.compress,
        backing_file=args.backing_file,
        backing_fmt=args.backing_fmt,
        existing=args.existing,
        target_is_zero=args.target_is_zero,
        sparse_size=None if args.sparse is None else parse_size(args.sparse, "-S"),
        workers=workers,
        in_order=not args.out_of_order,
        cache=args.cache,
        source_cache=args.source_cache,
        copy_offload=args.copy_offload,
        force_share=args.force_share,
        bitmaps=args.bitmaps,
        skip_broken_bitmaps=args.skip_broken_bitmaps,
        snapshot=None if args.snapshot is None else SnapshotRef.parse(args.snapshot),
    )
    if args.target_image_opts and not args.existing:
        raise UsageError("--target-image-opts requires use of -n flag")
    progress = Progress(args.progress and not args.quiet)
    with event_hub(args) as events:
        request.image_opts = args.image_opts
        request.target_image_opts = args.target_image_opts
        request.events = events
        # Every refusal of the command line comes before any output.
        request.validate()
        progress.start()
        try:
            run_convert(request, progress)
        except QimgError:
            progress.finish_line()
            raise
    progress.end()
    return 0
