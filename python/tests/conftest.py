"""Shared fixtures: the qimg CLI under test and QEMU's tools as the reference.

QEMU's ``qemu-img`` / ``qemu-io`` are looked up on PATH. When they are missing, the tests that
need them are skipped on a developer machine and fail when the ``CI`` environment variable is
set (CI must never silently lose its oracle). Tests that need QEMU carry ``@pytest.mark.qemu``.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import TypeAlias

import pytest

Arg: TypeAlias = str | os.PathLike[str] | int

#: Type of the command-running fixtures: command-line arguments in, the finished process out
#: (text mode, stdout and stderr captured, never raising on a non-zero exit status).
RunCommand: TypeAlias = Callable[..., subprocess.CompletedProcess[str]]

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


def _require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        reason = f"{name} (QEMU) is not installed; it is the reference these tests compare with"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}, and CI is set: install QEMU's tools (Debian: qemu-utils)")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def qemu_img() -> str:
    """Path of QEMU's qemu-img (skips when missing, or fails when CI is set)."""
    return _require_tool("qemu-img")


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
