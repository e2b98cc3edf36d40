"""``qimg snapshot -l`` against ``qemu-img snapshot -l``, and ``Image.snapshots()``.
Creating, applying and deleting snapshots are refused by name until qimg writes them."""

from __future__ import annotations

from pathlib import Path

import pytest

import qimg
from conftest import RunCommand, assert_ok


@pytest.fixture
def with_snapshots(tmp_path: Path, run_qemu_img: RunCommand, run_qemu_io: RunCommand) -> Path:
    path = tmp_path / "snap.qcow2"
    assert_ok(run_qemu_img("create", "-q", "-f", "qcow2", path, "4M"))
    assert_ok(run_qemu_io("-c", "write -P 0x11 0 64k", path))
    for name in ("first", "a much longer snapshot name", "third"):
        assert_ok(run_qemu_img("snapshot", "-c", name, path))
    assert_ok(run_qemu_img("snapshot", "-d", "third", path))
    return path


@pytest.mark.parametrize("args", [["-l"], [], ["-U"], ["-l", "-f", "qcow2"], ["-q"]])
def test_snapshot_list_is_qemu_imgs(
    with_snapshots: Path, args: list[str], run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    ours = run_qimg("snapshot", *args, with_snapshots)
    theirs = run_qemu_img("snapshot", *args, with_snapshots)
    assert (ours.returncode, ours.stdout, ours.stderr) == (theirs.returncode, theirs.stdout, "")
    assert "a much longer snapshot name" in ours.stdout  # -q too, as qemu-img


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_an_image_without_snapshots_lists_nothing(
    tmp_path: Path, fmt: str, run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    path = tmp_path / f"plain.{fmt}"
    assert_ok(run_qemu_img("create", "-q", "-f", fmt, path, "1M"))
    ours, theirs = run_qimg("snapshot", "-l", path), run_qemu_img("snapshot", "-l", path)
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout) == (0, "")


@pytest.mark.parametrize(
    "args",
    [["-c", "x", "-d", "y"], ["-l", "-c", "x"], ["--apply", "first", "--delete", "first"]],
)
def test_snapshot_operations_do_not_mix(
    with_snapshots: Path, args: list[str], run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    """One operation per call, refused before anything is opened, as qemu-img does."""
    before = with_snapshots.read_bytes()
    ours, theirs = (
        run_qimg("snapshot", *args, with_snapshots),
        run_qemu_img("snapshot", *args, with_snapshots),
    )
    assert ours.returncode == theirs.returncode == 1
    assert ours.stderr.startswith("qimg: Cannot mix '-l', '-a', '-c', '-d'")
    assert with_snapshots.read_bytes() == before


def test_image_snapshots_in_python(with_snapshots: Path) -> None:
    with qimg.open(with_snapshots) as image:
        snapshots = image.snapshots()
    assert [(s["id"], s["name"]) for s in snapshots] == [
        ("1", "first"),
        ("2", "a much longer snapshot name"),
    ]
    assert all(s["vm-state-size"] == 0 for s in snapshots)
