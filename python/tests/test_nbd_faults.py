"""Network faults of NBD exports (issue 6), injected by a proxy between qimg and a real
``qemu-nbd`` (``nbd_proxy.py``): a dropped connection, a reply held longer than the
client's timeout, a truncated reply, a reply with a bad magic or a cookie nobody asked for,
and read data corrupted in flight. Alone, each is a clean one-line error (except corrupted
data, which no client can see by itself); inside a quorum of three, the vote goes on with
the other children and reports the faulty one, and fails cleanly when two are faulty.

Also: exports on test hosts in network namespaces, reachable from inside and not outside.

Every nbd node here has ``"timeout": 1``; the delay fault holds replies 3 s.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeAlias

import pytest
from nbd_proxy import Fault, FaultyNbdProxy
from test_nbd_interop import PATTERN, SIZE, _make_raw

import qimg
from conftest import NBD_START_TIMEOUT_S, NbdServer, RunCommand, StartNbd, _free_port, _require_tool

pytestmark = pytest.mark.qemu

#: The client's timeout in every node here, and how long the delay fault holds a reply.
TIMEOUT_S = 1
DELAY_S = 3.0

ERROR_FAULTS = [Fault.DROP, Fault.DELAY, Fault.TRUNCATE, Fault.BAD_MAGIC, Fault.WRONG_COOKIE]

#: What the one-line error says for each fault (a part of it).
ERROR_TEXT = {
    Fault.DROP: "closed the connection",
    Fault.DELAY: f"did not answer within {TIMEOUT_S} s",
    Fault.TRUNCATE: "closed the connection",
    Fault.BAD_MAGIC: "bad reply magic 0xdeadbeef",
    Fault.WRONG_COOKIE: "reply to unknown request",
}

#: ``proxy(server, fault, after=1, xor=0xFF)`` starts a proxy in front of ``server``.
StartProxy: TypeAlias = Callable[..., FaultyNbdProxy]


@pytest.fixture
def proxies() -> Iterator[StartProxy]:
    """Fault-injecting proxies for one test, all closed (threads joined) when it ends;
    a proxy that met traffic it does not understand fails the test."""
    started: list[FaultyNbdProxy] = []

    def start(
        server: NbdServer, fault: Fault, *, after: int = 1, xor: int = 0xFF
    ) -> FaultyNbdProxy:
        assert server.port is not None
        proxy = FaultyNbdProxy(
            ("127.0.0.1", server.port), fault, after=after, delay_s=DELAY_S, xor=xor
        )
        started.append(proxy)
        return proxy

    try:
        yield start
    finally:
        for proxy in started:
            proxy.close()
    for proxy in started:
        assert proxy.errors == [], proxy.errors


def _node(proxy: FaultyNbdProxy) -> dict[str, Any]:
    server = {"type": "inet", "host": "127.0.0.1", "port": str(proxy.port)}
    return {"driver": "nbd", "server": server, "export": "x", "timeout": TIMEOUT_S}


def _direct_node(server: NbdServer) -> dict[str, Any]:
    return {**server.node(), "timeout": TIMEOUT_S}


def _spec(tree: dict[str, Any]) -> str:
    return "json:" + json.dumps(tree)


def _assert_one_line_error(proc: subprocess.CompletedProcess[str], *parts: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("qimg: "), proc.stderr
    for part in parts:
        assert part in proc.stderr, proc.stderr


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return _make_raw(tmp_path / "a.raw")


# --- the proxy itself ------------------------------------------------------------------------


def test_the_proxy_without_a_fault_is_transparent(
    run_qimg: RunCommand,
    nbd_servers: StartNbd,
    proxies: StartProxy,
    image: Path,
    tmp_path: Path,
) -> None:
    proxy = proxies(nbd_servers(image, read_only=True), Fault.NONE)
    out = tmp_path / "out.raw"
    proc = run_qimg("convert", "-O", "raw", _spec(_node(proxy)), out)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert out.read_bytes() == image.read_bytes()
    assert proxy.replies > 0 and proxy.faulted == 0


# --- one export ------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ERROR_FAULTS, ids=lambda f: f.value)
def test_a_faulty_reply_to_a_read_is_a_one_line_error(
    run_qimg: RunCommand,
    nbd_servers: StartNbd,
    proxies: StartProxy,
    image: Path,
    fault: Fault,
) -> None:
    proxy = proxies(nbd_servers(image, read_only=True), fault)
    started = time.monotonic()
    proc = run_qimg("io", "-r", "-c", "read -P 0x5a 0 65536", _spec(_node(proxy)))
    elapsed = time.monotonic() - started
    _assert_one_line_error(proc, "Read failed", ERROR_TEXT[fault])
    assert proxy.faulted >= 1
    # A delayed reply is given up on at the timeout, not waited for.
    assert elapsed < DELAY_S or fault is not Fault.DELAY


@pytest.mark.parametrize("fault", ERROR_FAULTS, ids=lambda f: f.value)
def test_a_fault_in_the_middle_of_a_convert_is_a_one_line_error(
    run_qimg: RunCommand,
    nbd_servers: StartNbd,
    proxies: StartProxy,
    image: Path,
    tmp_path: Path,
    fault: Fault,
) -> None:
    # Replies before the third pass through: the fault hits a copy already under way.
    proxy = proxies(nbd_servers(image, read_only=True), fault, after=3)
    proc = run_qimg("convert", "-O", "raw", _spec(_node(proxy)), tmp_path / "out.raw")
    _assert_one_line_error(proc, ERROR_TEXT[fault])
    assert proxy.faulted >= 1 and proxy.replies >= 3


def test_corrupted_read_data_is_invisible_to_a_lone_client(
    nbd_servers: StartNbd, proxies: StartProxy, image: Path
) -> None:
    # No checksum in NBD: only a quorum can tell (below).
    proxy = proxies(nbd_servers(image, read_only=True), Fault.CORRUPT_DATA)
    img = qimg.open(_node(proxy))
    try:
        assert img.read(0, 4096) == b"\xa5" * 4096  # 0x5a ^ 0xff
    finally:
        img.close()
    assert proxy.faulted >= 1


# --- quorum of three ---------------------------------------------------------------------------


def _quorum(
    nbd_servers: StartNbd,
    proxies: StartProxy,
    tmp_path: Path,
    faults: dict[int, Fault],
) -> tuple[dict[str, Any], list[FaultyNbdProxy], bytes]:
    """A quorum (threshold 2) of three exports of equal images; child ``i`` goes through
    a proxy with ``faults[i]`` (each corrupting proxy with its own mask, so two corrupted
    children never agree with each other)."""
    children: list[dict[str, Any]] = []
    used: list[FaultyNbdProxy] = []
    for i in range(3):
        server = nbd_servers(_make_raw(tmp_path / f"r{i}.raw"), read_only=True)
        if i in faults:
            proxy = proxies(server, faults[i], xor=0xFF - i)
            used.append(proxy)
            children.append(_node(proxy))
        else:
            children.append(_direct_node(server))
    tree = {"driver": "quorum", "vote-threshold": 2, "children": children}
    return tree, used, (tmp_path / "r0.raw").read_bytes()


@pytest.mark.parametrize("fault", [*ERROR_FAULTS, Fault.CORRUPT_DATA], ids=lambda f: f.value)
def test_quorum_outvotes_one_faulty_child_and_reports_it(
    run_qimg: RunCommand,
    nbd_servers: StartNbd,
    proxies: StartProxy,
    tmp_path: Path,
    fault: Fault,
) -> None:
    tree, (proxy,), _ = _quorum(nbd_servers, proxies, tmp_path, {1: fault})
    events = tmp_path / "read.jsonl"
    offset, length, byte = PATTERN[0]
    proc = run_qimg(
        "io", "-r", "--events", events, "-c", f"read -P {byte:#x} {offset} {length}", _spec(tree)
    )
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stdout
    assert proc.stdout.startswith(f"read {length}/{length} bytes at offset {offset}\n")
    records = _events(events)
    assert records, "no QUORUM_REPORT_BAD event"
    assert {r["event"] for r in records} == {"QUORUM_REPORT_BAD"}
    assert {r["data"]["node-name"] for r in records} == {"children.1"}
    first = records[0]["data"]
    assert first["type"] == "read"
    assert first["sector-num"] * 512 <= offset
    if fault is Fault.CORRUPT_DATA:
        assert "error" not in first
    else:
        assert ERROR_TEXT[fault] in first["error"], first
    assert proxy.faulted >= 1


@pytest.mark.parametrize(
    "fault",
    [*ERROR_FAULTS, Fault.CORRUPT_DATA],
    ids=lambda f: f.value,
)
def test_quorum_convert_outvotes_one_faulty_child_and_reports_it(
    run_qimg: RunCommand,
    nbd_servers: StartNbd,
    proxies: StartProxy,
    tmp_path: Path,
    fault: Fault,
) -> None:
    tree, (proxy,), expected = _quorum(nbd_servers, proxies, tmp_path, {1: fault})
    out = tmp_path / "voted.raw"
    events = tmp_path / "convert.jsonl"
    proc = run_qimg("convert", "--events", events, "-O", "raw", _spec(tree), out)
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    assert out.read_bytes() == expected
    records = _events(events)
    assert {(r["event"], r["data"]["node-name"]) for r in records} == {
        ("QUORUM_REPORT_BAD", "children.1")
    }
    assert proxy.faulted >= 1


@pytest.mark.parametrize("fault", [*ERROR_FAULTS, Fault.CORRUPT_DATA], ids=lambda f: f.value)
def test_quorum_with_two_faulty_children_fails_cleanly(
    run_qimg: RunCommand,
    nbd_servers: StartNbd,
    proxies: StartProxy,
    tmp_path: Path,
    fault: Fault,
) -> None:
    tree, used, _ = _quorum(nbd_servers, proxies, tmp_path, {0: fault, 2: fault})
    events = tmp_path / "events.jsonl"
    proc = run_qimg("io", "-r", "--events", events, "-c", "read 0 65536", _spec(tree))
    # qimg io, like qemu-io, reports the failed read command on stdout; the children's
    # errors, when there are any, are one line on stderr.
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stdout == "read failed: Input/output error\n", proc.stdout
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") <= 1, proc.stderr
    names = [r["event"] for r in _events(events)]
    assert "QUORUM_FAILURE" in names, names
    bad = {r["data"]["node-name"] for r in _events(events) if r["event"] == "QUORUM_REPORT_BAD"}
    assert bad <= {"children.0", "children.2"}
    assert all(proxy.faulted >= 1 for proxy in used)


# --- test hosts in network namespaces ------------------------------------------------------------


def _require_namespaces() -> None:
    """Skips (or fails when CI is set) unless this process may make network namespaces."""
    missing = [tool for tool in ("unshare", "nsenter", "ip") if shutil.which(tool) is None]
    reason = ""
    if missing:
        reason = f"{', '.join(missing)} not installed (Debian: util-linux, iproute2)"
    else:
        probe = subprocess.run(
            ["unshare", "--net", "ip", "link", "set", "lo", "up"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        if probe.returncode != 0:
            reason = f"network namespaces are not permitted here: {probe.stderr.strip()}"
    if reason:
        if os.environ.get("QIMG_CI"):
            pytest.fail(f"{reason}, and CI is set: the namespace tests must run there")
        pytest.skip(reason)


class Host:
    """A test host: a process holding a new network namespace where only loopback is up."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            ["unshare", "--net", "sh", "-c", "ip link set lo up && exec sleep 3600"],
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + NBD_START_TIMEOUT_S
        while not self._lo_up():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the test host's namespace did not come up")
            time.sleep(0.02)

    def _lo_up(self) -> bool:
        proc = subprocess.run(
            self.argv("ip", "-o", "link", "show", "lo"),
            capture_output=True,
            text=True,
            check=False,
        )
        return proc.returncode == 0 and ",UP" in proc.stdout

    def argv(self, *args: str) -> list[str]:
        """``args`` as a command run inside this host's network namespace."""
        return ["nsenter", "-t", str(self.process.pid), "-n", *args]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args),
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)


