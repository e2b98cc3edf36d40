"""`qimg create` for qcow2 and raw, every preallocation mode, checked against QEMU.

QEMU's qemu-img / qemu-io are the oracle: every qimg image must pass ``qemu-img check``, describe
itself in ``qemu-img info`` exactly like a twin made by ``qemu-img create`` with the same command
line, and read back as zeros (or as its backing file's data).

On top of that, qimg promises a layout of its own for preallocation=metadata|falloc|full: all
metadata in one contiguous region at the front (header, refcount table and blocks, L1, L2), then
the data clusters in guest order, so guest offset g lives at host offset M + g, and the file is
exactly ``qemu-img measure``'s "fully allocated size" long. For preallocation=off qimg aims to
write the very same bytes as qemu-img.

The qcow2 matrix is a pairwise covering set over cluster size x preallocation x compat x
refcount_bits x lazy_refcounts x extended_l2 x compression_type x backing file x size (generated
once by a greedy pairwise search, then frozen here); combinations that QEMU refuses are not in
it and are tested for rejection separately.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeAlias

import pytest

from conftest import seek_data_ranges

RunCommand: TypeAlias = Callable[..., subprocess.CompletedProcess[str]]
BackingKind: TypeAlias = Literal["qcow2", "raw"]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

#: Backing files shared by the matrix: a qcow2 one (referenced by a relative path through -b/-F)
#: and a raw one with an odd size (referenced by an absolute path through -o backing_file=...).
QCOW2_BACKING_SIZE = 1 * MiB
RAW_BACKING_SIZE = 1 * MiB + 512
#: The backing files hold this byte over [0, PATTERN_LEN) and zeros after it.
PATTERN = 0xAB
PATTERN_LEN = 64 * KiB

#: Largest single qemu-io read (its buffer is allocated in one piece).
QEMU_IO_CHUNK = 64 * MiB

NO_ERRORS = "No errors were found on the image."


def round_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def size_label(size: int) -> str:
    """Readable test-id form of a byte count: 0, 511, 65535, 64K, 16M+512, 1G+512."""
    for unit, name in ((GiB, "G"), (MiB, "M"), (KiB, "K")):
        whole, rest = divmod(size, unit)
        if whole and rest <= 512:
            return f"{whole}{name}" + (f"+{rest}" if rest else "")
    return str(size)


# --------------------------------------------------------------------------------------------
# Running the tools


def check_ok(proc: subprocess.CompletedProcess[str], what: str) -> str:
    assert proc.returncode == 0, (
        f"{what} failed with exit {proc.returncode}\n"
        f"command: {proc.args}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    )
    return proc.stdout


def qemu_info(run_qemu_img: RunCommand, image: Path) -> dict[str, Any]:
    out = check_ok(run_qemu_img("info", "--output=json", "-f", "qcow2", image), "qemu-img info")
    info: dict[str, Any] = json.loads(out)
    return info


def qemu_map(run_qemu_img: RunCommand, image: Path) -> list[dict[str, Any]]:
    out = check_ok(run_qemu_img("map", "--output=json", "-f", "qcow2", image), "qemu-img map")
    entries: list[dict[str, Any]] = json.loads(out)
    return entries


def read_commands(segments: list[tuple[int, int, int]]) -> list[str]:
    """qemu-io ``-c`` arguments verifying each (offset, length, byte) segment."""
    commands: list[str] = []
    for offset, length, byte in segments:
        pos, end = offset, offset + length
        while pos < end:
            step = min(QEMU_IO_CHUNK, end - pos)
            commands += ["-c", f"read -P {byte:#x} {pos} {step}"]
            pos += step
    return commands or ["-c", "read 0 0"]


def assert_qemu_io_reads(
    run_qemu_io: RunCommand, image: Path, fmt: str, segments: list[tuple[int, int, int]]
) -> None:
    proc = run_qemu_io("-r", "-f", fmt, *read_commands(segments), image)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Pattern verification failed" not in output, (
        f"qemu-io read-back of {image} differs from {segments}:\n{output}"
    )


# --------------------------------------------------------------------------------------------
# Host allocation (FIEMAP, falling back to SEEK_DATA/SEEK_HOLE)

_FS_IOC_FIEMAP = 0xC020660B
_FIEMAP_FLAG_SYNC = 0x1
_FIEMAP_EXTENT_LAST = 0x1
_FIEMAP_HEADER = struct.Struct("=QQIIII")
_FIEMAP_EXTENT = struct.Struct("=QQQQQIIII")
_FIEMAP_BATCH = 256


def allocated_ranges(path: Path) -> list[tuple[int, int]]:
    """Byte ranges of *path* backed by disk blocks, preallocated (unwritten) extents included."""
    with path.open("rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        ranges: list[tuple[int, int]] = []
        pos = 0
        while pos < size:
            buf = bytearray(_FIEMAP_HEADER.size + _FIEMAP_BATCH * _FIEMAP_EXTENT.size)
            _FIEMAP_HEADER.pack_into(
                buf, 0, pos, size - pos, _FIEMAP_FLAG_SYNC, 0, _FIEMAP_BATCH, 0
            )
            try:
                fcntl.ioctl(fd, _FS_IOC_FIEMAP, buf, True)
            except OSError:  # no FIEMAP on this file system: SEEK_DATA is the next best view
                return seek_data_ranges(fd, size)
            mapped = _FIEMAP_HEADER.unpack_from(buf, 0)[3]
            if mapped == 0:
                break
            last = False
            for i in range(mapped):
                fields = _FIEMAP_EXTENT.unpack_from(
                    buf, _FIEMAP_HEADER.size + i * _FIEMAP_EXTENT.size
                )
                logical, length, flags = fields[0], fields[2], fields[5]
                ranges.append((logical, logical + length))
                pos = logical + length
                last = last or bool(flags & _FIEMAP_EXTENT_LAST)
            if last:
                break
        return ranges


def uncovered(ranges: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """Parts of [start, end) that none of *ranges* covers."""
    gaps: list[tuple[int, int]] = []
    pos = start
    for lo, hi in sorted(ranges):
        if hi <= pos:
            continue
        if lo >= end:
            break
        if lo > pos:
            gaps.append((pos, lo))
        pos = max(pos, hi)
    if pos < end:
        gaps.append((pos, end))
    return gaps


def overlapping(ranges: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """Parts of *ranges* inside [start, end)."""
    return [(max(lo, start), min(hi, end)) for lo, hi in ranges if lo < end and hi > start]


# --------------------------------------------------------------------------------------------
# A minimal qcow2 reader, for the layout promise (qemu-img check covers consistency)

_L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
_L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
_REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
_INCOMPAT_EXTL2 = 1 << 4


@dataclass(frozen=True)
class Qcow2Layout:
    cluster_size: int
    virtual_size: int
    l1_table: tuple[int, int]  # (offset, bytes)
    refcount_table: tuple[int, int]
    refcount_blocks: list[int]
    l2_tables: list[int]
    data: dict[int, int]  # guest cluster index -> host offset


def _read_exact(fd: int, offset: int, length: int) -> bytes:
    data = os.pread(fd, length, offset)
    assert len(data) == length, f"short read: {length} bytes at {offset} -> {len(data)}"
    return data


def read_layout(path: Path) -> Qcow2Layout:
    with path.open("rb") as f:
        fd = f.fileno()
        header = _read_exact(fd, 0, 104)
        magic, version = struct.unpack_from(">4sI", header, 0)
        assert magic == b"QFI\xfb", f"{path} is not qcow2"
        cluster_bits, virtual_size = struct.unpack_from(">IQ", header, 20)
        l1_size, l1_offset, rt_offset, rt_clusters = struct.unpack_from(">IQQI", header, 36)
        incompatible = struct.unpack_from(">Q", header, 72)[0] if version >= 3 else 0
        cluster_size = 1 << cluster_bits
        l2_entry_size = 16 if incompatible & _INCOMPAT_EXTL2 else 8
        l2_entries = cluster_size // l2_entry_size

        reftable_bytes = _read_exact(fd, rt_offset, rt_clusters * cluster_size)
        reftable = struct.unpack(f">{len(reftable_bytes) // 8}Q", reftable_bytes)
        refblocks = [e & _REFT_OFFSET_MASK for e in reftable if e & _REFT_OFFSET_MASK]
        l1 = struct.unpack(f">{l1_size}Q", _read_exact(fd, l1_offset, 8 * l1_size))
        l2_tables: list[int] = []
        data: dict[int, int] = {}
        for l1_index, l1_entry in enumerate(l1):
            l2_offset = l1_entry & _L1E_OFFSET_MASK
            if not l2_offset:
                continue
            l2_tables.append(l2_offset)
            l2 = _read_exact(fd, l2_offset, cluster_size)
            for j in range(l2_entries):
                entry = struct.unpack_from(">Q", l2, j * l2_entry_size)[0]
                if entry & _L2E_OFFSET_MASK:
                    data[l1_index * l2_entries + j] = entry & _L2E_OFFSET_MASK
    return Qcow2Layout(
        cluster_size=cluster_size,
        virtual_size=virtual_size,
        l1_table=(l1_offset, 8 * l1_size),
        refcount_table=(rt_offset, rt_clusters * cluster_size),
        refcount_blocks=refblocks,
        l2_tables=l2_tables,
        data=data,
    )


# --------------------------------------------------------------------------------------------
# Backing files


@dataclass(frozen=True)
class BackingFiles:
    qcow2: Path
    raw: Path

    def reference(self, kind: BackingKind, overlay_dir: Path) -> str:
        """The name the overlay records: qcow2 base relative to the overlay, raw one absolute."""
        if kind == "qcow2":
            return os.path.relpath(self.qcow2, overlay_dir)
        return str(self.raw)

    @staticmethod
    def size(kind: BackingKind) -> int:
        return QCOW2_BACKING_SIZE if kind == "qcow2" else RAW_BACKING_SIZE


@pytest.fixture(scope="module")
def backing_files(
    tmp_path_factory: pytest.TempPathFactory, run_qemu_img: RunCommand, run_qemu_io: RunCommand
) -> BackingFiles:
    directory = tmp_path_factory.mktemp("backing")
    qcow2 = directory / "base.qcow2"
    check_ok(run_qemu_img("create", "-q", "-f", "qcow2", qcow2, QCOW2_BACKING_SIZE), "create")
    check_ok(
        run_qemu_io("-f", "qcow2", "-c", f"write -P {PATTERN:#x} 0 {PATTERN_LEN}", qcow2), "write"
    )
    raw = directory / "base.raw"
    with raw.open("wb") as f:
        f.write(bytes([PATTERN]) * PATTERN_LEN)
        f.truncate(RAW_BACKING_SIZE)
    return BackingFiles(qcow2=qcow2, raw=raw)


# --------------------------------------------------------------------------------------------
# The qcow2 create matrix


@dataclass(frozen=True)
class CreateCase:
    cluster_size: int
    preallocation: str
    compat: str
    refcount_bits: int
    lazy_refcounts: bool
    extended_l2: bool
    compression_type: str
    backing: BackingKind | None
    size: int | None  # None: taken from the backing file

    @property
    def id(self) -> str:
        parts = [f"cs{size_label(self.cluster_size)}", self.preallocation, f"compat{self.compat}"]
        parts.append(f"rb{self.refcount_bits}")
        if self.lazy_refcounts:
            parts.append("lazy")
        if self.extended_l2:
            parts.append("extl2")
        if self.compression_type != "zlib":
            parts.append(self.compression_type)
        if self.backing:
            parts.append(f"backing-{self.backing}")
        parts.append("size-from-backing" if self.size is None else f"size{size_label(self.size)}")
        return "-".join(parts)

    def format_options(self) -> list[str]:
        """The non-default qcow2 options, as -o key=value items."""
        options: list[str] = []
        if self.cluster_size != 64 * KiB:
            options.append(f"cluster_size={self.cluster_size}")
        if self.preallocation != "off":
            options.append(f"preallocation={self.preallocation}")
        if self.compat != "1.1":
            options.append(f"compat={self.compat}")
        if self.refcount_bits != 16:
            options.append(f"refcount_bits={self.refcount_bits}")
        if self.lazy_refcounts:
            options.append("lazy_refcounts=on")
        if self.extended_l2:
            options.append("extended_l2=on")
        if self.compression_type != "zlib":
            options.append(f"compression_type={self.compression_type}")
        return options

    def create_argv(self, target: Path, backing_files: BackingFiles) -> list[str]:
        """``create`` arguments; the qcow2 base goes through -b/-F, the raw one through -o."""
        argv = ["create", "-f", "qcow2"]
        options = self.format_options()
        if self.backing == "qcow2":
            argv += ["-b", backing_files.reference("qcow2", target.parent), "-F", "qcow2"]
        elif self.backing == "raw":
            reference = backing_files.reference("raw", target.parent).replace(",", ",,")
            options += [f"backing_file={reference}", "backing_fmt=raw"]
        if options:
            argv += ["-o", ",".join(options)]
        argv.append(str(target))
        if self.size is not None:
            argv.append(str(self.size))
        return argv

    def measure_argv(self, overlay_dir: Path, backing_files: BackingFiles) -> list[str]:
        """``measure`` arguments describing the same image as create_argv."""
        # qemu-img 10.0's measure rejects the v2/v3 spellings ("Invalid compatibility level")
        spelling = {"compat=v2": "compat=0.10", "compat=v3": "compat=1.1"}
        options = [spelling.get(o, o) for o in self.format_options()]
        if self.backing is not None:
            reference = backing_files.reference(self.backing, overlay_dir).replace(",", ",,")
            options += [f"backing_file={reference}", f"backing_fmt={self.backing}"]
        argv = ["measure", "--output=json", "-O", "qcow2", "--size", str(self.virtual_size)]
        return argv + (["-o", ",".join(options)] if options else [])

    @property
    def virtual_size(self) -> int:
        if self.size is None:
            assert self.backing is not None
            return BackingFiles.size(self.backing)
        return round_up(self.size, 512)

    @property
    def data_region(self) -> int:
        return round_up(self.virtual_size, self.cluster_size)

    def expected_contents(self) -> list[tuple[int, int, int]]:
        """(offset, length, byte) segments the image must read back as."""
        if self.backing is None:
            return [(0, self.virtual_size, 0)] if self.virtual_size else []
        pattern_end = min(PATTERN_LEN, self.virtual_size, BackingFiles.size(self.backing))
        segments = [(0, pattern_end, PATTERN)] if pattern_end else []
        if self.virtual_size > pattern_end:
            segments.append((pattern_end, self.virtual_size - pattern_end, 0))
        return segments


def _case(
    cluster_size: int,
    preallocation: str,
    *,
    compat: str = "1.1",
    refcount_bits: int = 16,
    lazy_refcounts: bool = False,
    extended_l2: bool = False,
    compression_type: str = "zlib",
    backing: BackingKind | None = None,
    size: int | None,
) -> CreateCase:
    return CreateCase(
        cluster_size=cluster_size,
        preallocation=preallocation,
        compat=compat,
        refcount_bits=refcount_bits,
        lazy_refcounts=lazy_refcounts,
        extended_l2=extended_l2,
        compression_type=compression_type,
        backing=backing,
        size=size,
    )


# Validity rules the matrix respects (each is tested for rejection below): compat 0.10 means
# refcount_bits=16, no lazy refcounts, no extended L2, zlib; extended L2 needs clusters >= 16k;
# preallocation with a backing file needs extended L2. Budget rules: falloc/full images stay
# <= 16M+512 (they really allocate), metadata images have <= 16384 clusters (qemu-img's own
# metadata preallocation, which makes the twin, is slow for many small clusters).
# Generated by a greedy pairwise search over all valid combinations (covers all 395 valid value
# pairs of the nine dimensions), plus the hand-picked cases at the end.
CASES: list[CreateCase] = [
    _case(512, "off", compat="0.10", size=0),
    _case(
        64 * KiB,
        "off",
        refcount_bits=1,
        lazy_refcounts=True,
        extended_l2=True,
        compression_type="zstd",
        backing="qcow2",
        size=1,
    ),
    _case(2 * MiB, "metadata", refcount_bits=64, extended_l2=True, backing="raw", size=511),
    _case(
        4 * KiB, "falloc", refcount_bits=64, lazy_refcounts=True, compression_type="zstd", size=512
    ),
    _case(
        2 * MiB,
        "full",
        lazy_refcounts=True,
        extended_l2=True,
        compression_type="zstd",
        backing="raw",
        size=65535,
    ),
    _case(64 * KiB, "full", refcount_bits=1, size=16 * MiB + 512),
    _case(4 * KiB, "off", compat="0.10", backing="qcow2", size=None),
    _case(512, "metadata", refcount_bits=1, lazy_refcounts=True, compression_type="zstd", size=511),
    _case(2 * MiB, "falloc", compat="0.10", size=1),
    _case(
        64 * KiB,
        "falloc",
        refcount_bits=1,
        extended_l2=True,
        compression_type="zstd",
        backing="raw",
        size=0,
    ),
    _case(512, "off", refcount_bits=64, lazy_refcounts=True, backing="raw", size=64 * MiB + 512),
    _case(64 * KiB, "metadata", compat="0.10", size=65535),
    _case(
        64 * KiB,
        "full",
        refcount_bits=64,
        lazy_refcounts=True,
        extended_l2=True,
        compression_type="zstd",
        backing="qcow2",
        size=None,
    ),
    _case(2 * MiB, "off", refcount_bits=1, backing="qcow2", size=GiB + 512),
    _case(512, "off", compat="0.10", backing="qcow2", size=512),
    _case(
        2 * MiB,
        "metadata",
        lazy_refcounts=True,
        extended_l2=True,
        compression_type="zstd",
        backing="qcow2",
        size=16 * MiB + 512,
    ),
    _case(
        64 * KiB,
        "metadata",
        refcount_bits=1,
        extended_l2=True,
        compression_type="zstd",
        size=64 * MiB + 512,
    ),
    _case(4 * KiB, "off", compat="0.10", backing="raw", size=511),
    _case(
        64 * KiB,
        "off",
        lazy_refcounts=True,
        extended_l2=True,
        compression_type="zstd",
        size=GiB + 512,
    ),
    _case(4 * KiB, "off", refcount_bits=1, backing="qcow2", size=65535),
    _case(4 * KiB, "metadata", refcount_bits=64, lazy_refcounts=True, size=0),
    _case(64 * KiB, "metadata", refcount_bits=1, extended_l2=True, backing="raw", size=512),
    _case(512, "off", compat="0.10", backing="raw", size=16 * MiB + 512),
    _case(2 * MiB, "metadata", refcount_bits=1, extended_l2=True, backing="raw", size=None),
    _case(512, "full", compat="0.10", size=1),
    _case(64 * KiB, "falloc", refcount_bits=1, extended_l2=True, backing="qcow2", size=511),
    _case(512, "falloc", refcount_bits=64, size=65535),
    _case(4 * KiB, "off", compat="0.10", backing="qcow2", size=64 * MiB + 512),
    _case(4 * KiB, "off", refcount_bits=64, backing="raw", size=1),
    _case(2 * MiB, "full", refcount_bits=1, extended_l2=True, backing="qcow2", size=0),
    _case(512, "off", compat="0.10", backing="raw", size=GiB + 512),
    _case(4 * KiB, "falloc", refcount_bits=64, size=16 * MiB + 512),
    _case(4 * KiB, "full", compat="0.10", size=511),
    _case(2 * MiB, "full", compat="0.10", size=512),
    _case(4 * KiB, "off", refcount_bits=64, size=GiB + 512),
    _case(512, "off", compat="0.10", backing="qcow2", size=None),
    _case(512, "metadata", compat="0.10", size=1),
    _case(64 * KiB, "falloc", refcount_bits=1, extended_l2=True, backing="qcow2", size=None),
    _case(2 * MiB, "off", compat="0.10", size=64 * MiB + 512),
    _case(2 * MiB, "metadata", compat="0.10", size=GiB + 512),
    # Hand-picked: the other compat spellings, the remaining refcount widths, and the plain
    # defaults (64k clusters, refcount_bits=16) for every preallocation mode.
    _case(64 * KiB, "metadata", compat="v2", size=1 * MiB),
    _case(4 * KiB, "full", compat="v3", size=1 * MiB + 512),
    _case(512, "falloc", refcount_bits=2, size=1 * MiB + 512),
    _case(64 * KiB, "metadata", refcount_bits=8, size=GiB + 512),
    _case(2 * MiB, "off", refcount_bits=32, size=65535),
    _case(64 * KiB, "off", size=64 * MiB + 512),
    _case(64 * KiB, "metadata", size=64 * MiB + 512),
    _case(64 * KiB, "falloc", size=1 * MiB + 512),
    _case(64 * KiB, "full", size=1 * MiB + 512),
]


def qemu_grows_refcounts(cluster_size: int, refcount_bits: int, size: int) -> bool:
    """Whether qemu-img's L1 table outgrows its first refcount block.

    qemu-img starts every image with header, refcount table and one refcount block,
    then allocates the L1; when the L1 runs past what that block covers, its allocator
    adds refcount blocks after the L1. qimg sizes the refcount structures up front and
    puts them before the L1, so only images below this point are byte-identical.
    """
    entry = 8
    l1_entries = -(-size // (cluster_size * (cluster_size // entry)))
    l1_clusters = -(-(l1_entries * 8) // cluster_size)
    return 3 + l1_clusters > cluster_size * 8 // refcount_bits


OFF_CASES = [
    c
    for c in CASES
    if c.preallocation == "off"
    and not qemu_grows_refcounts(c.cluster_size, c.refcount_bits, c.size or 0)
]
LARGE_L1_OFF_CASES = [
    c
    for c in CASES
    if c.preallocation == "off"
    and qemu_grows_refcounts(c.cluster_size, c.refcount_bits, c.size or 0)
]
PREALLOC_CASES = [c for c in CASES if c.preallocation != "off"]
NO_BACKING_PREALLOC_CASES = [c for c in PREALLOC_CASES if c.backing is None]


def _params(cases: list[CreateCase]) -> list[Any]:
    return [pytest.param(c, id=c.id) for c in cases]


@dataclass(frozen=True)
class CreatedPair:
    """A qimg-made image and what its qemu-img-made twin (same command line) looked like.

    Only preallocation=off twins stay on disk (for the byte comparison); the others are deleted
    once their ``qemu-img info`` is taken, to keep the module's disk use small.
    """

    case: CreateCase
    qimg: Path
    twin: Path
    twin_info: dict[str, Any]

    @property
    def metadata_end(self) -> int:
        """M: where qimg's data region starts (file length minus the data clusters)."""
        return self.qimg.stat().st_size - self.case.data_region


