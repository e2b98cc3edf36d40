"""``qimg info`` lists persistent dirty bitmaps as ``qemu-img info`` does, and a
damaged bitmap directory is one clear error, never a crash."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

import qimg
from conftest import RunCommand, assert_ok

EXT_BITMAPS = 0x23852875


def _image(tmp_path: Path, run_qemu_img: RunCommand, bitmaps: list[list[str]]) -> Path:
    path = tmp_path / "b.qcow2"
    assert_ok(run_qemu_img("create", "-q", "-f", "qcow2", path, "16M"))
    for args in bitmaps:
        assert_ok(run_qemu_img("bitmap", *args[:-1], path, args[-1]))
    return path


CASES = {
    "one": [["--add", "b0"]],
    "granularities": [["--add", "-g", "512", "small"], ["--add", "-g", "2M", "big"]],
    "disabled": [["--add", "on"], ["--add", "off"], ["--disable", "off"]],
    "names": [["--add", "a name, with spaces"], ["--add", "ünïcode ✓"], ["--add", "x" * 200]],
    "many": [["--add", f"bitmap-{i}"] for i in range(40)],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_info_lists_bitmaps_as_qemu_img(
    tmp_path: Path, case: str, run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    path = _image(tmp_path, run_qemu_img, CASES[case])
    for args in (["info"], ["info", "--output=json"]):
        ours, theirs = run_qimg(*args, path), run_qemu_img(*args, path)
        assert_ok(ours)
        assert ours.stdout == theirs.stdout


def test_bitmaps_in_the_python_api(tmp_path: Path, run_qemu_img: RunCommand) -> None:
    path = _image(tmp_path, run_qemu_img, CASES["disabled"])
    specific = qimg.info(path)["format-specific"]
    assert specific["type"] == "qcow2"
    assert specific["data"].get("bitmaps") == [
        {"name": "on", "granularity": 65536, "flags": ["auto"]},
        {"name": "off", "granularity": 65536, "flags": []},
    ]


def _directory(path: Path) -> tuple[int, int, int]:
    """Where the bitmaps extension sits in the header, and the directory's place."""
    data = path.read_bytes()
    at = struct.unpack(">I", data[100:104])[0]
    while True:
        kind, length = struct.unpack(">II", data[at : at + 8])
        if kind == EXT_BITMAPS:
            offset = struct.unpack(">Q", data[at + 24 : at + 32])[0]
            return at, offset, length
        assert kind != 0, "no bitmaps extension"
        at += 8 + (length + 7) // 8 * 8


def _poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("directory past the end", "lie past the end of the file"),
        ("huge directory", "bytes (at most 67107840)"),
        ("granularity 2^40", "granularity 2^40"),
        ("name too long", "2000-byte name"),
        ("extra data past the end", "lies past the directory's end"),
    ],
)
def test_a_damaged_directory_is_one_clear_error(
    tmp_path: Path, damage: str, message: str, run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    path = _image(tmp_path, run_qemu_img, CASES["one"])
    ext, directory, _ = _directory(path)
    if damage == "directory past the end":
        _poke(path, ext + 24, struct.pack(">Q", 1 << 40))
    elif damage == "huge directory":
        _poke(path, ext + 16, struct.pack(">Q", 1 << 30))
    elif damage == "granularity 2^40":
        _poke(path, directory + 17, bytes([40]))
    elif damage == "name too long":
        _poke(path, directory + 18, struct.pack(">H", 2000))
    else:
        _poke(path, directory + 20, struct.pack(">I", 1 << 20))
    got = run_qimg("info", path)
    assert got.returncode == 1
    assert got.stderr.count("\n") == 1 and got.stderr.startswith("qimg: ")
    assert "bitmap directory" in got.stderr and message in got.stderr


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("target", [[], ["-o", "cluster_size=512"], ["-o", "cluster_size=2M"]])
def test_measure_counts_bitmaps_as_qemu_img(
    tmp_path: Path,
    case: str,
    target: list[str],
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
) -> None:
    path = _image(tmp_path, run_qemu_img, CASES[case])
    for output in ("human", "json"):
        args = ["measure", f"--output={output}", "-O", "qcow2", *target, path]
        ours, theirs = run_qimg(*args), run_qemu_img(*args)
        assert_ok(ours)
        assert ours.stdout == theirs.stdout
