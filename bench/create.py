#!/usr/bin/env python3
"""Benchmark `qimg create` against `qemu-img create` (and against dd) on qcow2.

Runs are alternating (qimg, qemu-img[, dd], qimg, ...); each output is deleted after
its run, outside the timed region. Every case checks the qimg image once with
`qemu-img check`/`qemu-img info` (untimed) so a broken writer cannot post a time.

Cases (full run):
  metadata 1 TiB, cluster 64k    qimg >= 5x faster than qemu-img; within 2x of dd
  metadata 100 GiB, cluster 4k   qimg >= 20x faster than qemu-img; within 2x of dd
  full 2 GiB                     qimg within 1.1x of qemu-img

The dd comparison writes M bytes from /dev/zero with bs=8M conv=fdatasync, where
M = (qimg's file length) - round_up(size, cluster_size): the metadata qimg wrote
(its data region is a hole).

Speedup = other tool's time / qimg's time, the median of the per-round ratios.
The bench reports and never gates: exit status is 0 unless a command fails or an
image fails its sanity check.

    python bench/create.py [--quick] [--repeat N] [--dir DIR] [--qimg PATH] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    CommandFailed,
    Contender,
    GiB,
    KiB,
    MiB,
    TiB,
    allocated_bytes,
    alternate,
    facts_line,
    free_bytes,
    human,
    machine_facts,
    median,
    median_ratio,
    print_table,
    qimg_command,
    quote,
    remove,
    round_up,
    write_json,
)

DEFAULT_CLUSTER = 64 * KiB
DD_BLOCK = "8M"


@dataclass(frozen=True)
class Target:
    """Pass when median(other/qimg) >= min_ratio."""

    min_ratio: float
    text: str


@dataclass(frozen=True)
class Case:
    prealloc: str
    size: int
    cluster: int | None  # None: qcow2's default, not passed on the command line
    vs_qemu: Target
    vs_dd: Target | None = None

    @property
    def cluster_size(self) -> int:
        return self.cluster if self.cluster is not None else DEFAULT_CLUSTER

    @property
    def name(self) -> str:
        cl = f", cluster {human(self.cluster_size)}" if self.cluster is not None else ""
        return f"{self.prealloc} {human(self.size)}{cl}"

    @property
    def options(self) -> str:
        opts = f"preallocation={self.prealloc}"
        if self.cluster is not None:
            opts += f",cluster_size={size_arg(self.cluster).lower()}"
        return opts


@dataclass
class Result:
    case: Case
    status: str = "ok"  # ok | skipped | error
    reason: str = ""
    commands: dict[str, str] = field(default_factory=dict)
    times: dict[str, list[float]] = field(default_factory=dict)
    facts: dict[str, int] = field(default_factory=dict)
    comparisons: list[dict[str, Any]] = field(default_factory=list)


FAST_5X = Target(5.0, ">= 5x")
FAST_20X = Target(20.0, ">= 20x")
WITHIN_2X = Target(0.5, ">= 0.5x (within 2x)")
WITHIN_1_1X = Target(1 / 1.1, ">= 0.909x (within 1.1x)")


def cases(quick: bool) -> list[Case]:
    if quick:
        return [
            Case("metadata", 8 * GiB, 64 * KiB, FAST_5X, WITHIN_2X),
            Case("metadata", 1 * GiB, 4 * KiB, FAST_20X, WITHIN_2X),
            Case("full", 64 * MiB, None, WITHIN_1_1X),
        ]
    return [
        Case("metadata", 1 * TiB, 64 * KiB, FAST_5X, WITHIN_2X),
        Case("metadata", 100 * GiB, 4 * KiB, FAST_20X, WITHIN_2X),
        Case("full", 2 * GiB, None, WITHIN_1_1X),
    ]


def size_arg(n: int) -> str:
    """Bytes as qemu-img's size syntax: 1099511627776 -> '1T'."""
    for suffix, mult in (("T", TiB), ("G", GiB), ("M", MiB), ("K", KiB)):
        if n % mult == 0:
            return f"{n // mult}{suffix}"
    return str(n)


# --------------------------------------------------------------------------- checks


def qemu_json(args: list[str]) -> tuple[int, dict[str, Any]]:
    try:
        proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
    except OSError as exc:
        raise CommandFailed(f"cannot run qemu-img: {exc}") from exc
    try:
        data: dict[str, Any] = json.loads(proc.stdout) if proc.stdout.strip() else {}
    except json.JSONDecodeError:
        data = {}
    if not data and proc.returncode != 0:
        raise CommandFailed(
            f"qemu-img {quote(args)} exited {proc.returncode}: {proc.stderr.strip()}"
        )
    return proc.returncode, data


def required_bytes(case: Case) -> int:
    """On-disk bytes one output of this case takes (qemu-img measure)."""
    if case.prealloc == "full":
        return case.size
    _, data = qemu_json(
        ["measure", "--output=json", "-O", "qcow2", "-o", case.options, "--size", str(case.size)]
    )
    return int(data["required"])