@pytest.fixture
def hosts() -> Iterator[Callable[[], Host]]:
    _require_namespaces()
    started: list[Host] = []

    def start() -> Host:
        host = Host()
        started.append(host)
        return host

    try:
        yield start
    finally:
        for host in started:
            host.close()


def _serve(host: Host, image: Path, address: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    """Starts qemu-nbd inside ``host`` on ``address``:``port`` and waits until it answers."""
    # Skips outside CI when qemu-nbd is missing, fails under CI (conftest's rule).
    qemu_nbd = _require_tool("qemu-nbd")
    argv = [qemu_nbd, "-f", "raw", "-x", "x", "--persistent", "--shared=16", "-r"]
    argv += ["-b", address]
    with open(log, "ab") as out:
        process = subprocess.Popen(
            host.argv(*argv, "-p", str(port), str(image)),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    probe = (
        "import socket,sys\n"
        f"s=socket.create_connection(({address!r},{port}),timeout=1)\n"
        "sys.exit(s.recv(8)!=b'NBDMAGIC')\n"
    )
    deadline = time.monotonic() + NBD_START_TIMEOUT_S
    while process.poll() is None and time.monotonic() < deadline:
        if host.run(sys.executable, "-c", probe).returncode == 0:
            return process
        time.sleep(0.05)
    process.kill()
    process.wait(timeout=30)
    pytest.fail(f"qemu-nbd did not start in the test host: {log.read_text(errors='replace')}")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Callable[[subprocess.Popen[bytes]], None]]:
    """Registers qemu-nbd processes to kill when the test ends."""
    processes: list[subprocess.Popen[bytes]] = []
    try:
        yield processes.append
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)


