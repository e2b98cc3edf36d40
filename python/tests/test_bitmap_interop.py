"""Persistent dirty bitmaps against qemu-img: ``qimg bitmap`` makes the directory
qemu-img makes, and every write qimg makes to an image lands in its enabled bitmaps,
as QEMU itself reads them back (qemu-nbd exports the bitmap; ``qemu-img map`` with
``x-dirty-bitmap`` lists its dirty ranges)."""

from __future__ import annotations

import json
import struct
import subprocess
import time
from pathlib import Path

import pytest

import qimg
from conftest import RunCommand

MiB = 1 << 20
WRITES = ["write -P 1 1M 64k", "write -z 10M 1M", "discard 20M 128k", "write -P 2 30M 5k"]


def dirty_ranges(image: Path, bitmap: str) -> list[tuple[int, int]]:
    """The dirty ranges of `bitmap` as QEMU reads them: (start, length) pairs."""
    sock = image.parent / f"{image.name}.sock"
    server = subprocess.Popen(
        ["qemu-nbd", "-r", "-f", "qcow2", "-B", bitmap, "-k", str(sock), "-t", str(image)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(200):
            if sock.exists() or server.poll() is not None:
                break
            time.sleep(0.02)
        assert server.poll() is None, server.communicate()[1]
        spec = (
            f"driver=nbd,server.type=unix,server.path={sock},"
            f"x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}"
        )
        out = subprocess.run(
            ["qemu-img", "map", "--output=json", "--image-opts", spec],
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 0, out.stderr
    finally:
        server.terminate()
        server.wait(timeout=10)
    # With x-dirty-bitmap, dirty ranges are the ones reported without data.
    return [(e["start"], e["length"]) for e in json.loads(out.stdout) if not e["data"]]


def _bitmaps(run_qemu_img: RunCommand, image: Path) -> list[dict[str, object]] | None:
    info = json.loads(run_qemu_img("info", "--output=json", image).stdout)
    found: list[dict[str, object]] | None = info["format-specific"]["data"].get("bitmaps")
    return found


@pytest.mark.parametrize("cluster", ["4k", "64k", "2M"])
def test_bitmap_commands_make_what_qemu_img_makes(
    tmp_path: Path, cluster: str, run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    for image in (ours, theirs):
        made = run_qemu_img(
            "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", image, 64 * MiB
        )
        assert made.returncode == 0
    for args in (
        ["--add", "b1"],
        ["--add", "-g", "128k", "--disable", "b2"],
        ["--add", "b3"],
        ["--disable", "b3"],
        ["--enable", "b3"],
        ["--remove", "b1"],
        ["--add", "b1"],
    ):
        *ops, name = args
        assert run_qimg("bitmap", *ops, ours, name).returncode == 0
        assert run_qemu_img("bitmap", *ops, theirs, name).returncode == 0
        assert _bitmaps(run_qemu_img, ours) == _bitmaps(run_qemu_img, theirs)
        assert run_qemu_img("check", ours).returncode == 0


@pytest.mark.parametrize("maker", ["qimg", "qemu-img"])
def test_qimg_writes_land_in_enabled_bitmaps(
    tmp_path: Path,
    maker: str,
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    run_qemu_io: RunCommand,
) -> None:
    """qimg io writes into one image, qemu-io into another; QEMU reads the same dirty
    ranges from both, in the enabled bitmap, and none in the disabled one."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    make = run_qimg if maker == "qimg" else run_qemu_img
    for image in (ours, theirs):
        assert run_qemu_img("create", "-q", "-f", "qcow2", image, 64 * MiB).returncode == 0
        assert make("bitmap", "--add", image, "on").returncode == 0
        assert make("bitmap", "--add", "--disable", image, "off").returncode == 0
    args = [a for w in WRITES for a in ("-c", w)]
    assert run_qimg("io", *args, ours).returncode == 0
    assert run_qemu_io(*args, theirs).returncode == 0
    assert run_qemu_img("check", ours).returncode == 0
    want = dirty_ranges(theirs, "on")
    assert want  # the oracle sees the writes at all
    assert dirty_ranges(ours, "on") == want
    assert dirty_ranges(ours, "off") == dirty_ranges(theirs, "off") == []
    assert _bitmaps(run_qemu_img, ours) == _bitmaps(run_qemu_img, theirs)


def test_clear_and_merge_as_qemu_img(
    tmp_path: Path, run_qimg: RunCommand, run_qemu_img: RunCommand, run_qemu_io: RunCommand
) -> None:
    """--merge from the same image and from another one (another granularity), then
    --clear: the dirty ranges qemu-img's same steps leave."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    src = tmp_path / "src.qcow2"
    assert run_qemu_img("create", "-q", "-f", "qcow2", src, 64 * MiB).returncode == 0
    assert run_qemu_img("bitmap", "--add", "-g", "512k", src, "s").returncode == 0
    assert run_qemu_io("-c", "write 40M 4k", src).returncode == 0
    for image in (ours, theirs):
        assert run_qemu_img("create", "-q", "-f", "qcow2", image, 64 * MiB).returncode == 0
        assert run_qemu_img("bitmap", "--add", image, "a").returncode == 0
        assert run_qemu_io("-c", "write 1M 4k", image).returncode == 0
        assert run_qemu_img("bitmap", "--add", image, "b").returncode == 0
        assert run_qemu_io("-c", "write 5M 4k", image).returncode == 0
    for tool, image in ((run_qimg, ours), (run_qemu_img, theirs)):
        assert tool("bitmap", "--merge", "a", image, "b").returncode == 0
        assert tool("bitmap", "--merge", "s", "-b", src, "-F", "qcow2", image, "b").returncode == 0
    assert dirty_ranges(ours, "b") == dirty_ranges(theirs, "b")
    assert len(dirty_ranges(ours, "b")) == 3
    for tool, image in ((run_qimg, ours), (run_qemu_img, theirs)):
        assert tool("bitmap", "--clear", image, "a").returncode == 0
    assert dirty_ranges(ours, "a") == dirty_ranges(theirs, "a") == []
    assert run_qemu_img("check", ours).returncode == 0


@pytest.mark.parametrize(
    "args",
    [
        ["--add", "b1"],
        ["--remove", "nope"],
        ["--enable", "nope"],
        ["--add", "-g", "1000", "b9"],
        ["-g", "128k", "--enable", "b1"],
        ["--merge", "nope", "b1"],
        ["b1"],
        ["-b", "x.qcow2", "--add", "b2"],
        ["-F", "qcow2", "--add", "b2"],
    ],
)
def test_bitmap_refusals_match_qemu_img(
    tmp_path: Path, args: list[str], run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    image = tmp_path / "t.qcow2"
    assert run_qemu_img("create", "-q", "-f", "qcow2", image, MiB).returncode == 0
    assert run_qemu_img("bitmap", "--add", image, "b1").returncode == 0
    before = image.read_bytes()
    *ops, name = args
    ours = run_qimg("bitmap", *ops, image, name)
    assert image.read_bytes() == before
    # (qemu-img rewrites the bitmap directory even when an operation fails.)
    theirs = run_qemu_img("bitmap", *ops, image, name)
    assert ours.returncode == theirs.returncode == 1
    assert ours.stderr.splitlines()[0] == theirs.stderr.splitlines()[0].replace("qemu-img", "qimg")


def test_bitmaps_in_python_follow_writes(tmp_path: Path, run_qemu_img: RunCommand) -> None:
    path = tmp_path / "t.qcow2"
    qimg.create(path, 8 * MiB, format="qcow2")
    with qimg.open(path, writable=True) as image:
        image.change_bitmap("b", ("add", None))
        assert [b["name"] for b in image.bitmaps()] == ["b"]
        image.write(2 * MiB, b"\x01" * 4096)
    assert run_qemu_img("check", path).returncode == 0
    assert dirty_ranges(path, "b") == [(2 * MiB, 65536)]
    with qimg.open(path, writable=True) as image:
        image.change_bitmap("b", "clear", "disable")
        image.write(0, b"\x01" * 4096)
        assert image.bitmaps() == [{"flags": [], "name": "b", "granularity": 65536}]
    assert dirty_ranges(path, "b") == []


def test_convert_copies_bitmaps_as_qemu_img(
    tmp_path: Path, run_qimg: RunCommand, run_qemu_img: RunCommand, run_qemu_io: RunCommand
) -> None:
    """convert --bitmaps: names, granularities, flags and dirty bits as qemu-img's copy;
    an inconsistent bitmap is refused (no output left) or skipped on request."""
    src = tmp_path / "src.qcow2"
    assert run_qemu_img("create", "-q", "-f", "qcow2", src, 16 * MiB).returncode == 0
    assert run_qemu_img("bitmap", "--add", src, "b1").returncode == 0
    assert run_qemu_img("bitmap", "--add", "-g", "1M", "--disable", src, "b2").returncode == 0
    assert run_qemu_io("-c", "write 1M 4k", "-c", "write 9M 64k", src).returncode == 0
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    assert run_qimg("convert", "--bitmaps", "-O", "qcow2", src, ours).returncode == 0
    assert run_qemu_img("convert", "--bitmaps", "-O", "qcow2", src, theirs).returncode == 0
    assert _bitmaps(run_qemu_img, ours) == _bitmaps(run_qemu_img, theirs)
    assert run_qemu_img("check", ours).returncode == 0
    for name in ("b1", "b2"):
        assert dirty_ranges(ours, name) == dirty_ranges(theirs, name)
    assert dirty_ranges(ours, "b1")
    # Left in use by a writer that died: refused, or skipped.
    _mark_in_use(src, "b1")
    assert '"in-use"' in run_qemu_img("info", "--output=json", src).stdout
    broken = tmp_path / "broken.qcow2"
    got = run_qimg("convert", "--bitmaps", "-O", "qcow2", src, broken)
    assert got.returncode == 1
    assert got.stderr.startswith("qimg: Cannot copy inconsistent bitmap 'b1'\n")
    assert not broken.exists()
    got = run_qimg("convert", "--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", src, broken)
    assert got.returncode == 0
    assert got.stderr == "qimg: warning: Skipping inconsistent bitmap 'b1'\n"
    assert [b["name"] for b in _bitmaps(run_qemu_img, broken) or []] == ["b2"]


def _mark_in_use(image: Path, name: str) -> None:
    """Sets the in-use flag of bitmap `name`, as a writer that died leaves it."""
    data = bytearray(image.read_bytes())
    at = struct.unpack(">I", data[100:104])[0]
    directory = 0
    while (kind := struct.unpack(">I", data[at : at + 4])[0]) != 0:
        length = struct.unpack(">I", data[at + 4 : at + 8])[0]
        if kind == 0x23852875:
            directory = struct.unpack(">Q", data[at + 24 : at + 32])[0]
        at += 8 + (length + 7) // 8 * 8
    entry = directory
    while True:
        name_len, extra = struct.unpack(">HI", data[entry + 18 : entry + 24])
        if data[entry + 24 + extra : entry + 24 + extra + name_len] == name.encode():
            flags = struct.unpack(">I", data[entry + 12 : entry + 16])[0]
            data[entry + 12 : entry + 16] = struct.pack(">I", flags | 1)
            break
        entry = (entry + 24 + extra + name_len + 7) // 8 * 8
    image.write_bytes(bytes(data))


def test_resize_carries_bitmaps_as_qemu_img(
    tmp_path: Path, run_qimg: RunCommand, run_qemu_img: RunCommand, run_qemu_io: RunCommand
) -> None:
    """Growing and shrinking an image resizes its bitmaps: the same directory and
    dirty ranges as qemu-img resize leaves."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    for image in (ours, theirs):
        assert run_qemu_img("create", "-q", "-f", "qcow2", image, 64 * MiB).returncode == 0
        assert run_qemu_img("bitmap", "--add", image, "on").returncode == 0
        assert (
            run_qemu_img("bitmap", "--add", "-g", "1M", "--disable", image, "off").returncode == 0
        )
        assert run_qemu_io("-c", "write 1M 4k", "-c", "write 63M 1M", image).returncode == 0
    for args in (["100M"], ["--shrink", "63500K"], ["--shrink", "2M"]):
        assert run_qimg("resize", "-q", ours, *args).returncode == 0
        assert run_qemu_img("resize", "-q", theirs, *args).returncode == 0
        assert run_qemu_img("check", ours).returncode == 0
        assert _bitmaps(run_qemu_img, ours) == _bitmaps(run_qemu_img, theirs)
        for name in ("on", "off"):
            assert dirty_ranges(ours, name) == dirty_ranges(theirs, name)


def test_bitmap_methods_of_image(tmp_path: Path, run_qemu_img: RunCommand) -> None:
    """add_bitmap / disable_bitmap / enable_bitmap / merge_bitmap / clear_bitmap /
    remove_bitmap: the one-operation forms of change_bitmap."""
    path = tmp_path / "t.qcow2"
    qimg.create(path, 8 * MiB, format="qcow2")
    with qimg.open(path, writable=True) as image:
        image.add_bitmap("a")
        image.add_bitmap("b", granularity=131072, disabled=True)
        image.write(MiB, b"\x01" * 512)
        image.enable_bitmap("b")
        image.merge_bitmap("b", "a")
        assert image.bitmaps() == [
            {"flags": ["auto"], "name": "a", "granularity": 65536},
            {"flags": ["auto"], "name": "b", "granularity": 131072},
        ]
        image.disable_bitmap("a")
        image.clear_bitmap("a")
        image.remove_bitmap("a")
        assert [b["name"] for b in image.bitmaps()] == ["b"]
    assert run_qemu_img("check", path).returncode == 0
    assert dirty_ranges(path, "b") == [(MiB, 131072)]


def test_image_rebase_method(tmp_path: Path, run_qemu_img: RunCommand) -> None:
    """Image.rebase on an image open with its chain keeps the guest content; opened
    without the chain, the safe mode is refused (it would lose the old content)."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qimg.create(base, 4 * MiB, format="qcow2")
    with qimg.open(base, writable=True) as image:
        image.write(0, b"\x07" * 65536)
    made = run_qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    assert made.returncode == 0
    with (
        qimg.open(top, writable=True, backing=False) as image,
        pytest.raises(qimg.UsageError, match="old backing chain"),
    ):
        image.rebase(None)
    with qimg.open(top, writable=True) as image:
        image.rebase(None)
    with qimg.open(top) as image:
        assert image.backing_file is None
        assert image.read(0, 65536) == b"\x07" * 65536
    assert run_qemu_img("check", top).returncode == 0
