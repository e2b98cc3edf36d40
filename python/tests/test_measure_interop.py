"""`qimg measure` prints exactly what QEMU's `qemu-img measure` prints.

Every case runs the same arguments through both tools and compares stdout byte for byte (human
output by default, ``--output=human`` and ``--output=json``), the exit status, and stderr.
Cases: ``--size`` for sizes from 0 to 2P with qcow2 and raw targets and the options that change
the qcow2 metadata size; raw input files with data at scattered, unaligned offsets, so the
SEEK_DATA/SEEK_HOLE extents (rounded to clusters) matter; qcow2 input files; and the
"image size is too large" error.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import pytest

RunCommand: TypeAlias = Callable[..., subprocess.CompletedProcess[str]]

pytestmark = pytest.mark.qemu

KiB = 1024
MiB = 1024 * KiB

OUTPUTS = [
    pytest.param([], id="default"),
    pytest.param(["--output=human"], id="human"),
    pytest.param(["--output=json"], id="json"),
]

TOO_LARGE = "The image size is too large (try using a larger cluster size)"


def assert_same_measure(run_qimg: RunCommand, run_qemu_img: RunCommand, argv: list[str]) -> None:
    theirs = run_qemu_img("measure", *argv)
    assert theirs.returncode == 0, f"qemu-img measure {argv} failed: {theirs.stderr}"
    ours = run_qimg("measure", *argv)
    assert (ours.returncode, ours.stderr) == (0, ""), f"qimg measure {argv}: {ours.stderr}"
    assert ours.stdout == theirs.stdout, f"qimg measure {argv}"


# --------------------------------------------------------------------------------------------
# --size


@dataclass(frozen=True)
class SizeCase:
    target: str
    size: str
    options: str = ""

    @property
    def id(self) -> str:
        return "-".join(filter(None, [self.target, self.size, self.options.replace(",", "+")]))

    def argv(self) -> list[str]:
        options = ["-o", self.options] if self.options else []
        return ["-O", self.target, *options, "--size", self.size]


SIZES = ["0", "1", "512", "64k", "1G", "2G", "64G", "1T", "2P"]

SIZE_CASES = [
    # qcow2 with defaults (64k clusters, refcount_bits=16): every size
    *(SizeCase("qcow2", size) for size in SIZES),
    # raw: the size rounded up to 512, preallocation changes nothing
    *(SizeCase("raw", size) for size in ["0", "1", "512", "64k", "1G", "2P"]),
    SizeCase("raw", "1G", "preallocation=full"),
    SizeCase("raw", "65535", "preallocation=falloc"),
    # cluster sizes
    *(SizeCase("qcow2", size, "cluster_size=512") for size in ["0", "1", "64k", "1G"]),
    SizeCase("qcow2", "512", "cluster_size=4k"),
    SizeCase("qcow2", "64G", "cluster_size=4k"),
    SizeCase("qcow2", "1", "cluster_size=2M"),
    SizeCase("qcow2", "1T", "cluster_size=2M"),
    SizeCase("qcow2", "2P", "cluster_size=2M"),
    # refcount widths
    SizeCase("qcow2", "1G", "refcount_bits=1"),
    SizeCase("qcow2", "1G", "cluster_size=512,refcount_bits=2"),
    SizeCase("qcow2", "64G", "cluster_size=4k,refcount_bits=8"),
    SizeCase("qcow2", "1T", "refcount_bits=64"),
    SizeCase("qcow2", "2P", "cluster_size=2M,refcount_bits=64"),
    # extended L2 entries
    SizeCase("qcow2", "1G", "extended_l2=on"),
    SizeCase("qcow2", "64k", "cluster_size=16k,extended_l2=on"),
    SizeCase("qcow2", "64G", "cluster_size=2M,extended_l2=on"),
    SizeCase("qcow2", "2P", "cluster_size=2M,extended_l2=on"),
    # preallocation (changes "required" to the full size for falloc/full)
    SizeCase("qcow2", "1G", "preallocation=off"),
    SizeCase("qcow2", "1G", "preallocation=metadata"),
    SizeCase("qcow2", "64G", "preallocation=falloc"),
    SizeCase("qcow2", "2G", "preallocation=full"),
    SizeCase("qcow2", "2P", "preallocation=metadata"),
    SizeCase("qcow2", "1G", "cluster_size=512,preallocation=full,refcount_bits=1"),
    # options that do not change the numbers must still be accepted
    SizeCase("qcow2", "1G", "compat=0.10"),
    SizeCase("qcow2", "64G", "compat=1.1,lazy_refcounts=on,compression_type=zstd"),
    SizeCase("qcow2", "1G", "backing_file=base.qcow2,backing_fmt=qcow2"),
    # odd sizes, size suffixes and decimals
    SizeCase("qcow2", "65535", "cluster_size=4k"),
    SizeCase("qcow2", "1073742336"),
    SizeCase("qcow2", "1.5k"),
    SizeCase("qcow2", "0.5T", "cluster_size=2M,extended_l2=on,preallocation=falloc"),
]


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in SIZE_CASES])
def test_measure_size_matches_qemu_img(
    case: SizeCase, output: list[str], run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    assert_same_measure(run_qimg, run_qemu_img, [*output, *case.argv()])


TOO_LARGE_CASES = [
    SizeCase("qcow2", "2P", "cluster_size=512"),
    SizeCase("qcow2", "2P", "extended_l2=on"),
    SizeCase("qcow2", "7E"),
    SizeCase("qcow2", "64T", "cluster_size=512,preallocation=metadata"),
]


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in TOO_LARGE_CASES])
def test_measure_too_large_image_fails_like_qemu_img(
    case: SizeCase, output: list[str], run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    argv = [*output, *case.argv()]
    theirs = run_qemu_img("measure", *argv)
    assert (theirs.returncode, theirs.stdout) == (1, ""), theirs
    assert theirs.stderr == f"qemu-img: {TOO_LARGE}\n"
    ours = run_qimg("measure", *argv)
    assert ours.returncode == 1, f"qimg exit {ours.returncode}: {ours.stdout}{ours.stderr}"
    assert ours.stdout == ""
    assert ours.stderr.startswith("qimg: ")
    assert TOO_LARGE in ours.stderr


# --------------------------------------------------------------------------------------------
# Input files


#: Bytes written into the sparse raw input: unaligned single bytes and short runs straddling
#: 4k / 64k / 2M boundaries, so that extents and their rounding to clusters matter.
SCATTERED_WRITES = [
    (0, b"\x01"),
    (4095, b"\x02\x03"),  # straddles the first 4k boundary
    (64 * KiB - 1, b"\x04"),
    (1 * MiB + 17, b"\x05" * 100),
    (2 * MiB - 3, b"\x06" * 6),  # straddles a 2M boundary
    (5 * MiB, b"\x07" * 4096),
    (40 * MiB + 12345, b"\x08" * 70000),  # spans several 4k blocks and a 64k boundary
    (70 * MiB - 1, b"\x09"),
]
SCATTERED_SIZE = 100 * MiB + 123  # not a multiple of 512
FALLOCATED_RANGE = (20 * MiB, 1 * MiB)  # preallocated but never written


@dataclass(frozen=True)
class Inputs:
    scattered_raw: Path
    empty_raw: Path
    dense_raw: Path
    tail_only_raw: Path
    qcow2: Path
    qcow2_metadata_prealloc: Path


@pytest.fixture(scope="module")
def inputs(
    tmp_path_factory: pytest.TempPathFactory, run_qemu_img: RunCommand, run_qemu_io: RunCommand
) -> Inputs:
    d = tmp_path_factory.mktemp("measure-inputs")

    scattered = d / "scattered.raw"
    with scattered.open("wb") as f:
        f.truncate(SCATTERED_SIZE)
        for offset, data in SCATTERED_WRITES:
            os.pwrite(f.fileno(), data, offset)
        os.pwrite(f.fileno(), b"\x0a" * 23, SCATTERED_SIZE - 23)
        # without fallocate on this file system the range simply stays a plain hole
        with contextlib.suppress(OSError):
            os.posix_fallocate(f.fileno(), *FALLOCATED_RANGE)

    empty = d / "empty.raw"
    empty.write_bytes(b"")
    dense = d / "dense.raw"
    dense.write_bytes(bytes(range(256)) * 11 + b"odd")  # 2819 bytes, all data
    tail_only = d / "tail-only.raw"
    with tail_only.open("wb") as f:
        f.truncate(3 * MiB + 1)
        os.pwrite(f.fileno(), b"\xff", 3 * MiB)

    def qemu_ok(proc: subprocess.CompletedProcess[str]) -> None:
        assert proc.returncode == 0, proc

    qcow2 = d / "written.qcow2"
    qemu_ok(run_qemu_img("create", "-q", "-f", "qcow2", qcow2, "64M"))
    qemu_ok(
        run_qemu_io(
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 4k",
            "-c",
            "write -P 0x22 1049088 512",
            "-c",
            "write -P 0x33 33M 64k",
            "-c",
            "write -z 48M 1M",
            qcow2,
        )
    )
    prealloc = d / "metadata-prealloc.qcow2"
    qemu_ok(
        run_qemu_img("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", prealloc, "8M")
    )
    qemu_ok(run_qemu_io("-f", "qcow2", "-c", "write -P 0x44 2M 4k", prealloc))
    return Inputs(scattered, empty, dense, tail_only, qcow2, prealloc)


@dataclass(frozen=True)
class FileCase:
    id: str
    input: str  # an Inputs field name
    argv: list[str]  # between "measure" and the filename (output options come first)


FILE_CASES = [
    # the scattered raw file, into every cluster size and the options that matter
    *(
        FileCase(
            f"scattered-raw-to-qcow2-cs{cs or 'default'}",
            "scattered_raw",
            ["-f", "raw", "-O", "qcow2"] + (["-o", f"cluster_size={cs}"] if cs else []),
        )
        for cs in ["", "512", "4k", "64k", "2M"]
    ),
    FileCase(
        "scattered-raw-to-qcow2-extl2",
        "scattered_raw",
        ["-f", "raw", "-O", "qcow2", "-o", "extended_l2=on"],
    ),
    FileCase(
        "scattered-raw-to-qcow2-cs2M-extl2",
        "scattered_raw",
        ["-f", "raw", "-O", "qcow2", "-o", "cluster_size=2M,extended_l2=on"],
    ),
    FileCase(
        "scattered-raw-to-qcow2-cs4k-rb1",
        "scattered_raw",
        ["-f", "raw", "-O", "qcow2", "-o", "cluster_size=4k,refcount_bits=1"],
    ),
    FileCase(
        "scattered-raw-to-qcow2-compat0.10",
        "scattered_raw",
        ["-f", "raw", "-O", "qcow2", "-o", "compat=0.10"],
    ),
    *(
        FileCase(
            f"scattered-raw-to-qcow2-prealloc-{mode}",
            "scattered_raw",
            ["-f", "raw", "-O", "qcow2", "-o", f"preallocation={mode}"],
        )
        for mode in ["metadata", "falloc", "full"]
    ),
    FileCase(
        "scattered-raw-to-qcow2-with-backing-file",
        "scattered_raw",
        ["-f", "raw", "-O", "qcow2", "-o", "backing_file=base.raw,backing_fmt=raw"],
    ),
    FileCase("scattered-raw-to-raw", "scattered_raw", ["-f", "raw", "-O", "raw"]),
    FileCase("scattered-raw-default-target", "scattered_raw", ["-f", "raw"]),
    FileCase("scattered-raw-probed-to-qcow2", "scattered_raw", ["-O", "qcow2"]),
    # other raw inputs
    FileCase("empty-raw-to-qcow2", "empty_raw", ["-f", "raw", "-O", "qcow2"]),
    FileCase("empty-raw-to-raw", "empty_raw", ["-f", "raw", "-O", "raw"]),
    FileCase("dense-raw-to-qcow2", "dense_raw", ["-f", "raw", "-O", "qcow2"]),
    FileCase(
        "dense-raw-to-qcow2-cs512",
        "dense_raw",
        ["-f", "raw", "-O", "qcow2", "-o", "cluster_size=512"],
    ),
    FileCase("dense-raw-to-raw", "dense_raw", ["-f", "raw", "-O", "raw"]),
    FileCase(
        "tail-only-raw-to-qcow2-cs2M",
        "tail_only_raw",
        ["-f", "raw", "-O", "qcow2", "-o", "cluster_size=2M"],
    ),
    FileCase("tail-only-raw-to-qcow2", "tail_only_raw", ["-f", "raw", "-O", "qcow2"]),
]

# qcow2 inputs (a v3 target also reports "bitmaps size: 0"); the data is counted from
# the reader's block status, including the metadata-preallocated case whose data
# clusters are holes in the file.
QCOW2_FILE_CASES = [
    FileCase("qcow2-to-qcow2", "qcow2", ["-f", "qcow2", "-O", "qcow2"]),
    FileCase(
        "qcow2-to-qcow2-compat0.10", "qcow2", ["-f", "qcow2", "-O", "qcow2", "-o", "compat=0.10"]
    ),
    FileCase(
        "qcow2-to-qcow2-cs512", "qcow2", ["-f", "qcow2", "-O", "qcow2", "-o", "cluster_size=512"]
    ),
    FileCase("qcow2-to-raw", "qcow2", ["-f", "qcow2", "-O", "raw"]),
    FileCase(
        "metadata-prealloc-qcow2-to-qcow2",
        "qcow2_metadata_prealloc",
        ["-f", "qcow2", "-O", "qcow2"],
    ),
]


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=c.id) for c in [*FILE_CASES, *QCOW2_FILE_CASES]],
)
def test_measure_input_file_matches_qemu_img(
    case: FileCase,
    output: list[str],
    inputs: Inputs,
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
) -> None:
    path: Any = getattr(inputs, case.input)
    assert isinstance(path, Path)
    assert_same_measure(run_qimg, run_qemu_img, [*output, *case.argv, str(path)])


def test_scattered_input_really_is_sparse(inputs: Inputs) -> None:
    """Guards the fixture: without holes the scattered-input cases would prove little."""
    st = inputs.scattered_raw.stat()
    assert st.st_size == SCATTERED_SIZE
    assert st.st_blocks * 512 < 4 * MiB