def sanity_check(case: Case, image: Path) -> dict[str, int]:
    """qemu-img must find the qimg image clean, of the right geometry, preallocated."""
    try:
        return _sanity_check(case, image)
    except CommandFailed as exc:
        raise CommandFailed(f"qimg image fails its sanity check: {exc}") from exc


def _sanity_check(case: Case, image: Path) -> dict[str, int]:
    rc, chk = qemu_json(["check", "--output=json", "-f", "qcow2", str(image)])
    problems: list[str] = []
    if rc != 0 or chk.get("check-errors", 0) != 0:
        problems.append(f"qemu-img check exited {rc}: {json.dumps(chk)}")
    for key in ("corruptions", "leaks"):
        if chk.get(key, 0):
            problems.append(f"qemu-img check reports {key}={chk[key]}")
    total = chk.get("total-clusters")
    alloc = chk.get("allocated-clusters")
    if total is None or alloc != total:
        problems.append(f"preallocation={case.prealloc} but {alloc} of {total} clusters allocated")
    _, info = qemu_json(["info", "--output=json", "-f", "qcow2", str(image)])
    if info.get("virtual-size") != case.size:
        problems.append(f"virtual-size {info.get('virtual-size')} != {case.size}")
    if info.get("cluster-size") != case.cluster_size:
        problems.append(f"cluster-size {info.get('cluster-size')} != {case.cluster_size}")
    length = image.stat().st_size
    alloc_bytes = allocated_bytes(image)
    data_region = round_up(case.size, case.cluster_size)
    metadata = length - data_region
    if metadata <= 0:
        problems.append(f"file length {length} leaves no room for metadata")
    if case.prealloc == "full" and alloc_bytes < case.size:
        problems.append(f"preallocation=full but only {alloc_bytes} bytes allocated on disk")
    if problems:
        raise CommandFailed(f"{image}: " + "; ".join(problems))
    return {"length": length, "allocated": alloc_bytes, "metadata": metadata}


# --------------------------------------------------------------------------- one case


def run_case(case: Case, qimg: list[str], workdir: Path, repeat: int, with_dd: bool) -> Result:
    res = Result(case)
    need = 2 * required_bytes(case)
    free = free_bytes(workdir)
    if free < need:
        res.status = "skipped"
        res.reason = (
            f"not enough free space in {workdir}: {human(free)} free, "
            f"{human(need)} needed (2 x {human(need // 2)})"
        )
        print(f"SKIP {case.name}: {res.reason}", flush=True)
        return res

    stem = f"{case.prealloc}-{size_arg(case.size)}-{size_arg(case.cluster_size)}"
    q_out = workdir / f"{stem}.qimg.qcow2"
    r_out = workdir / f"{stem}.qemu.qcow2"
    d_out = workdir / f"{stem}.dd.bin"
    size = size_arg(case.size)
    q_cmd = [*qimg, "create", "-q", "-f", "qcow2", "-o", case.options, str(q_out), size]
    r_cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", case.options, str(r_out), size]
    state: dict[str, int] = {}

    def dd_cmd(_rep: int) -> list[str]:
        return [
            "dd",
            "if=/dev/zero",
            f"of={d_out}",
            f"bs={DD_BLOCK}",
            f"count={state['metadata']}",
            "iflag=count_bytes",
            "conv=fdatasync",
            "status=none",
        ]

    def q_finish(rep: int) -> None:
        try:
            if not q_out.exists():
                raise CommandFailed(f"qimg produced no file {q_out}")
            if rep == 0:
                state.update(sanity_check(case, q_out))
            elif q_out.stat().st_size != state["length"]:
                raise CommandFailed(
                    f"qimg file length changed between runs: {q_out.stat().st_size} "
                    f"!= {state['length']}"
                )
        finally:
            remove(q_out)

    def r_finish(rep: int) -> None:
        if rep == 0 and r_out.exists():
            state["qemu_length"] = r_out.stat().st_size
            state["qemu_allocated"] = allocated_bytes(r_out)
        remove(r_out)

    contenders = [
        Contender("qimg", lambda _rep: q_cmd, finish=q_finish),
        Contender("qemu-img", lambda _rep: r_cmd, finish=r_finish),
    ]
    if with_dd:
        contenders.append(Contender("dd", dd_cmd, finish=lambda _rep: remove(d_out)))
    res.commands = {"qimg": quote(q_cmd), "qemu-img": quote(r_cmd)}

    print(f"== {case.name}", flush=True)
    print(f"   qimg:     {res.commands['qimg']}")
    print(f"   qemu-img: {res.commands['qemu-img']}", flush=True)

    def after_round(rep: int) -> None:
        if rep == 0:
            print(first_round_facts(state))
            if with_dd:
                res.commands["dd"] = quote(dd_cmd(0))
                print(f"   dd:       {res.commands['dd']}")
        times = "  ".join(f"{c.name} {c.times[-1]:.3f}s" for c in contenders)
        print(f"   round {rep + 1}/{repeat}: {times}", flush=True)

    try:
        alternate(contenders, repeat, after_round=after_round)
    except CommandFailed as exc:
        res.status = "error"
        res.reason = str(exc)
        print(f"ERROR {case.name}: {exc}", file=sys.stderr, flush=True)
    finally:
        for path in (q_out, r_out, d_out):
            remove(path)
    res.times = {c.name: c.times for c in contenders}
    res.facts = dict(state)
    if res.status == "ok":
        qt = res.times["qimg"]
        against = [("qemu-img", case.vs_qemu)]
        if with_dd and case.vs_dd is not None:
            against.append(("dd", case.vs_dd))
        for other, target in against:
            ratio = median_ratio(res.times[other], qt)
            res.comparisons.append(
                {
                    "against": other,
                    "qimg_median_s": median(qt),
                    "other_median_s": median(res.times[other]),
                    "ratio": ratio,
                    "target": target.text,
                    "min_ratio": target.min_ratio,
                    "verdict": "PASS" if ratio >= target.min_ratio else "MISS",
                }
            )
    return res


