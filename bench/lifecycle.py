#!/usr/bin/env python3
"""Benchmark `qimg commit` and safe `qimg rebase` against qemu-img's.

The images (built once per run in the work dir, deleted afterwards):
  base.qcow2   4 GiB, 1 GiB of data: the first 16 MiB of every 64 MiB
  top.qcow2    4 GiB overlay over base.qcow2 with 1 GiB of data: 16 MiB at 8 MiB
               into every 64 MiB (half of it over base's data, half not)
  new.qcow2    base.qcow2's data, but other bytes in the second half of each extent
               (the new backing file of the rebase case)

Cases:
  commit  `commit top.qcow2`: top's 1 GiB goes into base, then top is emptied
  rebase  `rebase -b new.qcow2 -F qcow2 top.qcow2`: the old and the new backing
          files are compared wherever top leaves them through; what differs is copied

Each timed run works on fresh copies of the images, made before it and outside the
timed region, and deleted after it. Runs alternate (qimg, qemu-img, ...). Before the
timed rounds, each tool runs once (untimed): the results must read the same
(`qemu-img compare` of every image involved) and pass `qemu-img check`.
Reported: the median wall time and the median CPU time (user+sys) of each tool, and
the median of the per-round ratios qemu-img/qimg (> 1: qimg is faster). Target: at
least 1.0x. The bench reports and never gates: it exits non-zero only when a command
fails or the results differ.

    python bench/lifecycle.py [--quick] [--repeat N] [--dir DIR] [--qimg PATH]
                              [--only commit|rebase]... [--json FILE|-]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    CommandFailed,
    GiB,
    MiB,
    exit_with,
    facts_line,
    human,
    machine_facts,
    median,
    median_ratio,
    print_table,
    qimg_command,
    quote,
    run,
    write_json,
)

TARGET = 1.0
CASES = ("commit", "rebase")
IMAGES = ("base.qcow2", "top.qcow2", "new.qcow2")


@dataclass(frozen=True)
class Layout:
    size: int
    stride: int
    extent: int


FULL = Layout(size=4 * GiB, stride=64 * MiB, extent=16 * MiB)
QUICK = Layout(size=256 * MiB, stride=16 * MiB, extent=4 * MiB)


@dataclass
class Side:
    name: str
    tool: list[str]
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def case_args(case: str) -> list[str]:
    if case == "commit":
        return ["commit", "-q", "top.qcow2"]
    return ["rebase", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2"]


def timed(argv: Sequence[str], cwd: Path) -> tuple[float, float]:
    """Wall and CPU (user+sys) seconds of one run of argv in cwd (stdout discarded)."""
    os.sync()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: nothing but chdir, redirect and exec
        try:
            os.chdir(cwd)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.execvp(argv[0], list(argv))
        finally:
            os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise CommandFailed(f"{quote(argv)} exited {code} in {cwd}")
    return wall, usage.ru_utime + usage.ru_stime


def qemu_io(path: Path, commands: list[str]) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        argv += ["-c", c]
    run([*argv, str(path)])


def build(work: Path, layout: Layout) -> Path:
    """The pristine images every run copies."""
    src = work / "pristine"
    src.mkdir()
    size = str(layout.size)
    starts = range(0, layout.size, layout.stride)
    half = layout.extent // 2
    for name in ("base.qcow2", "new.qcow2"):
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(src / name), size])
        qemu_io(
            src / name,
            [f"write -P {1 + i % 200} {s} {layout.extent}" for i, s in enumerate(starts)],
        )
    qemu_io(src / "new.qcow2", [f"write -P 0xee {s + half} {half}" for s in starts])
    top = src / "top.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top)])
    qemu_io(
        top, [f"write -P {201 + i % 50} {s + half} {layout.extent}" for i, s in enumerate(starts)]
    )
    return src


def fresh_copy(src: Path, dst: Path, case: str) -> None:
    """Copies of the images `case` changes; links to the others (read only)."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir()
    changed = {"commit": ("base.qcow2", "top.qcow2"), "rebase": ("top.qcow2",)}[case]
    for name in IMAGES:
        if name in changed:
            run(["cp", "--sparse=always", str(src / name), str(dst / name)])
        else:
            os.link(src / name, dst / name)


def check_same(a: Path, b: Path) -> None:
    """Both tools' results read the same and qimg's pass qemu-img check."""
    for name in IMAGES:
        run(["qemu-img", "check", "-q", str(a / name)])
        run(["qemu-img", "compare", "-q", str(a / name), str(b / name)])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="256 MiB images, 1 round")
    ap.add_argument("--repeat", type=int, help="timed rounds (default 5; --quick: 1)")
    ap.add_argument("--dir", type=Path, help="work dir (default: a temporary dir in /var/tmp)")
    ap.add_argument("--qimg", help="command that runs qimg (default: this python -m qimg)")
    ap.add_argument("--only", action="append", choices=CASES, help="run only this case")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON ('-': stdout)")
    args = ap.parse_args(argv)
    layout = QUICK if args.quick else FULL
    repeat = args.repeat or (1 if args.quick else 5)
    cases = args.only or list(CASES)
    base_dir = args.dir or Path("/var/tmp")
    results: list[dict[str, Any]] = []
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory(prefix="qimg-lifecycle-", dir=base_dir) as tmp:
        work = Path(tmp)
        print(facts_line(machine_facts(work)))
        print(
            f"images: {human(layout.size)}; base and top hold "
            f"{human(layout.size // layout.stride * layout.extent)} each; {repeat} rounds"
        )
        src = build(work, layout)
        for case in cases:
            sides = [Side("qimg", qimg_command(args.qimg)), Side("qemu-img", ["qemu-img"])]
            runs = {s.name: work / f"run-{s.name}" for s in sides}
            # Untimed check round: both results must agree.
            for s in sides:
                fresh_copy(src, runs[s.name], case)
                timed([*s.tool, *case_args(case)], runs[s.name])
            check_same(runs["qimg"], runs["qemu-img"])
            for _ in range(repeat):
                for s in sides:
                    fresh_copy(src, runs[s.name], case)
                    wall, cpu = timed([*s.tool, *case_args(case)], runs[s.name])
                    s.wall.append(wall)
                    s.cpu.append(cpu)
                    shutil.rmtree(runs[s.name])
            qimg, qemu = sides
            ratio = median_ratio(qemu.wall, qimg.wall)
            rows.append(
                [
                    case,
                    f"{median(qimg.wall):.2f}",
                    f"{median(qimg.cpu):.2f}",
                    f"{median(qemu.wall):.2f}",
                    f"{median(qemu.cpu):.2f}",
                    f"{ratio:.2f}x",
                    "ok" if ratio >= TARGET else "MISS",
                ]
            )
            results.append(
                {
                    "case": case,
                    "argv": case_args(case),
                    "speedup": ratio,
                    **{f"{s.name}_wall_s": s.wall for s in sides},
                    **{f"{s.name}_cpu_s": s.cpu for s in sides},
                }
            )
    print_table(
        [
            "case",
            "qimg wall s",
            "qimg cpu s",
            "qemu-img wall s",
            "qemu-img cpu s",
            "speedup",
            ">= 1x",
        ],
        rows,
    )
    if args.json == "-":
        print(json.dumps({"layout": layout.__dict__, "results": results}, indent=2))
    elif args.json:
        write_json(Path(args.json), {"layout": layout.__dict__, "results": results})
    return 0


if __name__ == "__main__":
    exit_with(main)
