#!/usr/bin/env python3
"""Benchmark how fast `qimg` starts: `qimg --version` and `qimg info` on a small image,
beside `qemu-img` doing the same and a bare `python -I -S -c pass`.

A command line tool that takes longer to start than to do its work feels slow in
scripts and shell loops, so the target is that both qimg commands finish in under
40 ms (median wall time). The bare interpreter is the floor no Python program can
beat; this machine class has slow phases in which every figure doubles, which is why
the five commands run alternating, round after round, and only medians are reported.

Each run is one process started with posix_spawn, its output sent to /dev/null. Wall
time is time.perf_counter around spawn and wait; CPU time is the user + system time
os.wait4 reports for that child. One untimed round first checks that every command
succeeds and fills Python's bytecode caches. The small image is made with qemu-img
(64 MiB qcow2) in a temporary directory, which is removed afterwards.

    python bench/startup.py [--repeat N] [--qimg CMD] [--qemu-img PATH] [--json FILE|-]

`--qimg` is the command that runs qimg, split like a shell would (default: a
console-script wrapper like the one pip installs, written to the temporary directory and
run by this Python, so the qimg that this Python imports is measured).
The bench reports and never gates: it exits non-zero only when a command fails.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from _common import (
    CommandFailed,
    exit_with,
    facts_line,
    machine_facts,
    median,
    print_table,
    quote,
    run,
    write_json,
)

TARGET_MS = 40.0

# What pip writes for a console script entry point `qimg = "qimg.cli:entry"`.
WRAPPER = """\
#!{python}
# -*- coding: utf-8 -*-
import re
import sys
from qimg.cli import entry
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit(entry())
"""


class Runner:
    """One command under test, with the wall and CPU seconds of each run."""

    def __init__(self, name: str, argv: Sequence[str], *, is_qimg: bool = False) -> None:
        self.name = name
        self.argv = list(argv)
        self.is_qimg = is_qimg
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def once(self, errors: Path) -> tuple[float, float]:
        """Runs the command once: (wall seconds, user + system CPU seconds)."""
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
            (os.POSIX_SPAWN_OPEN, 2, str(errors), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
        ]
        start = time.perf_counter()
        try:
            pid = os.posix_spawnp(self.argv[0], self.argv, os.environ, file_actions=actions)
        except OSError as exc:
            raise CommandFailed(f"cannot run {quote(self.argv)}: {exc}") from exc
        _, status, usage = os.wait4(pid, 0)
        wall = time.perf_counter() - start
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            message = errors.read_text(errors="replace").strip()
            raise CommandFailed(f"{quote(self.argv)} exited {code}: {message}")
        return wall, usage.ru_utime + usage.ru_stime


def write_wrapper(workdir: Path) -> list[str]:
    path = workdir / "qimg"
    path.write_text(WRAPPER.format(python=sys.executable))
    path.chmod(0o755)
    return [str(path)]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=21, help="timed rounds (default 21)")
    ap.add_argument("--qimg", help="command that runs qimg (default: a pip-style wrapper)")
    ap.add_argument("--qemu-img", default="qemu-img", help="qemu-img to compare with")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON ('-': stdout)")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")

    # The bytecode caches must be written by the warm-up round, not rebuilt in every run.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    with tempfile.TemporaryDirectory(prefix="qimg-startup-") as tmp:
        workdir = Path(tmp)
        image = str(workdir / "small.qcow2")
        run([args.qemu_img, "create", "-q", "-f", "qcow2", image, "64M"])
        qimg = shlex.split(args.qimg) if args.qimg else write_wrapper(workdir)
        runners = [
            Runner("qimg --version", [*qimg, "--version"], is_qimg=True),
            Runner("qimg info small.qcow2", [*qimg, "info", image], is_qimg=True),
            Runner("qemu-img info small.qcow2", [args.qemu_img, "info", image]),
            Runner("qemu-img --version", [args.qemu_img, "--version"]),
            Runner("python -I -S -c pass", [sys.executable, "-I", "-S", "-c", "pass"]),
        ]
        errors = workdir / "stderr"
        print(facts_line(machine_facts(workdir)))
        print(f"qimg: {quote(qimg)}; {args.repeat} alternating rounds after 1 warm-up round")
        for r in runners:
            r.once(errors)
        for _ in range(args.repeat):
            for r in runners:
                wall, cpu = r.once(errors)
                r.wall.append(wall)
                r.cpu.append(cpu)

    floor = runners[-1]
    rows = []
    results = []
    for r in runners:
        # Per-round difference to the bare interpreter: what the command adds to it,
        # measured in the same phase of the machine.
        extra = median([w - f for w, f in zip(r.wall, floor.wall, strict=True)])
        verdict = ("ok" if median(r.wall) * 1000 < TARGET_MS else "MISS") if r.is_qimg else ""
        rows.append(
            [
                r.name,
                ms(median(r.wall)),
                ms(min(r.wall)),
                ms(median(r.cpu)),
                ms(extra),
                verdict,
            ]
        )
        results.append(
            {
                "command": r.name,
                "argv": r.argv,
                "median_wall_ms": median(r.wall) * 1000,
                "min_wall_ms": min(r.wall) * 1000,
                "median_cpu_ms": median(r.cpu) * 1000,
                "median_over_bare_python_ms": extra * 1000,
                "wall_ms": [w * 1000 for w in r.wall],
                "cpu_ms": [c * 1000 for c in r.cpu],
            }
        )
    print_table(
        [
            "command",
            "median wall ms",
            "min wall ms",
            "median cpu ms",
            "over bare python ms",
            f"< {TARGET_MS:.0f} ms",
        ],
        rows,
        align="lrrrrl",
    )
    if args.json:
        data = {"target_ms": TARGET_MS, "repeat": args.repeat, "results": results}
        if args.json == "-":
            import json

            print(json.dumps(data, indent=2))
        else:
            write_json(Path(args.json), data)
    return 0


if __name__ == "__main__":
    exit_with(main)
