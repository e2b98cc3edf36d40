"""A plain reference for qimg's quorum node, written for tests to compare the Rust core with.

Everything here is deliberately simple: children are byte arrays in memory, reads are slices,
votes hash one 64 KiB block at a time with :mod:`hashlib`, and nothing runs in parallel. The
rules it encodes are the ones qimg documents for its quorum (QEMU's quorum driver, judged per
block rather than per request):

* **Reads, read-pattern quorum.** A request is handled in pieces of :data:`PIECE` bytes counted
  from its first byte. Every child reads each piece. A child whose read fails is reported
  (``QUORUM_REPORT_BAD``, type ``read``, with the error's text) over the whole piece. With fewer
  successful reads than the threshold the piece has no winner (``QUORUM_FAILURE``) and the
  request fails with the error most failed children share (the first such child's error).
  Otherwise the piece is judged in :data:`BLOCK`-byte blocks aligned to the node's offsets:
  blocks on which every successful child agrees are settled; elsewhere equal SHA-256 digests
  form versions and the version with the most members wins, a tie going to the version with
  the lowest-numbered child. A winner with fewer members than the threshold leaves the block
  undecided. Children outside a winning version lost that block. Events of one request:
  read errors (by child, then offset), then lost blocks (by child, then offset), then
  ``QUORUM_FAILURE`` for undecided ranges (by offset); adjacent ranges of one child (or of
  undecided blocks) are merged, across pieces too. Undecided blocks fail the request.
* **rewrite-corrupted:** after each piece's vote, every child is rewritten with the winning
  bytes where it lost (a failed rewrite is ignored).
* **read-pattern fifo:** child 0 reads the whole request; on failure it is reported and the
  next child tries; when all fail, the request fails with the last child's error.
* **blkverify** (two children, threshold 2): a piece on which the two differ fails the request
  with the offset of its first differing byte; nothing is reported.
* **Writes, write-zeroes, discards:** every child gets the request; each failure is reported
  (type ``write``, over the request). The request fails, with ``QUORUM_FAILURE`` and the most
  common error, when fewer than threshold children succeed. **Flushes** alike, with type
  ``flush``, sector 0 and count 0, and no ``QUORUM_FAILURE``.
* **blkdebug:** ``read_aio`` fires for reads, ``write_aio`` for writes, write-zeroes and
  discards, ``flush_to_disk`` for flushes. The first rule whose event fired, whose ``iotype``
  (when set) is the request's and whose ``sector`` (when not -1) lies in the request fails it
  with its errno; a ``once`` rule is then dropped.
* **Scrub:** the node is walked in :data:`PIECE`-byte pieces from offset 0. In each piece the
  ranges that every child reports as a hole are skipped; the others form runs (more than
  :data:`MAX_RUNS` runs: one run from the first to the end of the last). Each run is read and
  voted as one read request and its events are recorded as such. The report merges adjacent
  bad ranges per child, read errors of one child with the same text, and unvoted ranges. With
  repair, losers and children whose read failed get the winning bytes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

BLOCK = 64 * 1024
"""Votes are taken per block of this many bytes, aligned to node offsets."""

PIECE = 4 * 1024 * 1024
"""Reads are voted in pieces of at most this many bytes."""

MAX_RUNS = 8
"""A scrub piece with more data runs than this is read whole."""

SECTOR = 512
EIO = 5

Event: TypeAlias = tuple[str, dict[str, Any]]
"""An event as the tests compare them: (name, QMP data), no timestamp."""

Range: TypeAlias = tuple[int, int]
"""(offset, length)"""


# --------------------------------------------------------------------------------- events


def sectors(offset: int, length: int) -> tuple[int, int]:
    """QMP's sector-num and sectors-count for a byte range: every byte is covered."""
    first = offset // SECTOR
    end = -(-(offset + length) // SECTOR)
    return first, end - first


def report_bad(kind: str, node_name: str, offset: int, length: int, error: str | None) -> Event:
    num, count = sectors(offset, length)
    data: dict[str, Any] = {"type": kind}
    if error is not None:
        data["error"] = error
    data.update({"node-name": node_name, "sector-num": num, "sectors-count": count})
    return ("QUORUM_REPORT_BAD", data)


def quorum_failure(reference: str, offset: int, length: int) -> Event:
    num, count = sectors(offset, length)
    return ("QUORUM_FAILURE", {"reference": reference, "sector-num": num, "sectors-count": count})


# --------------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class Failure:
    """An I/O error: errno and the whole message, as ``ImageIOError`` carries them."""

    errno: int
    message: str

    @property
    def text(self) -> str:
        """What an event's ``error`` field says: the system's wording of the errno."""
        return os.strerror(self.errno)


def io_failure(context: str, errno: int = EIO) -> Failure:
    return Failure(errno, f"{context}: {os.strerror(errno)}")


def most_common(failures: Sequence[Failure]) -> Failure:
    """The error most failures share by errno; on a tie the first of them."""
    best: Failure | None = None
    best_count = 0
    for f in failures:
        count = sum(1 for g in failures if g.errno == f.errno)
        if count > best_count:
            best, best_count = f, count
    if best is None:
        raise ValueError("most_common needs at least one failure")
    return best


# --------------------------------------------------------------------------------- blkdebug

EVENT_OF_IO = {
    "read": "read_aio",
    "write": "write_aio",
    "write-zeroes": "write_aio",
    "discard": "write_aio",
    "flush": "flush_to_disk",
}


@dataclass(frozen=True)
class Rule:
    """One blkdebug ``inject-error`` rule."""

    event: str
    errno: int = EIO
    iotype: str | None = None
    sector: int = -1
    once: bool = False

    def matches(self, io: str, offset: int, length: int) -> bool:
        if EVENT_OF_IO[io] != self.event:
            return False
        if self.iotype is not None and self.iotype != io:
            return False
        if self.sector == -1:
            return True
        at = self.sector * SECTOR
        return length > 0 and offset <= at < offset + length

    def to_json(self) -> dict[str, Any]:
        return {
            "event": self.event,
            "iotype": self.iotype,
            "errno": self.errno,
            "sector": self.sector,
            "once": self.once,
        }


@dataclass
class Child:
    """One replica: its bytes, and blkdebug rules when it sits under a blkdebug node."""

    name: str
    """Node name of the child's top node (the one events name)."""
    filename: str
    """The file, as blkdebug's messages name it."""
    data: bytearray
    rules: list[Rule] | None = None

    def _check(self, io: str, offset: int, length: int) -> Failure | None:
        if self.rules is None:
            return None
        for i, rule in enumerate(self.rules):
            if rule.matches(io, offset, length):
                if rule.once:
                    del self.rules[i]
                return io_failure(
                    f"blkdebug: injected error on {io} of {length} bytes at offset {offset} "
                    f"of '{self.filename}'",
                    rule.errno,
                )
        return None

    def read(self, offset: int, length: int) -> bytes | Failure:
        failed = self._check("read", offset, length)
        if failed is not None:
            return failed
        return bytes(self.data[offset : offset + length])

    def write(self, offset: int, data: bytes) -> Failure | None:
        failed = self._check("write", offset, len(data))
        if failed is None:
            self.data[offset : offset + len(data)] = data
        return failed

    def write_zeroes(self, offset: int, length: int, io: str = "write-zeroes") -> Failure | None:
        failed = self._check(io, offset, length)
        if failed is None:
            self.data[offset : offset + length] = bytes(length)
        return failed

    def flush(self) -> Failure | None:
        return self._check("flush", 0, 0)


# --------------------------------------------------------------------------------- runs


def merge_run(runs: list[list[int]], offset: int, length: int) -> None:
    """Appends [offset, length] to runs, extending the last run when adjacent."""
    if runs and runs[-1][0] + runs[-1][1] == offset:
        runs[-1][1] += length
    else:
        runs.append([offset, length])


def vote_blocks(offset: int, length: int) -> list[tuple[int, int]]:
    """[start, end) node ranges of the vote blocks of a request (first and last may be partial)."""
    blocks = []
    at = offset
    end = offset + length
    while at < end:
        stop = min((at // BLOCK + 1) * BLOCK, end)
        blocks.append((at, stop))
        at = stop
    return blocks


@dataclass
class Findings:
    """What the voted read of one request (or one scrub run) found."""

    errors: dict[int, list[tuple[int, int, Failure]]] = field(default_factory=dict)
    lost: dict[int, list[list[int]]] = field(default_factory=dict)
    undecided: list[list[int]] = field(default_factory=list)
    too_few: Failure | None = None
    mismatch: int | None = None
    rewrites: list[tuple[int, int, int, Failure | None]] = field(default_factory=list)

    def add_error(self, child: int, offset: int, length: int, failure: Failure) -> None:
        runs = self.errors.setdefault(child, [])
        if runs and runs[-1][0] + runs[-1][1] == offset and runs[-1][2].text == failure.text:
            start, n, first = runs[-1]
            runs[-1] = (start, n + length, first)
        else:
            runs.append((offset, length, failure))


# --------------------------------------------------------------------------------- quorum


@dataclass
class ReadResult:
    data: bytes | Failure
    events: list[Event]


@dataclass
class Quorum:
    name: str
    children: list[Child]
    threshold: int
    read_pattern: str = "quorum"
    blkverify: bool = False
    rewrite_corrupted: bool = False

    @property
    def size(self) -> int:
        return len(self.children[0].data)

    # ----------------------------------------------------------------------- reads

    def read(self, offset: int, length: int) -> ReadResult:
        if self.read_pattern == "fifo":
            return self._read_fifo(offset, length)
        found = Findings()
        out = bytearray()
        done = 0
        while done < length:
            n = min(PIECE, length - done)
            rewrite = "losers" if self.rewrite_corrupted else "nothing"
            out += self._vote_piece(offset + done, n, found, rewrite)
            done += n
        events = self._events(found)
        if found.too_few is not None:
            return ReadResult(found.too_few, events)
        if found.mismatch is not None:
            return ReadResult(
                io_failure(
                    f"quorum: offset={offset} bytes={length} contents mismatch "
                    f"at offset {found.mismatch}"
                ),
                events,
            )
        if found.undecided:
            at, n = found.undecided[0]
            return ReadResult(
                io_failure(
                    f"Quorum '{self.name}': no version of the {n} bytes at offset {at} "
                    f"has the {self.threshold} votes it needs"
                ),
                events,
            )
        return ReadResult(bytes(out), events)

    def _read_fifo(self, offset: int, length: int) -> ReadResult:
        events: list[Event] = []
        last: Failure | None = None
        for child in self.children:
            got = child.read(offset, length)
            if not isinstance(got, Failure):
                return ReadResult(got, events)
            events.append(report_bad("read", child.name, offset, length, got.text))
            last = got
        assert last is not None
        return ReadResult(last, events)

    def _vote_piece(self, offset: int, length: int, found: Findings, rewrite: str) -> bytes:
        """Reads and votes [offset, offset + length); returns the winning bytes (the bytes of
        undecided blocks are unspecified). ``rewrite``: ``nothing``; ``losers`` (what
        rewrite-corrupted repairs); ``all`` (a scrub's repair: losers and failed children)."""
        reads = [child.read(offset, length) for child in self.children]
        ok = [(i, got) for i, got in enumerate(reads) if not isinstance(got, Failure)]
        failed = [(i, got) for i, got in enumerate(reads) if isinstance(got, Failure)]

        if len(ok) < self.threshold:
            if found.too_few is None:
                found.too_few = most_common([f for _, f in failed])
            merge_run(found.undecided, offset, length)
            for i, f in failed:
                found.add_error(i, offset, length, f)
            return bytes(length)

        if self.blkverify:
            one, two = ok[0][1], ok[1][1]
            if one != two:
                first_diff = next(k for k in range(length) if one[k] != two[k])
                if found.mismatch is None:
                    found.mismatch = offset + first_diff
                return one

        out = bytearray(length)
        lost_here: dict[int, list[list[int]]] = {}
        sources: list[list[int]] = []  # [start, end, child] relative to offset
        for start, end in vote_blocks(offset, length):
            a, b = start - offset, end - offset
            pieces = [(i, data[a:b]) for i, data in ok]
            first_child, first_bytes = pieces[0]
            if all(p == first_bytes for _, p in pieces):
                source = first_child
            else:
                versions: dict[bytes, list[int]] = {}
                for i, p in pieces:
                    versions.setdefault(hashlib.sha256(p).digest(), []).append(i)
                # dicts keep insertion order: versions by their lowest child.
                winner: list[int] = []
                for members in versions.values():
                    if len(members) > len(winner):
                        winner = members
                if len(winner) < self.threshold:
                    merge_run(found.undecided, start, end - start)
                    continue
                source = winner[0]
                for i, _ in pieces:
                    if i not in winner:
                        merge_run(lost_here.setdefault(i, []), a, b - a)
            out[a:b] = reads[source][a:b]  # type: ignore[index]
            if sources and sources[-1][1] == a and sources[-1][2] == source:
                sources[-1][1] = b
            else:
                sources.append([a, b, source])

        rewrites: list[tuple[int, int, int]] = []
        for i in sorted(lost_here):
            for a, n in lost_here[i]:
                merge_run(found.lost.setdefault(i, []), offset + a, n)
                if rewrite != "nothing":
                    rewrites.append((i, a, a + n))
        if rewrite == "all":
            for i, _ in failed:
                rewrites.extend((i, a, b) for a, b, _ in sources)
        for i, f in failed:
            found.add_error(i, offset, length, f)
        for i, a, b in rewrites:
            result = self.children[i].write(offset + a, bytes(out[a:b]))
            found.rewrites.append((i, offset + a, b - a, result))
        return bytes(out)

    def _events(self, found: Findings) -> list[Event]:
        events: list[Event] = []
        for i in sorted(found.errors):
            for offset, length, f in found.errors[i]:
                events.append(report_bad("read", self.children[i].name, offset, length, f.text))
        for i in sorted(found.lost):
            for offset, length in found.lost[i]:
                events.append(report_bad("read", self.children[i].name, offset, length, None))
        for offset, length in found.undecided:
            events.append(quorum_failure(self.name, offset, length))
        return events

    # ----------------------------------------------------------------------- writes

    def _broadcast(
        self, kind: str, offset: int, length: int, results: list[Failure | None]
    ) -> tuple[Failure | None, list[Event]]:
        events: list[Event] = []
        failures: list[Failure] = []
        for child, result in zip(self.children, results, strict=True):
            if result is not None:
                failures.append(result)
                if kind == "flush":
                    events.append(report_bad(kind, child.name, 0, 0, result.text))
                else:
                    events.append(report_bad(kind, child.name, offset, length, result.text))
        if len(self.children) - len(failures) >= self.threshold:
            return None, events
        if kind != "flush":
            events.append(quorum_failure(self.name, offset, length))
        return most_common(failures), events

    def write(self, offset: int, data: bytes) -> tuple[Failure | None, list[Event]]:
        results = [c.write(offset, data) for c in self.children]
        return self._broadcast("write", offset, len(data), results)

    def write_zeroes(self, offset: int, length: int) -> tuple[Failure | None, list[Event]]:
        results = [c.write_zeroes(offset, length) for c in self.children]
        return self._broadcast("write", offset, length, results)

    def discard(self, offset: int, length: int) -> tuple[Failure | None, list[Event]]:
        results = [c.write_zeroes(offset, length, "discard") for c in self.children]
        return self._broadcast("write", offset, length, results)

    def flush(self) -> tuple[Failure | None, list[Event]]:
        results = [c.flush() for c in self.children]
        return self._broadcast("flush", 0, 0, results)

    # ----------------------------------------------------------------------- scrub

    def scrub(
        self, data_extents: Sequence[Sequence[Range]], *, repair: bool
    ) -> tuple[dict[str, Any], list[Event]]:
        """Scrubs the node. ``data_extents[i]`` are child i's non-hole ranges (what
        SEEK_DATA/SEEK_HOLE report), sorted; the rest of the child reads as zeroes and counts
        as a hole. Returns the report (in ``_core.scrub``'s shape) and the events."""
        size = self.size
        children: list[dict[str, Any]] = [
            {
                "node-name": c.name,
                "bad-ranges": [],
                "read-errors": [],
                "repaired-bytes": 0,
                "repair-errors": [],
            }
            for c in self.children
        ]
        report: dict[str, Any] = {
            "size": size,
            "bytes-compared": 0,
            "bytes-skipped-zero": 0,
            "children": children,
            "unvoted-ranges": [],
        }
        events: list[Event] = []
        for start in range(0, size, PIECE):
            end = min(start + PIECE, size)
            runs, skipped = self._scrub_runs(data_extents, start, end)
            report["bytes-skipped-zero"] += skipped
            for offset, length in runs:
                found = Findings()
                self._vote_piece(offset, length, found, "all" if repair else "nothing")
                report["bytes-compared"] += length
                events += self._events(found)
                for i in sorted(found.errors):
                    errs = children[i]["read-errors"]
                    for o, n, f in found.errors[i]:
                        if errs and errs[-1][0] + errs[-1][1] == o and errs[-1][2] == f.text:
                            errs[-1][1] += n
                        else:
                            errs.append([o, n, f.text])
                for i in sorted(found.lost):
                    for o, n in found.lost[i]:
                        merge_run(children[i]["bad-ranges"], o, n)
                for o, n in found.undecided:
                    merge_run(report["unvoted-ranges"], o, n)
                for i, o, n, result in found.rewrites:
                    if result is None:
                        children[i]["repaired-bytes"] += n
                    else:
                        children[i]["repair-errors"].append([o, n, result.text])
        return report, events

    def _scrub_runs(
        self, data_extents: Sequence[Sequence[Range]], start: int, end: int
    ) -> tuple[list[list[int]], int]:
        """The ranges of [start, end) to read, and how many bytes were skipped as holes."""
        runs: list[list[int]] = []
        skipped = 0
        at = start
        while at < end:
            n = end - at
            zero = True
            for extents in data_extents:
                is_data, length = extent_at(extents, at, n)
                n = min(n, length)
                zero = zero and not is_data
            if zero:
                skipped += n
            else:
                merge_run(runs, at, n)
            at += n
        if len(runs) > MAX_RUNS:
            first = runs[0][0]
            last_end = runs[-1][0] + runs[-1][1]
            gaps = (last_end - first) - sum(n for _, n in runs)
            skipped -= gaps
            runs = [[first, last_end - first]]
        return runs, skipped


def extent_at(extents: Sequence[Range], at: int, limit: int) -> tuple[bool, int]:
    """Whether ``at`` is in a data extent, and how long that data or hole lasts (<= limit)."""
    for start, length in extents:
        if start <= at < start + length:
            return True, min(start + length - at, limit)
        if start > at:
            return False, min(start - at, limit)
    return False, limit
