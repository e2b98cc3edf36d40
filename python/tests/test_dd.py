"""``qimg dd`` against ``qemu-img dd``: the same output (size, format, guest bytes), the
same messages, and the Python API ``qimg.dd``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import qimg
from conftest import RunCommand, assert_ok

MiB = 1 << 20


@pytest.fixture
def source(tmp_path: Path, run_qemu_img: RunCommand, run_qemu_io: RunCommand) -> Path:
    """A 1 MiB qcow2 image with data at its start, in its middle and in its last block."""
    path = tmp_path / "in.qcow2"
    assert_ok(run_qemu_img("create", "-q", "-f", "qcow2", path, "1M"))
    for pattern, offset, length in (
        ("0x41", 0, "64k"),
        ("0x42", "512k", "4k"),
        ("0x43", "1020k", "4k"),
    ):
        assert_ok(run_qemu_io("-c", f"write -P {pattern} {offset} {length}", path))
    return path


def _facts(run_qemu_img: RunCommand, path: Path, fmt: str) -> tuple[str, int]:
    info = json.loads(run_qemu_img("info", "--output=json", "-f", fmt, path).stdout)
    return info["format"], info["virtual-size"]


@pytest.mark.parametrize(
    "operands",
    [
        [],
        ["bs=4k", "count=3", "skip=1"],
        ["bs=64k", "skip=8"],
        ["bs=1M", "count=1", "bs=2M"],
        ["bs=3", "count=5"],
        ["bs=4096", "skip=256"],
        ["count=0"],
        ["bs=1k", "count=99999999999999"],
    ],
    ids=lambda ops: " ".join(ops) or "whole",
)
@pytest.mark.parametrize("out_fmt", ["raw", "qcow2"])
def test_dd_makes_what_qemu_img_dd_makes(
    tmp_path: Path,
    source: Path,
    operands: list[str],
    out_fmt: str,
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
) -> None:
    ours, theirs = tmp_path / f"ours.{out_fmt}", tmp_path / f"theirs.{out_fmt}"
    ours_run = run_qimg("dd", "-O", out_fmt, *operands, f"if={source}", f"of={ours}")
    theirs_run = run_qemu_img("dd", "-O", out_fmt, *operands, f"if={source}", f"of={theirs}")
    assert (ours_run.returncode, ours_run.stdout) == (theirs_run.returncode, theirs_run.stdout)
    assert ours_run.stderr == theirs_run.stderr.replace("qemu-img:", "qimg:")
    assert _facts(run_qemu_img, ours, out_fmt) == _facts(run_qemu_img, theirs, out_fmt)
    assert_ok(run_qemu_img("compare", "-f", out_fmt, "-F", out_fmt, ours, theirs))
    if out_fmt == "qcow2":
        assert_ok(run_qemu_img("check", ours))
    else:
        assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize(
    ("operands", "message"),
    [
        (["if=IN"], "Must specify both input and output files"),
        (["of=OUT"], "Must specify both input and output files"),
        (["bs=0", "if=IN", "of=OUT"], "Invalid bs specified. Must be between 1 and 2147483647."),
        (["bs=abc", "if=IN", "of=OUT"], "Invalid bs specified: 'abc'."),
        (["bs=2G", "if=IN", "of=OUT"], "Invalid bs specified. Must be between 1 and 2147483647."),
        (
            ["count=-1", "if=IN", "of=OUT"],
            "Invalid count specified. Must be between 0 and 9223372036854775807.",
        ),
        (["count=1k", "if=IN", "of=OUT"], "Invalid count specified: '1k'."),
        (
            ["skip=-1", "if=IN", "of=OUT"],
            "Invalid skip specified. Must be between 0 and 9223372036854775807.",
        ),
        (["skip=abc", "if=IN", "of=OUT"], "Invalid skip specified: 'abc'."),
        (["foo=bar", "if=IN", "of=OUT"], "unrecognized operand foo"),
        (["if=IN", "of=OUT", "extra"], "unrecognized operand extra"),
    ],
)
def test_dd_refuses_what_qemu_img_dd_refuses(
    tmp_path: Path,
    source: Path,
    operands: list[str],
    message: str,
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
) -> None:
    out = tmp_path / "out.raw"
    words = [w.replace("IN", str(source)).replace("OUT", str(out)) for w in operands]
    ours, theirs = run_qimg("dd", *words), run_qemu_img("dd", *words)
    assert theirs.returncode == ours.returncode == 1
    assert theirs.stderr == f"qemu-img: {message}\n"
    assert ours.stderr == f"qimg: {message}\n"
    assert not out.exists()


def test_a_skip_past_the_end_leaves_an_empty_output_and_fails(
    tmp_path: Path, source: Path, run_qimg: RunCommand
) -> None:
    """qemu-img creates the empty output, prints the error and exits 0; qimg does the
    same but exits 1, so that scripts see the failure."""
    out = tmp_path / "out.raw"
    got = run_qimg("dd", f"if={source}", f"of={out}", "skip=10000")
    assert got.returncode == 1
    assert got.stderr == f"qimg: {source}: cannot skip to specified offset\n"
    assert out.stat().st_size == 0


def test_dd_refuses_a_format_qimg_cannot_write(
    tmp_path: Path, source: Path, run_qimg: RunCommand
) -> None:
    got = run_qimg("dd", "-O", "vmdk", f"if={source}", f"of={tmp_path / 'x.vmdk'}")
    assert got.returncode == 1
    assert "'vmdk'" in got.stderr
    assert not (tmp_path / "x.vmdk").exists()


def test_python_dd(tmp_path: Path, source: Path) -> None:
    out = tmp_path / "part.qcow2"
    seen: list[int] = []
    qimg.dd(
        source,
        str(out),
        bs=4096,
        skip=128,
        count=130,  # qemu-img counts the skipped blocks too
        out_format="qcow2",
        progress=lambda d, t: seen.append(d),
    )
    assert seen[-1] == 8192
    with qimg.open(out) as image, qimg.open(source) as whole:
        assert image.size == 8192
        assert image.read(0, 8192) == whole.read(512 << 10, 8192)
    with pytest.raises(ValueError, match="Invalid bs"):
        qimg.dd(source, str(tmp_path / "x.raw"), bs=0)
