"""``qimg check -r leaks|all`` against ``qemu-img check -r`` (QEMU 10.0.2 is the oracle here).

Each damaged image is made once with qemu-img / qemu-io plus byte pokes. Every test copies it
twice into directories of their own (the image is ``t.qcow2`` in both, so file names in the
output agree), runs ``qemu-img check -r MODE`` on one copy and ``qimg check -r MODE`` on the
other, and requires the same exit status, the same stdout byte for byte and the same stderr
(qemu-img's with the differences of ``QIMG_WORDING`` applied). When qemu-img's repair succeeds,
both repaired images must then pass ``qemu-img check`` and hold the same guest data
(``qemu-img compare``).

Where qimg deliberately does something else than qemu-img, ``DELIBERATE`` says what and why,
and a test of its own proves what qimg does instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import qimg
from conftest import COMMAND_TIMEOUT_S

pytestmark = pytest.mark.qemu

KiB = 1024
CLUSTER = 64 * KiB
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
COPIED = 1 << 63

#: qemu-img's stderr lines as qimg prints them (deliberate rewording, not behaviour).
QIMG_WORDING: list[tuple[str, str]] = [
    # qimg names the image in its closing line, as in its other errors.
    (r"^qemu-img: Check failed", "qimg: t.qcow2: Check failed"),
    (r"^qemu-img: ", "qimg: "),
]

#: Where qimg's repair does something else than qemu-img 10.0.2, on purpose.
DELIBERATE = {
    "reftable-reserved-bits": (
        "A refcount table entry with reserved bits set is rebuilt. qemu-img's rebuild puts the "
        "new refcount block where the broken entry points, its own overlap check then refuses "
        "the write, and the repair fails leaving the image marked corrupt."
    ),
    "refblock-unaligned": (
        "The same for an unaligned refcount block offset; qimg also drops the 'Can't get "
        "refcount' errors of the replaced structure, so the repaired image is marked clean."
    ),
    "dirty-bit-after-failure": (
        "qemu-img clears the dirty bit (lazy refcounts) when it closes the image, even after a "
        "repair that could not complete; qimg keeps it until the image is clean, so that the "
        "image is still repaired before it is written to."
    ),
    "one-line-errors": (
        "Usage errors are one 'qimg:' line: no 'Try qemu-img check --help' hint, and for raw "
        "images no warning about probing (qimg writes nothing to raw images)."
    ),
}


# --------------------------------------------------------------------------------------------
# Making damaged images


def be64(path: Path, at: int) -> int:
    with path.open("rb") as f:
        f.seek(at)
        value: int = struct.unpack(">Q", f.read(8))[0]
        return value


def poke(path: Path, at: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(at)
        f.write(data)


def poke64(path: Path, at: int, value: int) -> None:
    poke(path, at, struct.pack(">Q", value))


def l1_of(path: Path) -> int:
    return be64(path, 40)


def reftable_of(path: Path) -> int:
    return be64(path, 48)


def l2_of(path: Path) -> int:
    return be64(path, l1_of(path)) & OFFSET_MASK


def refblock_of(path: Path) -> int:
    return be64(path, reftable_of(path)) & OFFSET_MASK


def set_refcount(path: Path, cluster: int, value: int) -> None:
    """The 16-bit refcount of ``cluster`` (first refcount block)."""
    poke(path, refblock_of(path) + 2 * cluster, struct.pack(">H", value))


def truncate(path: Path, length: int) -> None:
    os.truncate(path, length)


class Tools:
    """QEMU's tools for building images; every step must do what it is asked."""

    def __init__(self, qemu_img: str, qemu_io: str) -> None:
        self._qemu_img = qemu_img
        self._qemu_io = qemu_io

    def img(self, *args: str | Path) -> None:
        proc = run([self._qemu_img, *map(str, args)])
        assert proc.returncode == 0, f"qemu-img {args}: {proc.stderr}"

    def io(self, path: Path, *commands: str, killed: bool = False) -> None:
        argv = [self._qemu_io, "-f", "qcow2"]
        for command in [*commands, *(["sigraise 9"] if killed else [])]:
            argv += ["-c", command]
        proc = run([*argv, str(path)])
        if killed:
            assert proc.returncode == -9, f"qemu-io was to be killed: {proc.stderr}"
        else:
            assert proc.returncode == 0 and "error" not in proc.stdout + proc.stderr, proc.stderr

    def qcow2(self, path: Path, size: str, *writes: str, options: str = "") -> None:
        self.img("create", "-q", "-f", "qcow2", *(["-o", options] if options else []), path, size)
        if writes:
            self.io(path, *writes)


