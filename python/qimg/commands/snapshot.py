"""``qimg snapshot [-f fmt | --image-opts] [-U] [-q] [-l] filename``: lists a qcow2
image's internal snapshots. Creating, applying and deleting them (-c, -a, -d) are not
built yet and are refused by name."""

from __future__ import annotations

import argparse

from qimg.commands._common import add_format_arg, add_image_opts_arg, add_share_arg
from qimg.commands._parser import examples, refused_by_name
from qimg.errors import UsageError
from qimg.image import open_image
from qimg.imageinfo import snapshot_lines

NAME = "snapshot"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        NAME,
        help="list the internal snapshots of a qcow2 image",
        description=(
            "List the internal snapshots of an image, as qemu-img snapshot -l does "
            "(nothing for an image without any). qimg does not create, apply or delete "
            "snapshots yet: -c, -a and -d are refused."
        ),
        epilog=examples("qimg snapshot -l disk.qcow2", "qimg snapshot -U disk.qcow2"),
        allow_abbrev=False,
    )
    add_format_arg(p)
    add_image_opts_arg(p)
    add_share_arg(p)
    p.add_argument(
        "-q",
        "--quiet",
        dest="quiet",
        action="store_true",
        help="accepted as in qemu-img, where it does not silence the list either",
    )
    p.add_argument(
        "-l", "--list", dest="list", action="store_true", help="list the snapshots (the default)"
    )
    for flag, long, dest in (("-c", "--create", "create"), ("-a", "--apply", "apply")):
        refused_by_name(p, flag, long, dest=dest, takes_value=True)
    refused_by_name(p, "-d", "--delete", dest="delete", takes_value=True)
    p.add_argument("filename", nargs="?", help="the image")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    for flag, given in (("-c", args.create), ("-a", args.apply), ("-d", args.delete)):
        if given is not None:
            raise UsageError(
                f"snapshot {flag} is not supported by qimg yet (snapshot -l lists snapshots)"
            )
    if args.filename is None:
        raise UsageError("Expecting one image file name")
    with open_image(
        args.filename,
        args.fmt,
        backing=False,
        image_opts=args.image_opts,
        force_share=args.force_share,
        purpose="inspect",
    ) as image:
        snapshots = image.snapshots()
    if snapshots:
        print("\n".join(snapshot_lines(list(snapshots))))
    return 0
