"""``qimg rebase -u`` against ``qemu-img rebase -u``: the same bytes in the image, the
same messages (the safe mode has tests of its own)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import qimg
from conftest import RunCommand, assert_ok

OVERLAYS = {
    "v3": ["-o", "compat=1.1"],
    "v2": ["-o", "compat=0.10"],
    "512-byte clusters": ["-o", "cluster_size=512"],
    "2M clusters": ["-o", "cluster_size=2M"],
    "extended L2": ["-o", "extended_l2=on"],
    "lazy refcounts": ["-o", "lazy_refcounts=on"],
}

REBASES = {
    "to another qcow2": ["-b", "base2.qcow2", "-F", "qcow2"],
    "to a raw file": ["-b", "base.raw", "-F", "raw"],
    "to a missing file": ["-b", "not-there.img", "-F", "raw"],
    "to a long name": ["-b", "d/" * 200 + "b.qcow2", "-F", "qcow2"],
    "to nothing": ["-b", ""],
    "to nothing, no -b": [],
}


def _setup(tmp_path: Path, run_qemu_img: RunCommand, options: list[str]) -> Path:
    for name, fmt in (("base1.qcow2", "qcow2"), ("base2.qcow2", "qcow2"), ("base.raw", "raw")):
        assert_ok(run_qemu_img("create", "-q", "-f", fmt, tmp_path / name, "4M"))
    top = tmp_path / "top.qcow2"
    assert_ok(
        run_qemu_img(
            "create", "-q", "-f", "qcow2", *options, "-b", "base1.qcow2", "-F", "qcow2", top
        )
    )
    return top


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
@pytest.mark.parametrize("change", sorted(REBASES))
def test_rebase_u_writes_qemu_imgs_bytes(
    tmp_path: Path, overlay: str, change: str, run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    top = _setup(tmp_path, run_qemu_img, OVERLAYS[overlay])
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(top, theirs)
    before = top.read_bytes()
    ours_run = run_qimg("rebase", "-u", *REBASES[change], top)
    theirs_run = run_qemu_img("rebase", "-u", *REBASES[change], theirs)
    assert top.read_bytes() == theirs.read_bytes()
    if theirs_run.returncode != 0:
        # A name too long for the header cluster: both refuse and change nothing.
        assert "No space left in the file header" in theirs_run.stderr
        assert ours_run.returncode == 1
        assert ours_run.stderr.startswith("qimg: Could not change the backing file to 'd/d/")
        assert top.read_bytes() == before
        return
    assert (ours_run.returncode, ours_run.stdout, ours_run.stderr) == (0, "", "")
    # Checked without opening the backing file, which may be missing on purpose.
    alone = json.dumps({"driver": "qcow2", "backing": None, "file": {"filename": str(top)}})
    assert_ok(run_qemu_img("check", f"json:{alone}"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["-u", "-b", "base2.qcow2"],
            "Could not change the backing file to 'base2.qcow2': backing format must be specified",
        ),
        (["-u", "-b", "base2.qcow2", "-F", "vmdkx"], "Invalid format name: 'vmdkx'"),
    ],
)
def test_rebase_u_refuses_what_qemu_img_refuses(
    tmp_path: Path, args: list[str], message: str, run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    top = _setup(tmp_path, run_qemu_img, [])
    before = top.read_bytes()
    ours, theirs = run_qimg("rebase", *args, top), run_qemu_img("rebase", *args, top)
    assert theirs.returncode == ours.returncode == 1
    assert theirs.stderr == f"qemu-img: {message}\n"
    assert ours.stderr == f"qimg: {message}\n"
    assert top.read_bytes() == before


def test_rebase_u_of_a_raw_image_is_refused(tmp_path: Path, run_qimg: RunCommand) -> None:
    raw = tmp_path / "x.raw"
    qimg.create(raw, 1 << 20)
    got = run_qimg("rebase", "-u", "-f", "raw", "-b", "b.qcow2", "-F", "qcow2", raw)
    assert got.returncode == 1
    assert got.stderr == (
        "qimg: Could not change the backing file to 'b.qcow2': Operation not supported\n"
    )


def test_rebase_in_python(tmp_path: Path, run_qemu_img: RunCommand) -> None:
    top = _setup(tmp_path, run_qemu_img, [])
    qimg.rebase(top, "base2.qcow2", backing_format="qcow2", unsafe=True)
    info = qimg.info(top)
    assert (info.get("backing-filename"), info.get("backing-filename-format")) == (
        "base2.qcow2",
        "qcow2",
    )
    qimg.rebase(top, None, unsafe=True)
    assert "backing-filename" not in qimg.info(top)
