"""The command line as a whole: argument order as qemu-img accepts it, and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import RunCommand

MiB = 1 << 20


@pytest.mark.qemu
def test_options_may_follow_file_names(
    tmp_path: Path, run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(bytes(range(256)) * 4096)
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    # qemu-img takes options anywhere on the line; so does qimg.
    got = run_qimg("convert", src, "-O", "qcow2", ours, "-f", "raw")
    want = run_qemu_img("convert", src, "-O", "qcow2", theirs, "-f", "raw")
    assert got.returncode == want.returncode == 0, got.stderr
    assert ours.read_bytes() == theirs.read_bytes()
    cmp = run_qimg("compare", src, "-f", "raw", ours, "-F", "qcow2")
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    info = run_qimg("info", ours, "--output=json")
    assert info.returncode == 0 and '"format": "qcow2"' in info.stdout


def test_raw_images_have_no_backing_file(tmp_path: Path, run_qimg: RunCommand) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(MiB))
    target = tmp_path / "t.raw"
    got = run_qimg("create", "-f", "raw", "-b", base, "-F", "raw", target, "1M")
    assert got.returncode == 1
    assert got.stderr == f"qimg: {target}: Backing file not supported for file format 'raw'\n"
    assert not target.exists()
