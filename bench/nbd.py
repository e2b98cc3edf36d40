#!/usr/bin/env python3
"""Benchmark a quorum whose replicas live behind NBD servers: three loopback `qemu-nbd`
exports of 1 GiB raw replicas (--quick: 128 MiB), read through
`json:{"driver": "quorum", "children": [{"driver": "raw", "file": {"driver": "nbd", ...}}]}`.

Measures (alternating rounds, medians; see bench/quorum.py for the method):
  convert    `qimg convert -O raw SPEC out` vs `qemu-img convert -O raw SPEC out`, for
             agreeing replicas and for replicas where the third has 1% of its 64 KiB blocks
             changed. Before timing, both outputs must equal the majority replica.
  scrub      `qimg scrub SPEC` (which also compares every replica) vs the same
             `qemu-img convert -O raw SPEC out`: the time to read the quorum at all.

Servers: `qemu-nbd -r -e 8 -b 127.0.0.1 -p PORT -x r -t FILE` per replica (read-only,
persistent, up to 8 clients, so each export allows several connections).

Target (the issue's): at least 2x qemu-img's throughput. The bench reports and never gates.

    python bench/nbd.py [--quick] [--repeat N] [--dir DIR] [--qimg PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from _common import (
    CommandFailed,
    Contender,
    GiB,
    MiB,
    exit_with,
    facts_line,
    human,
    machine_facts,
    median,
    qimg_command,
    remove,
)
from quorum import (
    Measure,
    Replicas,
    alternate_rounds,
    bench_convert,
    run_timed,
    write_replicas,
)

MIN_SPEEDUP = 2.0


class NbdReplicas(Replicas):
    """The replicas, each served by its own qemu-nbd on a loopback port."""

    ports: dict[Path, int]

    def spec(self, corrupted: bool) -> str:
        paths = [*self.paths[:2], self.corrupt if corrupted else self.paths[2]]
        children = [
            {
                "driver": "raw",
                "file": {
                    "driver": "nbd",
                    "server": {"type": "inet", "host": "127.0.0.1", "port": str(self.ports[p])},
                    "export": "r",
                },
            }
            for p in paths
        ]
        return "json:" + json.dumps(
            {"driver": "quorum", "vote-threshold": 2, "children": children},
            separators=(",", ":"),
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise CommandFailed(f"qemu-nbd on port {port} exited {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise CommandFailed(f"qemu-nbd on port {port} did not start listening")


@contextlib.contextmanager
def servers(files: list[Path]) -> Iterator[dict[Path, int]]:
    procs: list[subprocess.Popen[bytes]] = []
    ports: dict[Path, int] = {}
    try:
        for f in files:
            port = free_port()
            cmd = ["qemu-nbd", "-r", "-e", "8", "-t", "-f", "raw", "-x", "r"]
            cmd += ["-b", "127.0.0.1", "-p", str(port), str(f)]
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(proc)
            wait_listening(port, proc)
            ports[f] = port
        yield ports
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def bench_scrub(replicas: NbdReplicas, qimg: list[str], workdir: Path, repeat: int) -> Measure:
    spec = replicas.spec(False)
    out = workdir / "out.qemu.raw"
    q_cmd = [*qimg, "scrub", spec]
    r_cmd = ["qemu-img", "convert", "-O", "raw", spec, str(out)]
    print(f"== scrub of agreeing replicas over NBD ({human(replicas.size)} each)", flush=True)
    run_timed(q_cmd)  # warm-up, and it must find them clean (exit 0)
    qc = Contender("qimg scrub", lambda _rep: q_cmd)
    rc = Contender("qemu-img convert", lambda _rep: r_cmd)
    rc.prepare = lambda _rep: remove(out)
    rc.finish = lambda _rep: remove(out)
    alternate_rounds([qc, rc], {}, repeat, {})
    m = Measure("scrub agreeing (NBD)", "qimg scrub", "qemu-img convert")
    m.times = {"qimg": qc.times, "qemu-img": rc.times}
    m.ratio = median([r / q for r, q in zip(rc.times, qc.times, strict=True)])
    m.ratio_text = f"{m.ratio:.2f}x faster"
    m.target = f">= {MIN_SPEEDUP:g}x"
    m.passed = m.ratio >= MIN_SPEEDUP
    return m


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="128 MiB replicas, 1 round")
    ap.add_argument("--repeat", type=int, help="timed rounds (default 5; 1 with --quick)")
    ap.add_argument("--dir", help="work directory (default: a new temporary one)")
    ap.add_argument("--qimg", help="qimg executable (default: python -m qimg)")
    args = ap.parse_args(argv)
    if shutil.which("qemu-nbd") is None:
        print("qemu-nbd not found: this bench needs it", file=sys.stderr)
        return 1
    size = 128 * MiB if args.quick else 1 * GiB
    repeat = args.repeat or (1 if args.quick else 5)
    qimg = qimg_command(args.qimg)
    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    print(facts_line(machine_facts(Path(args.dir or tempfile.gettempdir()))), flush=True)
    with contextlib.ExitStack() as stack:
        workdir = (
            Path(args.dir)
            if args.dir
            else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qimg-bench-nbd-")))
        )
        local = write_replicas(workdir, size)
        files = [*local.paths, local.corrupt]
        ports = stack.enter_context(servers(files))
        replicas = NbdReplicas(local.size, local.paths, local.corrupt, local.corrupt_blocks)
        replicas.ports = ports
        results = [
            bench_convert(replicas, qimg, workdir, repeat, corrupted=False),
            bench_convert(replicas, qimg, workdir, repeat, corrupted=True),
        ]
        for m in results:
            m.name += " (NBD)"
            m.target = f">= {MIN_SPEEDUP:g}x"
            m.passed = m.ratio >= MIN_SPEEDUP
        results.append(bench_scrub(replicas, qimg, workdir, repeat))
    print()
    for m in results:
        verdict = "PASS" if m.passed else "MISS"
        q, r = median(m.times["qimg"]), median(m.times["qemu-img"])
        print(
            f"{m.name:<28} qimg {q:.3f}s / qemu-img {r:.3f}s  {m.ratio_text:>14}  "
            f"target {m.target}  {verdict}"
        )
    print(f"(medians of {repeat} round(s); ratio = median of per-round qemu-img/qimg times)")
    return 0


if __name__ == "__main__":
    exit_with(main)
