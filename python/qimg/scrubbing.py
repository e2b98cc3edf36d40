"""Scrub a quorum: read every replica of the whole image, vote on every block,
and say per replica what was wrong; with ``repair``, write the winning bytes
back over what was wrong.

>>> report = qimg.scrub('json:{"driver": "quorum", "vote-threshold": 2, "children": [...]}')
>>> report.verdict
<ScrubVerdict.CLEAN: 'clean'>
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from qimg import _core
from qimg.errors import UsageError
from qimg.events import EventCallback
from qimg.image import Image, open_image
from qimg.qjson import JsonValue

# typing.TYPE_CHECKING without importing typing.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from qimg.spec import ImageSpec

__all__ = ["ChildReport", "ChildVerdict", "ScrubReport", "ScrubVerdict", "scrub"]

Range = tuple[int, int]
"""``(offset, length)`` in bytes of the guest disk."""


class ChildVerdict(enum.Enum):
    CLEAN = "clean"
    """Every block voted with the winner."""
    BAD = "bad"
    """Lost votes or failed reads, left as they are."""
    REPAIRED = "repaired"
    """Lost votes or failed reads, all rewritten with the winning bytes."""
    REPAIR_FAILED = "repair-failed"
    """Some rewrites failed: the replica is still bad there."""


class ScrubVerdict(enum.Enum):
    CLEAN = "clean"
    BAD = "bad"
    """Some replicas were wrong (see ``repaired``)."""
    NO_QUORUM = "no-quorum"
    """Some ranges had no version with enough votes: their right contents are unknown."""

    @property
    def exit_status(self) -> int:
        return {ScrubVerdict.CLEAN: 0, ScrubVerdict.BAD: 2, ScrubVerdict.NO_QUORUM: 3}[self]


@dataclass(frozen=True)
class ReadError:
    offset: int
    length: int
    error: str


@dataclass(frozen=True)
class ChildReport:
    node_name: str
    bad_ranges: tuple[Range, ...]
    """Ranges where this replica's bytes lost the vote (to 64 KiB blocks)."""
    read_errors: tuple[ReadError, ...]
    repaired_bytes: int
    repair_errors: tuple[ReadError, ...]
    repair: bool
    """Whether the scrub was asked to repair."""

    @property
    def bad_bytes(self) -> int:
        return sum(length for _, length in self.bad_ranges)

    @property
    def verdict(self) -> ChildVerdict:
        if not self.bad_ranges and not self.read_errors:
            return ChildVerdict.CLEAN
        if not self.repair:
            return ChildVerdict.BAD
        return ChildVerdict.REPAIR_FAILED if self.repair_errors else ChildVerdict.REPAIRED

    def as_json(self) -> dict[str, JsonValue]:
        return {
            "node-name": self.node_name,
            "verdict": self.verdict.value,
            "bad-bytes": self.bad_bytes,
            "bad-ranges": [{"offset": o, "length": n} for o, n in self.bad_ranges],
            "read-errors": [_error_json(e) for e in self.read_errors],
            "repaired-bytes": self.repaired_bytes,
            "repair-errors": [_error_json(e) for e in self.repair_errors],
        }


@dataclass(frozen=True)
class ScrubReport:
    image: str
    size: int
    bytes_compared: int
    """Bytes read from every replica and compared."""
    bytes_skipped_zero: int
    """Bytes every replica reported as zeroes, settled without reading them."""
    children: tuple[ChildReport, ...]
    unvoted_ranges: tuple[Range, ...]
    repair: bool

    @property
    def verdict(self) -> ScrubVerdict:
        if self.unvoted_ranges:
            return ScrubVerdict.NO_QUORUM
        if any(c.verdict is not ChildVerdict.CLEAN for c in self.children):
            return ScrubVerdict.BAD
        return ScrubVerdict.CLEAN

    @property
    def repaired(self) -> bool:
        """Every bad replica was rewritten successfully."""
        return self.repair and all(
            c.verdict in (ChildVerdict.CLEAN, ChildVerdict.REPAIRED) for c in self.children
        )

    def as_json(self) -> dict[str, JsonValue]:
        return {
            "image": self.image,
            "verdict": self.verdict.value,
            "repair": self.repair,
            "repaired": self.repaired,
            "virtual-size": self.size,
            "bytes-compared": self.bytes_compared,
            "bytes-skipped-zero": self.bytes_skipped_zero,
            "children": [c.as_json() for c in self.children],
            "unvoted-ranges": [{"offset": o, "length": n} for o, n in self.unvoted_ranges],
        }


def _error_json(e: ReadError) -> dict[str, JsonValue]:
    return {"offset": e.offset, "length": e.length, "error": e.error}


def _report(image: Image, raw: _core.ScrubResult, repair: bool) -> ScrubReport:
    children = tuple(
        ChildReport(
            node_name=c.node_name,
            bad_ranges=tuple(c.bad_ranges),
            read_errors=tuple(_read_error(e) for e in c.read_errors),
            repaired_bytes=c.repaired_bytes,
            repair_errors=tuple(_read_error(e) for e in c.repair_errors),
            repair=repair,
        )
        for c in raw.children
    )
    return ScrubReport(
        image=image.filename,
        size=raw.size,
        bytes_compared=raw.bytes_compared,
        bytes_skipped_zero=raw.bytes_skipped_zero,
        children=children,
        unvoted_ranges=tuple(raw.unvoted_ranges),
        repair=repair,
    )


def _read_error(e: _core.RangeError) -> ReadError:
    return ReadError(e.offset, e.length, e.error)


def scrub(
    spec: ImageSpec | Image,
    *,
    repair: bool = False,
    image_opts: bool = False,
    progress: Callable[[int, int], object] | None = None,
    events: EventCallback | None = None,
) -> ScrubReport:
    """Reads the whole quorum ``spec`` (a spec :func:`qimg.open` accepts, or
    an open quorum image), votes on every 64 KiB block and reports each
    replica's bad ranges and failed reads. With ``repair``, bad ranges and
    failed reads are rewritten with the winning bytes (the quorum is opened
    for writing). The events of the votes go to ``events`` (or the image's
    own callback), in offset order."""
    if isinstance(spec, Image):
        if repair and not spec.writable:
            raise UsageError("scrub with repair needs the quorum open for writing (writable=True)")
        return _scrub_open(spec, repair, progress)
    with open_image(spec, writable=repair, image_opts=image_opts, events=events) as image:
        return _scrub_open(image, repair, progress)


def _scrub_open(
    image: Image, repair: bool, progress: Callable[[int, int], object] | None
) -> ScrubReport:
    core = image._img

    def report_progress(done: int, total: int) -> None:
        image._drain()
        if progress is not None:
            progress(done, total)

    try:
        raw = _core.scrub(core, repair=repair, progress=report_progress)
    finally:
        image._drain()
    return _report(image, raw, repair)
