"""Events (qimg.events): the QMP shape, the sinks, and delivery from open images and
from every command that opens images (``--events FILE``)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import qimg
from qimg.errors import ImageIOError, UsageError
from qimg.events import Event, EventHub, EventStream, JsonLinesSink, open_sink

MiB = 1 << 20

# --- the event itself ---------------------------------------------------------------------


def test_event_renders_in_qmp_shape() -> None:
    event = Event.from_dict(
        {
            "event": "QUORUM_REPORT_BAD",
            "data": {
                "sectors-count": 8,
                "node-name": "children.2",
                "type": "read",
                "sector-num": 0,
            },
            "timestamp": {"seconds": 1700000000, "microseconds": 42},
        }
    )
    # Data members in QAPI's order, whatever order they were recorded in.
    assert event.to_json() == (
        '{"event": "QUORUM_REPORT_BAD", "data": {"type": "read", "node-name": "children.2", '
        '"sector-num": 0, "sectors-count": 8}, '
        '"timestamp": {"seconds": 1700000000, "microseconds": 42}}'
    )
    assert event.time == pytest.approx(1700000000.000042)


def test_failure_event_members_in_qapi_order() -> None:
    event = Event.from_dict(
        {
            "event": "QUORUM_FAILURE",
            "data": {"sectors-count": 1, "sector-num": 3, "reference": "root"},
            "timestamp": {"seconds": 1, "microseconds": 2},
        }
    )
    assert list(event.as_dict()["data"]) == ["reference", "sector-num", "sectors-count"]


def test_event_round_trips_through_its_json_line() -> None:
    event = Event(
        "QUORUM_REPORT_BAD",
        {"type": "write", "error": "Input/output error", "node-name": "d", "sector-num": 1,
         "sectors-count": 2},
        5,
        999999,
    )  # fmt: skip
    assert Event.from_dict(json.loads(event.to_json())) == event


@pytest.mark.parametrize(
    "obj",
    [{}, {"event": "X"}, {"event": "X", "timestamp": {"seconds": "s", "microseconds": 0}}],
)
def test_event_from_a_dict_that_is_not_one(obj: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="not a QMP event"):
        Event.from_dict(obj)


# --- sinks --------------------------------------------------------------------------------

E1 = Event("QUORUM_FAILURE", {"reference": "q", "sector-num": 0, "sectors-count": 1}, 1, 2)
E2 = Event("QUORUM_FAILURE", {"reference": "q", "sector-num": 8, "sectors-count": 1}, 3, 4)


def test_event_stream_yields_each_event_once_in_order() -> None:
    stream = EventStream()
    stream(E1)
    stream(E2)
    assert len(stream) == 2
    assert list(stream) == [E1, E2]
    assert list(stream) == []
    stream(E2)
    assert stream.drain() == [E2]
    assert len(stream) == 0


def test_hub_hands_every_event_to_every_sink_in_order() -> None:
    first: list[Event] = []
    second = EventStream()
    hub = EventHub([first.append, second])
    hub.deliver([E1, E2])
    assert first == [E1, E2]
    assert second.drain() == [E1, E2]


def test_json_lines_file_sink_truncates_and_flushes_each_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text("old contents\n")
    sink = open_sink(str(path))
    sink(E1)
    # Readable before the sink is closed: every line is flushed as it is written.
    assert path.read_text() == E1.to_json() + "\n"
    sink(E2)
    sink.close()
    assert path.read_text().splitlines() == [E1.to_json(), E2.to_json()]


def test_dash_is_standard_error_after_standard_output(capsys: pytest.CaptureFixture[str]) -> None:
    sink = open_sink("-")
    print("before", end="")
    sink(E1)
    sink.close()  # standard error stays open
    out, err = capsys.readouterr()
    assert (out, err) == ("before", E1.to_json() + "\n")
    print("still open", file=sys.stderr)


def test_stream_sink_writes_lines() -> None:
    buffer = io.StringIO()
    JsonLinesSink(buffer)(E2)
    assert buffer.getvalue() == E2.to_json() + "\n"


def test_events_file_that_cannot_be_opened(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"Could not open the events file '.*': Is a directory"):
        open_sink(str(tmp_path))


# --- events from images -------------------------------------------------------------------


def make_replicas(root: Path, count: int = 3, size: int = MiB, fill: bytes = b"\x11") -> list[Path]:
    paths = []
    for i in range(count):
        path = root / f"r{i}.raw"
        path.write_bytes(fill * size)
        paths.append(path)
    return paths


def quorum(paths: list[Path], threshold: int = 2, **options: Any) -> dict[str, Any]:
    return {
        "driver": "quorum",
        "vote-threshold": threshold,
        **options,
        "children": [{"driver": "raw", "file": {"filename": str(p)}} for p in paths],
    }


def corrupt(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_a_child_that_differs_is_reported_after_the_read(tmp_path: Path) -> None:
    paths = make_replicas(tmp_path)
    corrupt(paths[1], 4096, b"\xff" * 512)
    before = time.time()
    with qimg.open(quorum(paths)) as img:
        assert img.read(0, 65536) == b"\x11" * 65536
        events = list(img.events())
        assert list(img.events()) == []
    after = time.time()
    assert [(e.name, e.data["node-name"], e.data["type"]) for e in events] == [
        ("QUORUM_REPORT_BAD", "children.1", "read")
    ]
    assert "error" not in events[0].data
    assert before - 1 <= events[0].time <= after + 1


def test_user_node_names_name_the_children(tmp_path: Path) -> None:
    paths = make_replicas(tmp_path)
    corrupt(paths[2], 0, b"\x00")
    spec = quorum(paths)
    spec["node-name"] = "q"
    spec["children"][2]["node-name"] = "drive2"
    got: list[Event] = []
    with qimg.open(spec, events=got.append) as img:
        img.read(0, 512)
    assert [e.data["node-name"] for e in got] == ["drive2"]


def test_no_quorum_fails_the_read_and_still_delivers_the_event(tmp_path: Path) -> None:
    paths = make_replicas(tmp_path)
    corrupt(paths[1], 0, b"\x01" * 512)
    corrupt(paths[2], 0, b"\x02" * 512)
    stream = EventStream()
    with qimg.open(quorum(paths), events=stream) as img:
        with pytest.raises(ImageIOError) as err:
            img.read(0, 512)
        assert err.value.errno == 5
    events = stream.drain()
    assert events[-1].name == "QUORUM_FAILURE"
    assert events[-1].data == {"reference": "root", "sector-num": 0, "sectors-count": 1}


def test_blkdebug_failures_carry_the_error(tmp_path: Path) -> None:
    paths = make_replicas(tmp_path)
    spec = quorum(paths)
    spec["children"][0] = {
        "driver": "blkdebug",
        "image": spec["children"][0],
        "inject-error": [
            {"event": "read_aio", "errno": 28},
            {"event": "write_aio", "errno": 5, "sector": 16},
        ],
    }
    got: list[Event] = []
    with qimg.open(spec, writable=True, events=got.append) as img:
        assert img.read(0, 4096) == b"\x11" * 4096
        img.write(8192, b"x" * 512)
    assert [e.as_dict()["data"] for e in got] == [
        {
            "type": "read",
            "error": "No space left on device",
            "node-name": "children.0",
            "sector-num": 0,
            "sectors-count": 8,
        },
        {
            "type": "write",
            "error": "Input/output error",
            "node-name": "children.0",
            "sector-num": 16,
            "sectors-count": 1,
        },
    ]


def test_every_event_is_delivered_none_rate_limited(tmp_path: Path) -> None:
    paths = make_replicas(tmp_path)
    corrupt(paths[0], 0, b"\xee" * MiB)
    got: list[Event] = []
    with qimg.open(quorum(paths), events=got.append) as img:
        for i in range(300):
            img.read(i * 512, 512)
    assert [e.data["sector-num"] for e in got] == list(range(300))


def test_convert_delivers_the_events_of_its_sources(tmp_path: Path) -> None:
    paths = make_replicas(tmp_path, size=4 * MiB)
    corrupt(paths[2], 3 * MiB, b"\x00" * 4096)
    got: list[Event] = []
    qimg.convert(quorum(paths), tmp_path / "out.raw", events=got.append)
    assert (tmp_path / "out.raw").read_bytes() == b"\x11" * (4 * MiB)
    assert [e.data["node-name"] for e in got] == ["children.2"]
    assert got[0].data["sector-num"] <= (3 * MiB) // 512


# --- --events on the command line ---------------------------------------------------------


def run_qimg(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qimg", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def json_spec(paths: list[Path], threshold: int = 2) -> str:
    return "json:" + json.dumps(quorum(paths, threshold))


def events_of(path: Path) -> list[Event]:
    return [Event.from_dict(json.loads(line)) for line in path.read_text().splitlines()]


def test_io_writes_events_to_a_file(tmp_path: Path) -> None:
    paths = make_replicas(tmp_path)
    corrupt(paths[1], 65536, b"\x00" * 512)
    log = tmp_path / "events.jsonl"
    proc = run_qimg("io", "--events", log, "-c", "read -P 0x11 64k 64k", json_spec(paths))
    assert proc.returncode == 0, proc.stderr
    assert [(e.name, e.data["node-name"]) for e in events_of(log)] == [
        ("QUORUM_REPORT_BAD", "children.1")
    ]


def test_io_events_on_standard_error_come_in_order(tmp_path: Path) -> None:
    paths = make_replicas(tmp_path)
    corrupt(paths[1], 0, b"\x01" * 512)
    corrupt(paths[2], 0, b"\x02" * 512)
    proc = subprocess.run(
        [sys.executable, "-m", "qimg", "io", "--events", "-", "-c", "read 0 512",
         "-c", "read -P 0x11 512 512", json_spec(paths)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )  # fmt: skip
    lines = proc.stdout.splitlines()
    assert json.loads(lines[0])["event"] == "QUORUM_FAILURE"
    assert lines[1] == "read failed: Input/output error"
    assert lines[2] == "read 512/512 bytes at offset 512"
    assert proc.returncode == 1


def test_image_opts_and_events_for_convert_and_compare(tmp_path: Path) -> None:
    paths = make_replicas(tmp_path)
    corrupt(paths[0], 0, b"\x00" * 512)
    opts = "driver=quorum,vote-threshold=2," + ",".join(
        f"children.{i}.driver=raw,children.{i}.file.filename={p}" for i, p in enumerate(paths)
    )
    log = tmp_path / "convert.jsonl"
    out = tmp_path / "out.raw"
    proc = run_qimg("convert", "--events", log, "--image-opts", "-O", "raw", opts, out)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == b"\x11" * MiB
    assert [e.data["node-name"] for e in events_of(log)] == ["children.0"]
    log = tmp_path / "compare.jsonl"
    proc = run_qimg("compare", "--events", log, json_spec(paths), paths[1])
    assert (proc.returncode, proc.stdout) == (0, "Images are identical.\n")
    assert [e.data["node-name"] for e in events_of(log)] == ["children.0"]


@pytest.mark.parametrize(
    "command",
    [
        ["info"],
        ["map", "--output=json"],
        ["check"],
        ["measure", "-O", "qcow2"],
        ["io", "-c", "length"],
    ],
)
def test_every_reading_command_takes_events(tmp_path: Path, command: list[str]) -> None:
    paths = make_replicas(tmp_path)
    log = tmp_path / "events.jsonl"
    proc = run_qimg(*command, "--events", log, json_spec(paths))
    # check has nothing to check in a quorum: qemu-img's status 63.
    assert proc.returncode == (63 if command == ["check"] else 0), proc.stderr
    assert log.read_text() == ""


def test_events_file_error_is_one_line(tmp_path: Path) -> None:
    paths = make_replicas(tmp_path)
    proc = run_qimg("info", "--events", tmp_path, json_spec(paths))
    assert proc.returncode == 1
    assert proc.stderr == f"qimg: Could not open the events file '{tmp_path}': Is a directory\n"
