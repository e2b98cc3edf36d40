"""``qimg dd [-f fmt | --image-opts] [-O output_fmt] [-U] [bs=block_size] [count=blocks]
[skip=blocks] if=input of=output``"""

from __future__ import annotations

import argparse

from qimg.blockcopy import check_block_size, check_blocks, dd
from qimg.commands._common import add_format_arg, add_image_opts_arg, add_share_arg
from qimg.commands._parser import examples
from qimg.errors import InvalidOptionError, UsageError
from qimg.options import parse_size

NAME = "dd"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        NAME,
        help="copy a range of an image into a new image",
        description=(
            "Create OUTPUT holding the first COUNT blocks of BS bytes of INPUT (all of it "
            "without count=) but the first SKIP, converting the format, as qemu-img dd "
            "does (skipped blocks count in COUNT). The operands are dd's: bs=, count=, "
            "skip=, if=, of=."
        ),
        epilog=examples(
            "qimg dd if=disk.qcow2 of=disk.raw",
            "qimg dd -O qcow2 bs=1M skip=16 count=80 if=disk.raw of=part.qcow2",
        ),
        allow_abbrev=False,
    )
    add_format_arg(p)
    add_image_opts_arg(p, "if= is")
    p.add_argument(
        "-O",
        "--output-format",
        dest="out_fmt",
        default="raw",
        metavar="FMT",
        help="format of the output (qcow2 or raw; default raw)",
    )
    add_share_arg(p)
    p.add_argument(
        "operands",
        nargs="*",
        metavar="OPERAND",
        help="bs=SIZE (default 512), count=BLOCKS, skip=BLOCKS, if=INPUT, of=OUTPUT",
    )
    p.set_defaults(run=run)


def _blocks(name: str, text: str) -> int:
    """A block count as qemu-img reads count= and skip=: a plain decimal number."""
    if not text.isdigit() and not (text.startswith("-") and text[1:].isdigit()):
        raise InvalidOptionError(f"Invalid {name} specified: '{text}'.")
    return check_blocks(name, int(text))


def _block_size(text: str) -> int:
    try:
        value = parse_size(text, "bs")
    except InvalidOptionError:
        raise InvalidOptionError(f"Invalid bs specified: '{text}'.") from None
    return check_block_size(value)


def run(args: argparse.Namespace) -> int:
    bs, count, skip = 512, None, 0
    paths: dict[str, str] = {}
    # Operands are read in order, the last of each kind winning, as qemu-img does.
    for word in args.operands:
        key, eq, value = word.partition("=")
        if not eq or key not in ("bs", "count", "skip", "if", "of"):
            raise UsageError(f"unrecognized operand {key}")
        if key == "bs":
            bs = _block_size(value)
        elif key == "count":
            count = _blocks("count", value)
        elif key == "skip":
            skip = _blocks("skip", value)
        else:
            paths[key] = value
    if "if" not in paths or "of" not in paths:
        raise UsageError("Must specify both input and output files")
    dd(
        paths["if"],
        paths["of"],
        bs=bs,
        count=count,
        skip=skip,
        format=args.fmt,
        out_format=args.out_fmt,
        image_opts=args.image_opts,
        force_share=args.force_share,
    )
    return 0
