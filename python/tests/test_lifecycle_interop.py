"""Safe ``qimg rebase`` and ``qimg commit`` against qemu-img's, on chains made by qemu-img and
qemu-io: two and three layers, raw and qcow2 bases, 4 KiB / 64 KiB / 1 MiB / 2 MiB clusters
(the top's sometimes other than those below it), compat 0.10 and 1.1, extended L2,
compressed clusters in the layer right above the base, zero clusters in the top, and tops
bigger than their backing files.

Each chain is built once (per test process) in a pristine directory and copied twice: qimg
works on one copy, qemu-img on the other, with the same arguments. Backing files are named
relatively, so the two copies are independent chains. Then:

- rebase: qimg's top passes ``qemu-img check``; ``qemu-img compare`` finds it equal to
  qemu-img's top and to the pristine top (the guest content did not change); ``qemu-img
  info`` reports the same backing file, backing format and size; the first 512 bytes (the
  header, its extensions and the backing file name) are qemu-img's bytes; ``-c`` compresses
  as many clusters as qemu-img's;
- commit: every layer passes ``qemu-img check`` (qcow2 ones), reads the same as qemu-img's
  through its backing chain, and ``qemu-img info`` reports the same backing file, backing
  format and size (a base smaller than the top grows); a layer qemu-img leaves as it was
  (``-d``, ``-b``) qimg leaves byte for byte as it was; the top alone reads as qemu-img's
  (emptied, or kept).

Then the Python API (progress reports up to the total; a callback that raises), and the
refusals: each exits 1, says what qemu-img says, and leaves every file byte for byte as it
was. Where qimg's message is not qemu-img's word for word, the test pins the parts that are.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import qimg
from conftest import RunCommand, assert_ok

pytestmark = pytest.mark.qemu

KiB = 1 << 10
MiB = 1 << 20

#: Size of the base and of the middle layer; a bigger top has TOP_SIZE.
BASE_SIZE = 4 * MiB
TOP_SIZE = 6 * MiB


@dataclass(frozen=True)
class Chain:
    """A backing chain: ``layers`` images (base first), the base's format, the cluster size
    and options of every qcow2 layer (``top_cluster``: another cluster size for the top), and
    whether the top is bigger than the layers below."""

    layers: int
    base_fmt: str
    cluster: int
    compat: str = "1.1"
    extended_l2: bool = False
    bigger_top: bool = False
    top_cluster: int | None = None

    @property
    def base(self) -> str:
        return f"base.{self.base_fmt}"

    def names(self) -> list[tuple[str, str]]:
        """(file name, format) of every layer, base first."""
        middle = [("mid.qcow2", "qcow2")] if self.layers == 3 else []
        return [(self.base, self.base_fmt), *middle, ("top.qcow2", "qcow2")]

    def options(self, top: bool) -> str:
        cluster = self.top_cluster if top and self.top_cluster else self.cluster
        opts = f"cluster_size={cluster},compat={self.compat}"
        return opts + (",extended_l2=on" if self.extended_l2 else "")


CHAINS: dict[str, Chain] = {
    "2-qcow2-64k": Chain(2, "qcow2", 64 * KiB),
    "2-raw-64k-bigger": Chain(2, "raw", 64 * KiB, bigger_top=True),
    "2-qcow2-4k-v2-bigger": Chain(2, "qcow2", 4 * KiB, compat="0.10", bigger_top=True),
    "2-raw-2M-extl2": Chain(2, "raw", 2 * MiB, extended_l2=True),
    "3-qcow2-4k": Chain(3, "qcow2", 4 * KiB),
    "3-qcow2-64k-v2": Chain(3, "qcow2", 64 * KiB, compat="0.10"),
    "3-raw-64k-v2-bigger": Chain(3, "raw", 64 * KiB, compat="0.10", bigger_top=True),
    "3-qcow2-64k-extl2-bigger": Chain(3, "qcow2", 64 * KiB, extended_l2=True, bigger_top=True),
    "3-qcow2-2M-bigger": Chain(3, "qcow2", 2 * MiB, bigger_top=True),
    "3-raw-2M-v2": Chain(3, "raw", 2 * MiB, compat="0.10"),
    # The top's clusters bigger than those below (the region to copy is more than 2 MiB,
    # QEMU's IO_BUF_SIZE), then smaller.
    "3-qcow2-1M-top2M": Chain(3, "qcow2", 1 * MiB, top_cluster=2 * MiB),
    "3-qcow2-2M-top64k-extl2-bigger": Chain(
        3, "qcow2", 2 * MiB, extended_l2=True, bigger_top=True, top_cluster=64 * KiB
    ),
}

BASE_WRITES = ["write -P 0x11 0 1M", "write -P 0x12 2M 1M", "write -P 0x13 3584k 512k"]


def _middle_writes(cluster: int) -> list[str]:
    """Compressed clusters (whole clusters, as qemu-io wants them), data and zeroes."""
    return [
        f"write -c -P 0x21 2M {max(cluster, 256 * KiB)}",
        "write -P 0x22 640k 200k",
        "write -z 3M 64k",
    ]


def _top_writes(chain: Chain) -> list[str]:
    """Data and zeroes that do not start or end on cluster boundaries, over the base's data
    and (in a bigger top) past the end of the layers below; all in the first 2 MiB of the
    base's size, so that a top of 2 MiB clusters leaves one to the layers below."""
    writes = ["write -P 0x31 100k 300k", "write -z 900k 300k", "write -P 0x32 1600k 100k"]
    if chain.bigger_top:
        writes += ["write -P 0x33 4608k 512k", "write -z 5M 128k"]
    return writes


