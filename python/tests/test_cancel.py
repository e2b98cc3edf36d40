"""Stopping long work (issue 16): SIGINT and SIGTERM end a command stalled on a dead NBD
server within a second (exit 130 / 143, a new output file removed); an exception raised by a
Python progress callback stops the call and reaches the caller; a full file system ends a
convert with one line, every time, without a hang; a panic in the core is one line.

The stall is made by a proxy that holds every reply from the 8th on for a minute: the command
is then mid-copy, waiting on a server that does not answer.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nbd_proxy import Fault, FaultyNbdProxy

import qimg
from conftest import MountTmpfs, RunCommand, StartNbd
from qimg import _core
from qimg.errors import NoSpaceError

SIZE = 64 << 20
#: Replies from this one on are held back.
STALL_AFTER = 8
#: Longer than any test waits: the stalled server never answers in time.
STALL_S = 60.0
#: The issue's bound, from the signal to the exit.
STOP_WITHIN_S = 1.0


def _digest(path: Path) -> str:
    """A digest to compare large files by (a failing == on their bytes would make pytest
    diff megabytes)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _make_image(path: Path) -> Path:
    block = bytes(range(256)) * 4096  # 1 MiB, no zero blocks
    with open(path, "wb") as f:
        for i in range(SIZE // len(block)):
            f.write(block[i % 256 :] + block[: i % 256])
    return path


@pytest.fixture
def stalled(nbd_servers: StartNbd, tmp_path: Path) -> Iterator[tuple[FaultyNbdProxy, Path]]:
    """A read-only export of a 64 MiB image behind a proxy that stalls mid-copy."""
    image = _make_image(tmp_path / "src.raw")
    server = nbd_servers(image, read_only=True)
    assert server.port is not None
    proxy = FaultyNbdProxy(
        ("127.0.0.1", server.port), Fault.DELAY, after=STALL_AFTER, delay_s=STALL_S
    )
    try:
        yield proxy, image
    finally:
        proxy.close()


def _node(proxy: FaultyNbdProxy) -> dict[str, Any]:
    server = {"type": "inet", "host": "127.0.0.1", "port": str(proxy.port)}
    return {"driver": "nbd", "server": server, "export": "x", "timeout": 300}


def _spec(tree: dict[str, Any]) -> str:
    return "json:" + json.dumps(tree)


def _argv(command: str, proxy: FaultyNbdProxy, image: Path, tmp_path: Path) -> list[str]:
    if command == "convert":
        return ["convert", "-O", "raw", _spec(_node(proxy)), str(tmp_path / "out.raw")]
    if command == "compare":
        return ["compare", _spec(_node(proxy)), str(image)]
    assert command == "scrub"
    local = {"driver": "file", "filename": str(image)}
    tree = {"driver": "quorum", "vote-threshold": 2, "children": [local, _node(proxy), local]}
    return ["scrub", _spec(tree)]


def _wait_for_stall(proxy: FaultyNbdProxy, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while proxy.faulted == 0:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the command never reached the stalled reply"
        time.sleep(0.02)
    time.sleep(0.2)  # the command is now waiting for the held reply


def _signal_when_stalled(
    argv: list[str], proxy: FaultyNbdProxy, sig: signal.Signals
) -> tuple[int, float, str]:
    """Runs ``qimg ARGV``, sends ``sig`` once it waits on the stalled proxy; returns the
    exit status, the seconds from the signal to the exit, and stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "qimg", *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_stall(proxy, proc)
        sent = time.monotonic()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        return proc.returncode, time.monotonic() - sent, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.qemu
@pytest.mark.parametrize("command", ["convert", "compare", "scrub"])
@pytest.mark.parametrize(
    ("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["INT", "TERM"]
)
def test_a_signal_stops_a_stalled_command_within_a_second(
    stalled: tuple[FaultyNbdProxy, Path],
    tmp_path: Path,
    command: str,
    sig: signal.Signals,
    status: int,
) -> None:
    proxy, image = stalled
    returncode, took, err = _signal_when_stalled(_argv(command, proxy, image, tmp_path), proxy, sig)
    assert returncode == status, err
    assert took < STOP_WITHIN_S, f"{command} took {took:.2f} s to stop"
    assert "Traceback" not in err
    # A new output is removed, as after any failure; the source is untouched.
    assert not (tmp_path / "out.raw").exists()
    assert image.stat().st_size == SIZE


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["INT", "TERM"]
)
def test_a_signal_stops_a_check_stalled_on_its_metadata(
    nbd_servers: StartNbd,
    run_qemu_img: RunCommand,
    tmp_path: Path,
    sig: signal.Signals,
    status: int,
) -> None:
    """check reads only metadata: a qcow2 image of 512-byte clusters has hundreds of L2
    tables to read over the stalled export."""
    raw = tmp_path / "src.raw"
    with open(raw, "wb") as f:
        f.write(b"\x42" * (16 << 20))
    image = tmp_path / "small-clusters.qcow2"
    args = ["convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=512", raw, image]
    assert run_qemu_img(*args).returncode == 0
    server = nbd_servers(image, read_only=True)
    assert server.port is not None
    proxy = FaultyNbdProxy(
        ("127.0.0.1", server.port), Fault.DELAY, after=STALL_AFTER, delay_s=STALL_S
    )
    try:
        spec = _spec({"driver": "qcow2", "file": _node(proxy)})
        returncode, took, err = _signal_when_stalled(["check", spec], proxy, sig)
    finally:
        proxy.close()
    assert returncode == status, err
    assert took < STOP_WITHIN_S, f"check took {took:.2f} s to stop"
    assert "Traceback" not in err


def test_an_exception_from_the_progress_callback_stops_convert_and_is_raised(
    tmp_path: Path,
) -> None:
    source = _make_image(tmp_path / "src.raw")
    out = tmp_path / "out.raw"
    seen: list[int] = []

    class Stop(Exception):
        pass

    def progress(done: int, total: int) -> None:
        seen.append(done)
        if len(seen) == 3:
            raise Stop("enough")

    with pytest.raises(Stop, match="enough"):
        qimg.convert(source, out, format="raw", progress=progress)
    assert len(seen) == 3
    assert not out.exists()


def test_keyboard_interrupt_from_a_callback_stops_compare(tmp_path: Path) -> None:
    source = _make_image(tmp_path / "src.raw")

    def progress(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with (
        qimg.open(source, "raw") as a,
        qimg.open(source, "raw") as b,
        pytest.raises(KeyboardInterrupt),
    ):
        _core.compare_images(a._img, b._img, progress=progress)


# --- a full file system -----------------------------------------------------------------------


@pytest.fixture
def tiny_fs(mount_tmpfs: MountTmpfs) -> Path:
    """An 8 MiB tmpfs of the test's own, unmounted afterwards."""
    return mount_tmpfs("8m")


#: Rounds of the ENOSPC convert: the old hang was a race seen in 4 of 20 runs.
ENOSPC_ROUNDS = 20


@pytest.mark.parametrize("out_fmt", ["raw", "qcow2"])
def test_convert_onto_a_full_file_system_fails_in_one_line_every_time(
    run_qimg: RunCommand, tiny_fs: Path, tmp_path: Path, out_fmt: str
) -> None:
    source = _make_image(tmp_path / "src.raw")
    before = _digest(source)
    out = tiny_fs / "out.img"
    for _ in range(ENOSPC_ROUNDS):
        proc = run_qimg("convert", "-f", "raw", "-O", out_fmt, source, out)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr == f"qimg: Could not write '{out}': No space left on device\n"
        assert not out.exists()
    assert _digest(source) == before


def test_the_api_raises_no_space_error_on_a_full_file_system(tiny_fs: Path, tmp_path: Path) -> None:
    source = _make_image(tmp_path / "src.raw")
    with pytest.raises(NoSpaceError) as info:
        qimg.convert(source, tiny_fs / "out.raw", format="raw")
    assert info.value.errno == 28
    assert isinstance(info.value, OSError)
    assert not (tiny_fs / "out.raw").exists()


# --- errors a Python user can catch -------------------------------------------------------------


def test_core_errors_are_the_built_in_exceptions_python_users_catch(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        qimg.open(tmp_path / "missing.qcow2")
    with pytest.raises(IsADirectoryError):
        qimg.open(tmp_path)
    locked = tmp_path / "ro.raw"
    locked.write_bytes(b"\0" * 512)
    locked.chmod(0o000)
    if os.geteuid() != 0:  # root reads anything: the permission case needs a user
        with pytest.raises(PermissionError):
            qimg.open(locked)


def test_a_panic_in_the_core_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from qimg import cli
    from qimg.commands import info

    class PanicException(BaseException):  # what pyo3 raises for a Rust panic
        pass

    def panic(args: object) -> int:
        raise PanicException("index out of bounds")

    monkeypatch.setattr(info, "run", panic)
    errors: list[str] = []
    monkeypatch.setattr(sys, "stderr", _Lines(errors))
    assert cli.main(["info", "x.qcow2"]) == 1
    assert "".join(errors) == "qimg: internal error: index out of bounds (please report it)\n"


class _Lines:
    def __init__(self, sink: list[str]) -> None:
        self.sink = sink

    def write(self, text: str) -> int:
        self.sink.append(text)
        return len(text)

    def flush(self) -> None:
        pass
