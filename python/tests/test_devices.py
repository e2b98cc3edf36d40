"""Block devices as images (issue 16): qimg writes them in place exactly as qemu-img does,
never truncates, resizes or unlinks them, and accepts ``-O host_device`` where qemu-img does.

Each test attaches its own loop device over a file in its temporary directory and hands
the tools a private device node made with mknod there (same major/minor), never a /dev
path, so a bug under test cannot remove the machine's device nodes; the loop device is
detached in a ``finally``. CI runs as root, which this needs.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import qimg
from conftest import RunCommand

pytestmark = pytest.mark.qemu

DEVICE_SIZE = 32 << 20
SOURCE_SIZE = 16 << 20
#: What the device holds before each test: anything a tool leaves unwritten shows.
FILL = b"\xff"


@dataclass
class Device:
    node: Path
    backing: Path

    def content(self) -> bytes:
        with open(self.node, "rb") as f:
            return f.read()

    def fill(self) -> None:
        with open(self.node, "r+b") as f:
            f.write(FILL * DEVICE_SIZE)

    def is_intact(self) -> bool:
        return stat.S_ISBLK(os.lstat(self.node).st_mode)


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Device]:
    if os.geteuid() != 0:
        if os.environ.get("QIMG_CI"):
            pytest.fail("CI runs as root: the block-device tests attach loop devices")
        pytest.skip("attaching a loop device needs root")
    backing = tmp_path / "loop.img"
    with open(backing, "wb") as f:
        f.truncate(DEVICE_SIZE)
    loop = subprocess.run(
        ["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        rdev = os.stat(loop).st_rdev
        node = tmp_path / "dev"
        os.mknod(node, 0o600 | stat.S_IFBLK, rdev)
        dev = Device(node, backing)
        dev.fill()
        yield dev
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)


@pytest.fixture
def source(tmp_path: Path, run_qemu_img: RunCommand, run_qemu_io: RunCommand) -> Path:
    """A 16 MiB qcow2 image: data at 1 MiB and 9 MiB, the rest unallocated (zeroes)."""
    path = tmp_path / "src.qcow2"
    assert run_qemu_img("create", "-q", "-f", "qcow2", path, str(SOURCE_SIZE)).returncode == 0
    proc = run_qemu_io("-c", "write -P 0x11 1M 1M", "-c", "write -P 0x22 9M 64k", path)
    assert proc.returncode == 0, proc.stderr
    return path


def _expected(source: Path) -> bytes:
    with qimg.open(source) as img:
        return img.read(0, SOURCE_SIZE) + FILL * (DEVICE_SIZE - SOURCE_SIZE)


@pytest.mark.parametrize("out_fmt", ["raw", "host_device"])
def test_convert_onto_a_device_writes_it_in_place_like_qemu_img(
    device: Device,
    source: Path,
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    out_fmt: str,
) -> None:
    theirs = run_qemu_img("convert", "-O", out_fmt, source, device.node)
    assert theirs.returncode == 0, theirs.stderr
    reference = device.content()
    assert reference == _expected(source)
    device.fill()
    ours = run_qimg("convert", "-O", out_fmt, source, device.node)
    assert (ours.returncode, ours.stderr) == (0, "")
    assert device.is_intact()
    assert device.content() == reference


def test_convert_onto_a_qcow2_device_passes_qemu_img_check(
    device: Device, source: Path, run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    ours = run_qimg("convert", "-O", "qcow2", source, device.node)
    assert (ours.returncode, ours.stderr) == (0, "")
    assert run_qemu_img("check", device.node).returncode == 0
    compare = run_qemu_img("compare", source, device.node)
    assert compare.returncode == 0, compare.stdout


def test_a_device_too_small_is_refused_and_kept(
    device: Device, tmp_path: Path, run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    big = tmp_path / "big.raw"
    with open(big, "wb") as f:
        f.truncate(DEVICE_SIZE * 2)
    theirs = run_qemu_img("create", "-f", "raw", device.node, str(DEVICE_SIZE * 2))
    ours = run_qimg("create", "-f", "raw", device.node, str(DEVICE_SIZE * 2))
    assert ours.returncode == theirs.returncode == 1
    assert ours.stdout == theirs.stdout
    assert ours.stderr == theirs.stderr.replace("qemu-img: ", "qimg: ")
    converted = run_qimg("convert", "-f", "raw", "-O", "raw", big, device.node)
    assert converted.returncode == 1
    assert converted.stderr.endswith("Cannot grow device files\n"), converted.stderr
    assert device.is_intact()
    assert device.content() == FILL * DEVICE_SIZE


def test_a_convert_failing_mid_copy_leaves_the_device_node(
    device: Device, source: Path, run_qimg: RunCommand
) -> None:
    failing = {
        "driver": "raw",
        "file": {
            "driver": "blkdebug",
            "image": {"driver": "file", "filename": str(source)},
            "inject-error": [{"event": "read_aio", "errno": 5}],
        },
    }
    proc = run_qimg("convert", "-O", "raw", "json:" + json.dumps(failing), device.node)
    assert proc.returncode == 1
    assert proc.stderr.startswith("qimg: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert device.is_intact()


@pytest.mark.parametrize(("size", "status"), [("16M", 0), (str(DEVICE_SIZE), 0), ("64M", 1)])
def test_create_on_a_device_checks_its_size_like_qemu_img(
    device: Device, run_qimg: RunCommand, run_qemu_img: RunCommand, size: str, status: int
) -> None:
    theirs = run_qemu_img("create", "-f", "raw", device.node, size)
    ours = run_qimg("create", "-f", "raw", device.node, size)
    assert ours.returncode == theirs.returncode == status
    assert ours.stdout == theirs.stdout
    assert ours.stderr == theirs.stderr.replace("qemu-img: ", "qimg: ")
    # qemu-img zeroes the first sector of a device it creates a raw image on, and no more.
    wiped = bytes(512) if status == 0 else FILL * 512
    assert device.content() == wiped + FILL * (DEVICE_SIZE - 512)


@pytest.mark.parametrize("size", ["64M", "16M", str(DEVICE_SIZE)])
def test_resize_of_a_device_is_what_qemu_img_says(
    device: Device, run_qimg: RunCommand, run_qemu_img: RunCommand, size: str
) -> None:
    theirs = run_qemu_img("resize", "--shrink", "-f", "raw", device.node, size)
    ours = run_qimg("resize", "--shrink", "-f", "raw", device.node, size)
    assert ours.returncode == theirs.returncode
    assert ours.stdout == theirs.stdout
    assert ours.stderr.replace("qimg: ", "") == theirs.stderr.replace("qemu-img: ", "")
    assert device.is_intact()
    assert device.content() == FILL * DEVICE_SIZE


def test_reading_commands_see_the_device_as_qemu_img_does(
    device: Device, source: Path, run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    assert run_qemu_img("convert", "-O", "raw", source, device.node).returncode == 0
    for args in (
        ["info", "-f", "raw", "--output=json"],
        ["map", "-f", "raw", "--output=json"],
        ["compare", "-f", "raw", "-F", "qcow2"],
    ):
        extra = [source] if args[0] == "compare" else []
        theirs = run_qemu_img(*args, device.node, *extra)
        ours = run_qimg(*args, device.node, *extra)
        assert ours.returncode == theirs.returncode, (args, ours.stderr)
        if args[0] == "info":
            mine, ref = json.loads(ours.stdout), json.loads(theirs.stdout)
            assert mine["virtual-size"] == ref["virtual-size"] == DEVICE_SIZE
            assert mine["format"] == ref["format"] == "raw"
        elif args[0] == "map":
            # A device answers no hole queries: all data, as qemu-img maps it.
            assert json.loads(ours.stdout)[0]["data"] is True
        else:
            assert ours.stdout == theirs.stdout
    io = run_qimg("io", "-f", "raw", "-c", "write -P 0x77 0 4k", device.node)
    assert io.returncode == 0, io.stderr
    assert device.content()[:4096] == b"\x77" * 4096