CreateImages: TypeAlias = Callable[[CreateCase], CreatedPair]


@pytest.fixture(scope="module")
def created(
    tmp_path_factory: pytest.TempPathFactory,
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    backing_files: BackingFiles,
) -> Iterator[CreateImages]:
    """``created(case)``: the case's qimg image and qemu-img twin, made once per module."""
    made: dict[CreateCase, CreatedPair] = {}

    def get(case: CreateCase) -> CreatedPair:
        if case not in made:
            directory = tmp_path_factory.mktemp("case")
            ours, twin = directory / "qimg.qcow2", directory / "twin.qcow2"
            check_ok(run_qemu_img(*case.create_argv(twin, backing_files)), "qemu-img create")
            twin_info = qemu_info(run_qemu_img, twin)
            if case.preallocation != "off":
                twin.unlink()
            check_ok(run_qimg(*case.create_argv(ours, backing_files)), "qimg create")
            made[case] = CreatedPair(case, ours, twin, twin_info)
        return made[case]

    yield get
    for pair in made.values():
        pair.qimg.unlink(missing_ok=True)
        pair.twin.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# The matrix: properties every qimg image must have


@pytest.mark.qemu
@pytest.mark.parametrize("case", _params(CASES))
def test_qimg_image_passes_qemu_img_check(
    case: CreateCase, created: CreateImages, run_qemu_img: RunCommand
) -> None:
    pair = created(case)
    proc = run_qemu_img("check", "-f", "qcow2", pair.qimg)
    assert proc.returncode == 0, (
        f"qemu-img check exit {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    )
    assert NO_ERRORS in proc.stdout


INFO_KEYS = (
    "format",
    "virtual-size",
    "cluster-size",
    "backing-filename",
    "backing-filename-format",
)
QCOW2_INFO_KEYS = ("compat", "lazy-refcounts", "refcount-bits", "extended-l2", "compression-type")


def info_summary(info: dict[str, Any]) -> dict[str, Any]:
    data = info.get("format-specific", {}).get("data", {})
    summary = {key: info.get(key) for key in INFO_KEYS}
    summary.update({f"format-specific.{key}": data.get(key) for key in QCOW2_INFO_KEYS})
    return summary


@pytest.mark.qemu
@pytest.mark.parametrize("case", _params(CASES))
def test_qimg_image_info_matches_qemu_img_twin(
    case: CreateCase, created: CreateImages, run_qemu_img: RunCommand
) -> None:
    pair = created(case)
    ours = info_summary(qemu_info(run_qemu_img, pair.qimg))
    theirs = info_summary(pair.twin_info)
    assert ours == theirs
    assert ours["virtual-size"] == case.virtual_size


@pytest.mark.qemu
@pytest.mark.parametrize("case", _params(CASES))
def test_qimg_image_reads_as_zeros_over_backing_data(
    case: CreateCase, created: CreateImages, run_qemu_io: RunCommand
) -> None:
    """Zeros everywhere, except where a backing file shows through (its 0xab pattern)."""
    assert_qemu_io_reads(run_qemu_io, created(case).qimg, "qcow2", case.expected_contents())


@pytest.mark.qemu
@pytest.mark.parametrize(
    "case", _params([c for c in PREALLOC_CASES if c.backing and c.virtual_size > 0])
)
def test_extended_l2_prealloc_lets_backing_data_show_through(
    case: CreateCase, created: CreateImages, run_qemu_io: RunCommand
) -> None:
    """Preallocated clusters keep their subclusters unallocated, so the backing file shows."""
    assert case.extended_l2
    pattern = [seg for seg in case.expected_contents() if seg[2] == PATTERN]
    assert pattern, "the case should overlap the backing file's pattern"
    assert_qemu_io_reads(run_qemu_io, created(case).qimg, "qcow2", pattern)


_HEADER_FIELDS = [
    (0, "magic"),
    (4, "version"),
    (8, "backing_file_offset"),
    (16, "backing_file_size"),
    (20, "cluster_bits"),
    (24, "size"),
    (32, "crypt_method"),
    (36, "l1_size"),
    (40, "l1_table_offset"),
    (48, "refcount_table_offset"),
    (56, "refcount_table_clusters"),
    (60, "nb_snapshots"),
    (64, "snapshots_offset"),
    (72, "incompatible_features"),
    (80, "compatible_features"),
    (88, "autoclear_features"),
    (96, "refcount_order"),
    (100, "header_length"),
    (104, "compression_type"),
    (105, "header padding"),
]


def first_difference(a: bytes, b: bytes) -> str:
    """Where two qcow2 files first differ (header field names for the first 112 bytes)."""
    cluster_size = 1 << struct.unpack_from(">I", b, 20)[0] if len(b) >= 24 else 512
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            if i < 112:
                where = "header field " + [n for off, n in _HEADER_FIELDS if off <= i][-1]
            else:
                where = f"cluster {i // cluster_size}"
            return (
                f"first difference at byte {i:#x} ({where}): qimg {x:#04x}, qemu-img {y:#04x}; "
                f"lengths: qimg {len(a)}, qemu-img {len(b)}"
            )
    return f"lengths differ: qimg {len(a)}, qemu-img {len(b)}"


@pytest.mark.qemu
@pytest.mark.parametrize("case", _params(OFF_CASES))
def test_off_image_is_byte_identical_to_qemu_img_twin(
    case: CreateCase, created: CreateImages
) -> None:
    pair = created(case)
    ours, theirs = pair.qimg.read_bytes(), pair.twin.read_bytes()
    assert ours == theirs, first_difference(ours, theirs)


@pytest.mark.qemu
@pytest.mark.parametrize("case", _params(LARGE_L1_OFF_CASES))
def test_off_image_with_large_l1_is_no_longer_than_qemu_img_twin(
    case: CreateCase, created: CreateImages
) -> None:
    # Layouts differ here by design (see qemu_grows_refcounts); qemu-img check and info
    # agreement are asserted for these cases by the tests above.
    pair = created(case)
    assert pair.qimg.stat().st_size <= pair.twin.stat().st_size


@pytest.mark.qemu
@pytest.mark.parametrize("case", _params(PREALLOC_CASES))
def test_prealloc_file_length_equals_measure_fully_allocated(
    case: CreateCase,
    created: CreateImages,
    run_qemu_img: RunCommand,
    backing_files: BackingFiles,
) -> None:
    pair = created(case)
    measured = json.loads(
        check_ok(
            run_qemu_img(*case.measure_argv(pair.qimg.parent, backing_files)), "qemu-img measure"
        )
    )
    assert pair.qimg.stat().st_size == measured["fully-allocated"]


@pytest.mark.qemu
@pytest.mark.parametrize("case", _params(PREALLOC_CASES))
def test_prealloc_places_data_after_metadata_in_guest_order(
    case: CreateCase, created: CreateImages
) -> None:
    """Header, refcounts, L1 and L2 all lie below M; guest cluster i lives at M + i * cs."""
    pair = created(case)
    m = pair.metadata_end
    layout = read_layout(pair.qimg)
    cs = layout.cluster_size
    assert m >= cs, f"file shorter than its data region: M = {m}"
    assert m % cs == 0
    metadata = {
        "L1 table": [layout.l1_table],
        "refcount table": [layout.refcount_table],
        "refcount blocks": [(offset, cs) for offset in layout.refcount_blocks],
        "L2 tables": [(offset, cs) for offset in layout.l2_tables],
    }
    for name, extents in metadata.items():
        beyond = [(offset, length) for offset, length in extents if offset + length > m]
        assert not beyond, f"{name} past the metadata region end M={m}: {beyond}"
    expected = {i: m + i * cs for i in range(case.data_region // cs)}
    wrong = {i: host for i, host in layout.data.items() if expected.get(i) != host}
    missing = sorted(set(expected) - set(layout.data))
    assert not wrong and not missing, (
        f"M={m}: misplaced (guest cluster -> host) {dict(list(wrong.items())[:8])}, "
        f"unmapped guest clusters {missing[:8]} ({len(missing)} in all)"
    )


@pytest.mark.qemu
@pytest.mark.parametrize("case", _params(PREALLOC_CASES))
def test_qemu_img_map_shows_data_at_metadata_end_plus_guest_offset(
    case: CreateCase, created: CreateImages, run_qemu_img: RunCommand
) -> None:
    """Every range qemu-img map attributes to the image itself sits at host offset M + g.

    Without a backing file that is every range, covering the whole disk; with one (extended L2),
    unwritten subclusters show the backing file instead and only the rest is attributed here.
    """
    pair = created(case)
    m = pair.metadata_end
    # an empty disk maps as one zero-length, offset-less entry: there is nothing to place
    entries = [e for e in qemu_map(run_qemu_img, pair.qimg) if e["length"] > 0]
    own = [e for e in entries if e["depth"] == 0]
    misplaced = [e for e in own if e.get("offset") != m + e["start"]]
    assert not misplaced, f"M={m}: ranges not at M + guest offset: {misplaced[:4]}"
    if case.backing is None:
        assert own == entries
        covered = [(e["start"], e["start"] + e["length"]) for e in own]
        assert uncovered(covered, 0, case.virtual_size) == []


@pytest.mark.qemu
@pytest.mark.parametrize(
    "case", _params([c for c in PREALLOC_CASES if c.preallocation in ("falloc", "full")])
)
def test_falloc_and_full_prealloc_allocate_the_data_region(
    case: CreateCase, created: CreateImages
) -> None:
    pair = created(case)
    m = pair.metadata_end
    end = pair.qimg.stat().st_size
    gaps = uncovered(allocated_ranges(pair.qimg), m, end)
    assert gaps == [], f"data region [{m}, {end}) has unallocated parts {gaps[:8]}"


@pytest.mark.qemu
@pytest.mark.parametrize(
    "case", _params([c for c in PREALLOC_CASES if c.preallocation == "metadata"])
)
def test_metadata_prealloc_leaves_the_data_region_a_hole(
    case: CreateCase, created: CreateImages
) -> None:
    pair = created(case)
    block = os.stat(pair.qimg).st_blksize
    start = round_up(pair.metadata_end, block)  # the block holding the metadata's tail is data
    end = pair.qimg.stat().st_size
    allocated = overlapping(allocated_ranges(pair.qimg), start, end)
    assert allocated == [], f"data region [{start}, {end}) has allocated parts {allocated[:8]}"


# --------------------------------------------------------------------------------------------
# preallocation=off: the same bytes as qemu-img, named after the cases they cover


@dataclass(frozen=True)
class PlainCase:
    id: str
    options: list[str]  # "{backing}" stands for the qcow2 backing file's absolute path
    size: str | None


PLAIN_CASES = [
    PlainCase("64M-defaults", [], "64M"),
    PlainCase("1M-cluster512", ["-o", "cluster_size=512"], "1M"),
    PlainCase("1M-cluster4k", ["-o", "cluster_size=4k"], "1M"),
    PlainCase("1G-cluster2M", ["-o", "cluster_size=2M"], "1G"),
    # The largest L1 tables the first refcount block still covers (see qemu_grows_refcounts)
    PlainCase("64M-cluster512", ["-o", "cluster_size=512"], "64M"),
    PlainCase(
        "16M-cluster512-refcount-bits-64", ["-o", "cluster_size=512,refcount_bits=64"], "16M"
    ),
    PlainCase("64M-compat0.10", ["-o", "compat=0.10"], "64M"),
    PlainCase("64M-backing-F", ["-b", "{backing}", "-F", "qcow2"], "64M"),
    PlainCase("size-from-backing-F", ["-b", "{backing}", "-F", "qcow2"], None),
    PlainCase("64M-lazy-refcounts", ["-o", "lazy_refcounts=on"], "64M"),
    PlainCase("64M-extended-l2", ["-o", "extended_l2=on"], "64M"),
    PlainCase("64M-zstd", ["-o", "compression_type=zstd"], "64M"),
    PlainCase("64M-explicit-preallocation-off", ["-o", "preallocation=off"], "64M"),
    PlainCase("64M-refcount-bits-1", ["-o", "refcount_bits=1"], "64M"),
    PlainCase("64M-refcount-bits-64", ["-o", "refcount_bits=64"], "64M"),
    PlainCase("size-as-option", ["-o", "size=100M"], None),
    PlainCase("merged-option-lists", ["-o", "cluster_size=4k", "-o", "lazy_refcounts=on"], "128M"),
]


@pytest.mark.qemu
@pytest.mark.parametrize("plain", [pytest.param(p, id=p.id) for p in PLAIN_CASES])
def test_off_header_matches_qemu_img_byte_for_byte(
    plain: PlainCase,
    tmp_path: Path,
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    backing_files: BackingFiles,
) -> None:
    options = [o.replace("{backing}", str(backing_files.qcow2)) for o in plain.options]
    size = [plain.size] if plain.size is not None else []
    ours, theirs = tmp_path / "qimg.qcow2", tmp_path / "twin.qcow2"
    check_ok(run_qemu_img("create", "-f", "qcow2", *options, theirs, *size), "qemu-img create")
    check_ok(run_qimg("create", "-f", "qcow2", *options, ours, *size), "qimg create")
    a, b = ours.read_bytes(), theirs.read_bytes()
    assert a == b, first_difference(a, b)


def test_create_quiet_prints_nothing(tmp_path: Path, run_qimg: RunCommand) -> None:
    proc = run_qimg("create", "-q", "-f", "qcow2", tmp_path / "q.qcow2", "1M")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


@pytest.mark.qemu
def test_create_unsafe_records_backing_file_without_opening_it(
    tmp_path: Path, run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    missing = tmp_path / "does-not-exist.qcow2"
    ours, theirs = tmp_path / "qimg.qcow2", tmp_path / "twin.qcow2"
    argv = ["create", "-f", "qcow2", "-u", "-b", str(missing), "-F", "qcow2"]
    check_ok(run_qemu_img(*argv, theirs, "1M"), "qemu-img create -u")
    check_ok(run_qimg(*argv, ours, "1M"), "qimg create -u")
    assert info_summary(qemu_info(run_qemu_img, ours)) == info_summary(
        qemu_info(run_qemu_img, theirs)
    )


# --------------------------------------------------------------------------------------------
# Invalid option sets: rejected like qemu-img, and nothing on disk is created or touched


@dataclass(frozen=True)
class InvalidCase:
    id: str
    argv: list[str]  # after "create", before the target; "{backing}"/"{missing}" substituted
    size: str | None = "1M"

    def resolved(self, backing: Path, missing: Path) -> list[str]:
        return [
            a.replace("{backing}", str(backing)).replace("{missing}", str(missing))
            for a in self.argv
        ]


INVALID_CASES = [
    InvalidCase("qcow2-lazy-refcounts-with-compat0.10", ["-o", "compat=0.10,lazy_refcounts=on"]),
    InvalidCase("qcow2-refcount-bits-1-with-compat0.10", ["-o", "compat=0.10,refcount_bits=1"]),
    InvalidCase("qcow2-refcount-bits-3", ["-o", "refcount_bits=3"]),
    InvalidCase("qcow2-refcount-bits-128", ["-o", "refcount_bits=128"]),
    InvalidCase("qcow2-extended-l2-with-4k-clusters", ["-o", "cluster_size=4k,extended_l2=on"]),
    InvalidCase("qcow2-extended-l2-with-compat0.10", ["-o", "compat=0.10,extended_l2=on"]),
    InvalidCase("qcow2-zstd-with-compat0.10", ["-o", "compat=0.10,compression_type=zstd"]),
    InvalidCase("qcow2-compression-type-lz4", ["-o", "compression_type=lz4"]),
    InvalidCase("qcow2-cluster-size-3000", ["-o", "cluster_size=3000"]),
    InvalidCase("qcow2-cluster-size-256", ["-o", "cluster_size=256"]),
    InvalidCase("qcow2-cluster-size-4M", ["-o", "cluster_size=4M"]),
    InvalidCase("qcow2-preallocation-bogus", ["-o", "preallocation=bogus"]),
    InvalidCase("qcow2-compat-foobar", ["-o", "compat=foobar"]),
    InvalidCase("qcow2-unknown-option", ["-o", "foo=bar"]),
    InvalidCase("qcow2-backing-fmt-without-backing-file", ["-o", "backing_fmt=qcow2"]),
    InvalidCase(
        "qcow2-metadata-prealloc-with-backing-without-extended-l2",
        ["-b", "{backing}", "-F", "qcow2", "-o", "preallocation=metadata"],
    ),
    InvalidCase(
        "qcow2-falloc-prealloc-with-backing-without-extended-l2",
        ["-b", "{backing}", "-F", "qcow2", "-o", "preallocation=falloc"],
    ),
    InvalidCase(
        "qcow2-full-prealloc-with-backing-without-extended-l2",
        ["-b", "{backing}", "-F", "qcow2", "-o", "preallocation=full"],
    ),
    InvalidCase("qcow2-missing-backing-file", ["-b", "{missing}", "-F", "qcow2"]),
    InvalidCase("qcow2-missing-size", [], None),
    InvalidCase("qcow2-too-large-for-cluster-size", ["-o", "cluster_size=512"], "2P"),
    InvalidCase("raw-preallocation-metadata", ["-f", "raw", "-o", "preallocation=metadata"]),
    InvalidCase("raw-preallocation-bogus", ["-f", "raw", "-o", "preallocation=bogus"]),
    InvalidCase("raw-compat-option", ["-f", "raw", "-o", "compat=1.1"]),
]


# Where qemu-img words the same error differently per format, qimg uses one wording.
OWN_WORDING = {
    "raw-preallocation-bogus": "Parameter 'preallocation' does not accept value 'bogus'",
}


def _invalid_argv(case: InvalidCase, target: Path, backing_files: BackingFiles) -> list[str]:
    fmt = [] if "-f" in case.argv else ["-f", "qcow2"]
    missing = backing_files.qcow2.parent / "missing-backing.qcow2"
    size = [case.size] if case.size is not None else []
    return ["create", *fmt, *case.resolved(backing_files.qcow2, missing), str(target), *size]


INVALID_PARAMS = [pytest.param(c, id=c.id) for c in INVALID_CASES]


@pytest.mark.qemu
@pytest.mark.parametrize("case", INVALID_PARAMS)
def test_invalid_create_options_are_rejected_with_qemu_img_message(
    case: InvalidCase,
    tmp_path: Path,
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    backing_files: BackingFiles,
) -> None:
    (tmp_path / "qemu").mkdir()
    twin = tmp_path / "qemu" / "t.img"
    reference = run_qemu_img(*_invalid_argv(case, twin, backing_files))
    assert reference.returncode == 1, f"qemu-img accepted it: {reference}"
    first_line = reference.stderr.splitlines()[0]
    message = first_line.removeprefix("qemu-img: ").removeprefix(f"{twin}: ")
    message = OWN_WORDING.get(case.id, message)

    target = tmp_path / "t.img"
    proc = run_qimg(*_invalid_argv(case, target, backing_files))
    assert proc.returncode == 1, f"qimg exit {proc.returncode}: {proc.stdout}{proc.stderr}"
    assert proc.stderr.startswith("qimg: "), proc.stderr
    assert message in proc.stderr


@pytest.mark.qemu
@pytest.mark.parametrize("case", INVALID_PARAMS)
def test_invalid_create_leaves_no_file_behind(
    case: InvalidCase,
    tmp_path: Path,
    run_qimg: RunCommand,
    backing_files: BackingFiles,
) -> None:
    target = tmp_path / "t.img"
    proc = run_qimg(*_invalid_argv(case, target, backing_files))
    assert proc.returncode == 1, f"qimg exit {proc.returncode}: {proc.stdout}{proc.stderr}"
    assert not target.exists(), f"{target} was created ({target.stat().st_size} bytes)"


@pytest.mark.qemu
@pytest.mark.parametrize("case", INVALID_PARAMS)
def test_invalid_create_leaves_existing_file_untouched(
    case: InvalidCase,
    tmp_path: Path,
    run_qimg: RunCommand,
    backing_files: BackingFiles,
) -> None:
    target = tmp_path / "t.img"
    precious = bytes(range(256)) * 1000 + b"tail"
    target.write_bytes(precious)
    proc = run_qimg(*_invalid_argv(case, target, backing_files))
    assert proc.returncode == 1, f"qimg exit {proc.returncode}: {proc.stdout}{proc.stderr}"
    assert target.exists(), f"{target} was deleted"
    assert target.read_bytes() == precious, f"{target} was modified"


# --------------------------------------------------------------------------------------------
# raw


RAW_SIZES = [0, 1, 511, 512, 65535, 1 * MiB + 1]
RAW_SPARSE_SIZES = [*RAW_SIZES, 64 * MiB + 512, GiB + 512]


def _raw_pair(
    tmp_path: Path,
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    preallocation: str,
    size: int,
) -> tuple[Path, Path]:
    ours, theirs = tmp_path / "qimg.raw", tmp_path / "twin.raw"
    options = ["-o", f"preallocation={preallocation}"]
    check_ok(run_qemu_img("create", "-f", "raw", *options, theirs, size), "qemu-img create")
    check_ok(run_qimg("create", "-f", "raw", *options, ours, size), "qimg create")
    assert ours.stat().st_size == theirs.stat().st_size == round_up(size, 512)
    return ours, theirs


@pytest.mark.qemu
@pytest.mark.parametrize("size", RAW_SPARSE_SIZES, ids=size_label)
def test_raw_off_creates_sparse_file_of_qemu_img_size(
    size: int, tmp_path: Path, run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    ours, _ = _raw_pair(tmp_path, run_qimg, run_qemu_img, "off", size)
    allocated = sum(hi - lo for lo, hi in allocated_ranges(ours))
    assert allocated <= 64 * KiB, f"{allocated} bytes allocated in a sparse {size}-byte image"


@pytest.mark.qemu
@pytest.mark.parametrize("size", RAW_SIZES, ids=size_label)
def test_raw_falloc_allocates_the_whole_file(
    size: int, tmp_path: Path, run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    ours, _ = _raw_pair(tmp_path, run_qimg, run_qemu_img, "falloc", size)
    length = ours.stat().st_size
    assert uncovered(allocated_ranges(ours), 0, length) == []


@pytest.mark.qemu
@pytest.mark.parametrize("size", RAW_SIZES, ids=size_label)
def test_raw_full_allocates_and_zeroes_the_whole_file(
    size: int, tmp_path: Path, run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    ours, _ = _raw_pair(tmp_path, run_qimg, run_qemu_img, "full", size)
    length = ours.stat().st_size
    assert uncovered(allocated_ranges(ours), 0, length) == []
    assert ours.read_bytes() == bytes(length)


@pytest.mark.parametrize("size", [0, 511, 1 * MiB], ids=size_label)
def test_raw_metadata_preallocation_is_rejected(
    size: int, tmp_path: Path, run_qimg: RunCommand
) -> None:
    target = tmp_path / "t.raw"
    proc = run_qimg("create", "-f", "raw", "-o", "preallocation=metadata", target, size)
    assert proc.returncode == 1
    assert proc.stderr.startswith("qimg: ")
    assert "Unsupported preallocation mode: metadata" in proc.stderr
    assert not target.exists()
