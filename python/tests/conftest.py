"""Shared fixtures: the qimg CLI under test and QEMU's tools as the reference.

QEMU's ``qemu-img`` / ``qemu-io`` are looked up on PATH. When they are missing, the tests that
need them are skipped on a developer machine and fail under CI (CI must never silently lose its
oracle). scripts/test tells the tests they run under CI with ``QIMG_CI`` and runs pytest
without ``CI``: with ``CI`` set, pytest diffs the whole of two unequal values, and diffing two
disk images takes many minutes. Tests that need QEMU carry ``@pytest.mark.qemu``.

``nbd_servers`` starts real ``qemu-nbd`` servers (skipped or failed the same way when
``qemu-nbd`` is missing) and kills every one of them when the test ends, pass or fail.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import pytest

Arg: TypeAlias = str | os.PathLike[str] | int

#: Type of the command-running fixtures: command-line arguments in, the finished process out
#: (text mode, stdout and stderr captured, never raising on a non-zero exit status).
RunCommand: TypeAlias = Callable[..., subprocess.CompletedProcess[str]]


#: Byte strings longer than this get a short explanation when ``==`` fails.
_LARGE_BYTES = 64 << 10


def _first_difference(left: bytes | bytearray, right: bytes | bytearray) -> int:
    """Where two byte strings first differ (the shorter length if one is a prefix)."""
    lo, hi = 0, min(len(left), len(right))
    while hi - lo > 4096:  # bisect on slices: memcmp does the work
        mid = (lo + hi) // 2
        if left[lo:mid] != right[lo:mid]:
            hi = mid
        else:
            lo = mid
    return next((i for i in range(lo, hi) if left[i] != right[i]), hi)


def pytest_assertrepr_compare(op: str, left: object, right: object) -> list[str] | None:
    """Large byte strings that differ are explained in two lines: pytest's own diff of
    megabytes (disk images) takes many minutes and stalls the whole run."""
    if op != "==" or not isinstance(left, bytes | bytearray):
        return None
    if not isinstance(right, bytes | bytearray) or max(len(left), len(right)) <= _LARGE_BYTES:
        return None
    at = _first_difference(left, right)
    return [
        f"{len(left)} bytes == {len(right)} bytes",
        f"first difference at offset {at}: {left[at : at + 16]!r} != {right[at : at + 16]!r}",
    ]


def assert_ok(proc: subprocess.CompletedProcess[str]) -> None:
    """Fails the test, showing the command's output, unless it exited 0."""
    assert proc.returncode == 0, proc.stdout + proc.stderr


#: Upper bound for one tool invocation: a hang must fail the test, not stall CI.
COMMAND_TIMEOUT_S = 300


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        check=False,
        timeout=COMMAND_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )


def _argv(args: tuple[Arg, ...]) -> list[str]:
    return [str(a) if isinstance(a, int) else os.fspath(a) for a in args]


def _require_tool(name: str, package: str = "qemu-utils", why: str = "") -> str:
    path = shutil.which(name)
    if path is None:
        if package == "qemu-utils":
            reason = f"{name} (QEMU) is not installed; it is the reference these tests compare with"
        else:
            reason = f"{name} is not installed; {why}"
        if os.environ.get("QIMG_CI"):
            pytest.fail(f"{reason}, and CI is set: install it (Debian: {package})")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def qemu_img() -> str:
    """Path of QEMU's qemu-img (skips when missing, or fails when CI is set)."""
    return _require_tool("qemu-img")


@pytest.fixture(scope="session")
def strace() -> str:
    """Path of strace (skips when missing, or fails when CI is set)."""
    return _require_tool("strace", "strace", "these tests watch qimg's system calls with it")


@pytest.fixture(scope="session")
def zsh() -> str:
    """Path of zsh (skips when missing, or fails when CI is set)."""
    return _require_tool("zsh", "zsh", "the zsh completion script is checked with it")


@pytest.fixture(scope="session")
def groff() -> str:
    """Path of groff (skips when missing, or fails when CI is set)."""
    return _require_tool("groff", "groff-base", "the man page is rendered with it")


@pytest.fixture(scope="session")
def qemu_io() -> str:
    """Path of QEMU's qemu-io (skips when missing, or fails when CI is set)."""
    return _require_tool("qemu-io")


@pytest.fixture(scope="session")
def run_qimg() -> RunCommand:
    """``run_qimg(*args)`` runs ``python -m qimg ARGS...`` with the interpreter under test."""

    def run(*args: Arg) -> subprocess.CompletedProcess[str]:
        return _run([sys.executable, "-m", "qimg", *_argv(args)])

    return run


@pytest.fixture(scope="session")
def run_qemu_img(qemu_img: str) -> RunCommand:
    """``run_qemu_img(*args)`` runs QEMU's ``qemu-img ARGS...``."""

    def run(*args: Arg) -> subprocess.CompletedProcess[str]:
        return _run([qemu_img, *_argv(args)])

    return run


@pytest.fixture(scope="session")
def run_qemu_io(qemu_io: str) -> RunCommand:
    """``run_qemu_io(*args)`` runs QEMU's ``qemu-io ARGS...``."""

    def run(*args: Arg) -> subprocess.CompletedProcess[str]:
        return _run([qemu_io, *_argv(args)])

    return run