def _qemu_io(run_qemu_io: RunCommand, image: Path, fmt: str, writes: list[str]) -> None:
    args: list[str] = ["-f", fmt]
    for w in writes:
        args += ["-c", w]
    assert_ok(run_qemu_io(*args, image))


def _build(where: Path, chain: Chain, run_qemu_img: RunCommand, run_qemu_io: RunCommand) -> None:
    """The chain in ``where``, plus two files to rebase onto: ``new.qcow2`` (the base's size,
    partly the base's data, partly other data) and ``short.raw`` (1 MiB)."""
    where.mkdir()
    names = chain.names()
    below: tuple[str, str] | None = None
    for depth, (name, fmt) in enumerate(names):
        is_top = depth == len(names) - 1
        args: list[Any] = ["create", "-q", "-f", fmt]
        if fmt == "qcow2":
            args += ["-o", chain.options(is_top)]
        if below is not None:
            args += ["-b", below[0], "-F", below[1]]
        size = TOP_SIZE if is_top and chain.bigger_top else BASE_SIZE
        assert_ok(run_qemu_img(*args, where / name, size))
        if depth == 0:
            writes = BASE_WRITES
        elif not is_top:
            writes = _middle_writes(chain.cluster)
        elif chain.layers == 2:  # the top is also the layer right above the base
            writes = _middle_writes(chain.cluster) + _top_writes(chain)
        else:
            writes = _top_writes(chain)
        _qemu_io(run_qemu_io, where / name, fmt, writes)
        below = (name, fmt)
    new, short = where / "new.qcow2", where / "short.raw"
    assert_ok(run_qemu_img("create", "-q", "-f", "qcow2", new, BASE_SIZE))
    _qemu_io(run_qemu_io, new, "qcow2", ["write -P 0x11 0 512k", "write -P 0x5a 1M 2M"])
    assert_ok(run_qemu_img("create", "-q", "-f", "raw", short, 1 * MiB))
    _qemu_io(run_qemu_io, short, "raw", ["write -P 0x11 0 512k", "write -P 0x66 512k 512k"])


#: (chain id) -> its pristine directory, built once per test process.
_PRISTINE: dict[str, Path] = {}


@pytest.fixture
def copies(
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
    run_qemu_img: RunCommand,
    run_qemu_io: RunCommand,
) -> Callable[[str], tuple[Path, Path, Path]]:
    """``copies(chain_id)``: (pristine, ours, theirs) directories holding the chain."""

    def make(chain_id: str) -> tuple[Path, Path, Path]:
        if chain_id not in _PRISTINE:
            where = tmp_path_factory.mktemp("pristine") / chain_id
            _build(where, CHAINS[chain_id], run_qemu_img, run_qemu_io)
            _PRISTINE[chain_id] = where
        pristine = _PRISTINE[chain_id]
        ours, theirs = tmp_path / "ours", tmp_path / "theirs"
        shutil.copytree(pristine, ours)
        shutil.copytree(pristine, theirs)
        return pristine, ours, theirs

    return make


