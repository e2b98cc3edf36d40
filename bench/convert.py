#!/usr/bin/env python3
"""Benchmark `qimg convert` against `qemu-img convert`: qcow2 to raw, and raw to qcow2.

Runs are alternating (qimg, qemu-img, qimg, ...) on the same source; each output is
deleted after its run, outside the timed region. Before the timed rounds, each tool
converts the source once (untimed) and the two outputs must be byte-identical, so a
broken reader cannot post a time. Those check runs also warm the page cache: they are
reported as the warm-up and are not counted.

Inputs (full run), built once per run in the work dir and deleted afterwards:
  allocated   4 GiB qcow2 (64k clusters), ~89% of it random data, the rest holes -> -O raw
  compressed  2 GiB zlib-compressed qcow2 (qemu-img convert -c) of text-like data -> -O raw
  to-qcow2    4 GiB raw file, half random data, half holes -> -O qcow2
  to-qcow2-c  1 GiB raw file of text-like data (5% holes) -> -O qcow2 -c
  allocated-C the allocated input again, with -C (copy offloading) for both tools
  allocated-t-none  the allocated input again, with -t none (O_DIRECT output) for both
  small       1 GiB qcow2, half of it random data, the rest holes -> -O raw (in --quick
              too): a job this short is where start-up costs show

Targets (throughput = qemu-img time / qimg time): >= 1.5x for the -O raw inputs and for
-O qcow2 -c, >= 1.2x for plain -O qcow2; -C has no target of its own beyond >= 1x
(both tools leave the copy to the kernel), nor has -t none (the disk is the limit);
small must reach >= 1x (qimg must not lose on small images).
Outputs must be byte-identical to qemu-img's, except compressed qcow2 output (another
deflate implementation): that must pass `qemu-img check` and compare equal to
qemu-img's with `qemu-img compare`.
Speedup is the median of the per-round ratios. CPU utilisation is (user+sys)/wall of
each run, as `top` shows it: 100% is one core busy.
The bench reports and never gates: exit status is 0 unless a command fails or the
outputs differ.

    python bench/convert.py [--quick] [--repeat N] [--dir DIR] [--qimg PATH]
                            [--only allocated|compressed|to-qcow2|to-qcow2-c|allocated-C|
                                    allocated-t-none|small]...
                            [--json FILE|-]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    CommandFailed,
    Contender,
    GiB,
    KiB,
    MiB,
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
    timed,
    write_json,
)

CLUSTER = 64 * KiB  # qcow2's default; the sources are made without -o cluster_size
CHUNK = 1 * MiB  # unit of the raw files the sources are made from
POOL = 8 * MiB  # data repeats with this period (per-cluster content stays varied)
COMPARE_CHUNK = 8 * MiB
MIN_SPEEDUP = 1.5


@dataclass(frozen=True)
class Case:
    key: str  # allocated | compressed
    size: int
    # Holes of the raw file the source is made from, as (start, length) fractions of
    # the size, rounded to CHUNK; qemu-img leaves them unallocated in the qcow2.
    holes: tuple[tuple[float, float], ...]
    compressed: bool
    """The data is text-like (compressible) rather than random."""
    target: str = "raw"
    """Output format: raw (the source is qcow2) or qcow2 (the source is raw)."""
    compress_output: bool = False
    copy_offload: bool = False
    """Both tools run with -C (copy_file_range for plain data)."""
    cache: str | None = None
    """Both tools run with -t CACHE (none: O_DIRECT, around the page cache)."""
    min_speedup: float = MIN_SPEEDUP

    @property
    def source_fmt(self) -> str:
        return "qcow2" if self.target == "raw" else "raw"

    @property
    def name(self) -> str:
        return f"{self.key} {human(self.size)}"


ALLOCATED_HOLES = (
    (0.0, 0.01),
    (0.13, 0.02),
    (0.37, 0.03),
    (0.61, 0.005),
    (0.78, 0.025),
    (0.98, 0.02),  # the image ends in a hole: the output's length must still be right
)
COMPRESSED_HOLES = ((0.25, 0.02), (0.70, 0.03))
HALF_HOLES = ((0.05, 0.15), (0.30, 0.10), (0.50, 0.20), (0.85, 0.05))
MIN_SPEEDUP_QCOW2 = 1.2
CASE_KEYS = (
    "allocated",
    "compressed",
    "to-qcow2",
    "to-qcow2-c",
    "allocated-C",
    "allocated-t-none",
    "small",
)


def cases(quick: bool) -> list[Case]:
    a, c = (512 * MiB, 256 * MiB) if quick else (4 * GiB, 2 * GiB)
    q, qc = (512 * MiB, 128 * MiB) if quick else (4 * GiB, 1 * GiB)
    return [
        Case("allocated", a, ALLOCATED_HOLES, compressed=False),
        Case("compressed", c, COMPRESSED_HOLES, compressed=True),
        Case(
            "to-qcow2",
            q,
            HALF_HOLES,
            compressed=False,
            target="qcow2",
            min_speedup=MIN_SPEEDUP_QCOW2,
        ),
        Case(
            "to-qcow2-c",
            qc,
            COMPRESSED_HOLES,
            compressed=True,
            target="qcow2",
            compress_output=True,
        ),
        Case(
            "allocated-C", a, ALLOCATED_HOLES, compressed=False, copy_offload=True, min_speedup=1.0
        ),
        # O_DIRECT writes: the disk, not the page cache, is the limit for both tools.
        Case(
            "allocated-t-none", a, ALLOCATED_HOLES, compressed=False, cache="none", min_speedup=1.0
        ),
        # Start-up and set-up costs weigh most on a short job.
        Case("small", 1 * GiB, HALF_HOLES, compressed=False, min_speedup=1.0),
    ]


@dataclass
class Result:
    case: Case
    status: str = "ok"  # ok | skipped | error
    reason: str = ""
    commands: dict[str, str] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    check: dict[str, Any] = field(default_factory=dict)
    warmup: dict[str, dict[str, float]] = field(default_factory=dict)
    times: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    comparison: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- sources


def random_pool() -> bytes:
    """Incompressible data: every cluster of the pool is different."""
    return os.urandom(POOL)


def text_pool(seed: int = 1234) -> bytes:
    """Text-like data that raw deflate (QEMU's 4 KiB window) shrinks about 2.8x."""
    rng = random.Random(seed)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    weights = list(range(len(letters), 0, -1))
    vocab = ["".join(rng.choices(letters, weights, k=rng.randint(2, 10))) for _ in range(1500)]
    zipf = [1 / (i + 1) ** 1.1 for i in range(len(vocab))]
    parts: list[str] = []
    for i, word in enumerate(rng.choices(vocab, zipf, k=POOL // 5)):
        parts.append(word)
        if i % 29 == 0:
            parts.append(str(rng.randrange(1_000_000)))
        parts.append("\n" if i % 11 == 0 else " ")
    data = "".join(parts).encode()
    if len(data) < POOL:
        raise RuntimeError("text pool came out short")
    return data[:POOL]


def zero_runs(pos: int) -> Iterator[tuple[int, int]]:
    """Zero runs inside data, relative to the chunk at pos: in every 64 MiB, 12 KiB on a
    4 KiB boundary inside a cluster and 5000 bytes on no boundary. qcow2 keeps them as
    data; `-S 4k` turns only whole aligned 4 KiB blocks of them into holes."""
    if pos % (64 * MiB) == 32 * MiB:
        yield 20 * KiB, 12 * KiB
        yield 300 * KiB + 123, 5000


def write_raw(path: Path, case: Case, pool: bytes) -> None:
    """A raw file of case.size: pool data, sparse holes, a few zero runs in the data."""
    holes = [
        (round(case.size * s / CHUNK) * CHUNK, max(1, round(case.size * n / CHUNK)) * CHUNK)
        for s, n in case.holes
    ]
    with path.open("wb") as f:
        f.truncate(case.size)
        for pos in range(0, case.size, CHUNK):
            if any(start <= pos < start + n for start, n in holes):
                continue
            at = pos % len(pool)
            buf = bytearray(pool[at : at + CHUNK])
            for off, n in zero_runs(pos):
                buf[off : off + n] = bytes(n)
            os.pwrite(f.fileno(), buf, pos)


def qemu_json(args: list[str]) -> dict[str, Any]:
    proc = subprocess.run(
        ["qemu-img", *args], capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL
    )
    if proc.returncode != 0:
        raise CommandFailed(f"qemu-img {quote(args)} exited {proc.returncode}: {proc.stderr}")
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def build_source(case: Case, workdir: Path) -> tuple[Path, dict[str, Any]]:
    """Makes the source (a raw file, or a qcow2 made from one with qemu-img convert
    [-c]); returns it and its facts."""
    if case.source_fmt == "raw":
        src = workdir / f"{case.key}.src.raw"
        start = time.perf_counter()
        write_raw(src, case, text_pool() if case.compressed else random_pool())
        data = allocated_bytes(src)
        return src, {
            "build_s": time.perf_counter() - start,
            "file_length": src.stat().st_size,
            "data_bytes": data,
            "allocated_fraction": data / case.size,
        }
    raw = workdir / f"{case.key}.src.raw"
    src = workdir / f"{case.key}.src.qcow2"
    start = time.perf_counter()
    try:
        write_raw(raw, case, text_pool() if case.compressed else random_pool())
        cmd = ["qemu-img", "convert", "-q", *(["-c"] if case.compressed else [])]
        cmd += ["-f", "raw", "-O", "qcow2", str(raw), str(src)]
        subprocess_run(cmd)
    finally:
        remove(raw)
    built = time.perf_counter() - start
    chk = qemu_json(["check", "--output=json", "-f", "qcow2", str(src)])
    info = qemu_json(["info", "--output=json", "-f", "qcow2", str(src)])
    if info.get("virtual-size") != case.size or info.get("cluster-size") != CLUSTER:
        raise CommandFailed(f"unexpected source geometry: {json.dumps(info)}")
    total = int(chk["total-clusters"])
    alloc = int(chk["allocated-clusters"])
    compressed = int(chk.get("compressed-clusters", 0))
    facts: dict[str, Any] = {
        "build_s": built,
        "file_length": src.stat().st_size,
        "total_clusters": total,
        "allocated_clusters": alloc,
        "compressed_clusters": compressed,
        "allocated_fraction": alloc / total,
    }
    if case.compressed:
        if compressed == 0:
            raise CommandFailed("qemu-img convert -c compressed no cluster of the source")
        facts["compression_ratio"] = alloc * CLUSTER / src.stat().st_size
    return src, facts


def subprocess_run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise CommandFailed(f"{quote(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")


def source_line(case: Case, src: Path, f: dict[str, Any]) -> str:
    load = " ".join(f"{x:.2f}" for x in f["loadavg_at_start"])
    if case.source_fmt == "raw":
        kind = "text-like" if case.compressed else "random"
        return (
            f"   source: {src.name}, {human(case.size)} raw, {human(f['data_bytes'])} of "
            f"{kind} data ({100 * f['allocated_fraction']:.1f}%), the rest holes; "
            f"built in {f['build_s']:.1f}s; load average before: {load}"
        )
    msg = (
        f"   source: {src.name}, {human(case.size)} virtual, file {human(f['file_length'])}, "
        f"{f['allocated_clusters']}/{f['total_clusters']} clusters allocated "
        f"({100 * f['allocated_fraction']:.1f}%)"
    )
    if case.compressed:
        msg += (
            f", {f['compressed_clusters']} compressed (zlib), "
            f"about {f['compression_ratio']:.2f}x smaller than its data"
        )
    return msg + f"; built in {f['build_s']:.1f}s; load average before: {load}"


# --------------------------------------------------------------------------- checks


def compare_outputs(mine: Path, theirs: Path) -> dict[str, Any]:
    """qimg's output must be byte-identical to qemu-img's; returns the facts."""
    a_len, b_len = mine.stat().st_size, theirs.stat().st_size
    if a_len != b_len:
        raise CommandFailed(
            f"qimg's output is {a_len} bytes long, qemu-img's is {b_len} bytes: not identical"
        )
    digest = hashlib.sha256()
    with mine.open("rb") as fa, theirs.open("rb") as fb:
        pos = 0
        while True:
            a = fa.read(COMPARE_CHUNK)
            b = fb.read(COMPARE_CHUNK)
            if a != b:
                at = pos + next(
                    (i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b))
                )
                raise CommandFailed(
                    f"qimg's output differs from qemu-img's: first differing byte at offset "
                    f"{at} (qimg {a[at - pos : at - pos + 1].hex() or 'EOF'}, "
                    f"qemu-img {b[at - pos : at - pos + 1].hex() or 'EOF'})"
                )
            if not a:
                break
            digest.update(a)
            pos += len(a)
    return {
        "identical": True,
        "length": a_len,
        "sha256": digest.hexdigest(),
        "qimg_on_disk": allocated_bytes(mine),
        "qemu_on_disk": allocated_bytes(theirs),
    }


def check_equivalent(mine: Path, theirs: Path) -> dict[str, Any]:
    """For outputs that may differ in bytes (compressed qcow2): qimg's must pass
    `qemu-img check` and hold the same guest data as qemu-img's."""
    chk = qemu_json(["check", "--output=json", "-f", "qcow2", str(mine)])
    if chk.get("corruptions", 0) or chk.get("leaks", 0) or chk.get("check-errors", 0):
        raise CommandFailed(f"qemu-img check finds problems in qimg's output: {json.dumps(chk)}")
    proc = subprocess.run(
        ["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2", str(mine), str(theirs)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise CommandFailed(f"qemu-img compare: outputs differ in content ({proc.stdout.strip()})")
    theirs_chk = qemu_json(["check", "--output=json", "-f", "qcow2", str(theirs)])
    return {
        "identical": False,
        "same_content": True,
        "qimg_length": mine.stat().st_size,
        "qemu_length": theirs.stat().st_size,
        "qimg_compressed_clusters": chk.get("compressed-clusters", 0),
        "qemu_compressed_clusters": theirs_chk.get("compressed-clusters", 0),
        "qimg_on_disk": allocated_bytes(mine),
        "qemu_on_disk": allocated_bytes(theirs),
    }


# --------------------------------------------------------------------------- timing


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_mark() -> tuple[float, float, float | None]:
    """(user, sys) seconds of all waited-for children so far, and the seconds every
    CPU of the machine has been busy (from /proc/stat; None where it is missing)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy: float | None = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
        # user nice system idle iowait irq softirq steal: all but idle and iowait
        busy = (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK
    return r.ru_utime, r.ru_stime, busy


def cpu_entry(before: tuple[float, float, float | None], wall: float) -> dict[str, float]:
    """CPU use of the run that started at `before` and took `wall` seconds. `others`
    is what the rest of the machine used meanwhile, as a utilisation (-1: unknown)."""
    user, system, busy = cpu_mark()
    user -= before[0]
    system -= before[1]
    others = -1.0
    if busy is not None and before[2] is not None:
        others = max(0.0, (busy - before[2] - user - system) / wall)
    return {"user_s": user, "sys_s": system, "util": (user + system) / wall, "others": others}


def run_once(cmd: list[str]) -> dict[str, float]:
    """One run outside alternate(): wall, user, sys and utilisation."""
    os.sync()
    before = cpu_mark()
    wall = timed(cmd)
    return {"wall_s": wall, **cpu_entry(before, wall)}


def pct(util: float) -> str:
    return f"{100 * util:.0f}%" if util >= 0 else "?"


def run_line(name: str, wall: float, cpu: dict[str, float]) -> str:
    return (
        f"{name} {wall:.3f}s (cpu {pct(cpu['util'])}: "
        f"user {cpu['user_s']:.2f} + sys {cpu['sys_s']:.2f}; others {pct(cpu['others'])})"
    )


# --------------------------------------------------------------------------- one case


def run_case(case: Case, qimg: list[str], workdir: Path, repeat: int) -> Result:
    res = Result(case)
    # Peak: the raw file and the qcow2 while building, then the qcow2 and two outputs.
    need = 3 * case.size
    free = free_bytes(workdir)
    if free < need:
        res.status = "skipped"
        res.reason = f"not enough free space in {workdir}: {human(free)} free, {human(need)} needed"
        print(f"SKIP {case.name}: {res.reason}", flush=True)
        return res

    q_out = workdir / f"{case.key}.qimg.{case.target}"
    r_out = workdir / f"{case.key}.qemu.{case.target}"
    src = workdir / f"{case.key}.src.{case.source_fmt}"
    opts = ["-f", case.source_fmt, "-O", case.target, *(["-c"] if case.compress_output else [])]
    opts += ["-C"] if case.copy_offload else []
    opts += ["-t", case.cache] if case.cache else []
    q_cmd = [*qimg, "convert", *opts, str(src), str(q_out)]
    r_cmd = ["qemu-img", "convert", *opts, str(src), str(r_out)]
    res.commands = {"qimg": quote(q_cmd), "qemu-img": quote(r_cmd)}
    print(f"== {case.name}", flush=True)
    res.source["loadavg_at_start"] = os.getloadavg()
    print(f"   qimg:     {res.commands['qimg']}")
    print(f"   qemu-img: {res.commands['qemu-img']}", flush=True)

    contenders: list[Contender] = []
    try:
        src, facts = build_source(case, workdir)
        res.source.update(facts)
        print(source_line(case, src, res.source), flush=True)

        # Check (and warm-up): one run each, outputs compared, not counted.
        for path in (q_out, r_out):
            remove(path)
        res.warmup["qimg"] = run_once(q_cmd)
        res.warmup["qemu-img"] = run_once(r_cmd)
        if case.compress_output:
            res.check = check_equivalent(q_out, r_out)
        else:
            res.check = compare_outputs(q_out, r_out)
        for path in (q_out, r_out):
            remove(path)
        c = res.check
        if c["identical"]:
            print(
                f"   check: outputs identical ({c['length']} bytes, sha256 {c['sha256'][:16]}"
                f"...); on disk: qimg {human(c['qimg_on_disk'])}, "
                f"qemu-img {human(c['qemu_on_disk'])}"
            )
        else:
            print(
                f"   check: qimg's output passes qemu-img check and holds the same data; "
                f"files {human(c['qimg_length'])} (qimg) vs {human(c['qemu_length'])} "
                f"(qemu-img), compressed clusters {c['qimg_compressed_clusters']} vs "
                f"{c['qemu_compressed_clusters']}"
            )
        w = res.warmup
        print(
            "   warm-up (the check runs, not counted): "
            + "  ".join(run_line(n, w[n]["wall_s"], w[n]) for n in ("qimg", "qemu-img")),
            flush=True,
        )

        cpu: dict[str, list[dict[str, float]]] = {"qimg": [], "qemu-img": []}
        before: dict[str, tuple[float, float, float | None]] = {}

        def prepare(name: str, out: Path) -> None:
            remove(out)
            # alternate() syncs again right before the run; with nothing left to flush
            # that costs no CPU, so the mark sees only the run and the other processes.
            os.sync()
            before[name] = cpu_mark()

        def finish(c: Contender, out: Path) -> None:
            try:
                # Later rounds are not compared again, but the length must be right.
                length = out.stat().st_size if out.exists() else None
                if length is None or (case.target == "raw" and length != case.size):
                    raise CommandFailed(f"{c.name}'s output is {length} bytes, not {case.size}")
                cpu[c.name].append(cpu_entry(before[c.name], c.times[-1]))
            finally:
                remove(out)

        qc = Contender("qimg", lambda _rep: q_cmd)
        rc = Contender("qemu-img", lambda _rep: r_cmd)
        qc.prepare = lambda _rep: prepare("qimg", q_out)
        qc.finish = lambda _rep: finish(qc, q_out)
        rc.prepare = lambda _rep: prepare("qemu-img", r_out)
        rc.finish = lambda _rep: finish(rc, r_out)
        contenders = [qc, rc]

        def after_round(rep: int) -> None:
            runs = "  ".join(run_line(c.name, c.times[-1], cpu[c.name][-1]) for c in contenders)
            print(f"   round {rep + 1}/{repeat}: {runs}", flush=True)

        alternate(contenders, repeat, after_round=after_round)
        res.cpu = cpu
    except CommandFailed as exc:
        res.status = "error"
        res.reason = str(exc)
        print(f"ERROR {case.name}: {exc}", file=sys.stderr, flush=True)
    finally:
        for path in (q_out, r_out, src):
            remove(path)
    res.times = {c.name: c.times for c in contenders}
    if res.status == "ok":
        qt, rt = res.times["qimg"], res.times["qemu-img"]
        ratio = median_ratio(rt, qt)
        res.comparison = {
            "qimg_median_s": median(qt),
            "qemu_median_s": median(rt),
            "qimg_gib_per_s": case.size / GiB / median(qt),
            "qemu_gib_per_s": case.size / GiB / median(rt),
            "ratio": ratio,
            "qimg_cpu_util": median([c["util"] for c in res.cpu["qimg"]]),
            "qemu_cpu_util": median([c["util"] for c in res.cpu["qemu-img"]]),
            "others_cpu_util": median([c["others"] for n in res.cpu for c in res.cpu[n]]),
            "target": f">= {case.min_speedup}x",
            "min_ratio": case.min_speedup,
            "verdict": "PASS" if ratio >= case.min_speedup else "BELOW TARGET",
        }
    return res


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--repeat", type=int, help="timed rounds per input (default 5; 1 with --quick)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="512 MiB / 256 MiB inputs, 1 round: a smoke run; targets not applied",
    )
    ap.add_argument(
        "--dir", type=Path, help="work directory (default: a new dir in $TMPDIR or /tmp)"
    )
    ap.add_argument("--qimg", help="qimg executable (default: python -m qimg)")
    ap.add_argument("--json", help="write the results here as JSON ('-': to stdout)")
    ap.add_argument("--only", choices=CASE_KEYS, action="append", help="run only these inputs")
    args = ap.parse_args(argv)
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 5)
    if repeat < 1:
        ap.error("--repeat must be >= 1")
    if shutil.which("qemu-img") is None:
        print("error: qemu-img not found on PATH", file=sys.stderr)
        return 1

    # With --json -, stdout carries only the JSON; the report goes to stderr.
    report = sys.stderr if args.json == "-" else sys.stdout
    with contextlib.redirect_stdout(report):
        results, facts, qimg = run_all(args, repeat)
    if args.json is not None:
        data = {
            "bench": "convert",
            "mode": "quick" if args.quick else "full",
            "repeat": repeat,
            "machine": facts,
            "qimg": quote(qimg),
            "cases": [
                {
                    "name": r.case.name,
                    "input": r.case.key,
                    "size": r.case.size,
                    "status": r.status,
                    "reason": r.reason,
                    "commands": r.commands,
                    "source": r.source,
                    "check": r.check,
                    "warmup": r.warmup,
                    "times_s": r.times,
                    "cpu": r.cpu,
                    "comparison": r.comparison,
                }
                for r in results
            ],
        }
        if args.json == "-":
            print(json.dumps(data, indent=2))
        else:
            write_json(Path(args.json), data)
            print(f"results written to {args.json}")
    return 1 if any(r.status == "error" for r in results) else 0


def run_all(
    args: argparse.Namespace, repeat: int
) -> tuple[list[Result], dict[str, str], list[str]]:
    made_dir = args.dir is None
    if args.dir is None:
        workdir = Path(tempfile.mkdtemp(prefix="qimg-bench-convert-"))
    else:
        workdir = args.dir
        workdir.mkdir(parents=True, exist_ok=True)
    workdir = workdir.resolve()
    qimg = qimg_command(args.qimg)
    facts = machine_facts(workdir)
    print(facts_line(facts))
    mode = "quick (smoke run: targets shown, not applied)" if args.quick else "full"
    print(
        f"bench: qimg convert vs qemu-img convert; mode {mode}; "
        f"{repeat} timed round(s) after 1 warm-up, alternating; page cache warm, not dropped"
    )
    print(f"qimg: {quote(qimg)}", flush=True)

    results: list[Result] = []
    try:
        for case in cases(args.quick):
            if args.only is not None and case.key not in args.only:
                continue
            results.append(run_case(case, qimg, workdir, repeat))
    finally:
        if made_dir:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    rows: list[list[str]] = []
    for res in results:
        if res.status != "ok":
            rows.append([res.case.name, *["-"] * 7, res.status.upper()])
            continue
        cmp = res.comparison
        if args.quick:
            cmp["verdict"] = "n/a"
        rows.append(
            [
                res.case.name,
                f"{cmp['qimg_median_s']:.3f} ({cmp['qimg_gib_per_s']:.2f} GiB/s)",
                f"{cmp['qemu_median_s']:.3f} ({cmp['qemu_gib_per_s']:.2f} GiB/s)",
                f"{cmp['ratio']:.2f}x",
                pct(cmp["qimg_cpu_util"]),
                pct(cmp["qemu_cpu_util"]),
                pct(cmp["others_cpu_util"]),
                cmp["target"],
                cmp["verdict"],
            ]
        )
    print_table(
        [
            "input",
            "qimg s",
            "qemu-img s",
            "speedup",
            "qimg cpu",
            "qemu cpu",
            "others",
            "target",
            "result",
        ],
        rows,
        "lrrrrrrll",
    )
    print(
        f"(medians of {repeat} round(s); speedup = median of per-round qemu-img/qimg time "
        f"= throughput ratio; GiB/s = virtual size / median time; cpu = median "
        f"(user+sys)/wall, 100% = one core of {facts['nproc']}; others = CPU the rest of the "
        "machine used during the runs, median of all runs)"
    )
    for res in results:
        if res.status != "ok":
            print(f"{res.status.upper()} {res.case.name}: {res.reason}")
    return results, facts, qimg


if __name__ == "__main__":
    sys.exit(main())
