"""qimg over real ``qemu-nbd`` servers (issue 6): every command that reads an image
agrees, on the NBD URL, ``json:`` and ``--image-opts`` spellings of an export, with
the same command on the served file and with qemu-img on the same URL; writes reach
the served file; a quorum of exports votes a corrupted one down; network faults are
clean one-line errors.

Servers are loopback TCP and unix sockets in the test's directory (``nbd_servers`` in
conftest.py kills every one of them when the test ends, pass or fail).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import qimg
from conftest import NbdServer, RunCommand, StartNbd, _free_port
from qimg.errors import QimgError

pytestmark = pytest.mark.qemu

SIZE = 4 << 20

#: (offset, length, byte) written into the raw image; the rest is a hole.
PATTERN = [(0, 64 << 10, 0x5A), (1 << 20, 4096, 0x11), (3 << 20, 192 << 10, 0xC3)]


def _make_raw(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for offset, length, byte in PATTERN:
            f.seek(offset)
            f.write(bytes([byte]) * length)
    return path


@pytest.fixture
def raw_image(tmp_path: Path) -> Path:
    return _make_raw(tmp_path / "a.raw")


@pytest.fixture
def qcow2_image(tmp_path: Path, run_qemu_img: RunCommand, raw_image: Path) -> Path:
    out = tmp_path / "a.qcow2"
    proc = run_qemu_img("convert", "-f", "raw", "-O", "qcow2", raw_image, out)
    assert proc.returncode == 0, proc.stderr
    return out


def _spellings(server: NbdServer) -> list[list[str]]:
    """The command-line arguments that name the export as an image, every way."""
    return [
        [server.url],
        ["-f", "raw", server.url],
        [server.json],
        ["--image-opts", server.image_opts],
        [
            "--image-opts",
            "driver=raw," + ",".join("file." + item for item in server.image_opts.split(",")),
        ],
    ]


# --- info and map ---------------------------------------------------------------------------


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
@pytest.mark.parametrize("served_fmt", ["raw", "qcow2"])
def test_info_agrees_with_qemu_img_on_every_spelling(
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    nbd_servers: StartNbd,
    raw_image: Path,
    qcow2_image: Path,
    unix: bool,
    served_fmt: str,
) -> None:
    image = raw_image if served_fmt == "raw" else qcow2_image
    server = nbd_servers(image, fmt=served_fmt, unix=unix, read_only=True)
    for args in _spellings(server):
        for output in ("human", "json"):
            theirs = run_qemu_img("info", f"--output={output}", *args)
            ours = run_qimg("info", f"--output={output}", *args)
            assert theirs.returncode == 0, theirs.stderr
            assert (ours.returncode, ours.stderr) == (0, ""), args
            assert ours.stdout == theirs.stdout, args
    info = json.loads(run_qimg("info", "--output=json", server.url).stdout)
    assert info["virtual-size"] == SIZE


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
@pytest.mark.parametrize("served_fmt", ["raw", "qcow2"])
def test_map_agrees_with_qemu_img_and_with_the_local_file(
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    nbd_servers: StartNbd,
    raw_image: Path,
    qcow2_image: Path,
    unix: bool,
    served_fmt: str,
) -> None:
    image = raw_image if served_fmt == "raw" else qcow2_image
    server = nbd_servers(image, fmt=served_fmt, unix=unix, read_only=True)
    local = raw_image.read_bytes()
    # The nbd node by itself as the image: test_map_of_an_nbd_node_by_itself below.
    for args in [a for a in _spellings(server) if not _is_nbd_root(a)]:
        theirs = run_qemu_img("map", "--output=json", *args)
        ours = run_qimg("map", "--output=json", *args)
        assert theirs.returncode == 0, theirs.stderr
        assert (ours.returncode, ours.stderr) == (0, ""), args
        assert json.loads(ours.stdout) == json.loads(theirs.stdout), args
        # What the export calls holes reads as zeroes in the file, and the data written
        # into it lies in data extents (the server reports at its own granularity).
        extents = json.loads(ours.stdout)
        assert sum(e["length"] for e in extents) == SIZE
        for e in extents:
            if not e["data"]:
                assert local[e["start"] : e["start"] + e["length"]] == bytes(e["length"])
        for offset, length, _ in PATTERN:
            assert any(
                e["data"] and e["start"] <= offset and offset + length <= e["start"] + e["length"]
                for e in extents
            )


def _is_nbd_root(args: list[str]) -> bool:
    return args[-1].startswith(("driver=nbd,", 'json:{"driver": "nbd"'))


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
def test_map_of_an_nbd_node_by_itself(
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    nbd_servers: StartNbd,
    raw_image: Path,
    unix: bool,
) -> None:
    server = nbd_servers(raw_image, unix=unix, read_only=True)
    for args in [*(a for a in _spellings(server) if _is_nbd_root(a)), ["-f", "nbd", server.url]]:
        theirs = run_qemu_img("map", "--output=json", *args)
        ours = run_qimg("map", "--output=json", *args)
        assert theirs.returncode == 0, theirs.stderr
        assert (ours.returncode, ours.stderr) == (0, ""), args
        assert json.loads(ours.stdout) == json.loads(theirs.stdout), args


# --- convert and compare ----------------------------------------------------------------------


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
@pytest.mark.parametrize("served_fmt", ["raw", "qcow2"])
def test_convert_to_raw_gives_the_served_guest_bytes(
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    nbd_servers: StartNbd,
    raw_image: Path,
    qcow2_image: Path,
    tmp_path: Path,
    unix: bool,
    served_fmt: str,
) -> None:
    image = raw_image if served_fmt == "raw" else qcow2_image
    server = nbd_servers(image, fmt=served_fmt, unix=unix, read_only=True)
    expected = raw_image.read_bytes()
    for i, args in enumerate(_spellings(server)):
        ours = tmp_path / f"ours.{i}.raw"
        theirs = tmp_path / f"theirs.{i}.raw"
        proc = run_qimg("convert", "-O", "raw", *args, ours)
        assert (proc.returncode, proc.stderr) == (0, ""), args
        proc = run_qemu_img("convert", "-O", "raw", *args, theirs)
        assert proc.returncode == 0, proc.stderr
        assert ours.read_bytes() == theirs.read_bytes() == expected


def test_convert_to_qcow2_from_an_export_matches_the_local_file(
    run_qimg: RunCommand, nbd_servers: StartNbd, raw_image: Path, tmp_path: Path
) -> None:
    server = nbd_servers(raw_image, read_only=True)
    out = tmp_path / "out.qcow2"
    proc = run_qimg("convert", "-O", "qcow2", server.url, out)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert run_qimg("compare", "-f", "qcow2", "-F", "raw", out, raw_image).returncode == 0


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
def test_compare_agrees_with_qemu_img(
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    nbd_servers: StartNbd,
    raw_image: Path,
    qcow2_image: Path,
    tmp_path: Path,
    unix: bool,
) -> None:
    raw = nbd_servers(raw_image, unix=unix, read_only=True)
    qcow2 = nbd_servers(qcow2_image, fmt="qcow2", unix=unix, read_only=True)
    other = _make_raw(tmp_path / "other.raw")
    with open(other, "r+b") as f:
        f.seek((3 << 20) + 100)
        f.write(b"\x00")
    cases = [
        (raw.url, qcow2.url),
        (raw.url, str(raw_image)),
        (qcow2.json, str(qcow2_image)),
        (raw.url, str(other)),
        (qcow2.url, str(other)),
    ]
    for first, second in cases:
        theirs = run_qemu_img("compare", first, second)
        ours = run_qimg("compare", first, second)
        assert (ours.returncode, ours.stdout, ours.stderr) == (
            theirs.returncode,
            theirs.stdout,
            theirs.stderr,
        ), (first, second)
    # qemu-img names the 512-byte sector where the contents first differ.
    assert run_qimg("compare", raw.url, str(other)).stdout == (
        f"Content mismatch at offset {3 << 20}!\n"
    )


# --- io: reads and writes ---------------------------------------------------------------------


def test_io_reads_the_export(run_qimg: RunCommand, nbd_servers: StartNbd, raw_image: Path) -> None:
    server = nbd_servers(raw_image, read_only=True, unix=True)
    for offset, length, byte in PATTERN:
        proc = run_qimg("io", "-r", "-c", f"read -P {byte:#x} {offset} {length}", server.url)
        assert (proc.returncode, proc.stderr) == (0, "")
        assert proc.stdout.startswith(f"read {length}/{length} bytes at offset {offset}\n")
    proc = run_qimg("io", "-r", "-c", "read -P 0 65536 4096", "--image-opts", server.image_opts)
    assert (proc.returncode, proc.stderr) == (0, "")


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
def test_io_writes_land_on_the_served_file(
    run_qimg: RunCommand,
    run_qemu_io: RunCommand,
    nbd_servers: StartNbd,
    raw_image: Path,
    unix: bool,
) -> None:
    server = nbd_servers(raw_image, unix=unix)
    commands = [
        "write -P 0xab 8192 12288",
        "write -z 0 4096",
        "discard 3145728 65536",  # qemu-nbd ignores it (no --discard=unmap): it must succeed
        "flush",
    ]
    args = [arg for c in commands for arg in ("-c", c)]
    proc = run_qimg("io", *args, "-f", "raw", server.url)
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stdout
    data = raw_image.read_bytes()
    assert data[8192 : 8192 + 12288] == b"\xab" * 12288
    assert data[:4096] == bytes(4096)
    assert data[4096:8192] == b"\x5a" * 4096
    # And qemu-io, through the same server, reads what qimg wrote.
    proc = run_qemu_io("-f", "raw", "-c", "read -P 0xab 8192 12288", server.url)
    assert proc.returncode == 0 and "Pattern verification failed" not in proc.stdout


def test_writes_to_a_read_only_export_fail_cleanly(
    run_qimg: RunCommand, nbd_servers: StartNbd, raw_image: Path
) -> None:
    server = nbd_servers(raw_image, read_only=True)
    before = raw_image.read_bytes()
    proc = run_qimg("io", "-c", "write -P 0xab 0 4096", "-f", "raw", server.url)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert raw_image.read_bytes() == before


def test_writes_through_a_served_qcow2_reach_the_guest_view(
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    nbd_servers: StartNbd,
    qcow2_image: Path,
    tmp_path: Path,
) -> None:
    server = nbd_servers(qcow2_image, fmt="qcow2")
    proc = run_qimg("io", "-c", "write -P 0x77 2097152 65536", "-f", "raw", server.url)
    assert (proc.returncode, proc.stderr) == (0, "")
    server.kill()  # qemu-nbd writes the qcow2 metadata out as it goes; it is closed now
    out = tmp_path / "guest.raw"
    assert run_qemu_img("convert", "-O", "raw", qcow2_image, out).returncode == 0
    assert out.read_bytes()[2 << 20 : (2 << 20) + 65536] == b"\x77" * 65536


# --- quorum over the network ------------------------------------------------------------------


def test_quorum_of_three_exports_votes_the_corrupted_one_down(
    run_qimg: RunCommand, nbd_servers: StartNbd, tmp_path: Path
) -> None:
    images = [_make_raw(tmp_path / f"r{i}.raw") for i in range(3)]
    with open(images[1], "r+b") as f:
        f.seek(1 << 20)
        f.write(b"\xee" * 512)
    servers = [
        nbd_servers(images[0], read_only=True),
        nbd_servers(images[1], read_only=True, unix=True),
        nbd_servers(images[2], read_only=True),
    ]
    tree = {
        "driver": "quorum",
        "vote-threshold": 2,
        "children": [
            servers[0].node(),
            {"driver": "raw", "file": servers[1].node()},
            servers[2].node(),
        ],
    }
    events = tmp_path / "events.jsonl"
    proc = run_qimg(
        "io",
        "-r",
        "--events",
        events,
        "-c",
        "read -P 0x11 1048576 4096",
        "json:" + json.dumps(tree),
    )
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stdout
    records = [json.loads(line) for line in events.read_text().splitlines()]
    assert [r["event"] for r in records] == ["QUORUM_REPORT_BAD"]
    data = records[0]["data"]
    assert data["node-name"] == "children.1"
    assert data["type"] == "read"
    assert "error" not in data
    assert data["sector-num"] <= (1 << 20) // 512 < data["sector-num"] + data["sectors-count"]

    # Converting the quorum gives the majority's bytes.
    out = tmp_path / "voted.raw"
    proc = run_qimg("convert", "-O", "raw", "json:" + json.dumps(tree), out)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert out.read_bytes() == images[0].read_bytes()


def test_quorum_survives_a_dead_child_and_reports_it(
    run_qimg: RunCommand, nbd_servers: StartNbd, tmp_path: Path
) -> None:
    images = [_make_raw(tmp_path / f"r{i}.raw") for i in range(3)]
    servers = [nbd_servers(image, read_only=True) for image in images]
    tree = {"driver": "quorum", "vote-threshold": 2, "children": [s.node() for s in servers]}
    image = qimg.open(tree)
    try:
        assert image.read(0, 4096) == b"\x5a" * 4096
        assert list(image.events()) == []
        servers[2].kill()
        assert image.read(1 << 20, 4096) == b"\x11" * 4096
        bad = [e for e in image.events() if e.name == "QUORUM_REPORT_BAD"]
        assert [e.data["node-name"] for e in bad] == ["children.2"]
        assert "error" in bad[0].data
        servers[1].kill()
        with pytest.raises(QimgError):
            image.read(3 << 20, 4096)
        assert "QUORUM_FAILURE" in [e.name for e in image.events()]
    finally:
        image.close()


# --- network faults ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["info", "map", "compare", "convert", "io"])
def test_nothing_listening_is_a_one_line_error(
    run_qimg: RunCommand, run_qemu_img: RunCommand, tmp_path: Path, command: str
) -> None:
    urls = [f"nbd://127.0.0.1:{_free_port()}/x", f"nbd+unix:///x?socket={tmp_path}/none.sock"]
    for url in urls:
        commands: dict[str, list[str | os.PathLike[str]]] = {
            "info": ["info", url],
            "map": ["map", url],
            "compare": ["compare", url, url],
            "convert": ["convert", "-O", "raw", url, tmp_path / "out.raw"],
            "io": ["io", "-r", "-c", "read 0 512", url],
        }
        args = commands[command]
        proc = run_qimg(*args)
        assert proc.returncode != 0
        assert proc.stdout == ""
        assert "Traceback" not in proc.stderr
        assert proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith(f"qimg: Could not open '{url}': "), proc.stderr
    theirs = run_qemu_img("info", urls[0])
    assert theirs.returncode == 1 and "Connection refused" in theirs.stderr


def test_a_server_killed_mid_way_fails_the_read_cleanly(
    nbd_servers: StartNbd, raw_image: Path
) -> None:
    server = nbd_servers(raw_image, read_only=True)
    image = qimg.open(server.url, "raw")
    try:
        assert image.read(0, 4096) == b"\x5a" * 4096
        server.kill()
        with pytest.raises(QimgError) as err:
            image.read(1 << 20, 1 << 20)
        assert "\n" not in str(err.value)
    finally:
        image.close()


def test_a_server_killed_during_convert_is_a_clean_failure(
    run_qimg: RunCommand, nbd_servers: StartNbd, tmp_path: Path
) -> None:
    # The server dies before the copy; the source was opened on an earlier connection
    # attempt only in qemu-img's sense: here, opening itself must fail cleanly.
    source = _make_raw(tmp_path / "src.raw")
    server = nbd_servers(source, read_only=True)
    url = server.url
    server.kill()
    proc = run_qimg("convert", "-O", "raw", url, tmp_path / "out.raw")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1


@pytest.mark.qemu
def test_a_server_that_takes_one_client_at_a_time_is_shared_within_a_command(
    tmp_path: Path, run_qimg: RunCommand, nbd_servers: StartNbd
) -> None:
    # qemu-nbd's default serves one client at a time yet advertises multi-conn:
    # info (which probes the export, then opens it) and compare of the export with
    # itself must reuse one connection instead of waiting on a second.
    image = tmp_path / "one.raw"
    image.write_bytes(bytes(range(256)) * 4096)
    server = nbd_servers(image, unix=True, shared=1)
    info = run_qimg("info", "--output=json", server.url)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["virtual-size"] == 1 << 20
    same = run_qimg("compare", server.url, server.url)
    assert same.returncode == 0, same.stderr
    out = tmp_path / "out.raw"
    copy = run_qimg("convert", "-O", "raw", server.url, out)
    assert copy.returncode == 0, copy.stderr
    assert out.read_bytes() == image.read_bytes()


def _client_connections(port: int) -> int:
    """Established TCP connections from this machine to 127.0.0.1:``port``."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, state = fields[2], fields[3]
        if state == "01" and int(remote.split(":")[1], 16) == port:
            count += 1
    return count


@pytest.mark.parametrize("connections", [1, 3])
def test_the_connections_option_sets_how_many_a_multi_conn_export_gets(
    nbd_servers: StartNbd, raw_image: Path, connections: int
) -> None:
    server = nbd_servers(raw_image, read_only=True)
    assert server.port is not None
    image = qimg.open({"driver": "raw", "file": {**server.node(), "connections": connections}})
    try:
        assert _client_connections(server.port) == connections
        # Requests spread over them and come back whole.
        assert image.read(0, SIZE) == raw_image.read_bytes()
    finally:
        image.close()
    assert _client_connections(server.port) == 0


def test_extra_connections_a_server_never_answers_are_given_up(
    run_qimg: RunCommand, nbd_servers: StartNbd, raw_image: Path
) -> None:
    # One client at a time, yet multi-conn advertised: the extra connections wait in the
    # server's backlog; qimg gives up on them and works over the first.
    server = nbd_servers(raw_image, read_only=True, shared=1)
    spec = "json:" + json.dumps({"driver": "raw", "file": {**server.node(), "connections": 4}})
    info = run_qimg("info", "--output=json", spec)
    assert (info.returncode, info.stderr) == (0, "")
    assert json.loads(info.stdout)["virtual-size"] == SIZE
