"""``qimg scrub [--repair] [--output=human|json] [-p] [--image-opts] [--events FILE] SPEC``

Reads a whole quorum and checks every replica against the vote. Exit status:
0 every replica agreed, 2 some replica was wrong (fixed with --repair, as the
output says), 3 some range had no version with enough votes.
"""

from __future__ import annotations

import argparse
import json

from qimg.commands._common import (
    Progress,
    add_events_arg,
    add_image_opts_arg,
    add_output_arg,
    event_hub,
    output_mode,
)
from qimg.commands._parser import examples
from qimg.errors import UsageError
from qimg.scrubbing import ChildReport, ChildVerdict, ScrubReport, scrub
from qimg.sizes import size_to_str

NAME = "scrub"

# Ranges listed per replica in human output before the rest is summed up.
SHOWN_RANGES = 20


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        NAME,
        help="check every replica of a quorum against the vote (and repair it)",
        description=(
            'Read a whole quorum image (json:{"driver": "quorum", ...} or --image-opts), '
            "vote on every 64 KiB block and report, per replica, the ranges where it lost "
            "the vote and the reads that failed. With --repair, rewrite them with the "
            "winning bytes. Ranges every replica reports as zeroes are settled without "
            "reading. Exit status: 0 clean, 2 bad replicas found (repaired with --repair), "
            "3 some range has no version with enough votes."
        ),
        epilog=examples(
            'qimg scrub \'json:{"driver": "quorum", "vote-threshold": 2, "children": [...]}\'',
            "qimg scrub --repair --image-opts "
            "driver=quorum,vote-threshold=2,children.0.file.filename=a.raw,...",
        ),
        allow_abbrev=False,
    )
    p.add_argument(
        "--repair", action="store_true", help="rewrite bad ranges with the winning bytes"
    )
    add_output_arg(p)
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    add_image_opts_arg(p, "SPEC is")
    add_events_arg(p)
    p.add_argument("spec", nargs="?", metavar="SPEC", help="the quorum to scrub")
    p.set_defaults(run=run)


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def _range_lines(ranges: list[tuple[int, int]]) -> list[str]:
    lines = [f"    {o:#x} +{n:#x} ({size_to_str(n)})" for o, n in ranges[:SHOWN_RANGES]]
    if len(ranges) > SHOWN_RANGES:
        rest = ranges[SHOWN_RANGES:]
        lines.append(
            f"    ... and {_count(len(rest), 'more range')}, {size_to_str(sum(n for _, n in rest))}"
            " (--output=json lists them all)"
        )
    return lines


def _child_lines(c: ChildReport) -> list[str]:
    v = c.verdict
    if v is ChildVerdict.CLEAN:
        return [f"{c.node_name}: clean"]
    lines = []
    if c.bad_ranges:
        lines.append(
            f"{c.node_name}: {_count(len(c.bad_ranges), 'bad range')}, "
            f"{size_to_str(c.bad_bytes)} lost the vote"
        )
        lines += _range_lines(list(c.bad_ranges))
    if c.read_errors:
        lines.append(f"{c.node_name}: {_count(len(c.read_errors), 'range')} could not be read")
        for e in c.read_errors[:SHOWN_RANGES]:
            lines.append(f"    {e.offset:#x} +{e.length:#x}: {e.error}")
    if v is ChildVerdict.REPAIRED:
        lines.append(f"{c.node_name}: repaired ({size_to_str(c.repaired_bytes)} rewritten)")
    elif v is ChildVerdict.REPAIR_FAILED:
        lines.append(
            f"{c.node_name}: repair FAILED for {_count(len(c.repair_errors), 'range')} "
            f"({size_to_str(c.repaired_bytes)} rewritten)"
        )
        for e in c.repair_errors[:SHOWN_RANGES]:
            lines.append(f"    {e.offset:#x} +{e.length:#x}: {e.error}")
    return lines


def _human(r: ScrubReport) -> str:
    lines = [
        f"Scrubbed {r.image}",
        f"virtual size {size_to_str(r.size)}; {r.bytes_compared} bytes compared on "
        f"{len(r.children)} replicas, {r.bytes_skipped_zero} bytes of zeroes settled "
        "without reading",
    ]
    for c in r.children:
        lines += _child_lines(c)
    if r.unvoted_ranges:
        total = sum(n for _, n in r.unvoted_ranges)
        lines.append(
            f"{_count(len(r.unvoted_ranges), 'range')} ({size_to_str(total)}) without a "
            "version that has enough votes: the right contents are unknown there"
        )
        lines += _range_lines(list(r.unvoted_ranges))
    bad = [c.node_name for c in r.children if c.verdict is not ChildVerdict.CLEAN]
    if not bad and not r.unvoted_ranges:
        lines.append("Verdict: clean, every replica agrees")
        return "\n".join(lines)
    what = []
    if bad:
        what.append(f"{len(bad)} of {len(r.children)} replicas bad ({', '.join(bad)})")
        if not r.repair:
            what.append("run with --repair to rewrite them")
        elif r.repaired:
            what.append("all repaired")
        else:
            what.append("NOT all repaired")
    if r.unvoted_ranges:
        what.append("no quorum on some ranges (nothing to repair them from)")
    lines.append("Verdict: " + "; ".join(what))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    mode = output_mode(args)
    if args.spec is None:
        raise UsageError("Expecting a quorum specification (json:{...} or --image-opts)")
    progress = Progress(args.progress and mode == "human")
    progress.start()
    with event_hub(args) as events:
        report = scrub(
            args.spec,
            repair=args.repair,
            image_opts=args.image_opts,
            progress=progress,
            events=events,
        )
    progress.end()
    if mode == "json":
        print(json.dumps(report.as_json(), indent=4))
    else:
        print(_human(report))
    return report.verdict.exit_status
