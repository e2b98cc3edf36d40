"""Behaviour QEMU's own qemu-iotests pin down (issue 16), each checked against qemu-img on the
same command lines:

- growing an overlay makes the new area read as zeroes, not as its backing file (292, 271);
- a writer clears the autoclear feature bits it does not know (036);
- ``file:`` prefixes and single-quoted ``json:`` strings are read as QEMU reads them (126).
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

import qimg
from conftest import RunCommand, assert_ok

pytestmark = pytest.mark.qemu

KIB = 1024


def _make_overlay(tmp: Path, name: str, run: RunCommand, *opts: str, size: str) -> Path:
    base = tmp / f"{name}.base.raw"
    base.write_bytes(b"\xaa" * (1 << 20))
    top = tmp / f"{name}.qcow2"
    assert_ok(run("create", "-q", "-f", "qcow2", *opts, "-b", base, "-F", "raw", top, size))
    return top


@pytest.mark.parametrize(
    ("opts", "size"),
    [
        ((), "512K"),
        (("-o", "extended_l2=on"), "512K"),
        (("-o", "cluster_size=4k"), "100000"),  # the old end inside a cluster
        ((), "100000"),
    ],
    ids=["v3", "extended-l2", "4k-unaligned", "64k-unaligned"],
)
def test_growing_an_overlay_reads_zeroes_not_the_backing_file(
    tmp_path: Path,
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    opts: tuple[str, ...],
    size: str,
) -> None:
    ours = _make_overlay(tmp_path, "ours", run_qemu_img, *opts, size=size)
    theirs = _make_overlay(tmp_path, "theirs", run_qemu_img, *opts, size=size)
    assert_ok(run_qemu_img("resize", theirs, "1M"))
    proc = run_qimg("resize", ours, "1M")
    assert (proc.returncode, proc.stdout) == (0, "Image resized.\n"), proc.stderr
    assert_ok(run_qemu_img("check", ours))
    old_end = int(size[:-1]) * KIB if size.endswith("K") else (int(size) + 511) // 512 * 512
    with qimg.open(ours) as a:
        data = a.read(0, 1 << 20)
    assert data[:old_end] == b"\xaa" * old_end
    assert data[old_end:] == bytes((1 << 20) - old_end)
    assert run_qemu_img("compare", ours, theirs).returncode == 0


def test_growing_a_v2_overlay_is_refused_as_qemu_img_refuses_it(
    tmp_path: Path, run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    ours = _make_overlay(tmp_path, "ours", run_qemu_img, "-o", "compat=0.10", size="512K")
    theirs = _make_overlay(tmp_path, "theirs", run_qemu_img, "-o", "compat=0.10", size="512K")
    before = ours.read_bytes()
    ref = run_qemu_img("resize", theirs, "1M")
    proc = run_qimg("resize", ours, "1M")
    assert proc.returncode == ref.returncode == 1
    assert proc.stderr == ref.stderr.replace("qemu-img: ", "qimg: ")
    assert ours.read_bytes() == before


AUTOCLEAR_OFFSET = 88


def _autoclear(path: Path) -> int:
    with open(path, "rb") as f:
        f.seek(AUTOCLEAR_OFFSET)
        value: int = struct.unpack(">Q", f.read(8))[0]
        return value


def _set_autoclear(path: Path, bits: int) -> None:
    with open(path, "r+b") as f:
        f.seek(AUTOCLEAR_OFFSET)
        f.write(struct.pack(">Q", bits))


UNKNOWN_AUTOCLEAR = (1 << 63) | (1 << 5)


@pytest.mark.parametrize(
    "command",
    [
        ["resize", "IMG", "2M"],
        ["check", "-r", "all", "IMG"],
        ["amend", "-o", "lazy_refcounts=on", "IMG"],
        ["io", "-c", "write 0 4k", "IMG"],
        ["convert", "-n", "-O", "qcow2", "SRC", "IMG"],
    ],
    ids=["resize", "check-r", "amend", "io-write", "convert-n"],
)
def test_a_writer_clears_autoclear_bits_it_does_not_know(
    tmp_path: Path,
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    run_qemu_io: RunCommand,
    command: list[str],
) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(b"\x01" * (1 << 20))
    results = []
    for tool, run in (("qemu-img", run_qemu_img), ("qimg", run_qimg)):
        img = tmp_path / f"{tool}.qcow2"
        assert_ok(run_qemu_img("create", "-q", "-f", "qcow2", img, "1M"))
        _set_autoclear(img, UNKNOWN_AUTOCLEAR)
        argv = [str(img) if w == "IMG" else str(src) if w == "SRC" else w for w in command]
        qemu_io = tool == "qemu-img" and command[0] == "io"
        proc = run_qemu_io(*argv[1:]) if qemu_io else run(*argv)
        assert proc.returncode == 0, (tool, proc.stderr)
        results.append(_autoclear(img))
        assert_ok(run_qemu_img("check", img))
    assert results == [0, 0]


def test_a_reader_leaves_autoclear_bits_alone(tmp_path: Path, run_qimg: RunCommand) -> None:
    img = tmp_path / "a.qcow2"
    qimg.create(img, 1 << 20, format="qcow2")
    _set_autoclear(img, UNKNOWN_AUTOCLEAR)
    for args in (["info", img], ["check", img], ["map", img]):
        assert_ok(run_qimg(*args))
    assert _autoclear(img) == UNKNOWN_AUTOCLEAR


def test_file_prefix_is_a_protocol_not_part_of_the_name(
    tmp_path: Path, run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    for tool, run in (("theirs", run_qemu_img), ("ours", run_qimg)):
        proc = run("create", "-f", "qcow2", f"file:{tmp_path}/{tool}.qcow2", "1M")
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / f"{tool}.qcow2").exists()
        assert not (tmp_path / f"file:{tool}.qcow2").exists()
    ours = run_qimg("info", f"file:{tmp_path}/ours.qcow2")
    theirs = run_qemu_img("info", f"file:{tmp_path}/theirs.qcow2")
    assert ours.stdout.replace("ours", "X") == theirs.stdout.replace("theirs", "X")
    assert_ok(
        run_qimg("convert", "-O", "raw", f"file:{tmp_path}/ours.qcow2", f"file:{tmp_path}/o.raw")
    )
    assert (tmp_path / "o.raw").stat().st_size == 1 << 20


@pytest.mark.parametrize(
    "args",
    [["info", "foo:bar"], ["create", "-f", "raw", "foo:bar", "1M"], ["info", "file:"]],
    ids=["unknown-info", "unknown-create", "empty-file"],
)
def test_unknown_protocols_are_refused_as_qemu_img_refuses_them(
    tmp_path: Path, run_qimg: RunCommand, run_qemu_img: RunCommand, args: list[str]
) -> None:
    theirs = run_qemu_img(*args)
    ours = run_qimg(*args)
    assert ours.returncode == theirs.returncode == 1
    assert ours.stdout == theirs.stdout
    assert ours.stderr == theirs.stderr.replace("qemu-img: ", "qimg: ")


def test_json_with_single_quoted_strings_reads_as_qemu_reads_it(
    tmp_path: Path, run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    img = tmp_path / "it's.qcow2"
    qimg.create(img, 1 << 20, format="qcow2")
    escaped = str(img).replace("'", "\\'")
    spec = f"json:{{'driver': 'qcow2', 'file': {{'driver': 'file', 'filename': '{escaped}'}}}}"
    ours = run_qimg("info", "--output=json", spec)
    theirs = run_qemu_img("info", "--output=json", spec)
    assert (ours.returncode, theirs.returncode) == (0, 0), (ours.stderr, theirs.stderr)
    assert ours.stdout == theirs.stdout