QIMG = [sys.executable, "-m", "qimg"]


def test_an_export_on_a_loopback_only_host_is_reachable_inside_and_refused_outside(
    hosts: Callable[[], Host],
    served: Callable[[subprocess.Popen[bytes]], None],
    image: Path,
    tmp_path: Path,
    run_qimg: RunCommand,
) -> None:
    host = hosts()
    port = _free_port()  # free here, outside the host
    served(_serve(host, image, "127.0.0.1", port, tmp_path / "qemu-nbd.log"))
    url = f"nbd://127.0.0.1:{port}/x"

    proc = host.run(*QIMG, "info", "--output=json", url)
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    assert json.loads(proc.stdout)["virtual-size"] == SIZE
    out = tmp_path / "out.raw"
    proc = host.run(*QIMG, "convert", "-O", "raw", url, str(out))
    assert (proc.returncode, proc.stderr) == (0, "")
    assert out.read_bytes() == image.read_bytes()

    # The same address outside the host is another machine's loopback: nobody listens.
    outside = run_qimg("info", url)
    _assert_one_line_error(outside, f"Could not open '{url}'", "Connection refused")


def test_an_export_on_another_host_is_read_over_a_veth_link(
    hosts: Callable[[], Host],
    served: Callable[[subprocess.Popen[bytes]], None],
    image: Path,
    tmp_path: Path,
    run_qimg: RunCommand,
) -> None:
    server, client = hosts(), hosts()
    tag = f"{os.getpid() % 100000}"
    a, b = f"qs{tag}", f"qc{tag}"
    link = subprocess.run(
        ["ip", "link", "add", a, "type", "veth", "peer", "name", b],
        capture_output=True,
        text=True,
        check=False,
    )
    assert link.returncode == 0, link.stderr
    try:
        for name, host in ((a, server), (b, client)):
            moved = subprocess.run(
                ["ip", "link", "set", name, "netns", str(host.process.pid)],
                capture_output=True,
                text=True,
                check=False,
            )
            assert moved.returncode == 0, moved.stderr
    finally:
        # A link still here was not moved; the moved ones die with their namespaces.
        for name in (a, b):
            subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)
    for name, host, address in ((a, server, "10.251.7.1/24"), (b, client, "10.251.7.2/24")):
        for args in (["addr", "add", address, "dev", name], ["link", "set", name, "up"]):
            proc = host.run("ip", *args)
            assert proc.returncode == 0, proc.stderr

    port = 10809
    served(_serve(server, image, "10.251.7.1", port, tmp_path / "qemu-nbd.log"))
    url = f"nbd://10.251.7.1:{port}/x"
    proc = client.run(*QIMG, "info", "--output=json", url)
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    assert json.loads(proc.stdout)["virtual-size"] == SIZE
    out = tmp_path / "out.raw"
    proc = client.run(*QIMG, "convert", "-O", "raw", url, str(out))
    assert (proc.returncode, proc.stderr) == (0, "")
    assert out.read_bytes() == image.read_bytes()

    # From this machine's own namespace there is no link to that host.
    spec = {
        "driver": "nbd",
        "server": {"type": "inet", "host": "10.251.7.1", "port": str(port)},
        "export": "x",
        "timeout": TIMEOUT_S,
    }
    _assert_one_line_error(run_qimg("info", _spec(spec)), "Could not open")


