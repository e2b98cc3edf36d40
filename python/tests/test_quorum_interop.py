"""``qimg convert -O raw`` of a quorum against ``qemu-img convert -O raw`` of the same spec.

Both tools get the same command line (a ``json:{"driver":"quorum",...}`` filename, or the
same tree as ``--image-opts``). Where the replicas have a majority, both must succeed with
byte-identical outputs; where they have none, both must fail (exit 1, an I/O error). Replica
sets: raw children with one corrupt child, corruptions spread over different children in
different regions, a child failing every read (blkdebug, in QEMU's ``raw -> blkdebug -> file``
layout), qcow2 children over one shared backing file and over backing chains of their own (one
with a corrupt backing file), raw and qcow2 children mixed, and read-pattern fifo.

Where qimg deliberately goes beyond QEMU (votes per 64 KiB block rather than per request) the
last test shows the difference: a read QEMU must fail, qimg answers.
"""

from __future__ import annotations

import json
import random
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import pytest

RunCommand: TypeAlias = Callable[..., subprocess.CompletedProcess[str]]

pytestmark = pytest.mark.qemu

KiB = 1024
MiB = 1024 * KiB
SIZE = 8 * MiB
# qemu-img convert reads at most this much per request, aligned to it from offset 0, and
# QEMU's quorum votes on whole requests: corruptions of different children in different
# such regions leave each request with a majority.
QEMU_REQUEST = 2 * MiB


def raw_child(path: Path) -> dict[str, Any]:
    return {"driver": "raw", "file": {"driver": "file", "filename": str(path)}}


def qcow2_child(path: Path) -> dict[str, Any]:
    return {"driver": "qcow2", "file": {"driver": "file", "filename": str(path)}}


def failing_child(path: Path) -> dict[str, Any]:
    """A raw child whose every read fails, in the layout QEMU needs (raw over blkdebug)."""
    return {
        "driver": "raw",
        "file": {
            "driver": "blkdebug",
            "inject-error": [{"event": "read_aio", "errno": 5}],
            "image": {"driver": "file", "filename": str(path)},
        },
    }


def quorum(children: Sequence[dict[str, Any]], threshold: int, **options: Any) -> dict[str, Any]:
    return {"driver": "quorum", "vote-threshold": threshold, **options, "children": children}


def json_spec(tree: dict[str, Any]) -> str:
    return "json:" + json.dumps(tree)


def image_opts(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """The tree as --image-opts key=value items (dotted paths, list items by index)."""
    items: list[str] = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            items += image_opts(value, f"{path}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                items += image_opts(item, f"{path}.{i}.")
        elif isinstance(value, bool):
            items.append(f"{path}={'on' if value else 'off'}")
        else:
            items.append(f"{path}={value}")
    return items


def source_args(tree: dict[str, Any], spelling: str) -> list[str]:
    if spelling == "json":
        return [json_spec(tree)]
    return ["--image-opts", ",".join(image_opts(tree))]


def same_bytes(got: bytes, want: bytes, what: str) -> None:
    """Fails unless equal, naming the first difference. No ``assert``: a passing one formats
    its operands for the assertion-pass hook, which for megabytes costs seconds."""
    if got == want:
        return
    at = next(
        (i for i in range(min(len(got), len(want))) if got[i] != want[i]),
        min(len(got), len(want)),
    )
    pytest.fail(f"{what}: differ first at byte {at} ({len(got)} vs {len(want)} bytes)")


class Converter:
    """Runs the same conversion through qemu-img and qimg, into files of their own."""

    def __init__(self, root: Path, run_qemu_img: RunCommand, run_qimg: RunCommand) -> None:
        self.root = root
        self.run_qemu_img = run_qemu_img
        self.run_qimg = run_qimg
        self.count = 0

    def both(
        self, tree: dict[str, Any], spelling: str = "json"
    ) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str], Path, Path]:
        self.count += 1
        theirs = self.root / f"qemu-{self.count}.out"
        ours = self.root / f"qimg-{self.count}.out"
        args = source_args(tree, spelling)
        qemu = self.run_qemu_img("convert", "-O", "raw", *args, theirs)
        qimg = self.run_qimg("convert", "-O", "raw", *args, ours)
        return qemu, qimg, theirs, ours

    def same_output(self, tree: dict[str, Any], spelling: str = "json") -> bytes:
        """Converts with both tools; both must succeed with the same bytes, which it returns."""
        qemu, qimg, theirs, ours = self.both(tree, spelling)
        assert qemu.returncode == 0, f"qemu-img failed: {qemu.stderr}"
        assert qimg.returncode == 0, f"qimg failed: {qimg.stderr}"
        assert qimg.stderr == ""
        got = ours.read_bytes()
        same_bytes(got, theirs.read_bytes(), "qimg's output vs qemu-img's")
        return got

    def both_fail(self, tree: dict[str, Any]) -> str:
        """Converts with both tools; both must fail with an I/O error. Returns qimg's stderr."""
        qemu, qimg, _, _ = self.both(tree)
        assert qemu.returncode == 1, f"qemu-img did not fail: {qemu.stderr}"
        assert "Input/output error" in qemu.stderr
        assert qimg.returncode == 1, f"qimg did not fail: {qimg.stdout}{qimg.stderr}"
        assert qimg.stderr.startswith("qimg: ") and "Input/output error" in qimg.stderr
        return qimg.stderr


