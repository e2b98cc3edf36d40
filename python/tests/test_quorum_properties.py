"""The quorum node against a plain reference voter (``quorum_reference``).

Unit tests pin each rule with a small hand-made replica set: which bytes a read returns, which
events it records (name and data, timestamps ignored), how it fails; writes and flushes with a
failing child; rewrite-corrupted and scrub repairs on disk; holes skipped by a scrub. Property
tests (hypothesis) then build random replica sets of 3, 5 and 7 raw children with random
corruptions, random blkdebug failures and random thresholds, and check that reads, writes,
flushes and scrubs through ``_core.open_spec`` give exactly what the reference gives.

Specs are written in the canonical JSON that ``qimg.spec`` hands ``_core.open_spec``, built by
the helpers below, so these tests do not depend on the spec parser.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from quorum_reference import (
    BLOCK,
    PIECE,
    Child,
    Event,
    Failure,
    Quorum,
    Range,
    Rule,
    io_failure,
    quorum_failure,
    report_bad,
)

from conftest import seek_data_ranges
from qimg import _core
from qimg.errors import ImageIOError, InvalidOptionError
from qimg.events import Event as QmpEvent

KiB = 1024
MiB = 1024 * KiB
EIO, EACCES, ENOSPC = 5, 13, 28

# --------------------------------------------------------------------------------------------
# Canonical specs


def raw_node(name: str, path: Path) -> dict[str, Any]:
    return {
        "driver": "raw",
        "node-name": name,
        "file": {"driver": "file", "node-name": f"{name}.file", "filename": str(path)},
    }


def blkdebug_node(name: str, image: dict[str, Any], rules: Sequence[Rule]) -> dict[str, Any]:
    return {
        "driver": "blkdebug",
        "node-name": name,
        "image": image,
        "inject-error": [r.to_json() for r in rules],
    }


def quorum_node(
    children: Sequence[dict[str, Any]],
    threshold: int,
    *,
    name: str = "root",
    read_pattern: str = "quorum",
    blkverify: bool = False,
    rewrite_corrupted: bool = False,
) -> dict[str, Any]:
    return {
        "driver": "quorum",
        "node-name": name,
        "children": list(children),
        "vote-threshold": threshold,
        "blkverify": blkverify,
        "rewrite-corrupted": rewrite_corrupted,
        "read-pattern": read_pattern,
    }


@dataclass
class Replicas:
    """Raw replica files and the quorum over them, as a canonical spec and as a reference."""

    paths: list[Path]
    threshold: int
    rules: list[list[Rule] | None] = field(default_factory=list)
    read_pattern: str = "quorum"
    blkverify: bool = False
    rewrite_corrupted: bool = False
    name: str = "root"

    def __post_init__(self) -> None:
        if not self.rules:
            self.rules = [None] * len(self.paths)

    def child_name(self, i: int) -> str:
        return f"children.{i}"

    def spec(self) -> str:
        children = []
        for i, (path, rules) in enumerate(zip(self.paths, self.rules, strict=True)):
            name = self.child_name(i)
            if rules is None:
                children.append(raw_node(name, path))
            else:
                children.append(blkdebug_node(name, raw_node(f"{name}.image", path), rules))
        return json.dumps(
            quorum_node(
                children,
                self.threshold,
                name=self.name,
                read_pattern=self.read_pattern,
                blkverify=self.blkverify,
                rewrite_corrupted=self.rewrite_corrupted,
            )
        )

    def open(self, *, writable: bool = False) -> _core.Image:
        return _core.open_spec(self.spec(), writable=writable, cache="unsafe")

    def reference(self) -> Quorum:
        """The reference quorum over the files' current contents, with fresh rules."""
        return Quorum(
            self.name,
            [
                Child(
                    self.child_name(i),
                    str(path),
                    bytearray(guest_bytes(path)),
                    None if rules is None else list(rules),
                )
                for i, (path, rules) in enumerate(zip(self.paths, self.rules, strict=True))
            ],
            self.threshold,
            read_pattern=self.read_pattern,
            blkverify=self.blkverify,
            rewrite_corrupted=self.rewrite_corrupted,
        )

    def data_extents(self) -> list[list[Range]]:
        extents = []
        for path in self.paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                ranges = seek_data_ranges(fd, os.fstat(fd).st_size)
            finally:
                os.close(fd)
            extents.append([(start, end - start) for start, end in ranges])
        return extents


def guest_bytes(path: Path) -> bytes:
    """What a raw node over the file reads: its bytes, then zeroes up to a whole sector (the
    node's size is the file's rounded up to 512 bytes, as in QEMU)."""
    data = path.read_bytes()
    return data + bytes(-len(data) % 512)


def make_replicas(
    directory: Path, contents: Sequence[bytes], threshold: int, **options: Any
) -> Replicas:
    paths = []
    for i, data in enumerate(contents):
        path = directory / f"child{i}.raw"
        path.write_bytes(data)
        paths.append(path)
    return Replicas(paths, threshold, **options)


def patched(data: bytes, offset: int, patch: bytes) -> bytes:
    return data[:offset] + patch + data[offset + len(patch) :]