# --- one replica corrupted and another dying mid-way --------------------------------------------

BIG = 64 << 20
#: 64 KiB blocks of the second replica that hold other bytes than the other two.
CORRUPT_BLOCKS = (1 << 20, 60 << 20)
BLOCK = 64 << 10


def _replicas(tmp_path: Path) -> list[Path]:
    data = os.urandom(BIG)
    paths = []
    for i in range(3):
        path = tmp_path / f"big{i}.raw"
        path.write_bytes(data)
        paths.append(path)
    return paths


def _three(
    nbd_servers: StartNbd, proxies: StartProxy, paths: list[Path], after: int
) -> tuple[str, FaultyNbdProxy]:
    """The quorum spec: replicas 0 and 1 served directly, replica 2 through a proxy that
    drops its connection from its ``after``-th reply on (the server dies mid-way)."""
    direct = [_direct_node(nbd_servers(p, read_only=True)) for p in paths[:2]]
    proxy = proxies(nbd_servers(paths[2], read_only=True), Fault.DROP, after=after)
    tree = {"driver": "quorum", "vote-threshold": 2, "children": [*direct, _node(proxy)]}
    return _spec(tree), proxy


def test_a_replica_dying_mid_convert_leaves_the_surviving_majority(
    run_qimg: RunCommand, nbd_servers: StartNbd, proxies: StartProxy, tmp_path: Path
) -> None:
    paths = _replicas(tmp_path)
    spec, proxy = _three(nbd_servers, proxies, paths, after=40)
    out, events = tmp_path / "out.raw", tmp_path / "events.jsonl"
    proc = run_qimg("convert", "--events", events, "-O", "raw", spec, out)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert out.read_bytes() == paths[0].read_bytes()
    records = _events(events)
    assert {(r["event"], r["data"]["node-name"]) for r in records} == {
        ("QUORUM_REPORT_BAD", "children.2")
    }
    assert all("error" in r["data"] for r in records)
    assert proxy.faulted >= 1 and proxy.replies >= 40


