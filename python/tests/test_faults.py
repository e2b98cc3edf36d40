"""The fault suite (issue 16): EIO, ENOSPC and EDQUOT injected with blkdebug at chosen sectors
of a qcow2 image's header, refcount table, refcount block, L1 table, L2 table and data, under
sources and under targets (blkdebug as the file layer, as QEMU places it), and NBD servers
killed mid-copy. Every run has a hard timeout; every failure must be one ``qimg:`` line with a
non-zero exit, no traceback and no panic; inputs stay unchanged; a new output is removed; an
image modified in place passes ``qemu-img check`` (leaked clusters allowed).

The image layout the sectors aim at is QEMU's for a new 64 KiB-cluster image: header at
cluster 0, refcount table at 1, refcount block at 2, L1 table at 3; the first cluster a
writer allocates (an L2 table) is 4, data follows.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import RunCommand, StartNbd, assert_ok

pytestmark = pytest.mark.qemu

#: A run that takes longer than this has hung.
RUN_TIMEOUT_S = 60
MIB = 1 << 20
SIZE = 8 * MIB
#: Sectors of the phases (64 KiB clusters: 128 sectors each).
PHASES = {
    "header": 0,
    "reftable": 128,
    "refblock": 256,
    "l1": 384,
    "l2": 512,
    "data": 640,
    "any": -1,
}
ERRNOS = {"EIO": 5, "ENOSPC": 28, "EDQUOT": 122}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qimg", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=RUN_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )


def _assert_clean_failure(proc: subprocess.CompletedProcess[str], what: str) -> None:
    assert proc.returncode != 0, (what, proc.stdout)
    assert "Traceback" not in proc.stderr and "panicked" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("qimg: "), (what, proc.stderr)
    # One line; qemu-img's lock refusals are the only two-line messages.
    assert proc.stderr.count("\n") == 1, (what, proc.stderr)


def _blkdebug(path: Path, event: str, errno: int, sector: int, once: bool) -> dict[str, Any]:
    rule = {"event": event, "errno": errno, "sector": sector, "once": once}
    return {"driver": "blkdebug", "image": {"driver": "file", "filename": str(path)},
            "inject-error": [rule]}  # fmt: skip


def _spec(fmt: str, file: dict[str, Any]) -> str:
    return "json:" + json.dumps({"driver": fmt, "file": file})


def _check_status(run_qemu_img: RunCommand, image: Path) -> int:
    """qemu-img check's status: 0 clean, 3 leaked clusters only (both acceptable)."""
    return run_qemu_img("check", image).returncode


@pytest.fixture
def source(tmp_path: Path, run_qemu_img: RunCommand, run_qemu_io: RunCommand) -> Path:
    path = tmp_path / "src.qcow2"
    assert_ok(run_qemu_img("create", "-q", "-f", "qcow2", path, str(SIZE)))
    assert_ok(run_qemu_io("-c", "write -P 0x5a 0 1M", "-c", "write -P 0xa5 5M 512k", path))
    return path


@pytest.mark.parametrize("phase", list(PHASES))
@pytest.mark.parametrize("command", ["convert", "compare", "check", "map", "info"])
def test_a_read_error_in_any_phase_of_a_source_is_one_line(
    source: Path, tmp_path: Path, run_qemu_img: RunCommand, phase: str, command: str
) -> None:
    before = _digest(source)
    spec = _spec("qcow2", _blkdebug(source, "read_aio", 5, PHASES[phase], once=False))
    out = tmp_path / "out.raw"
    argvs: dict[str, list[str | Path]] = {
        "convert": ["convert", "-O", "raw", spec, out],
        "compare": ["compare", spec, source],
        "check": ["check", spec],
        "map": ["map", spec],
        "info": ["info", spec],
    }
    argv = argvs[command]
    proc = _run(*argv)
    # Every command reads the header; convert and compare read the data.
    must_fail = phase in ("header", "any") or (
        phase == "data" and command in ("convert", "compare")
    )
    if command == "check":
        # check reports what it cannot read line by line, as qemu-img does (qimg's
        # blkdebug fires read_aio for metadata reads too, so qemu-img is no oracle here).
        assert proc.returncode in (0, 1, 2, 3), proc.stderr
        assert "Traceback" not in proc.stderr and "panicked" not in proc.stderr
        assert must_fail is False or proc.returncode != 0
    elif proc.returncode != 0:
        _assert_clean_failure(proc, f"{command} {phase}")
        assert not out.exists()
    else:
        # A command that never reads that sector gets through, with the right result.
        assert not must_fail, (command, phase, proc.stdout)
        if command == "convert":
            assert run_qemu_img("compare", "-F", "raw", source, out).returncode == 0
    assert _digest(source) == before


