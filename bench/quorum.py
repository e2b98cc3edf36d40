#!/usr/bin/env python3
"""Benchmark qimg's quorum: `qimg convert -O raw json:{quorum}` against `qemu-img convert` of
the same spec, `qimg scrub` against `cat`, and SHA-256 throughput.

Inputs, built once per run in the work dir and deleted afterwards: three raw replicas of
1 GiB (--quick: 128 MiB) of incompressible data, every 64 KiB block different.
  agreeing   the three replicas, identical
  corrupted  the same, but the third replica has 1% of its 64 KiB blocks changed (512 bytes
             each at a random place in the block); the other two outvote it everywhere

Measures (each contender is one subprocess, wall clock; alternating rounds; page cache warm,
not dropped; `os.sync()` before every run):
  convert    `qimg convert -O raw json:{...} out` vs `qemu-img convert -O raw json:{...} out`,
             per input. Before the timed rounds each tool converts once (untimed, the
             warm-up): both outputs must equal the first replica byte for byte.
  scrub      `qimg scrub json:{...}` on each input, alternating with `cat a b c` to
             /dev/null (the time to read the replicas at all). Before the timed rounds one
             `qimg scrub --output=json` per input must find nothing (agreeing; exit 0) and
             exactly the changed blocks of the third replica (corrupted; exit 2).
  sha256     hashlib's SHA-256 on one core (OpenSSL), and the Rust vote itself: a read
             through a quorum of three replicas that differ in every 64 KiB block, so
             every block of every replica is hashed, against the same read of agreeing
             replicas (compared, not hashed); the difference is the hashing.

Targets (the issue's): convert at least 3x qemu-img's throughput (median per-round
qemu-img/qimg time); scrub of agreeing replicas within 1.5x of the cat time; the corrupted
input no more than 1.5x slower than the agreeing one (scrub; convert shown too); SHA-256
at least 0.9 GB/s per core where the CPU has SHA extensions. The bench reports and never
gates: exit status is 0 unless a command fails or a check does not hold.

    python bench/quorum.py [--quick] [--repeat N] [--dir DIR] [--qimg PATH] [--json FILE|-]
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
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    CommandFailed,
    Contender,
    GiB,
    KiB,
    MiB,
    facts_line,
    free_bytes,
    human,
    machine_facts,
    median,
    print_table,
    qimg_command,
    quote,
    remove,
    write_json,
)

BLOCK = 64 * KiB  # the quorum's vote block
CHUNK = 1 * MiB  # unit in which the replicas are written
POOL = 8 * MiB  # random data, reused with a per-block stamp
CORRUPT_FRACTION = 0.01
CORRUPT_BYTES = 512

MIN_CONVERT_SPEEDUP = 3.0
MAX_SCRUB_VS_CAT = 1.5
MAX_CORRUPTED_VS_AGREEING = 1.5
MIN_SHA_GBPS = 0.9  # GB/s (10^9 bytes) per core

SCRUB_CLEAN = 0
SCRUB_BAD = 2


@dataclass
class Replicas:
    size: int
    paths: list[Path]
    corrupt: Path
    corrupt_blocks: list[int]

    def spec(self, corrupted: bool) -> str:
        paths = [*self.paths[:2], self.corrupt if corrupted else self.paths[2]]
        children = [
            {"driver": "raw", "file": {"driver": "file", "filename": str(p)}} for p in paths
        ]
        return "json:" + json.dumps(
            {"driver": "quorum", "vote-threshold": 2, "children": children},
            separators=(",", ":"),
        )


@dataclass
class Measure:
    """One comparison: a qimg time series against another, as a ratio with a target."""

    name: str
    qimg: str
    other: str
    times: dict[str, list[float]] = field(default_factory=dict)
    ratio: float = 0.0
    ratio_text: str = ""
    target: str = ""
    passed: bool | None = None


# --------------------------------------------------------------------------- inputs


def write_replicas(workdir: Path, size: int) -> Replicas:
    """Three identical raw replicas, plus a copy of the third with 1% of its blocks changed."""
    pool = os.urandom(POOL)
    first = workdir / "replica0.raw"
    with first.open("wb") as f:
        for pos in range(0, size, CHUNK):
            at = (pos // CHUNK * 7919 * 4096) % (POOL - CHUNK)
            buf = bytearray(pool[at : at + CHUNK])
            # Every 64 KiB block is stamped with its offset, so no two blocks are alike.
            for b in range(0, CHUNK, BLOCK):
                struct.pack_into("<Q", buf, b, pos + b)
            f.write(buf[: min(CHUNK, size - pos)])
    paths = [first]
    for i in (1, 2):
        path = workdir / f"replica{i}.raw"
        shutil.copyfile(first, path)
        paths.append(path)
    corrupt = workdir / "replica2.corrupt.raw"
    shutil.copyfile(first, corrupt)
    rng = random.Random(1234)
    blocks = sorted(rng.sample(range(size // BLOCK), round(size // BLOCK * CORRUPT_FRACTION)))
    with corrupt.open("r+b") as f:
        for block in blocks:
            f.seek(block * BLOCK + rng.randrange(BLOCK - CORRUPT_BYTES))
            f.write(os.urandom(CORRUPT_BYTES))
    return Replicas(size, paths, corrupt, blocks)


# --------------------------------------------------------------------------- running


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_timed(argv: Sequence[str], ok: Sequence[int] = (0,)) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + sys) of one run; exit statuses in `ok` count
    as success (scrub exits 2 when it found bad replicas)."""
    os.sync()
    cpu = cpu_seconds()
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    except OSError as exc:
        raise CommandFailed(f"cannot run {quote(argv)}: {exc}") from exc
    wall = time.perf_counter() - start
    if proc.returncode not in ok:
        raise CommandFailed(f"{quote(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return wall, cpu_seconds() - cpu


def alternate_rounds(
    contenders: Sequence[Contender],
    ok: dict[str, Sequence[int]],
    repeat: int,
    cpu: dict[str, list[float]],
) -> None:
    """Like _common.alternate (a, b, c, a, b, c, ...), with accepted exit statuses per
    contender and CPU seconds recorded."""
    for rep in range(repeat):
        line = []
        for c in contenders:
            if c.prepare is not None:
                c.prepare(rep)
            try:
                wall, used = run_timed(c.cmd(rep), ok.get(c.name, (0,)))
            finally:
                if c.finish is not None:
                    c.finish(rep)
            c.times.append(wall)
            cpu.setdefault(c.name, []).append(used)
            line.append(f"{c.name} {wall:.3f}s (cpu {100 * used / wall:.0f}%)")
        print(f"   round {rep + 1}/{repeat}: " + "  ".join(line), flush=True)


def same_file(a: Path, b: Path) -> bool:
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            x, y = fa.read(8 * MiB), fb.read(8 * MiB)
            if x != y:
                return False
            if not x:
                return True


# --------------------------------------------------------------------------- convert


def bench_convert(
    replicas: Replicas, qimg: list[str], workdir: Path, repeat: int, corrupted: bool
) -> Measure:
    label = "corrupted" if corrupted else "agreeing"
    spec = replicas.spec(corrupted)
    q_out, r_out = workdir / "out.qimg.raw", workdir / "out.qemu.raw"
    q_cmd = [*qimg, "convert", "-O", "raw", spec, str(q_out)]
    r_cmd = ["qemu-img", "convert", "-O", "raw", spec, str(r_out)]
    print(f"== convert, {label} replicas ({human(replicas.size)} each)", flush=True)
    print(f"   qimg:     {quote(q_cmd)}")
    print(f"   qemu-img: {quote(r_cmd)}", flush=True)
    try:
        # Check and warm-up: one run each, not counted.
        warm = {}
        for name, cmd, out in (("qimg", q_cmd, q_out), ("qemu-img", r_cmd, r_out)):
            remove(out)
            warm[name] = run_timed(cmd)[0]
            if not same_file(out, replicas.paths[0]):
                raise CommandFailed(f"{name}'s output differs from the replicas' majority")
        print(
            "   check: both outputs equal the majority replica; warm-up (not counted): "
            f"qimg {warm['qimg']:.3f}s, qemu-img {warm['qemu-img']:.3f}s",
            flush=True,
        )
        qc = Contender("qimg", lambda _rep: q_cmd)
        rc = Contender("qemu-img", lambda _rep: r_cmd)
        qc.prepare = lambda _rep: remove(q_out)
        qc.finish = lambda _rep: remove(q_out)
        rc.prepare = lambda _rep: remove(r_out)
        rc.finish = lambda _rep: remove(r_out)
        cpu: dict[str, list[float]] = {}
        alternate_rounds([qc, rc], {}, repeat, cpu)
    finally:
        remove(q_out)
        remove(r_out)
    m = Measure(f"convert {label}", "qimg", "qemu-img", {"qimg": qc.times, "qemu-img": rc.times})
    m.ratio = median([r / q for r, q in zip(rc.times, qc.times, strict=True)])
    m.ratio_text = f"{m.ratio:.2f}x faster"
    m.target = f">= {MIN_CONVERT_SPEEDUP:g}x"
    m.passed = m.ratio >= MIN_CONVERT_SPEEDUP
    return m


# --------------------------------------------------------------------------- scrub


def check_scrub(replicas: Replicas, qimg: list[str], corrupted: bool) -> None:
    spec = replicas.spec(corrupted)
    proc = subprocess.run(
        [*qimg, "scrub", "--output=json", spec],
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    want_status = SCRUB_BAD if corrupted else SCRUB_CLEAN
    if proc.returncode != want_status:
        raise CommandFailed(
            f"qimg scrub exited {proc.returncode}, not {want_status}: {proc.stderr.strip()}"
        )
    report = json.loads(proc.stdout)
    bad = [[r["offset"], r["length"]] for r in report["children"][2]["bad-ranges"]]
    want: list[list[int]] = []
    if corrupted:
        for block in replicas.corrupt_blocks:
            if want and want[-1][0] + want[-1][1] == block * BLOCK:
                want[-1][1] += BLOCK
            else:
                want.append([block * BLOCK, BLOCK])
    others = [c["bad-ranges"] or c["read-errors"] for c in report["children"][:2]]
    if bad != want or any(others) or report["unvoted-ranges"]:
        raise CommandFailed("qimg scrub did not report exactly the corrupted blocks")


def bench_scrub(replicas: Replicas, qimg: list[str], repeat: int) -> list[Measure]:
    a_cmd = [*qimg, "scrub", replicas.spec(False)]
    b_cmd = [*qimg, "scrub", replicas.spec(True)]
    cat_cmd = ["cat", *map(str, replicas.paths)]
    print(f"== scrub ({human(replicas.size)} replicas)", flush=True)
    print(f"   agreeing:  {quote(a_cmd)}")
    print(f"   corrupted: {quote(b_cmd)}")
    print(f"   cat:       {quote(cat_cmd)} > /dev/null", flush=True)
    check_scrub(replicas, qimg, corrupted=False)
    check_scrub(replicas, qimg, corrupted=True)
    print(
        f"   check: agreeing replicas clean (exit 0); corrupted: exactly the "
        f"{len(replicas.corrupt_blocks)} changed blocks of replica 2 (exit 2)",
        flush=True,
    )
    a = Contender("scrub agreeing", lambda _rep: a_cmd)
    b = Contender("scrub corrupted", lambda _rep: b_cmd)
    c = Contender("cat", lambda _rep: cat_cmd)
    cpu: dict[str, list[float]] = {}
    alternate_rounds([a, b, c], {b.name: (SCRUB_BAD,)}, repeat, cpu)
    vs_cat = Measure("scrub agreeing vs cat", a.name, "cat", {a.name: a.times, "cat": c.times})
    vs_cat.ratio = median([x / y for x, y in zip(a.times, c.times, strict=True)])
    vs_cat.ratio_text = f"{vs_cat.ratio:.2f}x cat's time"
    vs_cat.target = f"<= {MAX_SCRUB_VS_CAT:g}x"
    vs_cat.passed = vs_cat.ratio <= MAX_SCRUB_VS_CAT
    slower = Measure(
        "scrub corrupted vs agreeing", b.name, a.name, {b.name: b.times, a.name: a.times}
    )
    slower.ratio = median([x / y for x, y in zip(b.times, a.times, strict=True)])
    slower.ratio_text = f"{slower.ratio:.2f}x agreeing's time"
    slower.target = f"<= {MAX_CORRUPTED_VS_AGREEING:g}x"
    slower.passed = slower.ratio <= MAX_CORRUPTED_VS_AGREEING
    return [vs_cat, slower]


# --------------------------------------------------------------------------- sha256


def hashlib_rate(total: int) -> float:
    """Bytes per second SHA-256 (hashlib, one core) hashes in 64 KiB blocks."""
    data = os.urandom(4 * MiB)
    blocks = [memoryview(data)[i : i + BLOCK] for i in range(0, len(data), BLOCK)]
    start = time.perf_counter()
    done = 0
    while done < total:
        for block in blocks:
            hashlib.sha256(block).digest()
        done += len(data)
    return done / (time.perf_counter() - start)


VOTE_SCRIPT = r"""
import json, sys, time
from qimg import _core
spec, size, piece = sys.argv[1], int(sys.argv[2]), 4 << 20
image = _core.open_spec(spec)
buf = bytearray(piece)
best = None
for _ in range(3):
    start = time.perf_counter()
    for offset in range(0, size, piece):
        image.readinto(offset, buf)
    elapsed = time.perf_counter() - start
    best = elapsed if best is None else min(best, elapsed)
    image.take_events()
print(best)
"""


def canonical(paths: Sequence[Path], threshold: int) -> str:
    children = []
    for i, p in enumerate(paths):
        name = f"children.{i}"
        children.append(
            {
                "driver": "raw",
                "node-name": name,
                "file": {"driver": "file", "node-name": f"{name}.file", "filename": str(p)},
            }
        )
    return json.dumps(
        {
            "driver": "quorum",
            "node-name": "root",
            "children": children,
            "vote-threshold": threshold,
            "blkverify": False,
            "rewrite-corrupted": False,
            "read-pattern": "quorum",
        }
    )


def vote_rates(replicas: Replicas, workdir: Path, size: int) -> dict[str, float] | str:
    """The Rust vote's hashing rate: reads of `size` bytes through three replicas that differ
    in every block (all hashed) and three that agree (compared only), best of 3 each."""
    differing = []
    for i in range(3):
        path = workdir / f"differ{i}.raw"
        with replicas.paths[0].open("rb") as src, path.open("wb") as dst:
            for _ in range(0, size, CHUNK):
                buf = bytearray(src.read(CHUNK))
                for b in range(0, len(buf), BLOCK):
                    buf[b + 8] = i  # after the stamp: every block differs per replica
                dst.write(buf)
        differing.append(path)
    try:
        times = {}
        for name, paths in (("agreeing", replicas.paths), ("differing", differing)):
            proc = subprocess.run(
                [sys.executable, "-c", VOTE_SCRIPT, canonical(paths, 1), str(size)],
                capture_output=True,
                text=True,
                check=False,
                stdin=subprocess.DEVNULL,
            )
            if proc.returncode != 0:
                return f"unavailable ({proc.stderr.strip().splitlines()[-1:]})"
            times[name] = float(proc.stdout)
    finally:
        for path in differing:
            remove(path)
    hashed = 3 * size
    extra = times["differing"] - times["agreeing"]
    return {
        "agreeing_s": times["agreeing"],
        "differing_s": times["differing"],
        "bytes_hashed": hashed,
        "lower_bound_bps": hashed / times["differing"],
        "estimate_bps": hashed / extra if extra > 0 else float("inf"),
    }


def bench_sha(replicas: Replicas, workdir: Path, quick: bool) -> tuple[Measure, dict[str, Any]]:
    print("== SHA-256", flush=True)
    total = (256 if quick else 2048) * MiB
    rate = hashlib_rate(total)
    size = min(replicas.size, (64 if quick else 512) * MiB)
    rust = vote_rates(replicas, workdir, size)
    sha_ni = False
    with contextlib.suppress(OSError):
        sha_ni = " sha_ni " in f" {Path('/proc/cpuinfo').read_text().replace(chr(10), ' ')} "
    facts: dict[str, Any] = {"hashlib_bps": rate, "sha_extensions": sha_ni, "vote": rust}
    print(f"   hashlib (OpenSSL), one core: {rate / 1e9:.2f} GB/s; CPU SHA extensions: {sha_ni}")
    if isinstance(rust, str):
        print(f"   Rust vote: {rust}")
        best = rate
    else:
        print(
            f"   Rust vote, {human(size)} through 3 replicas: agreeing {rust['agreeing_s']:.3f}s,"
            f" every block differing {rust['differing_s']:.3f}s -> hashing "
            f"{rust['estimate_bps'] / 1e9:.2f} GB/s (at least "
            f"{rust['lower_bound_bps'] / 1e9:.2f} GB/s counting the reads)",
            flush=True,
        )
        best = rust["estimate_bps"]
    m = Measure("SHA-256 (Rust vote)", "vote", "-")
    if isinstance(rust, str):
        m.name = "SHA-256 (hashlib)"
    m.ratio = best / 1e9
    m.ratio_text = f"{m.ratio:.2f} GB/s"
    m.target = f">= {MIN_SHA_GBPS:g} GB/s" + ("" if sha_ni else " (no SHA ext.)")
    m.passed = m.ratio >= MIN_SHA_GBPS if sha_ni else None
    return m, facts


# --------------------------------------------------------------------------- main


def run_all(args: argparse.Namespace, repeat: int) -> tuple[list[Measure], dict[str, Any]]:
    made_dir = args.dir is None
    workdir = Path(tempfile.mkdtemp(prefix="qimg-bench-quorum-")) if made_dir else args.dir
    workdir.mkdir(parents=True, exist_ok=True)
    workdir = workdir.resolve()
    qimg = qimg_command(args.qimg)
    facts = machine_facts(workdir)
    print(facts_line(facts))
    size = 128 * MiB if args.quick else 1 * GiB
    mode = "quick (smoke run: targets shown, not applied)" if args.quick else "full"
    print(
        f"bench: quorum of 3 x {human(size)} raw replicas; mode {mode}; {repeat} timed "
        "round(s) after the checks, alternating; page cache warm, not dropped"
    )
    print(f"qimg: {quote(qimg)}", flush=True)
    # The four replicas, one output, and the hashing inputs.
    need = 5 * size + 3 * min(size, 512 * MiB)
    if free_bytes(workdir) < need:
        raise CommandFailed(
            f"not enough free space in {workdir}: {human(free_bytes(workdir))} free, "
            f"{human(need)} needed"
        )
    measures: list[Measure] = []
    extra: dict[str, Any] = {"size": size}
    try:
        start = time.perf_counter()
        replicas = write_replicas(workdir, size)
        print(
            f"replicas written in {time.perf_counter() - start:.1f}s; corrupted copy: "
            f"{len(replicas.corrupt_blocks)} of {size // BLOCK} blocks changed",
            flush=True,
        )
        convert_a = bench_convert(replicas, qimg, workdir, repeat, corrupted=False)
        convert_b = bench_convert(replicas, qimg, workdir, repeat, corrupted=True)
        slower = Measure(
            "convert corrupted vs agreeing",
            "qimg corrupted",
            "qimg agreeing",
            {"corrupted": convert_b.times["qimg"], "agreeing": convert_a.times["qimg"]},
        )
        slower.ratio = median(
            [x / y for x, y in zip(convert_b.times["qimg"], convert_a.times["qimg"], strict=True)]
        )
        slower.ratio_text = f"{slower.ratio:.2f}x agreeing's time"
        slower.target = f"<= {MAX_CORRUPTED_VS_AGREEING:g}x"
        slower.passed = slower.ratio <= MAX_CORRUPTED_VS_AGREEING
        measures += [convert_a, convert_b, slower]
        measures += bench_scrub(replicas, qimg, repeat)
        sha, extra["sha256"] = bench_sha(replicas, workdir, args.quick)
        measures.append(sha)
    finally:
        if made_dir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            for name in ("replica0", "replica1", "replica2", "replica2.corrupt"):
                remove(workdir / f"{name}.raw")

    print()
    rows = []
    for m in measures:
        times = " / ".join(f"{k} {median(v):.3f}s" for k, v in m.times.items())
        verdict = "n/a" if args.quick or m.passed is None else ("PASS" if m.passed else "MISS")
        rows.append([m.name, times or "-", m.ratio_text, m.target, verdict])
    print_table(["measure", "median times", "result", "target", "verdict"], rows, "llrll")
    print(
        f"(medians of {repeat} round(s); ratios are medians of per-round ratios; "
        f"GB = 10^9 bytes; size {human(size)} per replica)"
    )
    return measures, {"machine": facts, "qimg": quote(qimg), **extra}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--repeat", type=int, help="timed rounds (default 5; 1 with --quick)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="128 MiB replicas, 1 round: a smoke run; targets not applied",
    )
    ap.add_argument(
        "--dir", type=Path, help="work directory (default: a new dir in $TMPDIR or /tmp)"
    )
    ap.add_argument("--qimg", help="qimg executable (default: python -m qimg)")
    ap.add_argument("--json", help="write the results here as JSON ('-': to stdout)")
    args = ap.parse_args(argv)
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 5)
    if repeat < 1:
        ap.error("--repeat must be >= 1")
    for tool in ("qemu-img", "cat"):
        if shutil.which(tool) is None:
            print(f"error: {tool} not found on PATH", file=sys.stderr)
            return 1

    report = sys.stderr if args.json == "-" else sys.stdout
    with contextlib.redirect_stdout(report):
        try:
            measures, info = run_all(args, repeat)
        except CommandFailed as exc:
            print(f"ERROR: {exc}", file=sys.stderr, flush=True)
            return 1
    if args.json is not None:
        data = {
            "bench": "quorum",
            "mode": "quick" if args.quick else "full",
            "repeat": repeat,
            **info,
            "measures": [
                {
                    "name": m.name,
                    "times_s": m.times,
                    "ratio": m.ratio,
                    "result": m.ratio_text,
                    "target": m.target,
                    "passed": m.passed,
                }
                for m in measures
            ],
        }
        if args.json == "-":
            print(json.dumps(data, indent=2))
        else:
            write_json(Path(args.json), data)
            print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