@pytest.fixture
def convert(tmp_path: Path, run_qemu_img: RunCommand, run_qimg: RunCommand) -> Converter:
    return Converter(tmp_path, run_qemu_img, run_qimg)


def write_replicas(directory: Path, data: bytes, patches: Sequence[dict[int, bytes]]) -> list[Path]:
    """Raw files holding `data`, each with its own patches {offset: bytes} applied."""
    paths = []
    for i, patch in enumerate(patches):
        buf = bytearray(data)
        for offset, chunk in patch.items():
            buf[offset : offset + len(chunk)] = chunk
        path = directory / f"replica{i}.raw"
        path.write_bytes(bytes(buf))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def data() -> bytes:
    return random.Random(0x5EED).randbytes(SIZE)


# --------------------------------------------------------------------------------------------
# Raw children


@pytest.mark.parametrize("spelling", ["json", "image-opts"])
def test_agreeing_replicas_convert_alike(
    tmp_path: Path, convert: Converter, data: bytes, spelling: str
) -> None:
    paths = write_replicas(tmp_path, data, [{}, {}, {}])
    got = convert.same_output(quorum([raw_child(p) for p in paths], 2), spelling)
    same_bytes(got, data, "output")


@pytest.mark.parametrize("spelling", ["json", "image-opts"])
def test_one_corrupt_replica_is_outvoted_alike(
    tmp_path: Path, convert: Converter, data: bytes, spelling: str
) -> None:
    corrupt = {100: b"\xff" * 10, 3 * MiB + 1: bytes(70000), SIZE - 1: b"!"}
    paths = write_replicas(tmp_path, data, [{}, corrupt, {}])
    got = convert.same_output(quorum([raw_child(p) for p in paths], 2), spelling)
    same_bytes(got, data, "output")


def test_corruptions_in_different_children_and_regions_are_outvoted_alike(
    tmp_path: Path, convert: Converter, data: bytes
) -> None:
    patches: list[dict[int, bytes]] = [
        {5000: b"zero"},
        {QEMU_REQUEST + 777: b"one" * 1000},
        {2 * QEMU_REQUEST: bytes(QEMU_REQUEST)},
        {3 * QEMU_REQUEST + 12345: b"three"},
        {},
    ]
    paths = write_replicas(tmp_path, data, patches)
    got = convert.same_output(quorum([raw_child(p) for p in paths], 3))
    same_bytes(got, data, "output")


def test_a_child_failing_every_read_is_outvoted_alike(
    tmp_path: Path, convert: Converter, data: bytes
) -> None:
    paths = write_replicas(tmp_path, data, [{}, {}, {}])
    tree = quorum([raw_child(paths[0]), failing_child(paths[1]), raw_child(paths[2])], 2)
    same_bytes(convert.same_output(tree), data, "output")


def test_fifo_reads_the_first_child_alike(tmp_path: Path, convert: Converter, data: bytes) -> None:
    paths = write_replicas(tmp_path, data, [{MiB: b"first"}, {}, {}])
    tree = quorum([raw_child(p) for p in paths], 1, **{"read-pattern": "fifo"})
    got = convert.same_output(tree)
    same_bytes(got, paths[0].read_bytes(), "output")


def test_without_a_majority_both_fail(tmp_path: Path, convert: Converter, data: bytes) -> None:
    at = 5 * MiB + 3
    paths = write_replicas(tmp_path, data, [{}, {at: b"one"}, {at: b"two"}])
    stderr = convert.both_fail(quorum([raw_child(p) for p in paths], 2))
    assert "no version of the 65536 bytes at offset 5242880 has the 2 votes it needs" in stderr


def test_two_failing_children_of_three_fail_both(
    tmp_path: Path, convert: Converter, data: bytes
) -> None:
    paths = write_replicas(tmp_path, data, [{}, {}, {}])
    tree = quorum([raw_child(paths[0]), failing_child(paths[1]), failing_child(paths[2])], 2)
    convert.both_fail(tree)


def test_a_threshold_of_every_child_fails_both_on_one_corrupt_child(
    tmp_path: Path, convert: Converter, data: bytes
) -> None:
    paths = write_replicas(tmp_path, data, [{}, {}, {7 * MiB: b"x"}])
    convert.both_fail(quorum([raw_child(p) for p in paths], 3))


# --------------------------------------------------------------------------------------------
# qcow2 children with backing files


def qemu_io(run_qemu_io: RunCommand, path: Path, *commands: str) -> None:
    argv: list[str] = []
    for command in commands:
        argv += ["-c", command]
    proc = run_qemu_io("-f", "qcow2", *argv, path)
    assert proc.returncode == 0 and "error" not in (proc.stdout + proc.stderr).lower(), (
        f"qemu-io {commands} on {path}: {proc.stdout}{proc.stderr}"
    )


