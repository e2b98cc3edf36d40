"""``qimg snapshot [-f fmt | --image-opts] [-U] [-q] [-l | -a name | -c name | -d name]
filename``: lists, creates, applies and deletes a qcow2 image's internal snapshots."""

from __future__ import annotations

import argparse

from qimg.commands._common import add_format_arg, add_image_opts_arg, add_share_arg
from qimg.commands._parser import examples
from qimg.errors import UsageError
from qimg.image import open_image
from qimg.imageinfo import snapshot_lines

NAME = "snapshot"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        NAME,
        help="list, create, apply or delete internal snapshots",
        description=(
            "List (-l, the default), create (-c), apply (-a) or delete (-d) the internal "
            "snapshots of a qcow2 image, as qemu-img snapshot does. -a takes a snapshot "
            "ID or name and restores its guest content and size; -d deletes the first "
            "snapshot with that name. Only one of -l, -a, -c and -d at a time."
        ),
        epilog=examples(
            "qimg snapshot -c before-upgrade disk.qcow2",
            "qimg snapshot -l disk.qcow2",
            "qimg snapshot -a before-upgrade disk.qcow2",
            "qimg snapshot -d before-upgrade disk.qcow2",
        ),
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
        help="quiet (as in qemu-img, the list is printed anyway)",
    )
    p.add_argument(
        "-l", "--list", dest="list", action="store_true", help="list the snapshots (the default)"
    )
    p.add_argument("-c", "--create", dest="create", metavar="NAME", help="create snapshot NAME")
    p.add_argument(
        "-a", "--apply", dest="apply", metavar="SNAPSHOT", help="apply the snapshot (ID or name)"
    )
    p.add_argument(
        "-d", "--delete", dest="delete", metavar="NAME", help="delete the snapshot called NAME"
    )
    p.add_argument("filename", nargs="?", help="the image")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    given = [
        (flag, value)
        for flag, value in (("-a", args.apply), ("-c", args.create), ("-d", args.delete))
        if value is not None
    ]
    if len(given) + args.list > 1:
        raise UsageError("Cannot mix '-l', '-a', '-c', '-d'")
    if args.filename is None:
        raise UsageError("Expecting one image file name")
    if not given:
        return _list(args)
    if args.force_share:
        raise UsageError(
            f"Could not open '{args.filename}': force-share=on can only be used with "
            "read-only images"
        )
    flag, name = given[0]
    with open_image(
        args.filename, args.fmt, backing=False, writable=True, image_opts=args.image_opts
    ) as image:
        if flag == "-c":
            image.create_snapshot(name)
        elif flag == "-a":
            image.apply_snapshot(name)
        else:
            image.delete_snapshot(name)
    return 0


def _list(args: argparse.Namespace) -> int:
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