def run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        check=False,
        timeout=COMMAND_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
    )


Build = Callable[[Path, Tools], None]
SCENARIOS: dict[str, Build] = {}


def scenario(name: str) -> Callable[[Build], Build]:
    def register(build: Build) -> Build:
        SCENARIOS[name] = build
        return build

    return register


def base(path: Path, t: Tools) -> None:
    """4M, 64k clusters: header, refcount table, refcount block, L1, L2, then the data of
    guest 0, 64k and 1M in clusters 5, 6 and 7."""
    t.qcow2(path, "4M", "write -P 1 0 128k", "write -P 2 1M 64k")


@scenario("clean")
def _clean(path: Path, t: Tools) -> None:
    base(path, t)


@scenario("leaked-clusters")
def _leaks(path: Path, t: Tools) -> None:
    base(path, t)
    truncate(path, 10 * CLUSTER)
    set_refcount(path, 8, 1)
    set_refcount(path, 9, 3)


@scenario("leaked-cluster-with-data")
def _leak_data(path: Path, t: Tools) -> None:
    base(path, t)
    poke64(path, l2_of(path) + 8, 0)


@scenario("refcount-zero")
def _refcount_zero(path: Path, t: Tools) -> None:
    base(path, t)
    set_refcount(path, 5, 0)


@scenario("refcount-too-low")
def _too_low(path: Path, t: Tools) -> None:
    base(path, t)
    t.img("snapshot", "-c", "s1", path)
    set_refcount(path, 5, 1)


@scenario("copied-flags")
def _copied(path: Path, t: Tools) -> None:
    base(path, t)
    l1, l2 = l1_of(path), l2_of(path)
    poke64(path, l1, be64(path, l1) & ~COPIED)
    poke64(path, l2, be64(path, l2) & ~COPIED)


@scenario("refblock-on-l2-table")
def _refblock_on_l2(path: Path, t: Tools) -> None:
    base(path, t)
    poke64(path, reftable_of(path), l2_of(path))


@scenario("refblock-beyond-eof")
def _refblock_beyond(path: Path, t: Tools) -> None:
    base(path, t)
    poke64(path, reftable_of(path) + 8, 0x10_0000)


@scenario("zero-cluster-unaligned")
def _zero_unaligned(path: Path, t: Tools) -> None:
    base(path, t)
    poke64(path, l2_of(path) + 24, COPIED | 0x7_0200 | 1)


@scenario("l2-entry-into-l1")
def _into_l1(path: Path, t: Tools) -> None:
    base(path, t)
    poke64(path, l2_of(path) + 16, COPIED | l1_of(path))


@scenario("dirty-lazy-refcounts")
def _dirty(path: Path, t: Tools) -> None:
    t.qcow2(path, "4M", options="lazy_refcounts=on")
    t.io(path, "write -P 7 0 64k", "write -P 8 1M 128k", killed=True)


@scenario("dirty-512-byte-clusters")
def _dirty_small(path: Path, t: Tools) -> None:
    t.qcow2(path, "32M", options="cluster_size=512,lazy_refcounts=on")
    t.io(path, "write -P 3 0 12M", "write -P 4 20M 1M", killed=True)


@scenario("dirty-1-bit-refcounts")
def _dirty_1bit(path: Path, t: Tools) -> None:
    t.qcow2(path, "8M", options="refcount_bits=1,lazy_refcounts=on,cluster_size=4k")
    t.io(path, "write -P 5 0 1M", "write -P 6 5M 64k", killed=True)


@scenario("corrupt-bit")
def _corrupt_bit(path: Path, t: Tools) -> None:
    base(path, t)
    poke64(path, 72, 2)