def _check(run_qemu_img: RunCommand, image: Path) -> dict[str, Any]:
    """``qemu-img check``'s report on ``image``, which must be clean (no leaks either)."""
    got = run_qemu_img("check", "--output=json", "-f", "qcow2", image)
    assert got.returncode == 0, got.stdout + got.stderr
    report: dict[str, Any] = json.loads(got.stdout)
    assert report.get("leaks", 0) == report.get("corruptions", 0) == 0, report
    return report


def _same_guest(run_qemu_img: RunCommand, a: Path, fmt_a: str, b: Path, fmt_b: str) -> None:
    got = run_qemu_img("compare", "-f", fmt_a, "-F", fmt_b, a, b)
    assert (got.returncode, got.stdout) == (0, "Images are identical.\n"), got.stderr


def _alone(image: Path) -> str:
    """A spec opening the qcow2 ``image`` without its backing file."""
    node = {"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": str(image)}}
    return "json:" + json.dumps(node)


def _same_alone(run_qemu_img: RunCommand, a: Path, b: Path) -> None:
    """The qcow2 images ``a`` and ``b`` read the same without their backing files."""
    got = run_qemu_img("compare", _alone(a), _alone(b))
    assert (got.returncode, got.stdout) == (0, "Images are identical.\n"), got.stderr


def _digest(path: Path) -> str:
    """A digest to compare files by: ``==`` on their bytes would have pytest render
    megabytes (even when they are equal, with the assertion pass hook)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digests(where: Path) -> dict[str, str]:
    return {p.name: _digest(p) for p in sorted(where.iterdir())}


INFO_FIELDS = ("backing-filename", "backing-filename-format", "virtual-size")


def _info(run_qemu_img: RunCommand, image: Path, fmt: str) -> dict[str, Any]:
    got = run_qemu_img("info", "--output=json", "-U", "-f", fmt, image)
    assert_ok(got)
    info = json.loads(got.stdout)
    return {k: info.get(k) for k in INFO_FIELDS}


REBASES: dict[str, Callable[[Chain], list[str]]] = {
    "onto the base": lambda c: ["-b", c.base, "-F", c.base_fmt],
    "no backing": lambda c: ["-b", ""],
    "no backing, compressed": lambda c: ["-c", "-b", ""],
    "onto other data": lambda c: ["-b", "new.qcow2", "-F", "qcow2"],
    "onto a shorter file": lambda c: ["-b", "short.raw", "-F", "raw"],
}


#: qemu-img 10.0.2 aborts on ``rebase -c`` of an image with extended L2 entries whose
#: clusters are partly allocated ("img_rebase: Assertion `!bdrv_is_allocated(unfiltered_bs,
#: offset, n, &n_alloc) && n_alloc == n' failed"): there qemu-img's uncompressed rebase is the
#: reference for the content and the header.
def _reference_rebase(chain: Chain, args: list[str]) -> list[str]:
    return [a for a in args if a != "-c"] if chain.extended_l2 else args


@pytest.mark.parametrize("rebase", list(REBASES))
@pytest.mark.parametrize("chain_id", list(CHAINS))
def test_safe_rebase_reads_the_same_as_qemu_imgs(
    chain_id: str,
    rebase: str,
    copies: Callable[[str], tuple[Path, Path, Path]],
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
) -> None:
    """qimg's rebased top is valid, reads as it did before and as qemu-img's does, names the
    same backing file and has qemu-img's header bytes; ``-c`` writes compressed clusters."""
    chain = CHAINS[chain_id]
    pristine, ours, theirs = copies(chain_id)
    args = REBASES[rebase](chain)
    top, ref = ours / "top.qcow2", theirs / "top.qcow2"
    ours_run = run_qimg("rebase", *args, top)
    assert_ok(run_qemu_img("rebase", *_reference_rebase(chain, args), ref))
    assert (ours_run.returncode, ours_run.stdout, ours_run.stderr) == (0, "", "")
    report = _check(run_qemu_img, top)
    _same_guest(run_qemu_img, top, "qcow2", ref, "qcow2")
    _same_guest(run_qemu_img, top, "qcow2", pristine / "top.qcow2", "qcow2")
    assert _info(run_qemu_img, top, "qcow2") == _info(run_qemu_img, ref, "qcow2")
    with open(top, "rb") as f, open(ref, "rb") as g:
        assert f.read(512) == g.read(512)
    if "-c" not in args:
        return
    compressed = report.get("compressed-clusters", 0)
    if "-c" in _reference_rebase(chain, args):
        ref_report = _check(run_qemu_img, ref)
        assert compressed == ref_report.get("compressed-clusters", 0)
    else:  # the clusters that were not allocated at all are compressed
        before = _check(run_qemu_img, pristine / "top.qcow2")
        if report["allocated-clusters"] > before["allocated-clusters"]:
            assert compressed > before.get("compressed-clusters", 0)