def _fresh_target(tmp_path: Path, run_qemu_img: RunCommand, name: str) -> Path:
    target = tmp_path / name
    assert_ok(run_qemu_img("create", "-q", "-f", "qcow2", target, str(SIZE)))
    return target


@pytest.mark.parametrize("once", [False, True], ids=["always", "once"])
@pytest.mark.parametrize("errno", list(ERRNOS))
@pytest.mark.parametrize("phase", list(PHASES))
def test_a_write_error_in_any_phase_of_a_qcow2_target_leaves_it_consistent(
    source: Path,
    tmp_path: Path,
    run_qemu_img: RunCommand,
    phase: str,
    errno: str,
    once: bool,
) -> None:
    before = _digest(source)
    target = _fresh_target(tmp_path, run_qemu_img, "t.qcow2")
    file = _blkdebug(target, "write_aio", ERRNOS[errno], PHASES[phase], once)
    proc = _run("convert", "-n", "--target-image-opts", "-O", "qcow2", source,
                _image_opts("qcow2", file))  # fmt: skip
    if proc.returncode != 0:
        _assert_clean_failure(proc, f"{phase} {errno}")
        assert os.strerror(ERRNOS[errno]) in proc.stderr, proc.stderr
    assert _digest(source) == before
    assert _check_status(run_qemu_img, target) in (0, 3)


def _image_opts(fmt: str, file: dict[str, Any]) -> str:
    """The --image-opts spelling of a format node over a blkdebug file node."""
    rule = file["inject-error"][0]
    return ",".join(
        [
            f"driver={fmt}",
            "file.driver=blkdebug",
            f"file.image.filename={file['image']['filename']}",
            f"file.inject-error.0.event={rule['event']}",
            f"file.inject-error.0.errno={rule['errno']}",
            f"file.inject-error.0.sector={rule['sector']}",
            f"file.inject-error.0.once={'on' if rule['once'] else 'off'}",
        ]
    )


@pytest.mark.parametrize("errno", list(ERRNOS))
@pytest.mark.parametrize("sector", [0, 2048, -1])
def test_a_write_error_on_a_raw_target_is_one_line(
    source: Path, tmp_path: Path, sector: int, errno: str
) -> None:
    target = tmp_path / "t.raw"
    with open(target, "wb") as f:
        f.truncate(SIZE)
    file = _blkdebug(target, "write_aio", ERRNOS[errno], sector, once=False)
    proc = _run("convert", "-n", "--target-image-opts", "-O", "raw", source,
                _image_opts("raw", file))  # fmt: skip
    _assert_clean_failure(proc, f"raw {sector} {errno}")
    assert target.stat().st_size == SIZE


