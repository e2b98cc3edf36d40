"""``qimg amend [-f fmt | --image-opts] [-p] [-q] -o options filename``"""

from __future__ import annotations

import argparse

from qimg.commands._common import Progress, add_cache_arg, add_format_arg, add_image_opts_arg
from qimg.commands._parser import examples, refused_by_name
from qimg.errors import InvalidOptionError, UsageError
from qimg.formats import amend_info, option_text
from qimg.image import check_cache_mode, open_image, parse_image_spec
from qimg.names import is_plain_filename
from qimg.options import parse_option_lists
from qimg.spec import BlkdebugNode, QuorumNode

# typing.TYPE_CHECKING without importing typing.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from qimg.spec import ImageSpec

NAME = "amend"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        NAME,
        help="change the options of an existing qcow2 image",
        description=(
            "Change compat (0.10 <-> 1.1), lazy_refcounts, refcount_bits or size of a "
            "qcow2 image in place, as qemu-img amend does; '-o help' lists the options."
        ),
        epilog=examples(
            "qimg amend -o compat=0.10 disk.qcow2",
            "qimg amend -o lazy_refcounts=on,size=20G disk.qcow2",
        ),
        allow_abbrev=False,
    )
    add_format_arg(p)
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTIONS",
        help="options to change, comma separated key=value",
    )
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("-q", dest="quiet", action="store_true", help="print nothing")
    refused_by_name(p, "--force", dest="unsupported_force")
    refused_by_name(p, "--object", dest="unsupported_object", takes_value=True)
    add_image_opts_arg(p)
    add_cache_arg(p, "writeback")
    p.add_argument("filename", nargs="?", help="the qcow2 image to change")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    for flag, value in (
        ("--force", args.unsupported_force),
        ("--object", args.unsupported_object),
    ):
        if value not in (None, False):
            raise UsageError(f"amend option {flag} is not supported by qimg")
    check_cache_mode(args.cache)
    if not args.options:
        raise UsageError("Must specify options (-o)")
    items = parse_option_lists(args.options)
    if any(item.is_help for item in items):
        fmt = args.fmt
        if fmt is None:
            if args.filename is None:
                raise UsageError("Expecting one image file name")
            spec, fmt = _amendable(args)
            with open_image(spec, fmt, backing=False) as probed:
                fmt = probed.format
        print(amend_info(fmt).amend_help_text())
        return 0
    if args.filename is None:
        raise UsageError("Expecting one image file name")
    progress = Progress(args.progress and not args.quiet)
    spec, fmt = _amendable(args)
    with open_image(spec, fmt, writable=True, cache=args.cache) as image:
        parsed = amend_info(image.format).parse_amend(items)
        # As qemu-img: naming either one means naming both; the pair must be what the
        # image already has (an option left out stands for "none").
        wanted = (option_text(parsed, "backing_file"), option_text(parsed, "backing_fmt"))
        if wanted != (None, None) and wanted != (image.backing_file, image.backing_format):
            raise InvalidOptionError(
                "Cannot amend the backing file (qimg cannot change which file an "
                "image is an overlay of)"
            )
        compat = option_text(parsed, "compat")
        lazy = parsed.get("lazy_refcounts")
        bits = parsed.get("refcount_bits")
        size = parsed.get("size")
        if size is not None and not size.value:
            # qemu-img amend reads size=0 as "keep the size", not as a shrink to nothing.
            size = None
        progress.start()
        image.amend(
            compat=compat,
            lazy_refcounts=None if lazy is None else bool(lazy.value),
            refcount_bits=None if bits is None else int(bits.value),
            size=None if size is None else int(size.value),
        )
    progress.end()
    return 0


def _amendable(args: argparse.Namespace) -> tuple[ImageSpec, str | None]:
    """The image to open and its ``-f``: the file name, or the parsed spec, refused
    before anything is opened when it names a node that has no options to amend
    (a quorum or blkdebug node)."""
    if not args.image_opts and is_plain_filename(args.filename):
        return args.filename, args.fmt
    spec = parse_image_spec(args.filename, image_opts=args.image_opts, fmt=args.fmt)
    if isinstance(spec.root, QuorumNode | BlkdebugNode):
        raise UsageError(f"Format driver '{spec.driver}' does not support option amendment")
    return spec, None