COMMITS: dict[str, Callable[[Chain], list[str]]] = {
    "default": lambda c: [],
    "-d": lambda c: ["-d"],
    "-b base": lambda c: ["-b", c.base],
    "-b backing file": lambda c: ["-b", c.names()[-2][0]],
}


@pytest.mark.parametrize("commit", list(COMMITS))
@pytest.mark.parametrize("chain_id", list(CHAINS))
def test_commit_leaves_every_layer_as_qemu_img_does(
    chain_id: str,
    commit: str,
    copies: Callable[[str], tuple[Path, Path, Path]],
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
) -> None:
    """After the same commit, every layer of qimg's chain is valid, reads (through its chain)
    as qemu-img's, names the same backing file and has the same size; a layer qemu-img leaves
    byte for byte as it was, qimg leaves so too; the top alone (without its backing files)
    reads as qemu-img's, so it is emptied, or kept, as qemu-img's is.

    Layers below the top are not compared alone: qemu-img copies whole clusters of the top's
    view, so where a top with extended L2 entries has some subclusters of a cluster, it
    copies into the base what the layers below held in the others; qimg copies the
    subclusters. Read through the chain, both are the same."""
    chain = CHAINS[chain_id]
    pristine, ours, theirs = copies(chain_id)
    args = COMMITS[commit](chain)
    ours_run = run_qimg("commit", *args, ours / "top.qcow2")
    theirs_run = run_qemu_img("commit", *args, theirs / "top.qcow2")
    assert_ok(theirs_run)
    assert (ours_run.returncode, ours_run.stdout, ours_run.stderr) == (
        0,
        theirs_run.stdout,
        "",
    )
    for name, fmt in chain.names():
        if fmt == "qcow2":
            _check(run_qemu_img, ours / name)
        _same_guest(run_qemu_img, ours / name, fmt, theirs / name, fmt)
        assert _info(run_qemu_img, ours / name, fmt) == _info(run_qemu_img, theirs / name, fmt)
        if _digest(theirs / name) == _digest(pristine / name):
            assert _digest(ours / name) == _digest(pristine / name), f"{name} changed"
    _same_alone(run_qemu_img, ours / "top.qcow2", theirs / "top.qcow2")


# --- the Python API --------------------------------------------------------------------------


def _progress_log() -> tuple[list[tuple[int, int]], Callable[[int, int], None]]:
    seen: list[tuple[int, int]] = []
    return seen, lambda done, total: seen.append((done, total))


def _assert_runs_to_the_end(seen: list[tuple[int, int]], total: int) -> None:
    assert seen, "the progress callback was never called"
    assert {t for _, t in seen} == {total}
    dones = [d for d, _ in seen]
    assert dones == sorted(dones)
    assert dones[-1] == total


def test_python_rebase_and_commit_report_progress_up_to_the_total(
    copies: Callable[[str], tuple[Path, Path, Path]], run_qemu_img: RunCommand
) -> None:
    """qimg.rebase and qimg.commit call ``progress(done, total)`` with a growing ``done``
    that ends at ``total``, and do what the command lines of qemu-img do."""
    chain_id = "3-qcow2-64k-extl2-bigger"
    _pristine, ours, theirs = copies(chain_id)
    seen, progress = _progress_log()
    qimg.rebase(ours / "top.qcow2", "base.qcow2", backing_format="qcow2", progress=progress)
    assert_ok(run_qemu_img("rebase", "-b", "base.qcow2", "-F", "qcow2", theirs / "top.qcow2"))
    _assert_runs_to_the_end(seen, TOP_SIZE)
    _same_guest(run_qemu_img, ours / "top.qcow2", "qcow2", theirs / "top.qcow2", "qcow2")

    seen, progress = _progress_log()
    qimg.commit(ours / "top.qcow2", progress=progress)
    assert_ok(run_qemu_img("commit", theirs / "top.qcow2"))
    _assert_runs_to_the_end(seen, TOP_SIZE)
    for name in ("base.qcow2", "mid.qcow2", "top.qcow2"):
        _check(run_qemu_img, ours / name)
        _same_guest(run_qemu_img, ours / name, "qcow2", theirs / name, "qcow2")
    _same_alone(run_qemu_img, ours / "top.qcow2", theirs / "top.qcow2")