def pattern(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


# --------------------------------------------------------------------------------------------
# Talking to the core


def events_of(image: _core.Image) -> list[Event]:
    """The events the image recorded since the last call, without their timestamps."""
    out: list[Event] = []
    for record in image.take_events():
        qmp = QmpEvent.from_core(record)
        name, seconds, micros = qmp.name, qmp.seconds, qmp.microseconds
        if not (seconds > 1_600_000_000 and 0 <= micros < 1_000_000):
            pytest.fail(f"{name} has a strange timestamp: {seconds} s {micros} us")
        out.append((name, dict(qmp.data)))
    return out


def errno_of(exc: ImageIOError) -> int:
    return -1 if exc.errno is None else exc.errno


def read(image: _core.Image, offset: int, length: int) -> bytes | Failure:
    try:
        return image.read(offset, length)
    except ImageIOError as exc:
        return Failure(errno_of(exc), str(exc))


def outcome(call: Any, *args: Any) -> Failure | None:
    try:
        call(*args)
    except ImageIOError as exc:
        return Failure(errno_of(exc), str(exc))
    return None


def scrub(image: _core.Image, *, repair: bool = False, workers: int = 2) -> dict[str, Any]:
    """``_core.scrub``'s report in the reference's shape, with JSON's types (lists, not tuples)."""
    report = _core.scrub(image, repair=repair, workers=workers)

    def errors(found: list[_core.RangeError]) -> list[list[Any]]:
        return [[e.offset, e.length, e.error] for e in found]

    children = [
        {
            "node-name": c.node_name,
            "bad-ranges": c.bad_ranges,
            "read-errors": errors(c.read_errors),
            "repaired-bytes": c.repaired_bytes,
            "repair-errors": errors(c.repair_errors),
        }
        for c in report.children
    ]
    shaped = {
        "size": report.size,
        "bytes-compared": report.bytes_compared,
        "bytes-skipped-zero": report.bytes_skipped_zero,
        "children": children,
        "unvoted-ranges": report.unvoted_ranges,
    }
    result: dict[str, Any] = json.loads(json.dumps(shaped))
    return result


def same_bytes(got: bytes | Failure, want: bytes | Failure, what: str = "read") -> None:
    """Fails unless equal; byte strings that differ are reported by their first difference.

    No ``assert`` here: with pytest-golden's assertion-pass hook a passing ``assert`` formats
    both operands, which for megabytes of data costs more than the test itself."""
    if got == want:
        return
    if isinstance(got, bytes) and isinstance(want, bytes):
        if len(got) != len(want):
            pytest.fail(f"{what}: {len(got)} bytes, expected {len(want)}")
        at = next(i for i in range(len(got)) if got[i] != want[i])
        pytest.fail(
            f"{what}: bytes differ first at {at}: {got[at : at + 8]!r} != {want[at : at + 8]!r}"
        )

    def show(x: bytes | Failure) -> str:
        return f"{len(x)} bytes" if isinstance(x, bytes) else repr(x)

    pytest.fail(f"{what}: got {show(got)}, expected {show(want)}")


def same_files(paths: Sequence[Path], contents: Sequence[bytes]) -> None:
    for path, want in zip(paths, contents, strict=True):
        same_bytes(guest_bytes(path), want, str(path))


def rb(child: int, offset: int, length: int, error: str | None = None) -> Event:
    return report_bad("read", f"children.{child}", offset, length, error)


def fail(offset: int, length: int) -> Event:
    return quorum_failure("root", offset, length)


READ_ANY = Rule("read_aio")


# --------------------------------------------------------------------------------------------
# Reads, read-pattern quorum


def test_agreeing_children_read_back_without_events(tmp_path: Path) -> None:
    data = pattern(4 * BLOCK)
    image = make_replicas(tmp_path, [data] * 3, 2).open()
    same_bytes(image.read(100, 3 * BLOCK), data[100 : 100 + 3 * BLOCK])
    assert events_of(image) == []


def test_a_corrupt_child_is_reported_for_the_blocks_it_lost_only(tmp_path: Path) -> None:
    data = pattern(8 * BLOCK)
    bad = patched(data, 2 * BLOCK + 7, b"\xff\xfe")
    bad = patched(bad, 3 * BLOCK, b"!")  # the next block too: one merged range
    bad = patched(bad, 6 * BLOCK - 1, b"?")  # the last byte of block 5
    image = make_replicas(tmp_path, [data, data, bad], 2).open()
    same_bytes(image.read(0, 8 * BLOCK), data)
    assert events_of(image) == [rb(2, 2 * BLOCK, 2 * BLOCK), rb(2, 5 * BLOCK, BLOCK)]


def test_blocks_are_aligned_to_the_node_so_edge_blocks_are_partial(tmp_path: Path) -> None:
    data = pattern(4 * BLOCK)
    bad = patched(patched(data, BLOCK - 3, b"x"), 3 * BLOCK + 10, b"y")
    image = make_replicas(tmp_path, [data, bad, data], 2).open()
    # The request starts 1000 bytes before block 1 and ends 700 bytes into block 3.
    offset, end = BLOCK - 1000, 3 * BLOCK + 700
    same_bytes(image.read(offset, end - offset), data[offset:end])
    # Sectors: the partial first block is bytes [BLOCK-1000, BLOCK): sector 126 (first byte
    # 64536 // 512) to 128 (rounded up), 2 sectors; the last is [3*BLOCK, 3*BLOCK+700).
    events = events_of(image)
    assert events == [rb(1, BLOCK - 1000, 1000), rb(1, 3 * BLOCK, 700)]
    assert [(e[1]["sector-num"], e[1]["sectors-count"]) for e in events] == [(126, 2), (384, 2)]


def test_a_tie_goes_to_the_version_holding_the_lowest_child(tmp_path: Path) -> None:
    a, b = pattern(BLOCK, 1), pattern(BLOCK, 2)
    image = make_replicas(tmp_path, [b, a, a, b], 2).open()
    same_bytes(image.read(0, BLOCK), b)
    assert events_of(image) == [rb(1, 0, BLOCK), rb(2, 0, BLOCK)]
    image = make_replicas(tmp_path, [a, b, b, a], 2).open()
    same_bytes(image.read(0, BLOCK), a)
    assert events_of(image) == [rb(1, 0, BLOCK), rb(2, 0, BLOCK)]


def test_the_largest_version_wins_even_without_child_0(tmp_path: Path) -> None:
    a, b, c = pattern(BLOCK, 1), pattern(BLOCK, 2), pattern(BLOCK, 3)
    image = make_replicas(tmp_path, [c, a, b, b, a, b], 3).open()
    same_bytes(image.read(0, BLOCK), b)
    assert events_of(image) == [rb(0, 0, BLOCK), rb(1, 0, BLOCK), rb(4, 0, BLOCK)]


def test_a_winner_below_the_threshold_fails_the_read(tmp_path: Path) -> None:
    data = pattern(3 * BLOCK)
    one = patched(data, BLOCK + 5, b"1")
    two = patched(data, BLOCK + 5, b"2")
    replicas = make_replicas(tmp_path, [data, one, two], 2)
    image = replicas.open()
    got = read(image, 0, 3 * BLOCK)
    assert got == io_failure(
        f"Quorum 'root': no version of the {BLOCK} bytes at offset {BLOCK} has the 2 votes it needs"
    )
    assert events_of(image) == [fail(BLOCK, BLOCK)]
    # The blocks around it are fine on their own, and a lower threshold decides it.
    same_bytes(image.read(0, BLOCK), data[:BLOCK])
    replicas.threshold = 1
    image = replicas.open()
    same_bytes(image.read(BLOCK, BLOCK), data[BLOCK : 2 * BLOCK])
    assert events_of(image) == [rb(1, BLOCK, BLOCK), rb(2, BLOCK, BLOCK)]


def test_undecided_blocks_and_losers_are_reported_in_order(tmp_path: Path) -> None:
    data = pattern(6 * BLOCK)
    c1 = patched(patched(data, 0, b"1"), 4 * BLOCK, b"1")
    c2 = patched(patched(data, 4 * BLOCK, b"2"), 5 * BLOCK, b"2")
    c3 = patched(data, 2 * BLOCK, b"3")
    c4 = patched(data, 4 * BLOCK, b"4")
    image = make_replicas(tmp_path, [data, c1, c2, c3, c4], 3).open()
    # Block 4: data, 1, 2, data, 4 -> the data version has 2 votes < 3: undecided.
    assert read(image, 0, 6 * BLOCK) == io_failure(
        f"Quorum 'root': no version of the {BLOCK} bytes at offset {4 * BLOCK} has the 3 "
        "votes it needs"
    )
    assert events_of(image) == [
        rb(1, 0, BLOCK),
        rb(2, 5 * BLOCK, BLOCK),
        rb(3, 2 * BLOCK, BLOCK),
        fail(4 * BLOCK, BLOCK),
    ]


def test_every_failed_child_is_reported_when_too_few_answer(tmp_path: Path) -> None:
    data = pattern(BLOCK)
    image = make_replicas(tmp_path, [data] * 2, 2, rules=[None, [READ_ANY]]).open()
    assert isinstance(read(image, 0, 512), Failure)
    assert events_of(image) == [rb(1, 0, 512, "Input/output error"), fail(0, 512)]


def test_a_failing_child_is_reported_with_its_error_and_outvoted(tmp_path: Path) -> None:
    data = pattern(2 * BLOCK)
    replicas = make_replicas(tmp_path, [data] * 3, 2, rules=[None, [Rule("read_aio")], None])
    image = replicas.open()
    same_bytes(image.read(512, 1024), data[512:1536])
    assert events_of(image) == [rb(1, 512, 1024, "Input/output error")]


def test_too_few_answers_fail_with_the_most_common_error(tmp_path: Path) -> None:
    data = pattern(BLOCK)
    rules: list[list[Rule] | None] = [
        [Rule("read_aio", ENOSPC)],
        None,
        [Rule("read_aio", EACCES)],
        [Rule("read_aio", EACCES)],
        None,
    ]
    replicas = make_replicas(tmp_path, [data] * 5, 3, rules=rules)
    image = replicas.open()
    got = read(image, 4096, 4096)
    assert got == io_failure(
        f"blkdebug: injected error on read of 4096 bytes at offset 4096 of '{replicas.paths[2]}'",
        EACCES,
    )
    assert events_of(image) == [
        rb(0, 4096, 4096, "No space left on device"),
        rb(2, 4096, 4096, "Permission denied"),
        rb(3, 4096, 4096, "Permission denied"),
        fail(4096, 4096),
    ]


def test_a_sector_rule_fails_only_the_requests_covering_that_sector(tmp_path: Path) -> None:
    data = pattern(4 * BLOCK)
    rules: list[list[Rule] | None] = [[Rule("read_aio", sector=10)], [Rule("read_aio", sector=10)]]
    image = make_replicas(tmp_path, [data] * 3, 2, rules=[*rules, None]).open()
    same_bytes(image.read(0, 5120), data[:5120])  # sectors 0-9
    same_bytes(image.read(5632, 512), data[5632:6144])  # sector 11
    assert events_of(image) == []
    assert isinstance(read(image, 5119, 2), Failure)
    assert events_of(image) == [
        rb(0, 5119, 2, "Input/output error"),
        rb(1, 5119, 2, "Input/output error"),
        fail(5119, 2),
    ]


def test_a_once_rule_fails_one_request_only(tmp_path: Path) -> None:
    data = pattern(BLOCK)
    rules: list[list[Rule] | None] = [[Rule("read_aio", once=True)], None, None]
    image = make_replicas(tmp_path, [data] * 3, 3, rules=rules).open()
    assert isinstance(read(image, 0, 512), Failure)
    same_bytes(image.read(0, 512), data[:512])
    assert events_of(image) == [rb(0, 0, 512, "Input/output error"), fail(0, 512)]


def test_write_rules_do_not_fire_on_reads(tmp_path: Path) -> None:
    data = pattern(BLOCK)
    rules: list[list[Rule] | None] = [
        [Rule("write_aio"), Rule("flush_to_disk"), Rule("read_aio", iotype="write")],
        None,
    ]
    image = make_replicas(tmp_path, [data] * 2, 2, rules=rules).open()
    same_bytes(image.read(0, BLOCK), data)
    assert events_of(image) == []


def test_large_requests_are_voted_in_pieces_with_runs_merged_across_them(tmp_path: Path) -> None:
    size = 9 * MiB
    data = pattern(size)
    # Child 1 is wrong from 4 MiB - 64 KiB to 4 MiB + 64 KiB: across the piece boundary.
    bad = patched(data, PIECE - BLOCK, bytes(2 * BLOCK))
    rules: list[list[Rule] | None] = [None, None, [READ_ANY], None]
    image = make_replicas(tmp_path, [data, bad, data, data], 2, rules=rules).open()
    same_bytes(image.read(0, size), data)
    assert events_of(image) == [
        rb(2, 0, size, "Input/output error"),
        rb(1, PIECE - BLOCK, 2 * BLOCK),
    ]


def test_too_few_answers_in_one_piece_fail_the_whole_request(tmp_path: Path) -> None:
    size = 9 * MiB
    data = pattern(size)
    sector = (PIECE + 12345) // 512  # in the second piece of a request from 0
    rules: list[list[Rule] | None] = [None, [Rule("read_aio", sector=sector)]]
    replicas = make_replicas(tmp_path, [data, data], 2, rules=rules)
    image = replicas.open()
    assert read(image, 0, size) == io_failure(
        f"blkdebug: injected error on read of {PIECE} bytes at offset {PIECE} of "
        f"'{replicas.paths[1]}'"
    )
    assert events_of(image) == [rb(1, PIECE, PIECE, "Input/output error"), fail(PIECE, PIECE)]


def test_failed_pieces_with_different_errors_are_reported_apart(tmp_path: Path) -> None:
    size = 9 * MiB
    data = pattern(size)
    rules = [Rule("read_aio", EIO, sector=0), Rule("read_aio", ENOSPC, sector=PIECE // 512)]
    image = make_replicas(tmp_path, [data] * 3, 2, rules=[None, rules, None]).open()
    same_bytes(image.read(0, 2 * PIECE), data[: 2 * PIECE])
    assert events_of(image) == [
        rb(1, 0, PIECE, "Input/output error"),
        rb(1, PIECE, PIECE, "No space left on device"),
    ]


def test_events_are_handed_out_once(tmp_path: Path) -> None:
    data = pattern(BLOCK)
    image = make_replicas(tmp_path, [data, data, bytes(BLOCK)], 2).open()
    image.read(0, 512)
    assert events_of(image) == [rb(2, 0, 512)]
    assert events_of(image) == []


# --------------------------------------------------------------------------------------------
# read-pattern fifo and blkverify


def test_fifo_reads_the_first_child_that_answers_without_voting(tmp_path: Path) -> None:
    a, b, c = pattern(BLOCK, 1), pattern(BLOCK, 2), pattern(BLOCK, 3)
    rules: list[list[Rule] | None] = [[READ_ANY], None, None]
    image = make_replicas(tmp_path, [a, b, c], 3, rules=rules, read_pattern="fifo").open()
    same_bytes(image.read(1000, 2000), b[1000:3000])
    assert events_of(image) == [rb(0, 1000, 2000, "Input/output error")]
    image = make_replicas(tmp_path, [a, b, c], 3, read_pattern="fifo").open()
    same_bytes(image.read(0, BLOCK), a)
    assert events_of(image) == []


def test_fifo_fails_with_the_last_childs_error_when_all_fail(tmp_path: Path) -> None:
    data = pattern(BLOCK)
    rules: list[list[Rule] | None] = [[Rule("read_aio", ENOSPC)], [Rule("read_aio", EACCES)]]
    replicas = make_replicas(tmp_path, [data] * 2, 1, rules=rules, read_pattern="fifo")
    image = replicas.open()
    assert read(image, 0, 512) == io_failure(
        f"blkdebug: injected error on read of 512 bytes at offset 0 of '{replicas.paths[1]}'",
        EACCES,
    )
    assert events_of(image) == [
        rb(0, 0, 512, "No space left on device"),
        rb(1, 0, 512, "Permission denied"),
    ]


def test_blkverify_names_the_first_differing_byte_and_reports_nothing(tmp_path: Path) -> None:
    data = pattern(3 * BLOCK)
    bad = patched(data, BLOCK + 77, b"!")
    image = make_replicas(tmp_path, [data, bad], 2, blkverify=True).open()
    same_bytes(image.read(0, BLOCK), data[:BLOCK])
    assert read(image, 100, 2 * BLOCK) == io_failure(
        f"quorum: offset=100 bytes={2 * BLOCK} contents mismatch at offset {BLOCK + 77}"
    )
    assert events_of(image) == []


def test_scrub_of_a_blkverify_quorum_reports_differing_blocks(tmp_path: Path) -> None:
    data = pattern(3 * BLOCK)
    bad = patched(data, BLOCK + 77, b"!")
    image = make_replicas(tmp_path, [data, bad], 2, blkverify=True).open()
    report = scrub(image)
    assert report["unvoted-ranges"] == [[BLOCK, BLOCK]]


@pytest.mark.parametrize(
    ("count", "threshold", "options", "message"),
    [
        (0, 1, {}, "Number of provided children must be 1 or more"),
        # Out of the schema's range: refused while the document is read.
        (3, 0, {}, "Invalid node specification: 'vote-threshold' must be 1 or more"),
        (3, 4, {}, "threshold may not exceed children count"),
        (
            3,
            2,
            {"blkverify": True},
            "blkverify=on can only be set if there are exactly two files and vote-threshold is 2",
        ),
        (
            2,
            1,
            {"blkverify": True},
            "blkverify=on can only be set if there are exactly two files and vote-threshold is 2",
        ),
        (
            2,
            2,
            {"blkverify": True, "rewrite_corrupted": True},
            "rewrite-corrupted=on cannot be used with blkverify=on",
        ),
        (3, 2, {"rewrite_corrupted": True, "read_pattern": "fifo"}, "needs read-pattern=quorum"),
    ],
)
def test_bad_quorum_options_are_refused(
    tmp_path: Path, count: int, threshold: int, options: dict[str, Any], message: str
) -> None:
    replicas = make_replicas(tmp_path, [bytes(BLOCK)] * count, threshold, **options)
    with pytest.raises(InvalidOptionError, match=message):
        replicas.open()


def test_children_of_different_sizes_are_refused(tmp_path: Path) -> None:
    replicas = make_replicas(tmp_path, [bytes(BLOCK), bytes(BLOCK), bytes(BLOCK + 512)], 2)
    with pytest.raises(InvalidOptionError, match="differ in size"):
        replicas.open()


def test_scrub_needs_a_quorum(tmp_path: Path) -> None:
    path = tmp_path / "plain.raw"
    path.write_bytes(bytes(BLOCK))
    image = _core.open_spec(json.dumps(raw_node("root", path)))
    with pytest.raises(InvalidOptionError, match="not a quorum"):
        _core.scrub(image)


# --------------------------------------------------------------------------------------------
# Writes and flushes


def wb(child: int, offset: int, length: int, error: str) -> Event:
    return report_bad("write", f"children.{child}", offset, length, error)


def test_a_write_succeeds_without_a_failing_child_and_reports_it(tmp_path: Path) -> None:
    old = pattern(4 * BLOCK, 1)
    rules: list[list[Rule] | None] = [None, [Rule("write_aio", ENOSPC)], None]
    replicas = make_replicas(tmp_path, [old] * 3, 2, rules=rules)
    image = replicas.open(writable=True)
    new = pattern(5000, 2)
    image.write(1000, new)
    assert events_of(image) == [wb(1, 1000, 5000, "No space left on device")]
    want = patched(old, 1000, new)
    same_files(replicas.paths, [want, old, want])
    # Reads of the written range now outvote child 1.
    same_bytes(image.read(0, BLOCK), want[:BLOCK])
    assert events_of(image) == [rb(1, 0, BLOCK)]


def test_a_write_without_enough_successes_fails_with_quorum_failure(tmp_path: Path) -> None:
    old = pattern(BLOCK)
    rules: list[list[Rule] | None] = [[Rule("write_aio")], [Rule("write_aio")], None]
    replicas = make_replicas(tmp_path, [old] * 3, 2, rules=rules)
    image = replicas.open(writable=True)
    assert outcome(image.write, 512, b"x" * 512) == io_failure(
        f"blkdebug: injected error on write of 512 bytes at offset 512 of '{replicas.paths[0]}'"
    )
    assert events_of(image) == [
        wb(0, 512, 512, "Input/output error"),
        wb(1, 512, 512, "Input/output error"),
        fail(512, 512),
    ]
    # The child that succeeded keeps the write.
    same_bytes(replicas.paths[2].read_bytes(), patched(old, 512, b"x" * 512))


def test_iotype_picks_write_zeroes_or_discard_apart_from_writes(tmp_path: Path) -> None:
    old = pattern(4 * BLOCK)
    rules: list[list[Rule] | None] = [
        [Rule("write_aio", iotype="write-zeroes")],
        [Rule("write_aio", iotype="discard", errno=EACCES)],
        None,
    ]
    replicas = make_replicas(tmp_path, [old] * 3, 2, rules=rules)
    image = replicas.open(writable=True)
    image.write(0, b"w" * 100)
    assert events_of(image) == []
    image.write_zeroes(BLOCK, BLOCK)
    assert events_of(image) == [wb(0, BLOCK, BLOCK, "Input/output error")]
    image.discard(2 * BLOCK, BLOCK)
    assert events_of(image) == [wb(1, 2 * BLOCK, BLOCK, "Permission denied")]
    step1 = patched(old, 0, b"w" * 100)
    zeroed = patched(step1, BLOCK, bytes(BLOCK))
    discarded = patched(step1, 2 * BLOCK, bytes(BLOCK))
    both = patched(zeroed, 2 * BLOCK, bytes(BLOCK))
    same_files(replicas.paths, [discarded, zeroed, both])


def test_flush_failures_are_reported_without_a_range_or_quorum_failure(tmp_path: Path) -> None:
    rules: list[list[Rule] | None] = [
        [Rule("flush_to_disk", ENOSPC)],
        None,
        [Rule("flush_to_disk")],
    ]
    replicas = make_replicas(tmp_path, [bytes(BLOCK)] * 3, 1, rules=rules)
    image = replicas.open(writable=True)
    image.flush()
    flush0 = report_bad("flush", "children.0", 0, 0, "No space left on device")
    flush2 = report_bad("flush", "children.2", 0, 0, "Input/output error")
    assert events_of(image) == [flush0, flush2]
    assert flush0[1]["sector-num"] == 0 and flush0[1]["sectors-count"] == 0
    replicas.threshold = 2
    image = replicas.open(writable=True)
    assert outcome(image.flush) == io_failure(
        f"blkdebug: injected error on flush of 0 bytes at offset 0 of '{replicas.paths[0]}'",
        ENOSPC,
    )
    assert events_of(image) == [flush0, flush2]


def test_a_read_only_quorum_refuses_writes(tmp_path: Path) -> None:
    image = make_replicas(tmp_path, [bytes(BLOCK)] * 3, 2).open()
    with pytest.raises(InvalidOptionError, match="read-only"):
        image.write(0, b"x")


# --------------------------------------------------------------------------------------------
# Repairs: rewrite-corrupted and scrub


def test_rewrite_corrupted_repairs_the_losing_child_on_disk(tmp_path: Path) -> None:
    data = pattern(4 * BLOCK)
    bad = patched(patched(data, 10, b"bad"), 3 * BLOCK, b"bad")
    replicas = make_replicas(tmp_path, [data, bad, data], 2, rewrite_corrupted=True)
    image = replicas.open()  # read-only: the repair still writes to the children
    same_bytes(image.read(0, 2 * BLOCK), data[: 2 * BLOCK])
    assert events_of(image) == [rb(1, 0, BLOCK)]
    # Only what was read is repaired.
    same_bytes(replicas.paths[1].read_bytes(), patched(data, 3 * BLOCK, b"bad"))
    same_bytes(image.read(0, 4 * BLOCK), data)
    assert events_of(image) == [rb(1, 3 * BLOCK, BLOCK)]
    same_bytes(replicas.paths[1].read_bytes(), data)
    same_bytes(image.read(0, 4 * BLOCK), data)
    assert events_of(image) == []


def test_without_rewrite_corrupted_nothing_is_written(tmp_path: Path) -> None:
    data = pattern(BLOCK)
    bad = patched(data, 10, b"bad")
    replicas = make_replicas(tmp_path, [data, bad, data], 2)
    replicas.open(writable=True).read(0, BLOCK)
    same_bytes(replicas.paths[1].read_bytes(), bad)


def test_scrub_repair_fixes_every_child_so_a_second_scrub_is_clean(tmp_path: Path) -> None:
    data = pattern(6 * MiB)
    c0 = patched(data, 100, b"zero")
    c1 = patched(data, 5 * MiB + 3, b"one")
    c2 = patched(patched(data, 100, b"two"), 2 * MiB, bytes(3 * BLOCK))
    replicas = make_replicas(tmp_path, [c0, c1, c2, data], 2)
    image = replicas.open(writable=True)
    report = scrub(image, repair=True)
    sizes = 6 * MiB
    assert report == {
        "size": sizes,
        "bytes-compared": sizes,
        "bytes-skipped-zero": 0,
        "children": [
            {
                "node-name": f"children.{i}",
                "bad-ranges": bad,
                "read-errors": [],
                "repaired-bytes": sum(n for _, n in bad),
                "repair-errors": [],
            }
            for i, bad in enumerate(
                [[[0, BLOCK]], [[5 * MiB, BLOCK]], [[0, BLOCK], [2 * MiB, 3 * BLOCK]], []]
            )
        ],
        "unvoted-ranges": [],
    }
    assert events_of(image) == [
        rb(0, 0, BLOCK),
        rb(2, 0, BLOCK),
        rb(2, 2 * MiB, 3 * BLOCK),
        rb(1, 5 * MiB, BLOCK),
    ]
    same_files(replicas.paths, [data] * 4)
    again = scrub(image)
    assert again["unvoted-ranges"] == []
    assert all(c["bad-ranges"] == [] and c["read-errors"] == [] for c in again["children"])
    assert events_of(image) == []


def test_scrub_repair_rewrites_children_whose_reads_failed(tmp_path: Path) -> None:
    data = pattern(2 * BLOCK)
    stale = bytes(2 * BLOCK)
    rules: list[list[Rule] | None] = [None, [Rule("read_aio", once=True)], None]
    replicas = make_replicas(tmp_path, [data, stale, data], 2, rules=rules)
    image = replicas.open(writable=True)
    report = scrub(image, repair=True, workers=1)
    child1 = report["children"][1]
    assert child1["read-errors"] == [[0, 2 * BLOCK, "Input/output error"]]
    assert child1["repaired-bytes"] == 2 * BLOCK
    same_bytes(replicas.paths[1].read_bytes(), data)
    assert events_of(image) == [rb(1, 0, 2 * BLOCK, "Input/output error")]


def test_scrub_without_a_majority_reports_unvoted_ranges(tmp_path: Path) -> None:
    data = pattern(3 * BLOCK)
    one = patched(data, BLOCK, b"1")
    two = patched(data, BLOCK, b"2")
    replicas = make_replicas(tmp_path, [data, one, two], 2)
    image = replicas.open(writable=True)
    report = scrub(image, repair=True)
    assert report["unvoted-ranges"] == [[BLOCK, BLOCK]]
    assert [c["repaired-bytes"] for c in report["children"]] == [0, 0, 0]
    assert events_of(image) == [fail(BLOCK, BLOCK)]
    same_files(replicas.paths, [data, one, two])


def sparse_file(path: Path, size: int, chunks: Sequence[tuple[int, bytes]]) -> None:
    with path.open("wb") as f:
        f.truncate(size)
        for offset, data in chunks:
            f.seek(offset)
            f.write(data)


def test_scrub_skips_what_every_child_reports_as_a_hole(tmp_path: Path) -> None:
    size = 64 * MiB
    data = pattern(3 * BLOCK)
    paths = [tmp_path / f"child{i}.raw" for i in range(3)]
    for i, path in enumerate(paths):
        chunks = [(10 * MiB, data)]
        if i == 2:
            chunks.append((40 * MiB, b"stray"))  # in a hole of the others
        sparse_file(path, size, chunks)
    replicas = Replicas(paths, 2)
    if any(not extents for extents in replicas.data_extents()):
        pytest.fail(f"the file system of {tmp_path} does not report data extents")
    # What the file system allocated for the stray write decides what is read.
    stray = replicas.data_extents()[2][1]
    image = replicas.open()
    report = scrub(image)
    assert report["bytes-compared"] == 3 * BLOCK + stray[1]
    assert report["bytes-skipped-zero"] == size - report["bytes-compared"]
    # The run read there is what was allocated: the vote block is cut to it.
    assert report["children"][2]["bad-ranges"] == [[40 * MiB, stray[1]]]
    assert events_of(image) == [rb(2, 40 * MiB, stray[1])]


# --------------------------------------------------------------------------------------------
# Properties: random replica sets against the reference


@dataclass(frozen=True)
class Corruption:
    """Bytes written over some children: the same bytes in each, so they may form a version."""

    children: tuple[int, ...]
    offset: int
    length: int
    kind: str  # random | zeros | fill
    seed: int

    def data(self) -> bytes:
        if self.kind == "random":
            return random.Random(self.seed).randbytes(self.length)
        if self.kind == "zeros":
            return bytes(self.length)
        return bytes([self.seed % 256]) * self.length


@dataclass(frozen=True)
class Scenario:
    size: int
    seed: int
    extents: tuple[Range, ...]
    """Where the common data is (the rest of every child is a hole)."""
    corruptions: tuple[Corruption, ...]
    rules: tuple[tuple[Rule, ...] | None, ...]
    threshold: int
    read_pattern: str
    rewrite_corrupted: bool

    @property
    def guest_size(self) -> int:
        """The quorum's size: the files' rounded up to whole sectors."""
        return -(-self.size // 512) * 512

    def build(self, directory: Path) -> Replicas:
        base = random.Random(self.seed).randbytes(self.size)
        paths = []
        for i in range(len(self.rules)):
            chunks = [(offset, base[offset : offset + n]) for offset, n in self.extents]
            chunks += [(c.offset, c.data()) for c in self.corruptions if i in c.children]
            path = directory / f"child{i}.raw"
            sparse_file(path, self.size, chunks)
            paths.append(path)
        return Replicas(
            paths,
            self.threshold,
            rules=[None if r is None else list(r) for r in self.rules],
            read_pattern=self.read_pattern,
            rewrite_corrupted=self.rewrite_corrupted,
        )


ERRNOS = [EIO, ENOSPC, EACCES]


# Hypothesis draws the shape of an example (how many children, corruptions, failing children,
# requests; the threshold; the options) and one seed from which the details (offsets,
# lengths, sectors, errnos) follow. Every draw runs hypothesis' internal asserts, which pytest
# rewrites (hypothesis is a pytest plugin) and, with pytest-golden's assertion-pass hook
# enabled, formats even when they pass: drawing each detail cost more than running the test.


def random_range(rng: random.Random, size: int, max_length: int) -> Range:
    """A byte range inside [0, size): block-aligned, sector-aligned or anywhere; as long as
    allowed, at most 600 bytes, or anything in between."""
    align = rng.choice([1, 1, 512, BLOCK])
    offset = rng.randrange(0, (size - 1) // align + 1) * align
    room = min(size - offset, max_length)
    length = rng.choice([room, min(room, 600), room])
    if rng.random() < 0.5:
        length = rng.randint(1, length)
    return offset, length


IOTYPES: dict[str, list[str | None]] = {
    "read_aio": [None, "read"],
    "write_aio": [None, "write", "write-zeroes", "discard"],
    "flush_to_disk": [None, "flush"],
}


def random_rules(
    rng: random.Random, kind: str, size: int, events: Sequence[str]
) -> tuple[Rule, ...] | None:
    """blkdebug rules for one child (None: no blkdebug node). One errno per child: runs of
    errors of one child merge only when their errors agree, which
    test_failed_pieces_with_different_errors_are_reported_apart covers."""
    if kind == "none":
        return None
    errno = rng.choice(ERRNOS)
    rules = []
    for _ in range(1 if kind == "whole" else rng.randint(1, 3)):
        event = rng.choice(events)
        rules.append(
            Rule(
                event,
                errno,
                iotype=rng.choice(IOTYPES[event]),
                sector=-1 if kind == "whole" else rng.randrange(size // 512),
                once=rng.random() < 0.3,
            )
        )
    return tuple(rules)


@st.composite
def scenarios(
    draw: st.DrawFn,
    sizes: st.SearchStrategy[int],
    *,
    counts: Sequence[int] = (3, 5, 7),
    events: Sequence[str] = ("read_aio",),
    max_corruption: int = 3 * BLOCK,
) -> Scenario:
    n = draw(st.sampled_from(counts))
    size = draw(sizes)
    sparse = draw(st.booleans())
    corruption_count = draw(st.sampled_from([0, 1, 2, 3, 4, 6]))
    failing = [draw(st.sampled_from(["none", "none", "whole", "sectors"])) for _ in range(n)]
    read_pattern = draw(st.sampled_from(["quorum", "quorum", "quorum", "fifo"]))
    rewrite_corrupted = read_pattern == "quorum" and draw(st.booleans())
    threshold = draw(st.one_of(st.just(n // 2 + 1), st.integers(1, n)))
    seed = draw(st.integers(0, 2**32 - 1))

    rng = random.Random(seed)
    extents: tuple[Range, ...] = ((0, size),)
    if sparse:
        extents = tuple(random_range(rng, size, size) for _ in range(rng.randint(0, 3)))
    corruptions = []
    for _ in range(corruption_count):
        mask = rng.randrange(1, 2**n)  # the same bytes go to each child of this set
        offset, length = random_range(rng, size, max_corruption)
        kind = rng.choice(["random", "random", "zeros", "fill"])
        children = tuple(i for i in range(n) if mask >> i & 1)
        corruptions.append(Corruption(children, offset, length, kind, rng.randrange(256)))
    return Scenario(
        size=size,
        seed=seed,
        extents=extents,
        corruptions=tuple(corruptions),
        rules=tuple(random_rules(rng, kind, size, events) for kind in failing),
        threshold=threshold,
        read_pattern=read_pattern,
        rewrite_corrupted=rewrite_corrupted,
    )


@st.composite
def requests_in(draw: st.DrawFn, size: int, most: int) -> list[Range]:
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    return [random_range(rng, size, size) for _ in range(draw(st.integers(1, most)))]


# Small images: 256 KiB to 1 MiB, some ending in a partial block, some in a partial sector
# (read as zeroes to the end of that sector).
SMALL = st.builds(
    lambda blocks, tail: blocks * BLOCK + tail,
    st.integers(4, 16),
    st.sampled_from([0, 0, 512, 4096 + 512, 33 * 512, 1000]),
)
# Requests bigger than one piece: 4 MiB to 9 MiB images, mostly holes.
LARGE = st.sampled_from([PIECE + 3 * BLOCK, 2 * PIECE + 512, 9 * MiB])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("quorum-properties")


def example_dir(workdir: Path) -> tempfile.TemporaryDirectory[str]:
    """A fresh directory for one hypothesis example (tmp_path is one per test call)."""
    return tempfile.TemporaryDirectory(dir=workdir)


def check_reads(replicas: Replicas, requests: Sequence[Range], *, writable: bool) -> None:
    ref = replicas.reference()
    image = replicas.open(writable=writable)
    for offset, length in requests:
        want = ref.read(offset, length)
        got = read(image, offset, length)
        same_bytes(got, want.data, f"read of {length} bytes at {offset}")
        names = sorted({name for name, _ in want.events})
        how = "succeeds" if isinstance(got, bytes) else got.message.split(":")[0][:9]
        event(f"read {how}, events {names}")
        assert events_of(image) == want.events, f"read of {length} bytes at {offset}"
    same_files(replicas.paths, [bytes(c.data) for c in ref.children])


PROPERTY = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(
    # write_aio rules fail some of rewrite-corrupted's repairs (which must change nothing).
    scenario=scenarios(SMALL, events=("read_aio", "read_aio", "write_aio")),
    data=st.data(),
)
def test_reads_match_the_reference(workdir: Path, scenario: Scenario, data: st.DataObject) -> None:
    requests = data.draw(requests_in(scenario.guest_size, 4))
    with example_dir(workdir) as d:
        check_reads(scenario.build(Path(d)), requests, writable=False)


@settings(PROPERTY, max_examples=15)
@given(
    scenario=scenarios(LARGE, max_corruption=PIECE),
    data=st.data(),
)
def test_requests_larger_than_a_piece_match_the_reference(
    workdir: Path, scenario: Scenario, data: st.DataObject
) -> None:
    requests = data.draw(requests_in(scenario.guest_size, 2))
    with example_dir(workdir) as d:
        check_reads(scenario.build(Path(d)), requests, writable=False)


@st.composite
def operations(draw: st.DrawFn, size: int) -> list[tuple[str, int, int, int]]:
    kinds = draw(
        st.lists(
            st.sampled_from(["write", "write", "write_zeroes", "discard", "flush"]),
            min_size=1,
            max_size=6,
        )
    )
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    return [(kind, *random_range(rng, size, 3 * BLOCK), rng.randrange(256)) for kind in kinds]


@PROPERTY
@given(
    scenario=scenarios(SMALL, events=("read_aio", "write_aio", "flush_to_disk")),
    data=st.data(),
)
def test_writes_and_flushes_match_the_reference(
    workdir: Path, scenario: Scenario, data: st.DataObject
) -> None:
    ops = data.draw(operations(scenario.guest_size))
    with example_dir(workdir) as d:
        replicas = scenario.build(Path(d))
        ref = replicas.reference()
        image = replicas.open(writable=True)
        for kind, offset, length, seed in ops:
            if kind == "write":
                payload = bytes([seed]) * length
                want, events = ref.write(offset, payload)
                got = outcome(image.write, offset, payload)
            elif kind == "write_zeroes":
                want, events = ref.write_zeroes(offset, length)
                got = outcome(image.write_zeroes, offset, length)
            elif kind == "discard":
                want, events = ref.discard(offset, length)
                got = outcome(image.discard, offset, length)
            else:
                want, events = ref.flush()
                got = outcome(image.flush)
            assert got == want, f"{kind} of {length} bytes at {offset}"
            assert events_of(image) == events, f"{kind} of {length} bytes at {offset}"
        same_files(replicas.paths, [bytes(c.data) for c in ref.children])


@PROPERTY
@given(
    scenario=scenarios(st.one_of(SMALL, LARGE), events=("read_aio", "read_aio", "write_aio")),
    repair=st.booleans(),
    workers=st.sampled_from([1, 2, 4]),
)
def test_scrubs_match_the_reference(
    workdir: Path, scenario: Scenario, repair: bool, workers: int
) -> None:
    # A scrub votes whatever the read pattern, and repairs only when asked to.
    if any(r.once for rules in scenario.rules if rules is not None for r in rules):
        workers = 1  # with several workers, which piece a once rule hits is a race
    with example_dir(workdir) as d:
        replicas = scenario.build(Path(d))
        ref = replicas.reference()
        image = replicas.open(writable=repair)
        for _ in range(2 if repair else 1):
            want, events = ref.scrub(replicas.data_extents(), repair=repair)
            got = scrub(image, repair=repair, workers=workers)
            assert got == want
            assert events_of(image) == events
            same_files(replicas.paths, [bytes(c.data) for c in ref.children])