def first_round_facts(state: dict[str, int]) -> str:
    msg = (
        f"   qimg image ok (qemu-img check clean, all clusters allocated): length "
        f"{state['length']}, on disk {state['allocated']}, metadata M = {state['metadata']}"
    )
    if "qemu_length" in state:
        msg += f"; qemu-img's: length {state['qemu_length']}, on disk {state['qemu_allocated']}"
    return msg


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--repeat", type=int, help="rounds per case (default 5; 1 with --quick)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="small sizes, 1 round: a smoke run; targets not applied",
    )
    ap.add_argument("--dir", type=Path, help="work directory (default: a new dir in /var/tmp)")
    ap.add_argument("--qimg", help="qimg executable (default: python -m qimg)")
    ap.add_argument("--json", type=Path, help="write the results here as JSON")
    ap.add_argument(
        "--only", choices=("metadata", "full"), help="run only the cases of this preallocation"
    )
    args = ap.parse_args(argv)
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 5)
    if repeat < 1:
        ap.error("--repeat must be >= 1")
    if shutil.which("qemu-img") is None:
        print("error: qemu-img not found on PATH", file=sys.stderr)
        return 1

    made_dir = args.dir is None
    if args.dir is None:
        workdir = Path(tempfile.mkdtemp(prefix="qimg-bench-", dir="/var/tmp"))
    else:
        workdir = args.dir
        workdir.mkdir(parents=True, exist_ok=True)
    workdir = workdir.resolve()
    qimg = qimg_command(args.qimg)
    facts = machine_facts(workdir)
    print(facts_line(facts))
    mode = "quick (smoke run: targets shown, not applied)" if args.quick else "full"
    print(f"bench: qimg create vs qemu-img create; mode {mode}; {repeat} round(s), alternating")
    print(f"qimg: {quote(qimg)}", flush=True)

    results: list[Result] = []
    try:
        for case in cases(args.quick):
            if args.only is not None and case.prealloc != args.only:
                continue
            try:
                results.append(
                    run_case(case, qimg, workdir, repeat, with_dd=case.vs_dd is not None)
                )
            except CommandFailed as exc:  # a failure outside the timed loop (measure)
                print(f"ERROR {case.name}: {exc}", file=sys.stderr, flush=True)
                results.append(Result(case, status="error", reason=str(exc)))
    finally:
        if made_dir:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    rows: list[list[str]] = []
    for res in results:
        if res.status != "ok":
            rows.append([res.case.name, "-", "-", "-", "-", res.status.upper()])
            continue
        for cmp in res.comparisons:
            if args.quick:
                cmp["verdict"] = "n/a"
            rows.append(
                [
                    f"{res.case.name} vs {cmp['against']}",
                    f"{cmp['qimg_median_s']:.3f}",
                    f"{cmp['other_median_s']:.3f}",
                    f"{cmp['ratio']:.2f}x",
                    cmp["target"],
                    cmp["verdict"],
                ]
            )
    print_table(["case", "qimg s", "other s", "speedup", "target", "result"], rows, "lrrrll")
    print(f"(medians of {repeat} round(s); speedup = median of per-round other/qimg)")
    for res in results:
        if res.status != "ok":
            print(f"{res.status.upper()} {res.case.name}: {res.reason}")

    if args.json is not None:
        write_json(
            args.json,
            {
                "bench": "create",
                "mode": "quick" if args.quick else "full",
                "repeat": repeat,
                "machine": facts,
                "qimg": quote(qimg),
                "cases": [
                    {
                        "name": r.case.name,
                        "preallocation": r.case.prealloc,
                        "size": r.case.size,
                        "cluster_size": r.case.cluster_size,
                        "status": r.status,
                        "reason": r.reason,
                        "commands": r.commands,
                        "times_s": r.times,
                        "files": r.facts,
                        "comparisons": r.comparisons,
                    }
                    for r in results
                ],
            },
        )
        print(f"results written to {args.json}")
    return 1 if any(r.status == "error" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