class _Stop(Exception):
    """Raised by a progress callback to stop the work."""


def _stop_at_first_report(done: int, total: int) -> None:
    raise _Stop(f"stopped at {done}/{total}")


@pytest.mark.parametrize("work", ["rebase", "commit"])
def test_a_raising_progress_callback_leaves_the_guest_content_as_it_was(
    work: str, copies: Callable[[str], tuple[Path, Path, Path]], run_qemu_img: RunCommand
) -> None:
    """The callback's exception reaches the caller; whenever it stopped the work, the top
    still passes ``qemu-img check`` and reads as before (a rebase keeps its old backing
    file), and so does every layer below it."""
    pristine, ours, _theirs = copies("3-qcow2-4k")
    top = ours / "top.qcow2"
    with pytest.raises(_Stop, match="stopped at"):
        if work == "rebase":
            qimg.rebase(top, None, compress=True, progress=_stop_at_first_report)
        else:
            qimg.commit(top, progress=_stop_at_first_report)
    for name in ("base.qcow2", "mid.qcow2", "top.qcow2"):
        _check(run_qemu_img, ours / name)
    _same_guest(run_qemu_img, top, "qcow2", pristine / "top.qcow2", "qcow2")
    if work == "rebase":
        info = _info(run_qemu_img, top, "qcow2")
        assert info["backing-filename"] == "mid.qcow2"


# --- refusals --------------------------------------------------------------------------------


@pytest.fixture
def chain(copies: Callable[[str], tuple[Path, Path, Path]]) -> tuple[Path, Path]:
    """(ours, theirs): two copies of a three-layer qcow2 chain."""
    _pristine, ours, theirs = copies("3-qcow2-64k-v2")
    return ours, theirs


def _refused_alike(
    ours: subprocess.CompletedProcess[str],
    theirs: subprocess.CompletedProcess[str],
    message: str | None = None,
) -> None:
    """Both exit 1; qimg says what qemu-img says, with its own name (or ``message``)."""
    assert theirs.returncode == 1, theirs.stdout + theirs.stderr
    assert ours.returncode == 1, ours.stdout + ours.stderr
    assert ours.stdout == ""
    expected = theirs.stderr.removeprefix("qemu-img: ") if message is None else message
    assert ours.stderr == f"qimg: {expected}"