@scenario("v2-leak")
def _v2(path: Path, t: Tools) -> None:
    t.qcow2(path, "4M", "write -P 1 0 128k", options="compat=0.10")
    end = -(-path.stat().st_size // CLUSTER)
    truncate(path, (end + 1) * CLUSTER)
    set_refcount(path, end, 2)


@scenario("compressed-leak")
def _compressed(path: Path, t: Tools) -> None:
    source = path.with_name("source.qcow2")
    base(source, t)
    t.img("convert", "-c", "-O", "qcow2", source, path)
    source.unlink()
    end = -(-path.stat().st_size // CLUSTER)
    truncate(path, (end + 1) * CLUSTER)
    set_refcount(path, end, 1)


@scenario("reftable-reserved-bits")
def _reserved(path: Path, t: Tools) -> None:
    base(path, t)
    poke64(path, reftable_of(path), be64(path, reftable_of(path)) | 1)


@scenario("refblock-unaligned")
def _unaligned(path: Path, t: Tools) -> None:
    base(path, t)
    poke64(path, reftable_of(path), refblock_of(path) + 512)


#: Scenarios where qemu-img and qimg are to agree on everything.
MATCHING = [name for name in SCENARIOS if name not in DELIBERATE]


# --------------------------------------------------------------------------------------------
# Running both tools


@dataclass
class Images:
    root: Path
    tools: Tools

    def original(self, name: str) -> Path:
        path = self.root / "originals" / name / "t.qcow2"
        if not path.exists():
            path.parent.mkdir(parents=True)
            SCENARIOS[name](path, self.tools)
        return path

    def copies(self, name: str, tmp: Path) -> tuple[Path, Path]:
        """Fresh copies of scenario ``name``: (qemu-img's, qimg's), both named t.qcow2."""
        original = self.original(name)
        out = []
        for who in ("qemu", "qimg"):
            (tmp / who).mkdir()
            out.append(Path(shutil.copy2(original, tmp / who / "t.qcow2")))
        return out[0], out[1]


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory, qemu_img: str, qemu_io: str) -> Images:
    return Images(tmp_path_factory.mktemp("repair"), Tools(qemu_img, qemu_io))


def qimg_run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "qimg", *args], cwd=cwd)


def reworded(stderr: str) -> str:
    """qemu-img's stderr as qimg is expected to print it."""
    lines = []
    for line in stderr.splitlines(keepends=True):
        for pattern, replacement in QIMG_WORDING:
            new = re.sub(pattern, replacement, line)
            if new != line:
                line = new
                break
        lines.append(line)
    return "".join(lines)


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}"


def assert_same(
    ours: subprocess.CompletedProcess[str], theirs: subprocess.CompletedProcess[str]
) -> None:
    context = f"\n=== qimg: {describe(ours)}\n=== qemu-img: {describe(theirs)}"
    assert ours.returncode == theirs.returncode, "exit status" + context
    assert ours.stdout == theirs.stdout, "stdout" + context
    assert ours.stderr == reworded(theirs.stderr), "stderr" + context


def both_repair(
    images: Images, qemu_img: str, name: str, tmp: Path, *args: str
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str], Path, Path]:
    theirs_path, ours_path = images.copies(name, tmp)
    theirs = run([qemu_img, "check", *args, "t.qcow2"], cwd=theirs_path.parent)
    ours = qimg_run("check", *args, "t.qcow2", cwd=ours_path.parent)
    return ours, theirs, ours_path, theirs_path


def assert_repaired_alike(qemu_img: str, ours: Path, theirs: Path) -> None:
    for path in (ours, theirs):
        proc = run([qemu_img, "check", str(path)])
        assert proc.returncode == 0, f"{path} after repair: {describe(proc)}"
    proc = run([qemu_img, "compare", str(theirs), str(ours)])
    assert proc.returncode == 0, f"guest data differs: {describe(proc)}"


# --------------------------------------------------------------------------------------------
# The comparisons


@pytest.mark.parametrize("output", ["human", "json"])
@pytest.mark.parametrize("mode", ["leaks", "all"])
@pytest.mark.parametrize("name", MATCHING)
def test_repair_matches_qemu_img(
    images: Images, qemu_img: str, tmp_path: Path, name: str, mode: str, output: str
) -> None:
    ours, theirs, ours_path, theirs_path = both_repair(
        images, qemu_img, name, tmp_path, "-r", mode, f"--output={output}"
    )
    assert_same(ours, theirs)
    if theirs.returncode == 0:
        assert_repaired_alike(qemu_img, ours_path, theirs_path)


@pytest.mark.parametrize("name", ["leaked-clusters", "refcount-zero", "copied-flags"])
def test_quiet_repair_matches_qemu_img(
    images: Images, qemu_img: str, tmp_path: Path, name: str
) -> None:
    ours, theirs, ours_path, theirs_path = both_repair(
        images, qemu_img, name, tmp_path, "-q", "-r", "all"
    )
    assert_same(ours, theirs)
    assert ours.stdout == ""
    assert_repaired_alike(qemu_img, ours_path, theirs_path)


