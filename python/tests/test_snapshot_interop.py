"""Internal snapshots made, applied and deleted by qimg and by qemu-img, crossed both
ways: every image passes ``qemu-img check`` and reads, snapshot by snapshot, what the
same steps give with qemu-img alone."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest

import qimg
from conftest import RunCommand
from qimg.snapshot_ref import SnapshotRef

MiB = 1 << 20
DATE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def _made(run_qemu_img: RunCommand, run_qemu_io: RunCommand, path: Path, opts: str) -> None:
    assert run_qemu_img("create", "-q", "-f", "qcow2", "-o", opts, path, 8 * MiB).returncode == 0
    # A compressed write covers one whole cluster.
    packed = "2M" if "2M" in opts else "4k" if "4k" in opts else "64k"
    io = run_qemu_io(
        "-c", "write -P 1 0 3M", "-c", f"write -c -P 2 4M {packed}", "-c", "write -z 6M 64k", path
    )
    assert io.returncode == 0, io.stderr


@pytest.mark.parametrize(
    "opts",
    [
        "compat=0.10",
        "compat=1.1",
        "cluster_size=4k",
        "cluster_size=2M",
        "extended_l2=on",
        "refcount_bits=64",
    ],
)
@pytest.mark.parametrize("first", ["qimg", "qemu-img"])
def test_snapshots_cross_between_tools(
    tmp_path: Path,
    opts: str,
    first: str,
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    run_qemu_io: RunCommand,
) -> None:
    """One tool creates, the other writes over the shared clusters, creates again,
    applies and deletes; the same steps with qemu-img alone give the same content."""
    ours, ref = tmp_path / "ours.qcow2", tmp_path / "ref.qcow2"
    _made(run_qemu_img, run_qemu_io, ours, opts)
    ref.write_bytes(ours.read_bytes())
    a, b = (run_qimg, run_qemu_img) if first == "qimg" else (run_qemu_img, run_qimg)

    def both(tool: RunCommand, *args: str) -> None:
        for runner, image in ((tool, ours), (run_qemu_img, ref)):
            got = runner(*args, image)
            assert got.returncode == 0, got.stderr

    both(a, "snapshot", "-c", "s1")
    for image in (ours, ref):
        assert (
            run_qemu_io("-c", "write -P 7 1M 1M", "-c", "write -P 8 4M 64k", image).returncode == 0
        )
    both(b, "snapshot", "-c", "s2")
    # qimg's own writer, over clusters both snapshots share.
    assert run_qimg("io", "-c", "write -P 9 0 2M", ours).returncode == 0
    assert run_qemu_io("-c", "write -P 9 0 2M", ref).returncode == 0
    assert run_qemu_img("check", ours).returncode == 0
    assert run_qemu_img("compare", ours, ref).returncode == 0
    both(b, "snapshot", "-a", "s1")
    assert run_qemu_img("compare", ours, ref).returncode == 0
    both(a, "snapshot", "-a", "2")
    assert run_qemu_img("compare", ours, ref).returncode == 0
    both(a, "snapshot", "-d", "s1")
    both(b, "snapshot", "-d", "s2")
    assert run_qemu_img("check", ours).returncode == 0
    assert run_qemu_img("compare", ours, ref).returncode == 0
    assert run_qemu_img("snapshot", "-l", ours).stdout == ""


def test_listing_of_qimg_snapshots_matches_qemu_img(
    tmp_path: Path, run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    """The entries qimg writes list as qemu-img's do (but the date)."""
    ours, ref = tmp_path / "ours.qcow2", tmp_path / "ref.qcow2"
    for image, tool in ((ours, run_qimg), (ref, run_qemu_img)):
        assert run_qemu_img("create", "-q", "-f", "qcow2", image, MiB).returncode == 0
        for name in ("first", "", "a much longer snapshot name", "first"):
            assert tool("snapshot", "-c", name, image).returncode == 0
    got, want = (run_qemu_img("snapshot", "-l", p).stdout for p in (ours, ref))
    assert DATE.sub("DATE", got) == DATE.sub("DATE", want)
    got_info, want_info = (qimg.info(p) for p in (ours, ref))
    strip = ("date-sec", "date-nsec")
    got_snaps = [{k: v for k, v in s.items() if k not in strip} for s in got_info["snapshots"]]
    want_snaps = [{k: v for k, v in s.items() if k not in strip} for s in want_info["snapshots"]]
    assert got_snaps == want_snaps