def make_base(run_qemu_img: RunCommand, directory: Path, name: str, data: bytes) -> Path:
    """A qcow2 image holding `data` in the first MiB of every 2 MiB, holes elsewhere (made by
    qemu-img from a raw file)."""
    raw = directory / f"{name}.src.raw"
    with raw.open("wb") as f:
        f.truncate(len(data))
        for offset in range(0, len(data), 2 * MiB):
            f.seek(offset)
            f.write(data[offset : offset + MiB])
    path = directory / f"{name}.qcow2"
    proc = run_qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, path)
    assert proc.returncode == 0, proc.stderr
    return path


def make_overlay(run_qemu_img: RunCommand, path: Path, backing: Path) -> Path:
    proc = run_qemu_img("create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", path)
    assert proc.returncode == 0, proc.stderr
    return path


# The same guest writes, through qemu-io, into every overlay of a replica set.
GUEST_WRITES = (
    "write -P 0x11 0 64k",
    "write -P 0x22 1M 300k",
    "write -z 3M 128k",
    "discard 6M 64k",
    "write -P 0x33 7340000 5000",
)


@pytest.mark.parametrize("spelling", ["json", "image-opts"])
def test_qcow2_children_over_one_backing_file_convert_alike(
    tmp_path: Path,
    convert: Converter,
    data: bytes,
    run_qemu_img: RunCommand,
    run_qemu_io: RunCommand,
    spelling: str,
) -> None:
    base = make_base(run_qemu_img, tmp_path, "base", data)
    overlays = [make_overlay(run_qemu_img, tmp_path / f"top{i}.qcow2", base) for i in range(3)]
    for overlay in overlays:
        qemu_io(run_qemu_io, overlay, *GUEST_WRITES)
    # One overlay is wrong: a write the others did not get, over backing data.
    qemu_io(run_qemu_io, overlays[1], "write -P 0x44 4M 100k")
    got = convert.same_output(quorum([qcow2_child(p) for p in overlays], 2), spelling)
    same_bytes(got[4 * MiB : 4 * MiB + 100 * KiB], data[4 * MiB : 4 * MiB + 100 * KiB], "output")
    same_bytes(got[MiB : MiB + 300 * KiB], b"\x22" * (300 * KiB), "output")


def test_qcow2_children_with_chains_of_their_own_convert_alike(
    tmp_path: Path,
    convert: Converter,
    data: bytes,
    run_qemu_img: RunCommand,
    run_qemu_io: RunCommand,
) -> None:
    # Three two-layer chains; the backing file of chain 2 is corrupt where its overlay
    # does not cover it, so chain 2 loses there.
    tops = []
    for i in range(3):
        base = make_base(run_qemu_img, tmp_path, f"base{i}", data)
        if i == 2:
            qemu_io(run_qemu_io, base, "write -P 0x55 4M 64k")
        top = make_overlay(run_qemu_img, tmp_path / f"chain{i}.qcow2", base)
        qemu_io(run_qemu_io, top, *GUEST_WRITES)
        tops.append(top)
    got = convert.same_output(quorum([qcow2_child(p) for p in tops], 2))
    same_bytes(got[4 * MiB : 4 * MiB + 64 * KiB], data[4 * MiB : 4 * MiB + 64 * KiB], "output")


def test_mixed_raw_and_qcow2_children_convert_alike(
    tmp_path: Path,
    convert: Converter,
    data: bytes,
    run_qemu_img: RunCommand,
    run_qemu_io: RunCommand,
) -> None:
    base = make_base(run_qemu_img, tmp_path, "base", data)
    top = make_overlay(run_qemu_img, tmp_path / "top.qcow2", base)
    qemu_io(run_qemu_io, top, "write -P 0x66 2M 64k")
    raws = write_replicas(tmp_path, convert.same_output(qcow2_child(top)), [{}, {}])
    got = convert.same_output(quorum([qcow2_child(top), *map(raw_child, raws)], 3))
    same_bytes(got[2 * MiB : 2 * MiB + 64 * KiB], b"\x66" * (64 * KiB), "output")


# --------------------------------------------------------------------------------------------
# Where qimg differs on purpose


def test_qimg_votes_per_block_where_qemu_votes_per_request(
    tmp_path: Path, convert: Converter, data: bytes
) -> None:
    # Children 1 and 2 are wrong in different 64 KiB blocks of the same qemu-img request:
    # QEMU sees three versions of the request and fails; qimg has a majority in each block.
    paths = write_replicas(tmp_path, data, [{}, {100: b"one"}, {70000: b"two"}])
    qemu, qimg, _, ours = convert.both(quorum([raw_child(p) for p in paths], 2))
    assert qemu.returncode == 1 and "Input/output error" in qemu.stderr
    assert qimg.returncode == 0, qimg.stderr
    same_bytes(ours.read_bytes(), data, "qimg's output")