def test_repair_lines_and_summary_are_qemu_img_s(
    images: Images, qemu_img: str, tmp_path: Path
) -> None:
    """A guard on the comparison itself: what is compared is really there."""
    ours, _, _, _ = both_repair(images, qemu_img, "leaked-clusters", tmp_path, "-r", "leaks")
    assert ours.returncode == 0
    assert ours.stderr.splitlines() == [
        "Leaked cluster 8 refcount=1 reference=0",
        "Leaked cluster 9 refcount=3 reference=0",
        "Repairing cluster 8 refcount=1 reference=0",
        "Repairing cluster 9 refcount=3 reference=0",
    ]
    assert ours.stdout.startswith(
        "The following inconsistencies were found and repaired:\n\n"
        "    2 leaked clusters\n    0 corruptions\n\nDouble checking the fixed image now...\n"
        "No errors were found on the image.\n"
    )


def test_a_second_repair_finds_nothing(images: Images, qemu_img: str, tmp_path: Path) -> None:
    _, _, ours_path, _ = both_repair(
        images, qemu_img, "dirty-lazy-refcounts", tmp_path, "-r", "all"
    )
    again = qimg_run("check", "-r", "all", "t.qcow2", cwd=ours_path.parent)
    assert (again.returncode, again.stderr) == (0, "")
    assert again.stdout.startswith("No errors were found on the image.\n")


# --------------------------------------------------------------------------------------------
# Usage


def test_unknown_repair_mode_is_refused(images: Images, qemu_img: str, tmp_path: Path) -> None:
    ours, theirs, ours_path, theirs_path = both_repair(
        images, qemu_img, "leaked-clusters", tmp_path, "-r", "everything"
    )
    assert ours.returncode == theirs.returncode == 1
    # DELIBERATE["one-line-errors"]: qemu-img's first line, without its --help hint.
    assert ours.stderr == reworded(theirs.stderr.splitlines(keepends=True)[0])
    assert ours_path.read_bytes() == theirs_path.read_bytes()


def test_force_share_with_repair_is_refused(images: Images, qemu_img: str, tmp_path: Path) -> None:
    ours, theirs, ours_path, theirs_path = both_repair(
        images, qemu_img, "leaked-clusters", tmp_path, "-U", "-r", "leaks"
    )
    assert_same(ours, theirs)
    assert ours_path.read_bytes() == theirs_path.read_bytes()


@pytest.mark.parametrize("fmt", [None, "raw"])
def test_raw_images_have_nothing_to_repair(qemu_img: str, tmp_path: Path, fmt: str | None) -> None:
    path = tmp_path / "t.raw"
    path.write_bytes(b"\x01" * 65536)
    fmt_args = ["-f", fmt] if fmt else []
    theirs = run([qemu_img, "check", *fmt_args, "-r", "all", "t.raw"], cwd=tmp_path)
    ours = qimg_run("check", *fmt_args, "-r", "all", "t.raw", cwd=tmp_path)
    assert ours.returncode == theirs.returncode == 63
    assert ours.stdout == theirs.stdout == ""
    # qemu-img's own line (it warns about probing raw first; qimg does not).
    assert theirs.stderr.endswith("qemu-img: This image format does not support checks\n")
    assert ours.stderr == "qimg: This image format does not support checks\n"
    assert path.read_bytes() == b"\x01" * 65536


def write_locked(path: Path) -> bool:
    """Whether some process holds QEMU's "write not shared" lock (byte 201) on ``path``,
    as /proc/locks lists it (without taking a lock that would race with the holder)."""
    inode = path.stat().st_ino
    with open("/proc/locks", encoding="ascii") as f:
        for line in f:
            fields = line.split()
            if "OFDLCK" in fields and fields[-3].endswith(f":{inode}") and fields[-2] == "201":
                return True
    return False


