"""``qimg info [-f fmt | --image-opts] [--output=ofmt] [--backing-chain] [-U] [--events FILE]
filename``"""

from __future__ import annotations

import argparse

from qimg import _core, _log, qjson
from qimg.commands._common import (
    add_events_arg,
    add_format_arg,
    add_image_opts_arg,
    add_output_arg,
    add_share_arg,
    event_hub,
    output_mode,
)
from qimg.commands._parser import examples
from qimg.errors import UsageError
from qimg.imageinfo import core_info, info_human

# typing.TYPE_CHECKING without importing typing (mypy and ruff know the name).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from qimg.qjson import JsonValue

NAME = "info"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        NAME,
        help="show an image's format, sizes and settings",
        description=(
            "Show what qemu-img info shows for an image: a qcow2 or raw file, or a node tree "
            "given as json:{...} or with --image-opts (quorum, blkdebug, ...)."
        ),
        epilog=examples(
            "qimg info disk.qcow2",
            "qimg info --backing-chain --output=json overlay.qcow2",
        ),
        allow_abbrev=False,
    )
    add_format_arg(p)
    add_output_arg(p)
    add_share_arg(p)
    add_image_opts_arg(p)
    add_events_arg(p)
    p.add_argument("--backing-chain", action="store_true", help="also show every image below it")
    p.add_argument("filename", nargs="?", help="the image: a file name, json:{...} or options")
    p.set_defaults(run=run)


def _is_plain(args: argparse.Namespace) -> bool:
    """Whether the image is a file that the core opens by itself. Anything that may be
    a node tree (json:, nbd..., --image-opts) or that has events to deliver goes
    through qimg.image, which knows all of that."""
    name: str = args.filename
    return not (
        args.image_opts
        or args.events is not None
        or name.startswith("json:")
        or name.startswith("nbd")
    )


def _plain_infos(args: argparse.Namespace) -> list[dict[str, JsonValue]]:
    """The ImageInfo of a plain file (and of its backing chain), read with the core
    alone: qimg.image and its node-tree parser are not needed, so info starts quickly."""
    top = _core.open_image(
        args.filename,
        args.fmt,
        no_backing=not args.backing_chain,
        writable=False,
        cache="writeback",
        force_share=args.force_share,
        purpose="inspect",
    )
    try:
        _log.info("opened image %s: format %s, driver file", args.filename, top.format)
        infos = [core_info(top)]
        below = top.backing() if args.backing_chain else None
        while below is not None:
            _log.info("opened backing file %s: format %s", below.filename, below.format)
            infos.append(core_info(below))
            below = below.backing()
    finally:
        top.release_locks()
    return infos


def _tree_infos(args: argparse.Namespace) -> list[dict[str, JsonValue]]:
    from typing import cast

    from qimg.image import open_image

    # Like qemu-img, plain info names the backing file without opening it.
    with (
        event_hub(args) as events,
        open_image(
            args.filename,
            args.fmt,
            backing=args.backing_chain,
            image_opts=args.image_opts,
            events=events,
            force_share=args.force_share,
            purpose="inspect",
        ) as image,
    ):
        _log.opened("image", args.filename, image)
        chain = image.chain() if args.backing_chain else [image]
        # An ImageInfo is JSON; the printer takes it as such.
        return [cast("dict[str, JsonValue]", img.info()) for img in chain]


def run(args: argparse.Namespace) -> int:
    mode = output_mode(args)
    if args.filename is None:
        raise UsageError("Expecting one image file name")
    infos = _plain_infos(args) if _is_plain(args) else _tree_infos(args)
    if mode == "json":
        print(qjson.dumps(infos if args.backing_chain else infos[0]))
    else:
        print("\n\n".join(info_human(i) for i in infos))
    return 0
