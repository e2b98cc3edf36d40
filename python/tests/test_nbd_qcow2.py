"""qcow2 images whose *file* is an NBD export (issue 6): ``qemu-nbd -f raw`` serves the
bytes of a qcow2 file, and qimg reads the qcow2 format over them as it reads a local
file. Every command agrees with qemu-img on the same URL and with the local file;
writes land in the served file and leave an image ``qemu-img check`` accepts; what an
export cannot do (grow, be repaired in place) is refused in one line.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from test_nbd_interop import PATTERN, SIZE
from test_nbd_interop import _make_raw as _guest

from conftest import NbdServer, RunCommand, StartNbd, assert_ok

pytestmark = pytest.mark.qemu

Maker = Callable[[Path, RunCommand, RunCommand], Path]


def _converted(*options: str) -> Maker:
    def make(tmp: Path, qemu_img: RunCommand, qemu_io: RunCommand) -> Path:
        out = tmp / "image.qcow2"
        assert_ok(
            qemu_img("convert", "-f", "raw", "-O", "qcow2", *options, _guest(tmp / "g.raw"), out)
        )
        return out

    return make


def _extended_l2(tmp: Path, qemu_img: RunCommand, qemu_io: RunCommand) -> Path:
    out = tmp / "image.qcow2"
    assert_ok(qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on", out, str(SIZE)))
    for offset, length, byte in PATTERN:
        assert_ok(qemu_io("-f", "qcow2", "-c", f"write -P {byte:#x} {offset} {length}", out))
    # Subclusters: 2 KiB of one 64 KiB cluster, and a zeroed subcluster inside data.
    assert_ok(qemu_io("-f", "qcow2", "-c", "write -P 0x3c 2101248 2048", out))
    assert_ok(qemu_io("-f", "qcow2", "-c", "write -z 4096 2048", out))
    return out


def _with_backing(tmp: Path, qemu_img: RunCommand, qemu_io: RunCommand) -> Path:
    base = _guest(tmp / "base.raw")
    out = tmp / "image.qcow2"
    # An absolute backing name: the overlay over NBD finds it as a local file.
    assert_ok(qemu_img("create", "-f", "qcow2", "-b", str(base.resolve()), "-F", "raw", out))
    assert_ok(qemu_io("-f", "qcow2", "-c", "write -P 0x77 1048576 65536", out))
    assert_ok(qemu_io("-f", "qcow2", "-c", "write -z 3145728 65536", out))
    return out


IMAGES: dict[str, Maker] = {
    "plain": _converted(),
    "compat-0.10": _converted("-o", "compat=0.10"),
    "zstd-compressed": _converted("-c", "-o", "compression_type=zstd"),
    "cluster-512": _converted("-o", "cluster_size=512"),
    "extended-l2": _extended_l2,
    "absolute-backing": _with_backing,
}


def _spellings(server: NbdServer) -> list[list[str]]:
    """Every way to name the qcow2 image whose file is the export."""
    return [
        [server.url],
        ["-f", "qcow2", server.url],
        ["json:" + json.dumps({"driver": "qcow2", "file": server.node()})],
        ["json:" + json.dumps({"file": server.node()})],
        [
            "--image-opts",
            "driver=qcow2," + ",".join("file." + item for item in server.image_opts.split(",")),
        ],
    ]


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_every_reading_command_agrees_with_qemu_img(
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    run_qemu_io: RunCommand,
    nbd_servers: StartNbd,
    tmp_path: Path,
    kind: str,
    unix: bool,
) -> None:
    image = IMAGES[kind](tmp_path, run_qemu_img, run_qemu_io)
    server = nbd_servers(image, fmt="raw", unix=unix, read_only=True)
    local = tmp_path / "local.raw"
    assert_ok(run_qemu_img("convert", "-O", "raw", image, local))
    for i, args in enumerate(_spellings(server)):
        for command in (
            ["info", "--output=human"],
            ["info", "--output=json"],
            ["map", "--output=json"],
            ["map", "--output=human"],
            ["check"],
            ["check", "--output=json"],
        ):
            theirs = run_qemu_img(*command, *args)
            ours = run_qimg(*command, *args)
            # (qemu-img's human map refuses compressed clusters; so does qimg's.)
            assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout), (
                command,
                args,
                ours.stderr,
            )
            assert ours.stderr.count("\n") == (0 if theirs.returncode == 0 else 1)
        out = tmp_path / f"out.{i}.raw"
        proc = run_qimg("convert", "-O", "raw", *args, out)
        assert (proc.returncode, proc.stderr) == (0, ""), args
        assert out.read_bytes() == local.read_bytes(), args
    # The export and the file it serves are the same image.
    same = run_qimg("compare", server.url, image)
    assert (same.returncode, same.stdout) == (0, "Images are identical.\n"), same.stderr


def test_a_relative_backing_name_is_shown_but_not_followed(
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    nbd_servers: StartNbd,
    tmp_path: Path,
) -> None:
    _guest(tmp_path / "base.raw")
    image = tmp_path / "top.qcow2"
    assert_ok(run_qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", image))
    server = nbd_servers(image, fmt="raw", unix=True, read_only=True)
    # info names the backing file without opening it, and cannot say where it is.
    shown = {}
    for output in ("human", "json"):
        theirs = run_qemu_img("info", f"--output={output}", server.url)
        ours = run_qimg("info", f"--output={output}", server.url)
        assert theirs.returncode == 0, theirs.stderr
        assert (ours.returncode, ours.stdout) == (0, theirs.stdout)
        shown[output] = ours.stdout
    assert "backing file: base.raw (cannot determine actual path)" in shown["human"]
    # Reading needs the backing file: both tools refuse, in one line.
    for command in (["map"], ["check"], ["convert", "-O", "raw"]):
        extra = [str(tmp_path / "out.raw")] if command[0] == "convert" else []
        theirs = run_qemu_img(*command, server.url, *extra)
        ours = run_qimg(*command, server.url, *extra)
        assert theirs.returncode == 1
        assert (ours.returncode, ours.stdout) == (1, "")
        assert ours.stderr.count("\n") == 1
        assert "'base.raw' is relative" in ours.stderr
    # With the backing node given, both read it.
    spec = {
        "driver": "qcow2",
        "file": server.node(),
        "backing": {
            "driver": "raw",
            "file": {"driver": "file", "filename": str(tmp_path / "base.raw")},
        },
    }
    args = ["map", "--output=json", "json:" + json.dumps(spec)]
    theirs = run_qemu_img(*args)
    ours = run_qimg(*args)
    assert theirs.returncode == 0, theirs.stderr
    assert (ours.returncode, ours.stdout) == (0, theirs.stdout), ours.stderr


def test_writes_land_in_the_served_file_and_qemu_img_accepts_it(
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    run_qemu_io: RunCommand,
    nbd_servers: StartNbd,
    tmp_path: Path,
) -> None:
    image = IMAGES["plain"](tmp_path, run_qemu_img, run_qemu_io)
    # Room at the end of the file for new clusters: the export cannot grow.
    with open(image, "r+b") as f:
        f.truncate(image.stat().st_size + (1 << 20))
    server = nbd_servers(image, fmt="raw", unix=True)
    commands = [
        "write -P 0x66 4096 8192",  # inside an allocated cluster
        "write -P 0x67 2097152 65536",  # a new cluster (and its refcount)
        "write -z 1048576 4096",
        "discard 3145728 65536",
        "flush",
    ]
    proc = run_qimg("io", *[a for c in commands for a in ("-c", c)], "-f", "qcow2", server.url)
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stdout
    server.kill()
    check = run_qemu_img("check", image)
    assert check.returncode == 0, check.stdout + check.stderr
    for pattern in (
        "read -P 0x66 4096 8192",
        "read -P 0x67 2097152 65536",
        "read -P 0 1048576 4096",
        "read -P 0x5a 0 4096",
        "read -P 0x5a 12288 53248",
    ):
        read = run_qemu_io("-f", "qcow2", "-c", pattern, image)
        assert read.returncode == 0 and "Pattern verification failed" not in read.stdout, pattern


def test_a_write_past_the_end_of_the_export_fails_and_corrupts_nothing(
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    run_qemu_io: RunCommand,
    nbd_servers: StartNbd,
    tmp_path: Path,
) -> None:
    image = IMAGES["plain"](tmp_path, run_qemu_img, run_qemu_io)
    server = nbd_servers(image, fmt="raw", unix=True)
    # The file ends at its last cluster: a new cluster would need the export to grow.
    ours = run_qimg("io", "-f", "qcow2", "-c", "write -P 0x67 2097152 65536", server.url)
    theirs = run_qemu_io("-f", "qcow2", "-c", "write -P 0x67 2097152 65536", server.url)
    assert "write failed" in theirs.stdout + theirs.stderr
    assert ours.returncode == 1
    assert "write failed: No space left on device" in ours.stdout + ours.stderr
    assert "Traceback" not in ours.stderr
    server.kill()
    check = run_qemu_img("check", image)
    assert check.returncode in (0, 3), check.stdout  # leaked clusters at most
    local = tmp_path / "after.raw"
    assert_ok(run_qemu_img("convert", "-O", "raw", image, local))
    assert local.read_bytes() == (tmp_path / "g.raw").read_bytes()


def test_an_export_is_not_repaired_or_grown_in_place(
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    run_qemu_io: RunCommand,
    nbd_servers: StartNbd,
    tmp_path: Path,
) -> None:
    image = IMAGES["plain"](tmp_path, run_qemu_img, run_qemu_io)
    raw = _guest(tmp_path / "plain.raw")
    served = nbd_servers(image, fmt="raw", unix=True)
    served_raw = nbd_servers(raw, fmt="raw", unix=True)
    before = image.read_bytes(), raw.read_bytes()
    repair = run_qimg("check", "-r", "all", served.url)
    assert (repair.returncode, repair.stdout) == (1, "")
    assert repair.stderr == (
        f"qimg: Cannot repair '{served.url}': its bytes are not in a local file (nbd); "
        "run 'check -r' where the image is stored\n"
    )
    grow = run_qimg("resize", "-f", "raw", served_raw.url, "8M")
    assert (grow.returncode, grow.stdout) == (1, "")
    assert grow.stderr.count("\n") == 1
    assert "an NBD export keeps the size its server gives it" in grow.stderr
    assert (image.read_bytes(), raw.read_bytes()) == before


def test_quorum_of_three_qcow2_exports_votes_a_corrupted_one_down(
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    nbd_servers: StartNbd,
    tmp_path: Path,
) -> None:
    guest = _guest(tmp_path / "g.raw")
    images = []
    for i in range(3):
        out = tmp_path / f"r{i}.qcow2"
        assert_ok(run_qemu_img("convert", "-f", "raw", "-O", "qcow2", guest, out))
        images.append(out)
    # Corrupt guest data of the second replica where its file holds it.
    mapped = json.loads(run_qemu_img("map", "--output=json", images[1]).stdout)
    host = next(e["offset"] for e in mapped if e["data"] and e["start"] == 1 << 20)
    with open(images[1], "r+b") as f:
        f.seek(host)
        f.write(b"\xee" * 512)
    servers = [
        nbd_servers(image, fmt="raw", unix=i == 1, read_only=True) for i, image in enumerate(images)
    ]
    tree = {
        "driver": "quorum",
        "vote-threshold": 2,
        "children": [{"driver": "qcow2", "file": s.node()} for s in servers],
    }
    spec = "json:" + json.dumps(tree)
    events = tmp_path / "events.jsonl"
    out = tmp_path / "voted.raw"
    proc = run_qimg("convert", "--events", events, "-O", "raw", spec, out)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert out.read_bytes() == guest.read_bytes()
    records = [json.loads(line) for line in events.read_text().splitlines()]
    assert {r["data"]["node-name"] for r in records} == {"children.1"}
    theirs = tmp_path / "theirs.raw"
    assert_ok(run_qemu_img("convert", "-O", "raw", spec, theirs))
    assert theirs.read_bytes() == out.read_bytes()
    scrub = run_qimg("scrub", "--output=json", spec)
    assert scrub.returncode == 2, scrub.stderr
    children = {c["node-name"]: c for c in json.loads(scrub.stdout)["children"]}
    assert [name for name, c in children.items() if c["bad-bytes"]] == ["children.1"]
    (bad,) = children["children.1"]["bad-ranges"]
    assert bad["offset"] <= 1 << 20 < bad["offset"] + bad["length"]


def test_convert_n_writes_an_image_into_exports(
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    nbd_servers: StartNbd,
    tmp_path: Path,
) -> None:
    source = _guest(tmp_path / "src.raw")
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\xff" * SIZE)
    qcow2 = tmp_path / "disk.qcow2"
    assert_ok(run_qemu_img("create", "-f", "qcow2", qcow2, str(SIZE)))
    with open(qcow2, "r+b") as f:
        f.truncate(SIZE + (1 << 20))  # room for the clusters the copy allocates
    raw_export = nbd_servers(disk, fmt="raw", unix=True)
    qcow2_export = nbd_servers(qcow2, fmt="raw")
    # Without -n there is nothing qimg could create at a URL: one line, nothing written.
    refused = run_qimg("convert", "-O", "raw", source, raw_export.url)
    assert (refused.returncode, refused.stdout) == (1, "")
    assert refused.stderr == (
        "qimg: A target given as an NBD URL, as json: or with --target-image-opts must exist: "
        "use -n (qimg creates targets only from file names)\n"
    )
    assert disk.read_bytes() == b"\xff" * SIZE
    for export, fmt in ((raw_export, "raw"), (qcow2_export, "qcow2")):
        proc = run_qimg("convert", "-n", "-O", fmt, source, export.url)
        assert (proc.returncode, proc.stderr) == (0, ""), fmt
        export.kill()
    assert disk.read_bytes() == source.read_bytes()
    check = run_qemu_img("check", qcow2)
    assert check.returncode == 0, check.stdout
    same = run_qemu_img("compare", "-f", "raw", "-F", "qcow2", source, qcow2)
    assert same.returncode == 0, same.stdout