def test_an_image_in_use_is_not_repaired(
    images: Images, qemu_img: str, qemu_io: str, tmp_path: Path
) -> None:
    _, ours_path = images.copies("leaked-clusters", tmp_path)
    before = ours_path.read_bytes()
    holder = subprocess.Popen(
        [qemu_io, "-f", "qcow2", str(ours_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):  # until qemu-io holds the image's locks
            if write_locked(ours_path):
                break
            time.sleep(0.05)
        else:
            pytest.fail("qemu-io did not lock the image")
        ours = qimg_run("check", "-r", "leaks", "t.qcow2", cwd=ours_path.parent)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=COMMAND_TIMEOUT_S)
    assert ours.returncode == 1
    assert ours.stdout == ""
    assert ours.stderr == (
        "qimg: Could not open 't.qcow2': Failed to get \"write\" lock\n"
        "Is another process using the image [t.qcow2]?\n"
    )
    assert ours_path.read_bytes() == before


# --------------------------------------------------------------------------------------------
# The deliberate differences


@pytest.mark.parametrize("name", ["reftable-reserved-bits", "refblock-unaligned"])
def test_broken_refcount_table_entries_are_rebuilt(
    images: Images, qemu_img: str, tmp_path: Path, name: str
) -> None:
    ours, theirs, ours_path, _ = both_repair(images, qemu_img, name, tmp_path, "-r", "all")
    # qemu-img 10.0.2 gives up (DELIBERATE[name]) ...
    assert theirs.returncode == 1
    assert "qemu-img: Check failed: Input/output error" in theirs.stderr
    # ... qimg rebuilds: the same lines up to the rebuild, then a clean image.
    assert ours.returncode == 0, describe(ours)
    qemu_lines = theirs.stderr.splitlines()
    rebuilt = qemu_lines.index("Rebuilding refcount structure")
    assert ours.stderr.splitlines()[: rebuilt + 1] == qemu_lines[: rebuilt + 1]
    assert "    1 corruptions\n" in ours.stdout
    assert "Double checking the fixed image now...\nNo errors were found" in ours.stdout
    assert run([qemu_img, "check", str(ours_path)]).returncode == 0
    original = images.original("clean")
    assert run([qemu_img, "compare", str(original), str(ours_path)]).returncode == 0
    info = run([qemu_img, "info", str(ours_path)])
    assert "corrupt: false" in info.stdout


def test_dirty_bit_stays_after_a_failed_repair(
    images: Images, qemu_img: str, tmp_path: Path
) -> None:
    ours, theirs, ours_path, theirs_path = both_repair(
        images, qemu_img, "dirty-lazy-refcounts", tmp_path, "-r", "leaks"
    )
    assert_same(ours, theirs)
    assert ours.returncode == 1
    # DELIBERATE["dirty-bit-after-failure"]
    assert be64(theirs_path, 72) & 1 == 0
    assert be64(ours_path, 72) & 1 == 1


# --------------------------------------------------------------------------------------------
# The Python API


def qemu_json(qemu_img: str, path: Path, *args: str) -> dict[str, int | str]:
    proc = run([qemu_img, "check", "--output=json", *args, str(path)])
    out: dict[str, int | str] = json.loads(proc.stdout)
    return out


@pytest.mark.parametrize("name", ["leaked-clusters", "refblock-on-l2-table", "copied-flags"])
def test_api_repair_reports_what_qemu_img_reports(
    images: Images, qemu_img: str, tmp_path: Path, name: str
) -> None:
    theirs_path, ours_path = images.copies(name, tmp_path)
    expected = qemu_json(qemu_img, theirs_path, "-r", "all")
    report = qimg.check(ours_path, repair="all")
    assert report.as_json() == {**expected, "filename": str(ours_path)}
    assert report.exit_status == 0
    assert report.repair_messages, "the repair's lines are kept"
    assert report.messages == []


def test_api_without_anything_to_repair(images: Images, tmp_path: Path) -> None:
    _, ours_path = images.copies("clean", tmp_path)
    before = ours_path.read_bytes()
    report = qimg.check(ours_path, repair="leaks")
    assert (report.leaks_fixed, report.corruptions_fixed, report.repair_messages) == (0, 0, [])
    assert report.exit_status == 0
    assert ours_path.read_bytes() == before


def test_api_repair_failures_raise(images: Images, tmp_path: Path) -> None:
    _, ours_path = images.copies("refcount-zero", tmp_path)
    with pytest.raises(qimg.ImageIOError, match="Input/output error"):
        qimg.check(ours_path, repair="leaks")
    with pytest.raises(qimg.UsageError, match="expects 'leaks' or 'all'"):
        qimg.check(ours_path, repair="most")  # type: ignore[arg-type]


def test_api_refuses_to_repair_raw_images(tmp_path: Path) -> None:
    path = tmp_path / "t.raw"
    path.write_bytes(bytes(4096))
    with pytest.raises(qimg.UsageError, match="does not support checks"):
        qimg.check(path, repair="all")