@pytest.mark.parametrize("errno", ["EIO", "ENOSPC"])
@pytest.mark.parametrize("phase", list(PHASES))
@pytest.mark.parametrize(
    "command",
    [["resize", "SPEC", "16M"], ["amend", "-o", "lazy_refcounts=on", "SPEC"],
     ["io", "-c", "write -P 0x33 3M 256k", "SPEC"], ["io", "-c", "write -z 0 1M", "SPEC"]],
    ids=["resize", "amend", "io-write", "io-write-zeroes"],
)  # fmt: skip
def test_a_write_error_while_modifying_in_place_leaves_the_image_consistent(
    source: Path,
    tmp_path: Path,
    run_qemu_img: RunCommand,
    command: list[str],
    phase: str,
    errno: str,
) -> None:
    image = tmp_path / "img.qcow2"
    shutil.copyfile(source, image)
    spec = _spec("qcow2", _blkdebug(image, "write_aio", ERRNOS[errno], PHASES[phase], False))
    proc = _run(*[spec if w == "SPEC" else w for w in command])
    if command[0] == "io":
        # qemu-io reports a failed request on stdout and goes on; the exit status says it.
        assert "Traceback" not in proc.stderr and "panicked" not in proc.stderr
    elif proc.returncode != 0:
        _assert_clean_failure(proc, f"{command[0]} {phase}")
    assert _check_status(run_qemu_img, image) in (0, 3), (command, phase, errno)


#: Rounds of the randomised in-place loop (one Python process, a watchdog per round).
RANDOM_ROUNDS = 150

_LOOP = textwrap.dedent(
    """
    import json, random, subprocess, sys, shutil
    import qimg
    source, workdir, rounds, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    rng = random.Random(seed)
    bad = []
    for i in range(rounds):
        target = f"{workdir}/t{i % 4}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", target, "8M"], check=True)
        sector = rng.choice([-1, rng.randrange(0, 3000)])
        errno = rng.choice([5, 28, 122])
        rule = {"event": rng.choice(["write_aio", "flush_to_disk"]), "errno": errno,
                "sector": sector, "once": rng.random() < 0.5}
        spec = {"driver": "qcow2", "file": {"driver": "blkdebug",
                "image": {"driver": "file", "filename": target}, "inject-error": [rule]}}
        try:
            qimg.convert(source, spec, out_format="qcow2", existing=True,
                         workers=rng.choice([1, 2, 8]), cache=rng.choice(["unsafe", "writeback"]))
        except qimg.QimgError as err:
            if isinstance(err, OSError) and err.errno not in (errno, 0):
                bad.append(f"round {i}: errno {err.errno} for an injected {errno}: {err}")
        status = subprocess.run(["qemu-img", "check", target], capture_output=True).returncode
        if status not in (0, 3):
            bad.append(f"round {i} ({rule}): qemu-img check exit {status}")
    print(json.dumps(bad))
    """
)


def test_hundreds_of_random_write_faults_never_hang_or_corrupt(
    source: Path, tmp_path: Path
) -> None:
    before = _digest(source)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", _LOOP, str(source), str(tmp_path), str(RANDOM_ROUNDS),
         str(random.randrange(1 << 30))],
        capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == []
    assert _digest(source) == before
    # Every round ends promptly: a hang would have hit the timeout above.
    assert time.monotonic() - started < 600


#: qemu-nbd killed at a random moment of a copy, this many times.
NBD_KILLS = 12


def test_a_server_killed_mid_copy_ends_the_copy_cleanly(
    nbd_servers: StartNbd, tmp_path: Path, run_qemu_img: RunCommand
) -> None:
    image = tmp_path / "big.raw"
    with open(image, "wb") as f:
        for i in range(64):
            f.write(bytes([i + 1]) * MIB)
    rng = random.Random()
    outcomes = []
    for round_ in range(NBD_KILLS):
        server = nbd_servers(image, read_only=True)
        out = tmp_path / f"out{round_}.raw"
        proc = subprocess.Popen(
            [sys.executable, "-m", "qimg", "convert", "-O", "raw", server.url, str(out)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        # The output exists once both ends are open: the copy is under way.
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.1))
        server.kill()
        try:
            _, err = proc.communicate(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"round {round_}: convert hung after its server died")
        outcomes.append(proc.returncode)
        if proc.returncode == 0:  # finished before the kill
            assert out.read_bytes() == image.read_bytes()
        else:
            assert proc.returncode == 1 and err.startswith("qimg: ") and err.count("\n") == 1, err
            assert "Traceback" not in err and "panicked" not in err
            assert not out.exists()
    assert outcomes.count(1) > 0, "no kill landed during a copy"
