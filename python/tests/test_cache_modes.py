"""QEMU's cache modes (issue 16): ``-t`` (target) and ``-T`` (source) take every one of
qemu-img's values on convert, check, compare and amend, and ``qimg io`` takes qemu-io's
``-t``/``-n``. ``none`` opens with O_DIRECT, ``directsync`` with O_DIRECT and O_DSYNC,
``writethrough`` with O_DSYNC; the bytes written are the same in every mode and the same as
qemu-img's on the same command line, on a file system with 512-byte direct I/O (the test's
temporary directory) and on tmpfs (where a direct write pads the file to a page, as qemu-img's
does).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MountTmpfs, RunCommand, assert_ok

pytestmark = pytest.mark.qemu

MODES = ["none", "directsync", "writethrough", "writeback", "unsafe"]
#: An odd size (not a multiple of 4096) shows how each mode ends the file.
SIZE = (3 << 20) + 512


@pytest.fixture
def sources(tmp_path: Path, run_qemu_img: RunCommand, run_qemu_io: RunCommand) -> dict[str, Path]:
    raw = tmp_path / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(SIZE)
        f.seek(4096)
        f.write(os.urandom(1 << 20))
        f.seek(SIZE - 1000)
        f.write(b"\x7f" * 1000)
    qcow2 = tmp_path / "src.qcow2"
    assert_ok(run_qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, qcow2))
    assert_ok(run_qemu_io("-c", "write -z 2M 64k", qcow2))
    return {"raw": raw, "qcow2": qcow2}


@pytest.fixture
def tmpfs(mount_tmpfs: MountTmpfs) -> Path:
    return mount_tmpfs("64m")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("src_fmt", "out_fmt"), [("qcow2", "raw"), ("raw", "qcow2")])
def test_convert_in_every_cache_mode_writes_what_qemu_img_writes(
    sources: dict[str, Path],
    tmp_path: Path,
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    mode: str,
    src_fmt: str,
    out_fmt: str,
) -> None:
    src = sources[src_fmt]
    ours, theirs = tmp_path / f"ours.{out_fmt}", tmp_path / f"theirs.{out_fmt}"
    args = ["convert", "-t", mode, "-T", mode, "-f", src_fmt, "-O", out_fmt, src]
    assert_ok(run_qemu_img(*args, theirs))
    proc = run_qimg(*args, ours)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert ours.stat().st_size == theirs.stat().st_size
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("mode", ["none", "directsync"])
def test_direct_writes_on_tmpfs_end_the_file_as_qemu_img_does(
    sources: dict[str, Path], tmpfs: Path, run_qimg: RunCommand, run_qemu_img: RunCommand, mode: str
) -> None:
    ours, theirs = tmpfs / "ours.raw", tmpfs / "theirs.raw"
    args = ["convert", "-t", mode, "-f", "qcow2", "-O", "raw", sources["qcow2"]]
    assert_ok(run_qemu_img(*args, theirs))
    assert_ok(run_qimg(*args, ours))
    assert ours.stat().st_size == theirs.stat().st_size
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize(
    ("mode", "flags"),
    [
        ("none", {"O_DIRECT"}),
        ("directsync", {"O_DIRECT", "O_DSYNC"}),
        ("writethrough", {"O_DSYNC"}),
    ],
)
def test_the_target_is_opened_with_the_mode_flags(
    sources: dict[str, Path], tmp_path: Path, strace: str, mode: str, flags: set[str]
) -> None:
    out = tmp_path / "out.raw"
    log = tmp_path / "strace.log"

    proc = subprocess.run(
        [strace, "-f", "-e", "trace=openat", "-o", str(log), sys.executable, "-m", "qimg",
         "convert", "-t", mode, "-f", "qcow2", "-O", "raw", str(sources["qcow2"]), str(out)],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    opens = [line for line in log.read_text().splitlines() if f'"{out}"' in line]
    rw = [line for line in opens if "O_RDWR" in line]
    assert rw, opens
    opened = set(re.findall(r"O_[A-Z]+", rw[-1]))
    assert flags <= opened, rw[-1]
    if "O_DIRECT" not in flags:
        assert "O_DIRECT" not in opened


@pytest.mark.parametrize("mode", ["none", "directsync", "writethrough"])
def test_check_compare_amend_and_io_take_cache_modes(
    sources: dict[str, Path],
    tmp_path: Path,
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    run_qemu_io: RunCommand,
    mode: str,
) -> None:
    src = sources["qcow2"]
    for args in (["check", "-T", mode, src], ["compare", "-T", mode, src, sources["raw"]]):
        ours, theirs = run_qimg(*args), run_qemu_img(*args)
        assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout), ours.stderr
    ours_img, theirs_img = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    for img in (ours_img, theirs_img):
        img.write_bytes(src.read_bytes())
    assert_ok(run_qimg("amend", "-t", mode, "-o", "lazy_refcounts=on", ours_img))
    assert_ok(run_qemu_img("amend", "-t", mode, "-o", "lazy_refcounts=on", theirs_img))
    assert ours_img.read_bytes() == theirs_img.read_bytes()
    assert_ok(run_qimg("io", "-t", mode, "-c", "write -P 0x42 1000 5000", ours_img))
    assert_ok(run_qemu_io("-t", mode, "-c", "write -P 0x42 1000 5000", theirs_img))
    assert_ok(run_qemu_img("check", ours_img))
    assert run_qemu_img("compare", ours_img, theirs_img).returncode == 0
    assert_ok(run_qimg("io", "-n", "-c", "read -P 0x42 1000 5000", ours_img))


@pytest.mark.parametrize(
    "args",
    [
        ["convert", "-t", "bogus", "SRC", "OUT"],
        ["convert", "-T", "bogus", "SRC", "OUT"],
        ["check", "-T", "bogus", "SRC"],
        ["compare", "-T", "bogus", "SRC", "SRC"],
        ["amend", "-t", "bogus", "-o", "lazy_refcounts=on", "SRC"],
    ],
    ids=["convert-t", "convert-T", "check-T", "compare-T", "amend-t"],
)
def test_an_unknown_cache_mode_is_refused_as_qemu_img_refuses_it(
    sources: dict[str, Path],
    tmp_path: Path,
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    args: list[str],
) -> None:
    def argv(out: str) -> list[str]:
        names = {"SRC": str(sources["qcow2"]), "OUT": str(tmp_path / out)}
        return [names.get(a, a) for a in args]

    theirs, ours = run_qemu_img(*argv("theirs.raw")), run_qimg(*argv("ours.raw"))
    assert ours.returncode == theirs.returncode != 0
    assert ours.stdout == theirs.stdout == ""
    assert ours.stderr == theirs.stderr.replace("qemu-img: ", "qimg: ")
    assert not (tmp_path / "ours.raw").exists()  # refused before anything is created