@pytest.mark.parametrize(
    "args",
    [["-a", "nope"], ["-d", "nope"], ["-d", "1"], ["-U", "-c", "x"]],
)
def test_snapshot_refusals_match_qemu_img(
    tmp_path: Path, args: list[str], run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    """Unknown snapshots (-d takes names only) and -U with a change: qemu-img's
    messages, and the image untouched."""
    image = tmp_path / "t.qcow2"
    assert run_qemu_img("create", "-q", "-f", "qcow2", image, MiB).returncode == 0
    assert run_qemu_img("snapshot", "-c", "s1", image).returncode == 0
    before = image.read_bytes()
    ours, theirs = run_qimg("snapshot", *args, image), run_qemu_img("snapshot", *args, image)
    assert ours.returncode == theirs.returncode == 1
    assert ours.stderr.splitlines()[0] == theirs.stderr.splitlines()[0].replace("qemu-img", "qimg")
    assert image.read_bytes() == before


def test_raw_images_have_no_snapshots_to_change(
    tmp_path: Path, run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    raw = tmp_path / "r.raw"
    assert run_qemu_img("create", "-q", "-f", "raw", raw, MiB).returncode == 0
    ours = run_qimg("snapshot", "-f", "raw", "-c", "x", raw)
    theirs = run_qemu_img("snapshot", "-f", "raw", "-c", "x", raw)
    assert ours.returncode == theirs.returncode == 1
    assert ours.stderr == theirs.stderr.replace("qemu-img", "qimg")


def test_snapshots_in_python(tmp_path: Path, run_qemu_img: RunCommand) -> None:
    """Image.create_snapshot / apply_snapshot / delete_snapshot, with the size the
    snapshot recorded coming back on apply."""
    path = tmp_path / "t.qcow2"
    qimg.create(path, 2 * MiB, format="qcow2")
    with qimg.open(path, writable=True) as image:
        image.write(0, b"\x11" * 65536)
        image.create_snapshot("before")
        image.write(0, b"\x22" * 65536)
        image.resize(4 * MiB)
        assert [s["name"] for s in image.snapshots()] == ["before"]
        image.apply_snapshot("before")
        assert image.size == 2 * MiB
        assert image.read(0, 65536) == b"\x11" * 65536
        with pytest.raises(qimg.InvalidOptionError, match="Could not delete snapshot 'x'"):
            image.delete_snapshot("x")
        image.delete_snapshot("before")
        assert image.snapshots() == []
    assert run_qemu_img("check", path).returncode == 0


@pytest.mark.parametrize(
    "param",
    [
        "s1",
        "1",
        "snapshot.name=s1",
        "snapshot.id=1",
        "snapshot.id=1,snapshot.name=s1",
        "nope",
        "snapshot.id=1,snapshot.name=other",
        "snapshot.foo=1",
    ],
)
def test_convert_and_measure_read_a_snapshot_as_qemu_img(
    tmp_path: Path,
    param: str,
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    run_qemu_io: RunCommand,
) -> None:
    """-l in its long and short forms: the snapshot's content, or qemu-img's refusal."""
    image = tmp_path / "t.qcow2"
    _made(run_qemu_img, run_qemu_io, image, "compat=1.1")
    assert run_qemu_img("snapshot", "-c", "s1", image).returncode == 0
    assert run_qemu_io("-c", "write -P 9 0 2M", image).returncode == 0
    assert run_qemu_img("resize", "-q", image, "+1M").returncode == 0
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    got = run_qimg("convert", "-l", param, "-O", "raw", image, ours)
    want = run_qemu_img("convert", "-l", param, "-O", "raw", image, theirs)
    assert got.returncode == want.returncode
    assert got.stderr.splitlines()[:1] == [
        line.replace("qemu-img", "qimg") for line in want.stderr.splitlines()[:1]
    ]
    if want.returncode == 0:
        assert ours.read_bytes() == theirs.read_bytes()
        assert len(ours.read_bytes()) == 9 * MiB  # the image's size, as qemu-img reads it
    else:
        assert not ours.exists()
    got = run_qimg("measure", "-l", param, "-O", "qcow2", image)
    want = run_qemu_img("measure", "-l", param, "-O", "qcow2", image)
    assert (got.returncode, got.stdout) == (want.returncode, want.stdout)


def test_open_a_snapshot_read_only_in_python(
    tmp_path: Path, run_qemu_img: RunCommand, run_qemu_io: RunCommand
) -> None:
    image = tmp_path / "t.qcow2"
    _made(run_qemu_img, run_qemu_io, image, "compat=1.1")
    assert run_qemu_img("snapshot", "-c", "s1", image).returncode == 0
    assert run_qemu_io("-c", "write -P 9 0 2M", image).returncode == 0
    with qimg.open(image, snapshot="s1") as snap:
        assert snap.read(0, 4) == b"\x01" * 4
        assert not snap.writable
    with qimg.open(image, snapshot=SnapshotRef(id="1")) as snap:
        assert snap.read(0, 4) == b"\x01" * 4
    with qimg.open(image) as current:
        assert current.read(0, 4) == b"\x09" * 4
    with pytest.raises(qimg.UsageError, match="read-only"):
        qimg.open(image, snapshot="s1", writable=True)
    with pytest.raises(qimg.InvalidOptionError, match="Can't find snapshot"):
        qimg.open(image, snapshot="nope")


@pytest.mark.parametrize(
    ("field", "value"),
    [("count", 5), ("offset", 1 << 40), ("offset_unaligned", 512)],
)
def test_damaged_snapshot_tables_are_checked_and_repaired_as_qemu_img(
    tmp_path: Path,
    field: str,
    value: int,
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
) -> None:
    """More snapshots in the header than the table holds, a table past the end of the
    file, an unaligned table: check reports what qemu-img reports (exit 2, or 1 for the
    table qemu-img cannot open), and check -r all leaves a clean image that lists the
    snapshots qemu-img's repair leaves."""
    good = tmp_path / "good.qcow2"
    assert run_qemu_img("create", "-q", "-f", "qcow2", good, MiB).returncode == 0
    assert run_qemu_img("snapshot", "-c", "s1", good).returncode == 0
    data = bytearray(good.read_bytes())
    if field == "count":
        data[60:64] = struct.pack(">I", value)
    elif field == "offset":
        data[64:72] = struct.pack(">Q", value)
    else:
        data[64:72] = struct.pack(">Q", struct.unpack(">Q", data[64:72])[0] + value)
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    ours.write_bytes(bytes(data))
    theirs.write_bytes(bytes(data))
    got, want = run_qimg("check", ours), run_qemu_img("check", theirs)
    assert got.returncode == want.returncode
    if want.returncode == 2:
        assert got.stdout == want.stdout
        assert got.stderr == want.stderr
        got, want = run_qimg("check", "-r", "all", ours), run_qemu_img("check", "-r", "all", theirs)
        assert got.returncode == want.returncode == 0
        assert run_qemu_img("check", ours).returncode == 0
        ours_list, theirs_list = (
            json.loads(run_qemu_img("info", "--output=json", p).stdout).get("snapshots")
            for p in (ours, theirs)
        )
        assert ours_list == theirs_list
    else:
        assert got.returncode == 1 and "snapshot table" in got.stderr.lower()
        assert ours.read_bytes() == bytes(data)