def test_scrub_with_one_replica_corrupted_and_another_dying_mid_scrub(
    run_qimg: RunCommand, nbd_servers: StartNbd, proxies: StartProxy, tmp_path: Path
) -> None:
    paths = _replicas(tmp_path)
    with open(paths[1], "r+b") as f:
        for at in CORRUPT_BLOCKS:
            f.seek(at + 100)
            f.write(b"\xee" * 512)
    spec, proxy = _three(nbd_servers, proxies, paths, after=40)
    events = tmp_path / "events.jsonl"
    proc = run_qimg("scrub", "--output=json", "--events", events, spec)
    assert "Traceback" not in proc.stderr
    report = json.loads(proc.stdout)
    children = {c["node-name"]: c for c in report["children"]}
    # The replica that died: its failed reads are in the report and the events.
    assert children["children.2"]["read-errors"], report
    assert proxy.faulted >= 1
    records = _events(events)
    dead = [r for r in records if r["data"].get("node-name") == "children.2"]
    assert dead and all("error" in r["data"] for r in dead)
    # The first replica agrees with whatever vote there was.
    assert children["children.0"]["bad-ranges"] == []
    assert children["children.0"]["read-errors"] == []
    # Each corrupted block was outvoted while three replicas answered, or had no
    # majority once only two were left; nothing else is bad or unvoted.
    bad = {(r["offset"], r["length"]) for r in children["children.1"]["bad-ranges"]}
    unvoted = {(r["offset"], r["length"]) for r in report["unvoted-ranges"]}
    assert bad | unvoted == {(at, BLOCK) for at in CORRUPT_BLOCKS}, report
    assert not bad & unvoted
    if unvoted:
        assert (proc.returncode, report["verdict"]) == (3, "no-quorum")
        assert "QUORUM_FAILURE" in {r["event"] for r in records}
    else:
        assert (proc.returncode, report["verdict"]) == (2, "bad")
    # Once only the two disagreeing replicas answer, a copy fails cleanly.
    again = run_qimg("convert", "-O", "raw", spec, tmp_path / "out.raw")
    _assert_one_line_error(again)
