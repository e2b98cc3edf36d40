"""Run each iotests case (iotests/NNN) and compare its transcript with iotests/NNN.out.

`pytest iotests --update-goldens` rewrites the transcripts instead; review them in `git diff`.
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from pytest_golden.plugin import GoldenTestFixture

from iotests.cases import (
    GROUP_LINE,
    GROUPS,
    IOTESTS_DIR,
    TRANSCRIPT_GLOB,
    Case,
    all_cases,
    case_of_transcript,
)

# Exit code of a case that cannot run here (common.rc `_notrun`).
NOTRUN = 77

# A case that runs longer than this has hung.
CASE_TIMEOUT = 600

# Control characters other than tab and newline cannot be stored in a YAML literal block.
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def qimg_command() -> str:
    """The command line of the tool under test: $QIMG, else this Python's `-m qimg`."""
    return os.environ.get("QIMG") or f"{shlex.quote(sys.executable)} -m qimg"


def case_environment(test_dir: Path) -> dict[str, str]:
    """The environment of a case: ours, plus its inputs, minus what would change its output."""
    env = dict(os.environ)
    for name in ("PYTHONUNBUFFERED", "PYTHONWARNINGS", "QEMU_IMG_OPTS"):
        env.pop(name, None)
    env.update(
        TEST_DIR=str(test_dir),
        QIMG=qimg_command(),
        QEMU_IMG=os.environ.get("QEMU_IMG") or "qemu-img",
        LC_ALL="C.UTF-8",
        TZ="UTC",
        COLUMNS="80",
    )
    return env


def filter_transcript(output: str, test_dir: Path) -> str:
    """Make a transcript independent of the machine and of editors.

    The scratch directory becomes TEST_DIR; control characters are shown as <0xNN>; trailing
    whitespace is dropped from every line, and the transcript ends in exactly one newline.
    """
    for path in sorted({str(test_dir.resolve()), str(test_dir)}, key=len, reverse=True):
        output = output.replace(path, "TEST_DIR")
    output = CONTROL_CHARS.sub(lambda m: f"<0x{ord(m.group()):02x}>", output)
    lines = [line.rstrip() for line in output.split("\n")]
    text = "\n".join(lines).strip("\n")
    return text + "\n" if text else ""


def run_case(case: Case, test_dir: Path) -> tuple[int, str]:
    """Run one case script; return its exit code and its filtered transcript."""
    proc = subprocess.run(
        ["bash", str(case.script)],
        cwd=test_dir,
        env=case_environment(test_dir),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=CASE_TIMEOUT,
        check=False,
    )
    output = proc.stdout.decode("utf-8", errors="backslashreplace")
    return proc.returncode, filter_transcript(output, test_dir)


def transcript_diff(case: Case, expected: object, actual: str) -> str:
    """A unified diff from the stored transcript to the actual one."""
    lines = difflib.unified_diff(
        str(expected).splitlines(keepends=True),
        actual.splitlines(keepends=True),
        fromfile=f"iotests/{case.name}.out",
        tofile=f"iotests/{case.name} (actual)",
    )
    return "transcript differs (accept with --update-goldens):\n" + "".join(lines)


@pytest.mark.golden_test(TRANSCRIPT_GLOB)
def test_iotest(golden: GoldenTestFixture, tmp_path: Path) -> None:
    case = case_of_transcript(golden.path)
    status, output = run_case(case, tmp_path)
    if status == NOTRUN:
        reason = output.strip().splitlines()[-1] if output.strip() else "not run"
        if os.environ.get("QIMG_CI"):
            pytest.fail(f"{case.name}: {reason} (CI is set: the reference tools must be there)")
        pytest.skip(f"{case.name}: {reason}")
    assert status == 0, f"{case.name} exited with {status}:\n{output}"
    expected = golden.out["output"]
    if not golden.update_goldens and output != expected:
        pytest.fail(transcript_diff(case, expected, output), pytrace=False)
    assert output == expected  # pytest-golden records this comparison for --update-goldens


@pytest.mark.parametrize("case", all_cases(), ids=lambda c: c.name)
def test_case_is_well_formed(case: Case) -> None:
    """Each case has the header the harness reads, can be run, and has a transcript."""
    shebang, group_line, description = case.header()
    assert shebang == "#!/usr/bin/env bash"
    match = GROUP_LINE.match(group_line)
    assert match, f"second line must be '# group: NAME...', not {group_line!r}"
    unknown = set(match.group(1).split()) - GROUPS.keys()
    assert not unknown, f"unknown groups {sorted(unknown)}: add them to iotests/cases.py GROUPS"
    assert re.fullmatch(r"# \S.*", description), "third line must describe the case"
    assert os.access(case.script, os.X_OK), f"chmod +x iotests/{case.name}"
    assert case.transcript.exists(), "run `pytest iotests --update-goldens` to create it"


def test_every_transcript_has_a_case() -> None:
    names = {c.name for c in all_cases()}
    for transcript in IOTESTS_DIR.glob(TRANSCRIPT_GLOB):
        assert case_of_transcript(transcript).name in names, f"{transcript.name} has no case"
