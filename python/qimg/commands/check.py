"""``qimg check [-f fmt | --image-opts] [--output=ofmt] [-r leaks|all] [-q] [-U] [--events FILE]
filename``"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from qimg import qjson
from qimg.commands._common import (
    add_events_arg,
    add_format_arg,
    add_image_opts_arg,
    add_output_arg,
    add_share_arg,
    add_source_cache_arg,
    event_hub,
    output_mode,
)
from qimg.commands._parser import examples
from qimg.consistency import (
    CheckReport,
    check_image,
    parse_repair_mode,
    repair_image,
    repair_summary,
)
from qimg.errors import QimgError, UsageError
from qimg.events import EventCallback
from qimg.image import check_cache_mode, open_image

NAME = "check"

# qemu-img's status for a format without a check.
NO_CHECK = 63


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        NAME,
        help="check a qcow2 image's metadata for consistency, or repair it",
        description=(
            "Recompute every refcount of a qcow2 image and compare with the stored ones, "
            "as qemu-img check does: exit 0 clean, 1 check failed, 2 corruptions, "
            "3 leaked clusters only, 63 for formats without metadata (raw). "
            "With -r the image is repaired in place first, then checked again."
        ),
        epilog=examples(
            "qimg check disk.qcow2",
            "qimg check -r leaks --output=json disk.qcow2",
        ),
        allow_abbrev=False,
    )
    add_format_arg(p)
    add_output_arg(p)
    add_share_arg(p)
    add_source_cache_arg(p)
    add_image_opts_arg(p)
    add_events_arg(p)
    p.add_argument("-q", dest="quiet", action="store_true", help="print nothing, just exit")
    p.add_argument(
        "-r",
        "--repair",
        dest="repair",
        metavar="leaks|all",
        help=(
            "repair in place: 'leaks' frees leaked clusters; 'all' also fixes refcounts that "
            "are too low, COPIED flags and broken refcount structures"
        ),
    )
    p.add_argument("filename", nargs="?", help="the image to check")
    p.set_defaults(run=run)


def print_lines(lines: list[str]) -> None:
    for line in lines:
        print(line, file=sys.stderr)


def check_failed(filename: str, err: QimgError) -> int:
    """qemu-img's ``Check failed: <why>`` ending (after the lines the check printed before)."""
    *preface, last = str(err).split("\n")
    print_lines(preface)
    if not last.startswith("Check failed"):
        last = f"Check failed: {last}"
    print(f"qimg: {filename}: {last}", file=sys.stderr)
    return 1


def show(report: CheckReport, filename: str, mode: str, quiet: bool) -> int:
    """The report's lines, the report, and the exit status."""
    print_lines(report.messages)
    if not quiet and mode == "json":
        # qemu-img names the image as it was typed (a json: spec stays one).
        print(qjson.dumps(replace(report, filename=filename).as_json()))
    elif not quiet:
        print(report.human())
    if report.check_errors:
        print(f"qimg: {filename}: Check failed", file=sys.stderr)
    return report.exit_status


def run(args: argparse.Namespace) -> int:
    mode = output_mode(args)
    repair = None if args.repair is None else parse_repair_mode(args.repair)
    if args.filename is None:
        raise UsageError("Expecting one image file name")
    check_cache_mode(args.source_cache, source=True)
    if repair is not None and args.force_share:
        raise UsageError(
            f"Could not open '{args.filename}': "
            "force-share=on can only be used with read-only images"
        )
    with event_hub(args) as events:
        if repair is not None:
            return run_repair(args, repair, mode, events)
        with open_image(
            args.filename,
            args.fmt,
            image_opts=args.image_opts,
            events=events,
            cache=args.source_cache,
            force_share=args.force_share,
        ) as image:
            if image.format != "qcow2":
                print("qimg: This image format does not support checks", file=sys.stderr)
                return NO_CHECK
            try:
                report = check_image(image)
            except QimgError as err:
                return check_failed(args.filename, err)
    return show(report, args.filename, mode, args.quiet)


def run_repair(
    args: argparse.Namespace, repair: str, mode: str, events: EventCallback | None
) -> int:
    filename, quiet = args.filename, args.quiet
    with open_image(
        filename,
        args.fmt,
        image_opts=args.image_opts,
        events=events,
        cache=args.source_cache,
        purpose="repair",
    ) as image:
        if image.format != "qcow2":
            print("qimg: This image format does not support checks", file=sys.stderr)
            return NO_CHECK
        result = repair_image(image, repair)
    if result.failure is not None:
        print_lines(result.messages)
        return check_failed(filename, result.failure)
    if result.repaired:
        print_lines(result.messages)
        if mode == "human" and not quiet:
            print(repair_summary(result.leaks_fixed, result.corruptions_fixed))
            sys.stdout.flush()
    if result.recheck_failure is not None:
        return check_failed(filename, result.recheck_failure)
    if result.report is None:
        raise QimgError("the repair produced no report")
    return show(result.report, filename, mode, quiet)
