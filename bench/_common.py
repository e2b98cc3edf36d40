"""Shared helpers for the qimg benchmarks in bench/.

Benchmarks here compare qimg with a reference tool (qemu-img, dd) on the same work.
They *report*; they never gate: a missed target is printed as MISS, and only a
failing command makes a bench exit non-zero.

Method (used by every bench):
  * contenders run ALTERNATING (a, b, a, b, ...) so drift in the machine (page cache,
    thermal, noisy neighbours) hits all of them alike;
  * each run is timed as one subprocess, wall clock (time.perf_counter), and the
    untimed `prepare`/`finish` hooks around it do setup, checks and cleanup;
  * `os.sync()` runs before each timed run so one run's dirty pages are not flushed
    inside the next run's fsync;
  * results are medians; a ratio is the median of the per-repetition ratios
    (reference time / qimg time, so > 1 means qimg is faster).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# pip compiles an installed package's bytecode once; with PYTHONDONTWRITEBYTECODE set
# (as in some CI and sandbox shells) a checkout recompiles every module on every run,
# and the bench would time that instead of qimg. The warm-up run writes the cache.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB


class CommandFailed(RuntimeError):
    """A benchmarked or helper command exited non-zero (or could not start)."""


# --------------------------------------------------------------------------- commands


def exit_with(main: Callable[[], int]) -> None:
    """Runs a bench's ``main`` as the program: its status, or 1 with one line when a
    command it ran failed."""
    try:
        sys.exit(main())
    except CommandFailed as exc:
        print(f"{Path(sys.argv[0]).name}: {exc}", file=sys.stderr)
        sys.exit(1)


def qimg_command(qimg: str | None) -> list[str]:
    """The argv prefix that runs qimg: `--qimg PATH` if given, else `python -m qimg`."""
    if qimg:
        return [qimg]
    return [sys.executable, "-m", "qimg"]


def quote(cmd: Sequence[str]) -> str:
    return shlex.join(cmd)


def run(cmd: Sequence[str], *, capture: bool = True) -> subprocess.CompletedProcess[str]:
    """Run cmd; raise CommandFailed with its stderr if it fails."""
    try:
        proc = subprocess.run(
            list(cmd),
            stdin=subprocess.DEVNULL,
            capture_output=capture,
            text=True,
            check=False,
        )
    except OSError as exc:
        raise CommandFailed(f"cannot run {quote(cmd)}: {exc}") from exc
    if proc.returncode != 0:
        err = (proc.stderr or "").strip() if capture else ""
        raise CommandFailed(f"{quote(cmd)} exited {proc.returncode}: {err}")
    return proc


def timed(cmd: Sequence[str]) -> float:
    """Wall-clock seconds of one run of cmd (output discarded, stderr kept for errors)."""
    argv = list(cmd)
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    except OSError as exc:
        raise CommandFailed(f"cannot run {quote(argv)}: {exc}") from exc
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise CommandFailed(f"{quote(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return elapsed


# --------------------------------------------------------------------------- machine


def first_line(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(
            list(cmd), capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL
        )
    except OSError as exc:
        return f"unavailable ({exc.strerror})"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else "unavailable"


def machine_facts(workdir: Path) -> dict[str, str]:
    return {
        "nproc": str(os.cpu_count() or "?"),
        "qemu-img": first_line(["qemu-img", "--version"]),
        "fs": first_line(["stat", "-f", "-c", "%T", str(workdir)]),
        "dir": str(workdir),
        "python": sys.version.split()[0],
    }


def facts_line(facts: dict[str, str]) -> str:
    return (
        f"machine: nproc={facts['nproc']}; {facts['qemu-img']}; "
        f"fs of {facts['dir']}: {facts['fs']}; python {facts['python']}"
    )


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def allocated_bytes(path: Path) -> int:
    """Bytes the file occupies on disk (what `du` counts)."""
    return os.stat(path).st_blocks * 512


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- sizes


def round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def human(n: int) -> str:
    """1099511627776 -> '1 TiB'; exact binary units when they fit, else 3 significant."""
    for unit, mult in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= mult:
            if n % mult == 0:
                return f"{n // mult} {unit}"
            return f"{n / mult:.3g} {unit}"
    return f"{n} B"


# --------------------------------------------------------------------------- timing


@dataclass
class Contender:
    """One side of a comparison.

    cmd(rep) gives the argv of the timed run; prepare(rep) and finish(rep) run
    untimed before and after it (setup, sanity checks, deleting the output).
    """

    name: str
    cmd: Callable[[int], Sequence[str]]
    prepare: Callable[[int], None] | None = None
    finish: Callable[[int], None] | None = None
    times: list[float] = field(default_factory=list)


def alternate(
    contenders: Sequence[Contender],
    repeat: int,
    *,
    sync: bool = True,
    after_round: Callable[[int], None] | None = None,
) -> None:
    """Run the contenders in turn, `repeat` rounds: a, b, c, a, b, c, ...

    Each contender's wall times are appended to its `times`. `finish` runs even if
    the timed command fails, so outputs never pile up on disk. after_round(rep), if
    given, runs after each complete round (e.g. to print progress).
    """
    for rep in range(repeat):
        for c in contenders:
            if c.prepare is not None:
                c.prepare(rep)
            argv = list(c.cmd(rep))
            if sync:
                os.sync()
            try:
                elapsed = timed(argv)
            except BaseException:
                # Clean up, but report the command's failure, not a follow-on one.
                if c.finish is not None:
                    with contextlib.suppress(Exception):
                        c.finish(rep)
                raise
            c.times.append(elapsed)
            if c.finish is not None:
                c.finish(rep)
        if after_round is not None:
            after_round(rep)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def median_ratio(reference: Sequence[float], qimg: Sequence[float]) -> float:
    """Median of the per-round ratios reference/qimg (> 1: qimg is faster)."""
    if len(reference) != len(qimg) or not qimg:
        raise ValueError("median_ratio needs two equally long, non-empty series")
    return statistics.median(r / q for r, q in zip(reference, qimg, strict=True))


# --------------------------------------------------------------------------- output


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None
) -> None:
    """Plain-text table. align has one 'l' or 'r' per column (default: first column
    left-aligned, the others right-aligned)."""
    if align is None:
        align = "l" + "r" * (len(headers) - 1)
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def fmt(cells: Sequence[str]) -> str:
        parts = [
            cell.ljust(widths[i]) if align[i] == "l" else cell.rjust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "  ".join(parts).rstrip()

    print(fmt(headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(fmt(row))
    sys.stdout.flush()


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
