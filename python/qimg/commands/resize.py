"""``qimg resize [-f fmt | --image-opts] [--preallocation=mode] [-q] [--shrink] filename
[+|-]size``"""

from __future__ import annotations

import argparse
import sys

from qimg.commands._common import add_format_arg, add_image_opts_arg
from qimg.commands._parser import examples, refused_by_name
from qimg.errors import InvalidOptionError, UsageError
from qimg.image import open_image, parse_image_spec
from qimg.names import is_plain_filename
from qimg.options import parse_image_size
from qimg.prealloc import PreallocMode
from qimg.spec import BlkdebugNode, QuorumNode

# typing.TYPE_CHECKING without importing typing.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from qimg.spec import ImageSpec

NAME = "resize"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        NAME,
        help="change the virtual size of an image",
        description=(
            "Grow or shrink a qcow2 or raw image, as qemu-img resize does. The size is "
            "absolute, or relative with a leading + or -; shrinking needs --shrink."
        ),
        epilog=examples(
            "qimg resize disk.qcow2 20G",
            "qimg resize disk.raw +1G",
            "qimg resize --shrink disk.raw -512M",
        ),
        allow_abbrev=False,
    )
    add_format_arg(p)
    p.add_argument(
        "--preallocation",
        default="off",
        metavar="MODE",
        help="off (default), metadata (qcow2), falloc or full: how to allocate a grown area",
    )
    p.add_argument("--shrink", action="store_true", help="allow the image to become smaller")
    p.add_argument("-q", dest="quiet", action="store_true", help="print nothing on success")
    refused_by_name(p, "--object", dest="unsupported_object", takes_value=True)
    add_image_opts_arg(p)
    p.add_argument("filename", help="the image to resize")
    p.add_argument("size", help="new size, or +N / -N relative to the current one")
    p.set_defaults(run=run)


def fix_argv(argv: list[str]) -> list[str]:
    """A relative shrink (``-1G``) looks like an option: the size is always
    the last argument, so it is marked as positional."""
    if len(argv) >= 3 and argv[-1].startswith("-") and argv[-2] != "--":
        rest = argv[-1][1:2]
        if rest.isdigit() or rest == ".":
            return [*argv[:-1], "--", argv[-1]]
    return argv


def run(args: argparse.Namespace) -> int:
    if args.unsupported_object is not None:
        raise UsageError("resize option --object is not supported by qimg")
    mode = _prealloc(args.preallocation)
    text: str = args.size
    sign = text[0] if text[:1] in ("+", "-") else ""
    amount = parse_image_size(text[1:] if sign else text)
    image_spec: ImageSpec = args.filename
    fmt = args.fmt
    if args.image_opts or not is_plain_filename(args.filename):
        spec = parse_image_spec(args.filename, image_opts=args.image_opts, fmt=args.fmt)
        if isinstance(spec.root, QuorumNode | BlkdebugNode):
            raise UsageError(
                f"Image format driver does not support resize ('{spec.driver}' nodes cannot "
                "be resized; resize each child image instead)"
            )
        image_spec, fmt = spec, None
    with open_image(image_spec, fmt, writable=True, purpose="resize") as image:
        current = image.size
        new_size = current + amount if sign == "+" else current - amount if sign else amount
        if new_size <= 0:
            raise InvalidOptionError("New image size must be positive")
        if new_size < current and not args.shrink:
            print(
                "qimg: Use the --shrink option to perform a shrink operation.\n"
                "qimg: warning: shrinking discards every byte past the new end of the image; "
                "make sure nothing there is needed.",
                file=sys.stderr,
            )
            return 1
        image.resize(new_size, preallocation=mode)
    if not args.quiet:
        print("Image resized.")
    return 0


def _prealloc(text: str) -> PreallocMode:
    try:
        return PreallocMode.parse(text)
    except InvalidOptionError:
        raise InvalidOptionError(f"Invalid preallocation mode '{text}'") from None