#: ``mount_tmpfs(size)`` mounts a tmpfs of that size (``8m``) in the test's temporary
#: directory and returns its path; it is unmounted when the test ends.
MountTmpfs: TypeAlias = Callable[[str], Path]


@pytest.fixture
def mount_tmpfs(tmp_path: Path) -> Iterator[MountTmpfs]:
    """Private tmpfs mounts (a full file system, a file system with its own O_DIRECT
    rules). They need root, which CI has: there a missing root fails, elsewhere it skips."""
    if os.geteuid() != 0:
        if os.environ.get("QIMG_CI"):
            pytest.fail("CI runs as root: these tests mount a tmpfs of their own")
        pytest.skip("mounting a tmpfs needs root")
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        mnt = tmp_path / f"tmpfs{len(mounted)}"
        mnt.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True
        )
        mounted.append(mnt)
        return mnt

    try:
        yield mount
    finally:
        for mnt in mounted:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def seek_data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """Byte ranges of the open file ``fd`` (of ``size`` bytes) that are not holes,
    as SEEK_DATA / SEEK_HOLE report them."""
    ranges: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        ranges.append((start, end))
        pos = end
    return ranges


# --- qemu-nbd servers ----------------------------------------------------------------------

#: How long a starting qemu-nbd may take to accept connections.
NBD_START_TIMEOUT_S = 20


@dataclass
class NbdServer:
    """One running ``qemu-nbd`` exporting ``image`` as ``export``, on loopback TCP
    (``port``) or on the unix socket ``socket_path``."""

    process: subprocess.Popen[bytes]
    image: Path
    export: str
    port: int | None = None
    socket_path: Path | None = None
    log: Path = field(default_factory=Path)

    @property
    def url(self) -> str:
        if self.socket_path is not None:
            return f"nbd+unix:///{self.export}?socket={self.socket_path}"
        return f"nbd://127.0.0.1:{self.port}/{self.export}"

    def node(self) -> dict[str, Any]:
        """The ``nbd`` node of this export, as a json: spec spells it."""
        server: dict[str, Any]
        if self.socket_path is not None:
            server = {"type": "unix", "path": str(self.socket_path)}
        else:
            server = {"type": "inet", "host": "127.0.0.1", "port": str(self.port)}
        return {"driver": "nbd", "server": server, "export": self.export}

    @property
    def json(self) -> str:
        return "json:" + json.dumps(self.node())

    @property
    def image_opts(self) -> str:
        if self.socket_path is not None:
            where = f"server.type=unix,server.path={self.socket_path}"
        else:
            where = f"server.type=inet,server.host=127.0.0.1,server.port={self.port}"
        return f"driver=nbd,{where},export={self.export}"

    def kill(self) -> None:
        """Kills the server at once (SIGKILL), as a crash would."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _accepts(server: NbdServer) -> bool:
    family = socket.AF_UNIX if server.socket_path is not None else socket.AF_INET
    address: Any = str(server.socket_path) if server.socket_path else ("127.0.0.1", server.port)
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect(address)
        except OSError:
            return False
        # The server's greeting: qemu-nbd has set the export up.
        try:
            return s.recv(8) == b"NBDMAGIC"
        except OSError:
            return False


#: ``nbd_servers(image, fmt="raw", export="x", unix=False, read_only=False, shared=16)``
#: starts one (``shared``: how many clients qemu-nbd serves at once).
StartNbd: TypeAlias = Callable[..., NbdServer]


@pytest.fixture
def nbd_servers(tmp_path: Path) -> Iterator[StartNbd]:
    """Starts ``qemu-nbd`` servers for one test and kills them all afterwards."""
    qemu_nbd = _require_tool("qemu-nbd")
    started: list[NbdServer] = []

    def start(
        image: Path,
        *,
        fmt: str = "raw",
        export: str = "x",
        unix: bool = False,
        read_only: bool = False,
        shared: int = 16,
    ) -> NbdServer:
        index = len(started)
        log = tmp_path / f"qemu-nbd.{index}.log"
        for _attempt in range(5):
            argv = [qemu_nbd, "-f", fmt, "-x", export, "--persistent", f"--shared={shared}"]
            port: int | None = None
            sock: Path | None = None
            if unix:
                sock = tmp_path / f"nbd.{index}.sock"
                argv += ["-k", str(sock)]
            else:
                port = _free_port()
                argv += ["-b", "127.0.0.1", "-p", str(port)]
            if read_only:
                argv.append("-r")
            argv.append(str(image))
            with open(log, "ab") as out:
                process = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
                )
            server = NbdServer(process, image, export, port, sock, log)
            started.append(server)
            deadline = time.monotonic() + NBD_START_TIMEOUT_S
            while process.poll() is None and time.monotonic() < deadline:
                if _accepts(server):
                    return server
                time.sleep(0.02)
            server.kill()
            if unix:
                break  # a socket in tmp_path cannot be taken by someone else
        pytest.fail(f"qemu-nbd did not start: {log.read_text(errors='replace')}")

    try:
        yield start
    finally:
        for server in started:
            server.kill()
            if server.socket_path is not None and server.socket_path.exists():
                server.socket_path.unlink()
