"""``qimg resize`` against ``qemu-img resize``, in the spirit of QEMU's test 125:
the same images resized the same way by both tools must have the same size and
guest contents, and qimg's must pass ``qemu-img check``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import RunCommand

pytestmark = pytest.mark.qemu

MiB = 1 << 20


def _make(run_qemu_img: RunCommand, run_qemu_io: RunCommand, path: Path, opts: str) -> None:
    args = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", opts]
    assert run_qemu_img(*args, path, 3 * MiB).returncode == 0
    io = run_qemu_io(
        "-c", "write -P 0x5a 0 1M", "-c", "write -z 1M 512k", "-c", "write -P 0x11 2M 1M", path
    )
    assert io.returncode == 0, io.stderr


def _virtual_size(run_qemu_img: RunCommand, path: Path) -> int:
    out = run_qemu_img("info", "--output=json", path)
    assert out.returncode == 0, out.stderr
    size: int = json.loads(out.stdout)["virtual-size"]
    return size


GROW = ["+1G", "+64k", "5M", "+1536"]
SHRINK = ["-1M", "1M", "-512k", "2560k"]
PREALLOC = ["off", "metadata", "falloc", "full"]
IMAGE_OPTS = ["", "cluster_size=512", "cluster_size=2M", "extended_l2=on", "compat=0.10"]


@pytest.mark.parametrize("opts", IMAGE_OPTS)
@pytest.mark.parametrize(
    ("size", "extra"),
    [(s, []) for s in GROW]
    + [(s, ["--shrink"]) for s in SHRINK]
    + [("+3M", [f"--preallocation={p}"]) for p in PREALLOC],
)
def test_resize_matches_qemu_img(
    tmp_path: Path,
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    run_qemu_io: RunCommand,
    opts: str,
    size: str,
    extra: list[str],
) -> None:
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    _make(run_qemu_img, run_qemu_io, ours, opts)
    shutil.copy(ours, theirs)
    # A leading '-' is a size, not an option, for both tools (qemu-img takes
    # the last argument as the size before parsing options).
    got = run_qimg("resize", *extra, ours, size)
    want = run_qemu_img("resize", *extra, theirs, size)
    assert (got.returncode, got.stdout) == (want.returncode, want.stdout), got.stderr
    assert got.stdout == "Image resized.\n"
    check = run_qemu_img("check", ours)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "No errors were found" in check.stdout
    assert _virtual_size(run_qemu_img, ours) == _virtual_size(run_qemu_img, theirs)
    cmp = run_qemu_img("compare", ours, theirs)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    # What is allocated is what qemu-img allocates. (Whether a preallocated
    # cluster shows as data or zero depends on which host blocks the file
    # system has, so only presence is compared.)
    assert _present(run_qemu_img, ours) == _present(run_qemu_img, theirs)


def _present(run_qemu_img: RunCommand, path: Path) -> list[tuple[int, int, bool]]:
    out = run_qemu_img("map", "--output=json", path)
    assert out.returncode == 0, out.stderr
    merged: list[tuple[int, int, bool]] = []
    for e in json.loads(out.stdout):
        if merged and merged[-1][2] == e["present"]:
            start, length, present = merged[-1]
            merged[-1] = (start, length + e["length"], present)
        else:
            merged.append((e["start"], e["length"], e["present"]))
    return merged


@pytest.mark.parametrize("fmt_opts", [["-f", "raw"], []])
@pytest.mark.parametrize(
    ("size", "extra"),
    [
        ("+1M", []),
        ("+1M", ["--preallocation=falloc"]),
        ("+1M", ["--preallocation=full"]),
        ("-512k", ["--shrink"]),
        ("4096", ["--shrink"]),
    ],
)
def test_resize_raw(
    tmp_path: Path,
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    fmt_opts: list[str],
    size: str,
    extra: list[str],
) -> None:
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    ours.write_bytes(bytes(range(256)) * 4096)
    shutil.copy(ours, theirs)
    got = run_qimg("resize", *fmt_opts, *extra, ours, size)
    want = run_qemu_img("resize", *fmt_opts, *extra, theirs, size)
    assert got.returncode == want.returncode == 0, got.stderr
    assert got.stdout == want.stdout
    assert ours.read_bytes() == theirs.read_bytes()
    if "full" in "".join(extra) or "falloc" in "".join(extra):
        assert ours.stat().st_blocks * 512 >= ours.stat().st_size


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["IMG", "-1M"], "Use the --shrink option to perform a shrink operation."),
        (["--shrink", "IMG", "-5M"], "New image size must be positive"),
        (["IMG", "0"], "New image size must be positive"),
        (["--preallocation=foo", "IMG", "+1M"], "Invalid preallocation mode 'foo'"),
        (["IMG", "1000448"], "Use the --shrink option"),
        (["IMG", "+1000"], "multiple of 512"),
        (["--shrink", "--preallocation=full", "IMG", "1M"], "only be used when growing"),
        (["IMG", "+1x"], "Invalid image size specified"),
    ],
)
def test_resize_refusals_leave_the_image_alone(
    tmp_path: Path,
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    run_qemu_io: RunCommand,
    args: list[str],
    message: str,
) -> None:
    img = tmp_path / "t.qcow2"
    _make(run_qemu_img, run_qemu_io, img, "")
    before = img.read_bytes()
    got = run_qimg("resize", *[img if a == "IMG" else a for a in args])
    assert got.returncode == 1
    assert got.stdout == ""
    assert message in got.stderr
    assert got.stderr.startswith("qimg: ")
    assert "Traceback" not in got.stderr
    assert img.read_bytes() == before


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_resize_with_snapshots_follows_qemu_img(
    tmp_path: Path,
    compat: str,
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    run_qemu_io: RunCommand,
) -> None:
    """v3 images with snapshots grow and shrink (the snapshots keep their own size);
    v2 images with snapshots are refused, as qemu-img refuses them."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    _make(run_qemu_img, run_qemu_io, ours, f"compat={compat}")
    assert run_qemu_img("snapshot", "-c", "snap1", ours).returncode == 0
    theirs.write_bytes(ours.read_bytes())
    for args in (["resize", "-q"], ["resize", "--shrink", "-q"]):
        size = "1M" if "--shrink" in args else "+1M"
        got, want = run_qimg(*args, ours, size), run_qemu_img(*args, theirs, size)
        assert got.returncode == want.returncode, (got.stderr, want.stderr)
        if want.returncode:
            assert got.stderr == want.stderr.replace("qemu-img:", "qimg:")
            return
        assert run_qemu_img("check", ours).returncode == 0
        assert run_qemu_img("compare", ours, theirs).returncode == 0
    for image in (ours, theirs):
        assert run_qemu_img("snapshot", "-a", "snap1", image).returncode == 0
    assert run_qemu_img("compare", ours, theirs).returncode == 0
    assert run_qemu_img("check", ours).returncode == 0


def test_api_resize(tmp_path: Path, run_qemu_img: RunCommand) -> None:
    import qimg

    img = tmp_path / "api.qcow2"
    qimg.create(img, MiB, format="qcow2")
    with qimg.open(img, writable=True) as image:
        image.write(0, b"\x42" * 65536)
        image.resize(4 * MiB, preallocation=qimg.PreallocMode.METADATA)
        assert image.size == 4 * MiB
        image.write(3 * MiB, b"\x17" * 4096)
    with qimg.open(img) as image:
        assert image.size == 4 * MiB
        assert image.read(0, 4) == b"\x42" * 4
        assert image.read(3 * MiB, 4) == b"\x17" * 4
    assert run_qemu_img("check", img).returncode == 0
