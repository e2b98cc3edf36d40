"""``qimg check [-f fmt] [--output=ofmt] [-q] [-U] filename``"""

from __future__ import annotations

import argparse
import sys

from qimg import qjson
from qimg.check import check_image
from qimg.commands._common import add_format_arg, add_output_arg, add_share_arg, output_mode
from qimg.errors import QimgError, UsageError
from qimg.image import open_image

NAME = "check"

# qemu-img's status for a format without a check.
NO_CHECK = 63


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        NAME,
        help="check a qcow2 image's metadata for consistency",
        description=(
            "Recompute every refcount of a qcow2 image and compare with the stored ones, "
            "as qemu-img check does: exit 0 clean, 1 check failed, 2 corruptions, "
            "3 leaked clusters only, 63 for formats without metadata (raw)."
        ),
        allow_abbrev=False,
    )
    add_format_arg(p)
    add_output_arg(p)
    add_share_arg(p)
    p.add_argument("-q", dest="quiet", action="store_true", help="print nothing, just exit")
    p.add_argument("-r", dest="repair", help="repair (leaks or all): not supported by qimg yet")
    p.add_argument("filename", nargs="?")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    mode = output_mode(args)
    if args.repair is not None:
        raise UsageError(
            f"check -r {args.repair} (repair) is not supported by qimg yet; "
            "run without -r to check read only"
        )
    if args.filename is None:
        raise UsageError("Expecting one image file name")
    with open_image(args.filename, args.fmt) as image:
        if image.format != "qcow2":
            print(
                f"qimg: {args.filename}: {image.format} images have no metadata to check",
                file=sys.stderr,
            )
            return NO_CHECK
        try:
            report = check_image(image)
        except QimgError as err:
            print(f"qimg: {args.filename}: Check failed: {err}", file=sys.stderr)
            return 1
    for line in report.messages:
        print(line, file=sys.stderr)
    if not args.quiet:
        if mode == "json":
            print(qjson.dumps(report.as_json()))
        else:
            print(report.human())
    if report.check_errors:
        print(f"qimg: {args.filename}: Check failed", file=sys.stderr)
    return report.exit_status
