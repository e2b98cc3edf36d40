"""Crash safety of the life-cycle commands: ``qimg commit``, ``rebase`` (safe mode),
``snapshot -c/-a/-d``, ``bitmap`` changes and writes to an image with bitmaps are
killed with SIGKILL at moments spread over their run. After every kill, ``qemu-img
check`` must find no corruption (leaked clusters are allowed), and the guest content
must be the old or the new one: commit and rebase never change what the image reads,
snapshot -c and -d never change the active content, and a snapshot that is listed
reads what it saved; snapshot -a leaves the old content or the snapshot's.

The snapshot commands are also killed at each of their writes in turn (strace injects
the SIGKILL as the write starts), so every state they can leave on disk is checked,
not only the ones a timer happens to hit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import RunCommand

MiB = 1 << 20
ROUNDS = 6


def _qimg(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "qimg", *map(str, args)]


def _chain(tmp: Path, run_qemu_img: RunCommand, run_qemu_io: RunCommand) -> Path:
    """base.qcow2 <- top.qcow2, data in both, partly overlapping; returns top."""
    base, top = tmp / "base.qcow2", tmp / "top.qcow2"
    assert run_qemu_img("create", "-q", "-f", "qcow2", base, 16 * MiB).returncode == 0
    _striped(run_qemu_io, base, 1, "512k")
    made = run_qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    assert made.returncode == 0
    _striped(run_qemu_io, top, 100, "768k")
    return top


def _striped(run_qemu_io: RunCommand, image: Path, first: int, length: str) -> None:
    """Writes pattern `first + i` at i MiB, `length` bytes, for each MiB of 16."""
    writes = [f"write -P {first + i} {i}M {length}" for i in range(16)]
    assert run_qemu_io(*[a for w in writes for a in ("-c", w)], image).returncode == 0


def _raw_of(run_qemu_img: RunCommand, image: Path, out: Path, *extra: str) -> bytes:
    got = run_qemu_img("convert", "-U", *extra, "-O", "raw", image, out)
    assert got.returncode == 0, got.stderr
    data = out.read_bytes()
    out.unlink()
    return data


def _assert_clean(run_qemu_img: RunCommand, image: Path) -> None:
    """No corruption; leaked clusters are allowed."""
    got = run_qemu_img("check", "--output=json", image)
    report = json.loads(got.stdout)
    assert report.get("check-errors", 0) == 0, got.stdout + got.stderr
    assert report.get("corruptions", 0) == 0, got.stdout + got.stderr


def _kill_at(argv: list[str], cwd: Path, delay: float) -> None:
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(delay)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _duration(argv: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return time.perf_counter() - start


def _crash_rounds(
    pristine: Path,
    work: Path,
    argv: list[str],
    verify: Callable[[Path], None],
) -> None:
    """Copies `pristine` to `work`, runs argv in it to measure it, then kills it at
    delays spread over that time, verifying the copy after each kill."""

    def fresh() -> None:
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(pristine, work)

    fresh()
    took = _duration(argv, work)
    verify(work)
    for i in range(ROUNDS):
        fresh()
        _kill_at(argv, work, took * (i + 0.5) / ROUNDS)
        verify(work)


@pytest.mark.parametrize("command", ["commit", "rebase", "rebase-standalone"])
def test_commit_and_rebase_survive_a_kill(
    tmp_path: Path, command: str, run_qemu_img: RunCommand, run_qemu_io: RunCommand
) -> None:
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    top = _chain(pristine, run_qemu_img, run_qemu_io)
    # A new base for the rebase: base's data but other bytes in half of it.
    new = pristine / "new.qcow2"
    shutil.copy(pristine / "base.qcow2", new)
    assert run_qemu_io("-c", "write -P 0xee 4M 4M", new).returncode == 0
    want = _raw_of(run_qemu_img, top, tmp_path / "want.raw")
    argv = {
        "commit": _qimg("commit", "-q", "top.qcow2"),
        "rebase": _qimg("rebase", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2"),
        "rebase-standalone": _qimg("rebase", "-b", "", "top.qcow2"),
    }[command]

    def verify(work: Path) -> None:
        for image in ("top.qcow2", "base.qcow2"):
            _assert_clean(run_qemu_img, work / image)
        assert _raw_of(run_qemu_img, work / "top.qcow2", tmp_path / "got.raw") == want

    _crash_rounds(pristine, tmp_path / "work", argv, verify)


def _snapshot_case(
    tmp_path: Path, op: str, run_qemu_img: RunCommand, run_qemu_io: RunCommand
) -> tuple[Path, list[str], Callable[[Path], None]]:
    """A 16 MiB image (with snapshot s1 and later writes, unless op is -c), the
    command, and the check of a copy it ran on."""
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    image = pristine / "t.qcow2"
    assert run_qemu_img("create", "-q", "-f", "qcow2", image, 16 * MiB).returncode == 0
    _striped(run_qemu_io, image, 1, "512k")
    saved = _raw_of(run_qemu_img, image, tmp_path / "saved.raw")
    if op != "-c":
        assert run_qemu_img("snapshot", "-c", "s1", image).returncode == 0
        _striped(run_qemu_io, image, 50, "768k")
        assert run_qemu_img("snapshot", "-c", "s2", image).returncode == 0
        assert run_qemu_io("-c", "write -P 9 2M 3M", image).returncode == 0
    current = _raw_of(run_qemu_img, image, tmp_path / "current.raw")

    def verify(work: Path) -> None:
        path = work / "t.qcow2"
        _assert_clean(run_qemu_img, path)
        got = _raw_of(run_qemu_img, path, tmp_path / "got.raw")
        assert got == current or (op == "-a" and got == saved)
        listed = run_qemu_img("snapshot", "-l", path).stdout
        if " s1 " in listed:
            snap = _raw_of(run_qemu_img, path, tmp_path / "snap.raw", "-l", "snapshot.name=s1")
            assert snap == saved

    return pristine, _qimg("snapshot", op, "s1", "t.qcow2"), verify


@pytest.mark.parametrize("op", ["-c", "-d", "-a"])
def test_snapshot_commands_survive_a_kill(
    tmp_path: Path, op: str, run_qemu_img: RunCommand, run_qemu_io: RunCommand
) -> None:
    pristine, argv, verify = _snapshot_case(tmp_path, op, run_qemu_img, run_qemu_io)
    _crash_rounds(pristine, tmp_path / "work", argv, verify)


@pytest.mark.parametrize("op", ["-c", "-d", "-a"])
def test_snapshot_commands_survive_a_kill_at_each_write(
    tmp_path: Path, op: str, strace: str, run_qemu_img: RunCommand, run_qemu_io: RunCommand
) -> None:
    pristine, argv, verify = _snapshot_case(tmp_path, op, run_qemu_img, run_qemu_io)
    work = tmp_path / "work"
    kills = 0
    for n in range(1, 200):
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(pristine, work)
        inject = f"inject=pwrite64:signal=KILL:when={n}"
        done = subprocess.run(
            [strace, "-f", "-qq", "-o", "/dev/null", "-e", "trace=pwrite64", "-e", inject, *argv],
            cwd=work,
            capture_output=True,
            check=False,
        )
        verify(work)
        if done.returncode == 0:
            break
        assert done.returncode == -signal.SIGKILL or done.returncode == 128 + signal.SIGKILL
        kills += 1
    else:
        pytest.fail("the command still writes after 200 writes")
    # The command writes tables, refcounts and the header: several kill points.
    assert kills >= 3


@pytest.mark.parametrize(
    "args",
    [
        ["bitmap", "--add", "t.qcow2", "new"],
        ["bitmap", "--remove", "t.qcow2", "b1"],
        ["bitmap", "--clear", "t.qcow2", "b1"],
        ["bitmap", "--merge", "b1", "--disable", "t.qcow2", "b2"],
        ["io", "-c", "write -P 7 0 4M", "-c", "write -P 8 8M 4M", "t.qcow2"],
    ],
)
def test_bitmap_changes_survive_a_kill(
    tmp_path: Path, args: list[str], run_qemu_img: RunCommand, run_qemu_io: RunCommand
) -> None:
    """After a kill: no corruption; the bitmaps are the old set or the new one, each
    either readable or flagged in use (a writer that died); a bitmap command leaves
    the guest content as it was."""
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    image = pristine / "t.qcow2"
    assert run_qemu_img("create", "-q", "-f", "qcow2", image, 16 * MiB).returncode == 0
    _striped(run_qemu_io, image, 1, "512k")
    for name in ("b1", "b2"):
        assert run_qemu_img("bitmap", "--add", "-g", "4k", image, name).returncode == 0
    assert run_qemu_io("-c", "write 1M 64k", image).returncode == 0
    before = _raw_of(run_qemu_img, image, tmp_path / "before.raw")
    names_before = _bitmap_names(run_qemu_img, image)

    def verify(work: Path) -> None:
        path = work / "t.qcow2"
        _assert_clean(run_qemu_img, path)
        names = _bitmap_names(run_qemu_img, path)
        if args[0] == "bitmap":
            assert _raw_of(run_qemu_img, path, tmp_path / "got.raw") == before
            assert set(names) in (
                set(names_before),
                set(names_before) | {"new"},
                set(names_before) - {"b1"},
            )

    _crash_rounds(pristine, tmp_path / "work", _qimg(*args), verify)


def _bitmap_names(run_qemu_img: RunCommand, image: Path) -> list[str]:
    got = run_qemu_img("info", "--output=json", image)
    assert got.returncode == 0, got.stderr
    data = json.loads(got.stdout)["format-specific"]["data"]
    return [b["name"] for b in data.get("bitmaps", [])]