def test_a_missing_new_backing_file_leaves_the_image_untouched(
    chain: tuple[Path, Path], run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    """A new backing file that cannot be opened: the image's bytes do not change."""
    ours, theirs = chain
    before = _digest(ours / "top.qcow2")
    missing = ours.parent / "nothere.qcow2"
    got = run_qimg("rebase", "-b", missing, "-F", "qcow2", ours / "top.qcow2")
    ref = run_qemu_img("rebase", "-b", missing, "-F", "qcow2", theirs / "top.qcow2")
    _refused_alike(got, ref)
    assert got.stderr == (
        f"qimg: Could not open new backing file '{missing}': "
        f"Could not open '{missing}': No such file or directory\n"
    )
    assert _digest(ours / "top.qcow2") == before
    # A relative name is found from the image's directory; the message names the file
    # as -b gave it, as qemu-img's does, and then the path that was tried.
    got = run_qimg("rebase", "-b", "nothere.qcow2", "-F", "qcow2", ours / "top.qcow2")
    assert got.returncode == 1
    assert got.stderr.startswith("qimg: Could not open new backing file 'nothere.qcow2': ")
    assert got.stderr.endswith(
        f"Could not open '{ours / 'nothere.qcow2'}': No such file or directory\n"
    )
    assert _digest(ours / "top.qcow2") == before


def test_a_safe_rebase_without_a_backing_format_is_refused_before_any_copy(
    chain: tuple[Path, Path], run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    """qemu-img's message; qimg refuses before it copies anything (qemu-img copies first)."""
    ours, theirs = chain
    before = _digest(ours / "top.qcow2")
    got = run_qimg("rebase", "-b", "new.qcow2", ours / "top.qcow2")
    ref = run_qemu_img("rebase", "-b", "new.qcow2", theirs / "top.qcow2")
    _refused_alike(got, ref)
    assert got.stderr == (
        "qimg: Could not change the backing file to 'new.qcow2': backing format must be specified\n"
    )
    assert _digest(ours / "top.qcow2") == before


@pytest.mark.parametrize(
    ("image", "args"),
    [
        ("top.qcow2", ["-b", "top.qcow2", "-F", "qcow2"]),
        ("base.qcow2", ["-b", "top.qcow2", "-F", "qcow2"]),
        ("mid.qcow2", ["-b", "top.qcow2", "-F", "qcow2"]),
    ],
    ids=["onto itself", "base onto the top", "middle onto the top"],
)
def test_a_rebase_that_would_make_a_loop_is_refused(
    chain: tuple[Path, Path],
    image: str,
    args: list[str],
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
) -> None:
    """The image is open for writing, so the new backing file (or its chain), which
    contains the image, cannot be opened: exit 1, no byte changed, as with qemu-img."""
    ours, theirs = chain
    before = _digest(ours / image)
    got = run_qimg("rebase", *args, ours / image)
    ref = run_qemu_img("rebase", *args, theirs / image)
    assert (got.returncode, ref.returncode) == (1, 1), got.stderr + ref.stderr
    # The wording differs from qemu-img's after the first colon (qimg names the layer it
    # could not open): only the parts they share are pinned here.
    assert got.stderr.startswith(f"qimg: Could not open new backing file '{args[1]}'")
    assert 'Failed to get shared "write" lock' in got.stderr
    assert _digest(ours / image) == before
    assert _digest(theirs / image) == before


def test_commit_of_an_image_without_a_backing_file_is_refused(
    chain: tuple[Path, Path], run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    ours, theirs = chain
    before = _digest(ours / "base.qcow2")
    got = run_qimg("commit", ours / "base.qcow2")
    ref = run_qemu_img("commit", theirs / "base.qcow2")
    _refused_alike(got, ref, "Image does not have a backing file\n")
    assert _digest(ours / "base.qcow2") == before


@pytest.mark.parametrize("base", ["nothere", "top.qcow2"])
def test_commit_into_a_file_outside_the_chain_is_refused(
    chain: tuple[Path, Path], base: str, run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    """``-b`` names no file below the image (the image itself is not below it)."""
    ours, theirs = chain
    before = _digests(ours)
    got = run_qimg("commit", "-b", base, ours / "top.qcow2")
    ref = run_qemu_img("commit", "-b", base, theirs / "top.qcow2")
    _refused_alike(
        got,
        ref,
        f"Did not find '{base}' in the backing chain of '{ours / 'top.qcow2'}'\n",
    )
    assert _digests(ours) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-r", "1M"], "commit -r (rate limits) is not supported by qimg\n"),
        (["--image-opts"], "commit --image-opts is not supported by qimg; give the file name\n"),
    ],
)
def test_commit_refuses_rate_limits_and_image_opts_by_name(
    chain: tuple[Path, Path], args: list[str], message: str, run_qimg: RunCommand
) -> None:
    ours, _theirs = chain
    before = _digests(ours)
    got = run_qimg("commit", *args, ours / "top.qcow2")
    assert (got.returncode, got.stdout, got.stderr) == (1, "", f"qimg: {message}")
    assert _digests(ours) == before


def test_commit_with_a_missing_backing_file_changes_nothing(
    chain: tuple[Path, Path], run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    """The chain cannot be opened: exit 1, the message names the missing file, no byte of
    the files that are there changes."""
    ours, theirs = chain
    (ours / "base.qcow2").unlink()
    (theirs / "base.qcow2").unlink()
    before = _digests(ours)
    got = run_qimg("commit", ours / "top.qcow2")
    ref = run_qemu_img("commit", theirs / "top.qcow2")
    assert (got.returncode, ref.returncode) == (1, 1)
    # qemu-img: "Could not open 'TOP': Could not open backing file: Could not open backing
    # file: Could not open 'BASE': ..."; qimg: "Could not open backing file of 'MID': Could
    # not open 'BASE': ...". The cause is pinned, the wording around it is not.
    assert ref.stderr.endswith(
        f"Could not open '{theirs / 'base.qcow2'}': No such file or directory\n"
    )
    assert got.stderr.startswith("qimg: ")
    assert got.stderr.endswith(
        f"Could not open '{ours / 'base.qcow2'}': No such file or directory\n"
    )
    assert _digests(ours) == before
