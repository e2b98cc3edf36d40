"""QEMU's image locks (issue 16), both ways: while qemu-nbd, qemu-io or qimg holds an image,
every qimg command that would conflict is refused exactly as qemu-img refuses it on the same
command line (message, exit status, the image left untouched), readers get in with ``-U``,
and while qimg holds an image, qemu-img and qemu-io are refused in turn.

Each case runs the same command line through qemu-img and through qimg against the same
holder, so the reference decides what must happen.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import qimg
from conftest import COMMAND_TIMEOUT_S, RunCommand, StartNbd, _run
from qimg.errors import ImageLockedError

pytestmark = pytest.mark.qemu

SIZE = 16 << 20


def _locked_bytes(path: Path) -> set[int]:
    """The OFD lock bytes some process holds on ``path`` (from /proc/locks)."""
    inode = path.stat().st_ino
    held: set[int] = set()
    with open("/proc/locks", encoding="ascii") as f:
        for line in f:
            fields = line.split()
            if "OFDLCK" in fields and fields[-3].endswith(f":{inode}"):
                held.update(range(int(fields[-2]), int(fields[-1]) + 1))
    return held


def _wait_until_locked(path: Path, byte: int) -> None:
    deadline = time.monotonic() + 30
    while byte not in _locked_bytes(path):
        assert time.monotonic() < deadline, f"nobody took lock byte {byte} of {path}"
        time.sleep(0.02)


@contextmanager
def _held_by(argv: list[str], image: Path, byte: int) -> Iterator[None]:
    """Runs ``argv`` (a program reading commands from stdin) until the block ends."""
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_until_locked(image, byte)
        yield
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=COMMAND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def images(tmp_path: Path, run_qemu_img: RunCommand) -> tuple[Path, Path]:
    """A qcow2 image with some data and a raw file, both 16 MiB."""
    qcow2 = tmp_path / "img.qcow2"
    assert run_qemu_img("create", "-q", "-f", "qcow2", qcow2, str(SIZE)).returncode == 0
    with qimg.open(qcow2, "qcow2", writable=True) as img:
        img.write(0, b"\x5a" * 65536)
    raw = tmp_path / "img.raw"
    raw.write_bytes(b"\x33" * SIZE)
    return qcow2, raw


#: Commands that write the image (IMG) they name; qemu-img refuses each of them while
#: another process writes it. (qimg's command, the same for qemu-img/qemu-io.)
WRITERS = {
    "io-write": (["io", "-c", "write 0 4k", "IMG"], ["qemu-io", "-c", "write 0 4k", "IMG"]),
    "resize": (["resize", "IMG", "32M"], ["qemu-img", "resize", "IMG", "32M"]),
    "amend": (
        ["amend", "-o", "lazy_refcounts=on", "IMG"],
        ["qemu-img", "amend", "-o", "lazy_refcounts=on", "IMG"],
    ),
    "convert-n": (
        ["convert", "-n", "-O", "qcow2", "RAW", "IMG"],
        ["qemu-img", "convert", "-n", "-O", "qcow2", "RAW", "IMG"],
    ),
    "check-r": (["check", "-r", "all", "IMG"], ["qemu-img", "check", "-r", "all", "IMG"]),
    "create": (
        ["create", "-q", "-f", "qcow2", "IMG", "1M"],
        ["qemu-img", "create", "-q", "-f", "qcow2", "IMG", "1M"],
    ),
}

#: Commands that only read the image; with -U they must succeed.
READERS = {
    "info": (["info", "IMG"], ["qemu-img", "info", "IMG"]),
    "measure": (["measure", "-O", "qcow2", "IMG"], ["qemu-img", "measure", "-O", "qcow2", "IMG"]),
    "map": (["map", "IMG"], ["qemu-img", "map", "IMG"]),
    "check": (["check", "IMG"], ["qemu-img", "check", "IMG"]),
    "compare": (["compare", "IMG", "IMG2"], ["qemu-img", "compare", "IMG", "IMG2"]),
    "convert": (["convert", "IMG", "OUT"], ["qemu-img", "convert", "IMG", "OUT"]),
    "io-read": (
        ["io", "-r", "-c", "read 0 4k", "IMG"],
        ["qemu-io", "-r", "-c", "read 0 4k", "IMG"],
    ),
}


def _argv(words: list[str], image: Path, raw: Path, out: Path) -> list[str]:
    names = {"IMG": str(image), "IMG2": str(image), "RAW": str(raw), "OUT": str(out)}
    return [names.get(w, w) for w in words]


def _qimg(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return _run([sys.executable, "-m", "qimg", *argv])


HOLDERS = ["qemu-nbd", "qemu-io", "qimg-io"]


@contextmanager
def _holding(holder: str, image: Path, nbd_servers: StartNbd) -> Iterator[None]:
    if holder == "qemu-nbd":
        nbd_servers(image, fmt="qcow2", unix=True)
        _wait_until_locked(image, 201)
        yield
        return
    program = ["qemu-io"] if holder == "qemu-io" else [sys.executable, "-m", "qimg", "io"]
    with _held_by([*program, "-f", "qcow2", str(image)], image, 201):
        yield


@pytest.mark.parametrize("holder", HOLDERS)
@pytest.mark.parametrize("command", list(WRITERS))
def test_a_writer_is_refused_while_another_process_writes_the_image(
    images: tuple[Path, Path], tmp_path: Path, nbd_servers: StartNbd, holder: str, command: str
) -> None:
    qcow2, raw = images
    ours_words, theirs_words = WRITERS[command]
    out = tmp_path / "out.raw"
    with _holding(holder, qcow2, nbd_servers):
        before = qcow2.read_bytes()
        theirs = _run(_argv(theirs_words, qcow2, raw, out))
        after_theirs = qcow2.read_bytes()
        ours = _qimg(_argv(ours_words, qcow2, raw, out))
        after_ours = qcow2.read_bytes()
    assert theirs.returncode == 1, theirs.stderr
    assert after_theirs == before
    assert ours.returncode == 1, ours.stderr
    assert after_ours == before, "qimg changed an image another process holds"
    refusal = f'Failed to get "write" lock\nIs another process using the image [{qcow2}]?\n'
    assert theirs.stderr.endswith(refusal), theirs.stderr
    assert ours.stderr.endswith(refusal), ours.stderr
    if theirs_words[0] == "qemu-img":  # the same line, qimg's name in front
        assert ours.stderr == theirs.stderr.replace("qemu-img: ", "qimg: ")


@pytest.mark.parametrize("holder", HOLDERS)
@pytest.mark.parametrize("command", list(READERS))
def test_a_reader_is_refused_without_u_and_reads_with_it(
    images: tuple[Path, Path], tmp_path: Path, nbd_servers: StartNbd, holder: str, command: str
) -> None:
    qcow2, raw = images
    ours_words, theirs_words = READERS[command]
    with _holding(holder, qcow2, nbd_servers):
        theirs = _run(_argv(theirs_words, qcow2, raw, tmp_path / "theirs.raw"))
        ours = _qimg(_argv(ours_words, qcow2, raw, tmp_path / "ours.raw"))
        shared_words = [ours_words[0], "-U", *ours_words[1:]]
        theirs_shared = _run(
            _argv(
                [theirs_words[0], theirs_words[1], "-U", *theirs_words[2:]],
                qcow2,
                raw,
                tmp_path / "ts.raw",
            )
            if theirs_words[0] == "qemu-img"
            else _argv(["qemu-io", "-U", *theirs_words[1:]], qcow2, raw, tmp_path / "ts.raw")
        )
        ours_shared = _qimg(_argv(shared_words, qcow2, raw, tmp_path / "os.raw"))
    assert theirs.returncode != 0 and ours.returncode == theirs.returncode, ours.stderr
    assert ours.stderr.endswith(
        f'Failed to get shared "write" lock\nIs another process using the image [{qcow2}]?\n'
    ), ours.stderr
    assert not (tmp_path / "ours.raw").exists()
    assert theirs_shared.returncode == 0, theirs_shared.stderr
    assert ours_shared.returncode == 0, ours_shared.stderr
    if command == "convert":
        assert (tmp_path / "os.raw").read_bytes() == (tmp_path / "ts.raw").read_bytes()


def test_u_is_refused_with_a_writer(images: tuple[Path, Path]) -> None:
    qcow2, _ = images
    proc = _qimg(["io", "-U", "-c", "write 0 4k", str(qcow2)])
    assert proc.returncode == 1
    assert "force-share=on can only be used with read-only images" in proc.stderr
    with pytest.raises(qimg.UsageError, match="force-share"):
        qimg.open(qcow2, writable=True, force_share=True)


@pytest.mark.parametrize(
    "theirs",
    [
        ["qemu-img", "resize", "IMG", "32M"],
        ["qemu-io", "-c", "write 0 4k", "IMG"],
        ["qemu-img", "info", "IMG"],
        ["qemu-img", "convert", "IMG", "OUT"],
        ["qemu-img", "check", "-r", "all", "IMG"],
    ],
    ids=["resize", "io-write", "info", "convert", "check-r"],
)
def test_qemu_is_refused_while_qimg_writes_the_image(
    images: tuple[Path, Path], tmp_path: Path, theirs: list[str]
) -> None:
    qcow2, raw = images
    with _held_by([sys.executable, "-m", "qimg", "io", str(qcow2)], qcow2, 201):
        before = qcow2.read_bytes()
        proc = _run(_argv(theirs, qcow2, raw, tmp_path / "out.raw"))
        assert qcow2.read_bytes() == before
        shared = _run(["qemu-img", "info", "-U", str(qcow2)])
    assert proc.returncode == 1, proc.stderr
    assert "lock\nIs another process using the image" in proc.stderr
    assert shared.returncode == 0, shared.stderr


def test_the_api_raises_a_blocking_io_error_for_a_held_image(
    images: tuple[Path, Path], nbd_servers: StartNbd
) -> None:
    qcow2, _ = images
    with _holding("qemu-nbd", qcow2, nbd_servers):
        with pytest.raises(BlockingIOError) as info:
            qimg.open(qcow2)
        assert isinstance(info.value, ImageLockedError)
        with qimg.open(qcow2, force_share=True) as img:
            assert img.read(0, 4) == b"\x5a" * 4


def test_locks_are_what_qemu_img_takes(images: tuple[Path, Path]) -> None:
    """While qimg io holds a qcow2 image for writing, the bytes locked are qemu-io's."""
    qcow2, _ = images
    with _held_by(["qemu-io", "-f", "qcow2", str(qcow2)], qcow2, 201):
        theirs = _locked_bytes(qcow2)
    with _held_by([sys.executable, "-m", "qimg", "io", "-f", "qcow2", str(qcow2)], qcow2, 201):
        ours = _locked_bytes(qcow2)
    assert ours == theirs == {100, 101, 103, 201, 203}
