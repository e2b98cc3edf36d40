"""Pieces every image-reading command shares."""

from __future__ import annotations

import argparse
import contextlib
import sys

from qimg.errors import QimgError, UsageError

# typing.TYPE_CHECKING without importing typing (mypy and ruff know the name).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

    from qimg.events import EventHub

__all__ = [
    "Progress",
    "add_cache_arg",
    "add_events_arg",
    "add_format_arg",
    "add_image_opts_arg",
    "add_options_arg",
    "add_output_arg",
    "add_share_arg",
    "add_source_cache_arg",
    "event_hub",
    "output_mode",
]


def add_format_arg(p: argparse.ArgumentParser, flag: str = "-f", dest: str = "fmt") -> None:
    p.add_argument(
        flag, dest=dest, metavar="FMT", help="image format (qcow2 or raw; default: probe)"
    )


def add_image_opts_arg(p: argparse.ArgumentParser, what: str = "the file name is") -> None:
    p.add_argument(
        "--image-opts",
        dest="image_opts",
        action="store_true",
        help=(
            f"{what} an option string, as qemu-img's --image-opts: "
            "driver=qcow2,file.filename=a.qcow2 or a node tree such as "
            "driver=quorum,vote-threshold=2,children.0.file.filename=a.raw,..."
        ),
    )


def add_events_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--events",
        metavar="FILE",
        help=(
            "write every event (QUORUM_REPORT_BAD, QUORUM_FAILURE) as a QMP-style JSON line "
            "to FILE; '-' is standard error"
        ),
    )


@contextlib.contextmanager
def event_hub(args: argparse.Namespace) -> Iterator[EventHub | None]:
    """The sink ``--events`` names, for the images the command opens (None without
    ``--events``); closed when the command ends."""
    if args.events is None:
        yield None
        return
    # Imported here: the events machinery (JSON, threads, sockets) is for --events only.
    from qimg.events import EventHub, open_sink

    hub = EventHub([open_sink(args.events)])
    try:
        yield hub
    finally:
        hub.close()


def add_options_arg(p: argparse.ArgumentParser, what: str) -> None:
    """``-o``, repeatable: comma separated ``key=value`` lists, merged in order."""
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTIONS",
        help=f"{what}, comma separated key=value; '-o help' lists them",
    )


def add_cache_arg(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "-t",
        dest="cache",
        default=default,
        metavar="MODE",
        help=(
            f"cache mode of the image written: writeback, unsafe, none (O_DIRECT), "
            f"directsync or writethrough (default: {default})"
        ),
    )


def add_source_cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-T",
        dest="source_cache",
        default="writeback",
        metavar="MODE",
        help="cache mode of the images read (default: writeback)",
    )


def add_output_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--output", default="human", metavar="FMT", help="output format: human (default) or json"
    )


def add_share_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-U",
        "--force-share",
        action="store_true",
        help="open read-only images even while another process writes them (QEMU's locks)",
    )


def output_mode(args: argparse.Namespace) -> str:
    if args.output not in ("human", "json"):
        raise UsageError(f"--output expects 'human' or 'json', not '{args.output}'")
    mode: str = args.output
    return mode


class Progress:
    """qemu-img's ``-p`` display: ``    (12.34/100%)`` rewritten in place on stdout."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        percent = 100.0 * done / total if total else 100.0
        sys.stdout.write(f"    ({percent:3.2f}/100%)\r")
        sys.stdout.flush()
        self.shown = True

    def start(self) -> None:
        self(0, 1)

    def finish_line(self) -> None:
        """Ends the progress display with a newline, after whatever was printed."""
        if self.enabled:
            sys.stdout.write("\n")
            sys.stdout.flush()

    @contextlib.contextmanager
    def around(self) -> Iterator[Progress]:
        """The display around one long call: started, ended at 100%, or (when the call
        fails) ended with a newline so that the error starts a line of its own."""
        self.start()
        try:
            yield self
        except QimgError:
            self.finish_line()
            raise
        self.end()

    def end(self) -> None:
        if self.enabled:
            self(1, 1)
            sys.stdout.write("\n")
            sys.stdout.flush()
