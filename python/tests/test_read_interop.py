"""qimg's read path against QEMU: info, map, check, compare, convert -O raw, measure, the API.

One corpus of images, made with qemu-img / qemu-io (never with qimg) by corpus.py when a test
first asks for one, and kept for the session: raw files with data, holes and odd lengths; qcow2
images with patterns, zero writes, discards, partial-cluster writes, compressed clusters (zlib
and zstd), backing chains with relative and probed backing names, extended L2 subclusters,
compat=0.10, 512-byte and 2 MiB clusters, every preallocation mode, lazy refcounts (clean and
dirty), 1-bit refcounts, internal snapshots, leaked and corrupted refcounts, and an image
opened by a path relative to the working directory.

Every test runs the same command line through ``qimg`` and ``qemu-img`` and compares what they
print (stdout byte for byte, stderr with the ``qemu-img:`` prefix read as ``qimg:``) and their
exit status; ``convert`` outputs are compared byte for byte and for sparseness. Each test id
names the image and the command, so a failure says what broke where.
"""

from __future__ import annotations

import difflib
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import pytest
from corpus import Corpus, Image, Recipe, compressed, created

import qimg
from conftest import seek_data_ranges

RunCommand: TypeAlias = Callable[..., subprocess.CompletedProcess[str]]

pytestmark = pytest.mark.qemu

KiB = 1024
MiB = 1024 * KiB


# --------------------------------------------------------------------------------------------
# The corpus: a recipe table (static, so tests can be parametrized over it), its images made
# by corpus.py's Corpus when a test first asks for them


def write_raw(path: Path, size: int, extents: list[tuple[int, bytes]]) -> None:
    """A sparse raw file: *size* bytes, holes except where *extents* put data."""
    with path.open("wb") as f:
        f.truncate(size)
        for offset, data in extents:
            f.seek(offset)
            f.write(data)


def fill(byte: int, length: int) -> bytes:
    return bytes([byte]) * length


def noise(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


def strip_backing_format(path: Path) -> None:
    """Drop the backing-format header extension, so QEMU (and qimg) must probe the backing file."""
    with path.open("r+b") as f:
        header = bytearray(f.read(64 * KiB))
        name_offset, name_size = struct.unpack_from(">QI", header, 8)
        name = bytes(header[name_offset : name_offset + name_size])
        header_length = struct.unpack_from(">I", header, 100)[0]
        extensions = bytearray()
        pos = header_length
        while True:
            kind, length = struct.unpack_from(">II", header, pos)
            if kind == 0:
                break
            if kind != 0xE2792ACA:
                data = bytes(header[pos + 8 : pos + 8 + length])
                extensions += struct.pack(">II", kind, length) + data + bytes(-length % 8)
            pos += 8 + length + (-length % 8)
        extensions += bytes(8)  # end of extensions
        new_name_offset = header_length + len(extensions)
        end = name_offset + name_size
        header[header_length:end] = bytes(end - header_length)
        header[header_length : new_name_offset + name_size] = extensions + name
        struct.pack_into(">Q", header, 8, new_name_offset)
        f.seek(0)
        f.write(header[: max(end, new_name_offset + name_size)])


def set_refcount(path: Path, cluster_index: int, refcount: int) -> None:
    """Poke one 16-bit refcount entry (the image must use refcount_bits=16 and one refblock)."""
    with path.open("r+b") as f:
        header = f.read(104)
        cluster_bits = struct.unpack_from(">I", header, 20)[0]
        reftable_offset = struct.unpack_from(">Q", header, 48)[0]
        assert struct.unpack_from(">I", header, 96)[0] == 4, "expects 16-bit refcounts"
        f.seek(reftable_offset)
        refblock = struct.unpack(">Q", f.read(8))[0] & ~0x1FF
        assert cluster_index < (1 << cluster_bits) // 2, "expects the first refcount block"
        f.seek(refblock + 2 * cluster_index)
        f.write(struct.pack(">H", refcount))


def first_data_offset(map_json: str) -> int:
    """The host offset of the first data cluster in ``qemu-img map --output=json``'s output."""
    entries: list[dict[str, Any]] = json.loads(map_json)
    return int(next(e["offset"] for e in entries if e["data"] and "offset" in e))


def raw(file: str, size: int, *extents: tuple[int, bytes]) -> Recipe:
    """A raw file written from Python, not made by ``qemu-img create``: that one allocates the
    first block, and where the holes are is part of what map, convert and compare see."""

    def make(c: Corpus) -> Image:
        path = c.path(file)
        write_raw(path, size, list(extents))
        return Image(path, "raw")

    return make


def qcow2(
    file: str, size: int | None, *writes: str, options: str = "", backing: str | None = None
) -> Recipe:
    """A qcow2 image; its backing file (another corpus name) is named relative to it: the
    chains test relative backing names, resolved next to the overlay."""
    return created(
        file, "qcow2", size, *writes, options=options, backing=backing, relative_backing=True
    )


def without_backing_format(make: Recipe) -> Recipe:
    """*make*'s image with its backing-format header extension dropped."""

    def build(c: Corpus) -> Image:
        image = make(c)
        strip_backing_format(image.path)
        return image

    return build


def _prealloc(mode: str) -> Recipe:
    return qcow2(
        f"qcow2/prealloc-{mode}.qcow2",
        2 * MiB,
        "write -P 0x66 512k 64k",
        "write -z 1M 64k",
        options=f"preallocation={mode}",
    )


def _qcow2_lazy_dirty(c: Corpus) -> Image:
    """Killed after writing: the dirty bit stays set and the refcounts were never written."""
    image = c.create("qcow2/dirty.qcow2", "qcow2", 2 * MiB, options="lazy_refcounts=on")
    c.qemu_io("qcow2", image.path, "write -P 7 0 128k", "flush", "sigraise 9", status=-9)
    return image


def _qcow2_snapshot(c: Corpus) -> Image:
    image = c.create("qcow2/snap.qcow2", "qcow2", 1 * MiB, "write -P 1 0 64k")
    c.qemu_img("snapshot", "-c", "snap1", image.path)
    c.qemu_io("qcow2", image.path, "write -P 2 0 4k", "write -P 3 512k 64k")
    c.qemu_img("snapshot", "-c", "second snapshot", image.path)
    c.qemu_io("qcow2", image.path, "write -P 4 4k 4k")
    return image


def _qcow2_leak(c: Corpus) -> Image:
    image = c.create("qcow2/leak.qcow2", "qcow2", 1 * MiB, "write -P 0x90 0 128k")
    cluster = 64 * KiB
    end = image.path.stat().st_size
    index = -(-end // cluster)
    with image.path.open("r+b") as f:  # a referenced-by-nothing cluster at the end of the file
        f.truncate((index + 1) * cluster)
    set_refcount(image.path, index, 1)
    return image


def _qcow2_corrupt(c: Corpus) -> Image:
    image = c.create("qcow2/corrupt.qcow2", "qcow2", 1 * MiB, "write -P 0x91 0 128k")
    data = first_data_offset(c.qemu_img("map", "--output=json", "-f", "qcow2", image.path))
    set_refcount(image.path, data // (64 * KiB), 0)
    return image


@dataclass(frozen=True)
class Entry:
    """An image the tests run over: how it is made, and what parametrizing needs to know of it
    before it is made."""

    make: Recipe
    fmt: str = "qcow2"
    #: Run commands from this directory (relative to the corpus root) and name the image by its
    #: path relative to it; None: absolute paths.
    cwd: str | None = None
    #: Whether the image has a backing file (info --backing-chain then prints more than one).
    backing: bool = False


#: Files the images below are made from and no test runs over by themselves.
SOURCES: dict[str, Recipe] = {
    "compress-source": raw(
        "compressed/source.raw",
        2 * MiB,
        (0, fill(0xAB, 256 * KiB)),  # compresses well
        (256 * KiB, noise(4, 64 * KiB)),  # does not compress: stored plain
        (320 * KiB, fill(0, 64 * KiB)),  # zeros written as data
        (1 * MiB + 4 * KiB, b"qimg reads what qemu-img wrote. " * 256),  # partial cluster
        (2 * MiB - 512, fill(0xEE, 512)),
    ),
    "chain-base": raw(
        "chain/base.raw", 2 * MiB, (0, fill(0x01, 1 * MiB)), (1536 * KiB, fill(0x02, 4 * KiB))
    ),
    "odd-length-raw": raw("oddback/odd.raw", 100007, (0, fill(0x5A, 100007))),
    "probe-base": qcow2("probe/base.qcow2", 1 * MiB, "write -P 0x50 0 128k"),
    "probe-base-raw": raw("probe/base.raw", 1 * MiB, (0, fill(0x52, 64 * KiB))),
    "extl2-base": qcow2("extl2/base.qcow2", 1 * MiB, "write -P 0x0b 0 1M"),
    "rel-base": qcow2("rel/base.qcow2", 1 * MiB, "write -P 0x80 0 64k"),
}

IMAGES: dict[str, Entry] = {
    # ---- raw
    "raw-sparse": Entry(
        raw(
            "raw/sparse.raw",
            4 * MiB,
            (0, fill(0xAB, 64 * KiB)),
            (1 * MiB + 512, noise(1, 3584)),
            (2 * MiB, fill(0, 64 * KiB)),  # data blocks that hold zeros
            (3 * MiB - 100, fill(0xCD, 100)),
        ),
        "raw",
    ),
    "raw-odd-length": Entry(
        raw("raw/odd.raw", 100007, (0, noise(2, 512)), (99000, fill(0x5A, 1007))), "raw"
    ),
    "raw-empty": Entry(raw("raw/empty.raw", 0), "raw"),
    "raw-dense": Entry(raw("raw/dense.raw", 256 * KiB, (0, noise(3, 256 * KiB))), "raw"),
    # ---- plain qcow2
    "qcow2-patterns": Entry(
        qcow2(
            "qcow2/patterns.qcow2",
            4 * MiB,
            "write -P 0xab 0 64k",
            "write -P 0xcd 131584 3k",  # partial cluster, unaligned start
            "write -P 0xef 1044480 8k",  # across a cluster boundary
            "write -z 2M 128k",  # zero clusters, never allocated
            "write -P 0x11 3M 256k",
            "write -z 3M 64k",  # zero flag on an allocated cluster
            "write -z -u 3211264 64k",  # zeroed and unmapped
            "discard 3276800 64k",
            "write -P 0x22 3350000 1",  # one byte
        )
    ),
    # 1000000 rounds up to 1000448 (512-byte multiple), not a cluster multiple
    "qcow2-odd-size": Entry(
        qcow2("qcow2/odd.qcow2", 1000000, "write -P 0x09 999424 1024", "write -P 8 0 1")
    ),
    "qcow2-empty": Entry(qcow2("qcow2/empty.qcow2", 0)),
    "qcow2-compat0.10": Entry(
        qcow2(
            "qcow2/v2.qcow2",
            2 * MiB,
            "write -P 0xab 0 64k",
            "write -z 64k 64k",
            "write -P 0x01 1M 8k",
            "write -z 1M 4k",  # no zero flag in v2: real zeros
            "discard 0 64k",
            options="compat=0.10",
        )
    ),
    "qcow2-cluster512": Entry(
        qcow2(
            "qcow2/c512.qcow2",
            4 * MiB,
            "write -P 0x33 0 1k",
            "write -P 0x34 102500 1000",
            "write -z 200k 2k",
            "write -P 0x36 1M 64k",  # spans several L2 tables (64 entries each)
            "write -P 0x35 4193792 512",  # the last sector
            options="cluster_size=512",
        )
    ),
    "qcow2-cluster2M": Entry(
        qcow2(
            "qcow2/c2m.qcow2",
            8 * MiB,
            "write -P 0x44 3149824 4k",
            "write -P 0x45 6M 2M",
            "write -z 7M 4k",
            "write -z 2M 2M",
            options="cluster_size=2M",
        )
    ),
    **{f"qcow2-prealloc-{mode}": Entry(_prealloc(mode)) for mode in ("metadata", "falloc", "full")},
    "qcow2-lazy-refcounts": Entry(
        qcow2("qcow2/lazy.qcow2", 2 * MiB, "write -P 0x70 0 128k", options="lazy_refcounts=on")
    ),
    "qcow2-lazy-dirty": Entry(_qcow2_lazy_dirty),
    "qcow2-refcount-bits-1": Entry(
        qcow2(
            "qcow2/rb1.qcow2",
            1 * MiB,
            "write -P 0x71 0 64k",
            "write -P 0x72 700k 3k",
            options="refcount_bits=1",
        )
    ),
    "qcow2-snapshot": Entry(_qcow2_snapshot),
    "qcow2-leaked-cluster": Entry(_qcow2_leak),
    "qcow2-corrupt-refcount": Entry(_qcow2_corrupt),
    # ---- compressed
    "qcow2-zlib": Entry(compressed("compressed/zlib.qcow2", "compress-source")),
    "qcow2-zlib-cluster4k": Entry(
        compressed("compressed/zlib-4k.qcow2", "compress-source", options="cluster_size=4k")
    ),
    "qcow2-zstd": Entry(
        compressed(
            "compressed/zstd.qcow2",
            "compress-source",
            "write -c -P 0x77 1536k 64k",  # a compressed write into the image
            "write -P 0x78 1M 4k",  # a plain write over part of a compressed cluster
            options="compression_type=zstd",
        )
    ),
    "qcow2-zstd-extl2": Entry(
        compressed(
            "compressed/zstd-extl2.qcow2",
            "compress-source",
            options="compression_type=zstd,extended_l2=on",
        )
    ),
    # ---- backing chains (relative backing names, resolved next to the overlay)
    "chain-mid": Entry(
        qcow2(
            "chain/mid.qcow2",
            None,
            "write -P 0x10 64k 64k",
            "write -z 256k 64k",  # zeros over backing data
            "write -P 0x11 1573376 512",
            "discard 512k 64k",
            backing="chain-base",
        ),
        backing=True,
    ),
    "chain-top": Entry(
        qcow2(
            "chain/top.qcow2",
            3 * MiB,  # bigger than its backing file
            "write -P 0x20 128k 4k",
            "write -z 0 4k",
            "write -z 1536k 4k",
            "write -P 0x21 2560k 64k",  # beyond the backing file's end
            backing="chain-mid",
        ),
        backing=True,
    ),
    "chain-small-overlay": Entry(
        qcow2(
            "chain/small.qcow2",
            1 * MiB + 512,  # smaller than its backing file
            "write -P 0x30 512k 4k",
            "write -P 0x31 1M 512",
            backing="chain-mid",
        ),
        backing=True,
    ),
    "chain-compat0.10-over-raw": Entry(
        qcow2(
            "chain/v2.qcow2",
            None,
            "write -z 0 64k",  # v2 has no zero flag: zeros over backing data must be real
            "write -P 0x40 65636 10",
            options="compat=0.10",
            backing="chain-base",
        ),
        backing=True,
    ),
    "backing-odd-length-raw": Entry(
        qcow2("oddback/top.qcow2", None, "write -P 0x5b 0 512", backing="odd-length-raw"),
        backing=True,
    ),
    # ---- probed backing formats (no backing-format header extension)
    "probed-qcow2-backing": Entry(
        without_backing_format(
            qcow2("probe/top.qcow2", None, "write -P 0x51 64k 4k", backing="probe-base")
        ),
        backing=True,
    ),
    "probed-raw-backing": Entry(
        without_backing_format(
            qcow2("probe/top-raw.qcow2", None, "write -P 0x53 512k 4k", backing="probe-base-raw")
        ),
        backing=True,
    ),
    # ---- extended L2 (32 subclusters of 2 KiB in 64 KiB clusters)
    "qcow2-extl2-backing": Entry(
        qcow2(
            "extl2/extl2.qcow2",
            2 * MiB,
            "write -P 0x5a 4k 4k",  # two subclusters; the rest still shows the backing file
            "write -P 0x5b 66560 1k",  # half a subcluster: COW from the backing file
            "write -z 135168 4k",  # zero subclusters in an unallocated cluster
            "write -P 0x5c 192k 64k",
            "write -z 204800 2k",  # one zero subcluster in an allocated cluster
            "write -P 0x5d 1052672 4k",  # beyond the backing file
            options="extended_l2=on",
            backing="extl2-base",
        ),
        backing=True,
    ),
    "qcow2-extl2": Entry(
        qcow2(
            "extl2/plain.qcow2",
            1 * MiB,
            "write -P 0x61 4k 4k",
            "write -P 0x62 67584 6k",
            "write -z 69632 2k",
            "write -z 256k 64k",
            "write -P 0x63 512k 64k",
            "write -z 557056 4k",
            options="extended_l2=on",
        )
    ),
    # ---- opened by a relative path from another directory
    "relative-path-in-subdir": Entry(
        qcow2("rel/sub/img.qcow2", None, "write -P 0x81 32k 4k", backing="rel-base"),
        cwd="rel",
        backing=True,
    ),
}

IMAGE_IDS = list(IMAGES)
QCOW2_IDS = [i for i, e in IMAGES.items() if e.fmt == "qcow2"]
BACKING_IDS = [i for i, e in IMAGES.items() if e.backing]
NONEMPTY_IDS = [i for i in IMAGE_IDS if i not in ("raw-empty", "qcow2-empty")]


@dataclass(frozen=True)
class ReadImage:
    """A corpus image as the tests name it."""

    id: str
    fmt: str
    path: Path  # absolute
    arg: str  # the name given on command lines (relative to cwd when cwd is set)
    cwd: Path | None


class Listing(Mapping[str, ReadImage]):
    """IMAGES by id, each made by the corpus when first looked up."""

    def __init__(self, corpus: Corpus) -> None:
        self._corpus = corpus

    def __getitem__(self, image_id: str) -> ReadImage:
        entry = IMAGES[image_id]
        path = self._corpus[image_id].path.resolve()
        if entry.cwd is None:
            return ReadImage(image_id, entry.fmt, path, str(path), None)
        cwd = self._corpus.root / entry.cwd
        return ReadImage(image_id, entry.fmt, path, os.path.relpath(path, cwd), cwd)

    def __iter__(self) -> Iterator[str]:
        return iter(IMAGES)

    def __len__(self) -> int:
        return len(IMAGES)


class ReadCorpus:
    """The shared corpus as the read tests use it: its ``images`` by id, and their contents
    as ``qemu-img convert -O raw`` writes them (the oracle most tests compare against)."""

    def __init__(self, corpus: Corpus, refdir: Path, run_qemu_img: RunCommand) -> None:
        self.images = Listing(corpus)
        self._refdir = refdir
        self._run_qemu_img = run_qemu_img
        self._refs: dict[str, Path] = {}

    def reference(self, image: ReadImage) -> Path:
        """``qemu-img convert -O raw`` of the image, made once (absolute path)."""
        if image.id not in self._refs:
            out = self._refdir / f"{image.id}.raw"
            proc = self._run_qemu_img("convert", "-f", image.fmt, "-O", "raw", image.path, out)
            assert proc.returncode == 0, f"qemu-img convert {image.id}: {proc.stderr}"
            self._refs[image.id] = out
        return self._refs[image.id]


@pytest.fixture(scope="session")
def corpus(
    tmp_path_factory: pytest.TempPathFactory, run_qemu_img: RunCommand, run_qemu_io: RunCommand
) -> ReadCorpus:
    root = tmp_path_factory.mktemp("corpus")
    recipes = {**SOURCES, **{image_id: e.make for image_id, e in IMAGES.items()}}
    return ReadCorpus(
        Corpus(root, run_qemu_img, run_qemu_io, recipes),
        tmp_path_factory.mktemp("references"),
        run_qemu_img,
    )


def _enter(corpus: ReadCorpus, image_id: str, monkeypatch: pytest.MonkeyPatch) -> ReadImage:
    image = corpus.images[image_id]
    if image.cwd is not None:
        monkeypatch.chdir(image.cwd)  # both tools inherit it
    return image


@pytest.fixture(params=IMAGE_IDS)
def image(
    request: pytest.FixtureRequest, corpus: ReadCorpus, monkeypatch: pytest.MonkeyPatch
) -> ReadImage:
    return _enter(corpus, request.param, monkeypatch)


@pytest.fixture(params=QCOW2_IDS)
def qcow2_image(
    request: pytest.FixtureRequest, corpus: ReadCorpus, monkeypatch: pytest.MonkeyPatch
) -> ReadImage:
    return _enter(corpus, request.param, monkeypatch)


@pytest.fixture(params=BACKING_IDS)
def backed_image(
    request: pytest.FixtureRequest, corpus: ReadCorpus, monkeypatch: pytest.MonkeyPatch
) -> ReadImage:
    return _enter(corpus, request.param, monkeypatch)


@pytest.fixture(params=NONEMPTY_IDS)
def nonempty_image(
    request: pytest.FixtureRequest, corpus: ReadCorpus, monkeypatch: pytest.MonkeyPatch
) -> ReadImage:
    return _enter(corpus, request.param, monkeypatch)


def test_corpus_is_what_the_recipes_say(corpus: ReadCorpus, run_qemu_img: RunCommand) -> None:
    """The oracle's own view of the corpus: formats, backing files, dirty and corrupt images."""
    for image in corpus.images.values():
        proc = run_qemu_img("info", "--output=json", image.path)
        assert proc.returncode == 0, f"{image.id}: {proc.stderr}"
        info = json.loads(proc.stdout)
        assert info["format"] == image.fmt, image.id
        has_backing = IMAGES[image.id].backing
        assert ("backing-filename" in info) == has_backing, image.id
    expected_checks = {
        "qcow2-leaked-cluster": 3,
        "qcow2-corrupt-refcount": 2,
        "qcow2-lazy-dirty": 2,
    }
    for image_id, status in expected_checks.items():
        proc = run_qemu_img("check", corpus.images[image_id].path)
        assert proc.returncode == status, f"{image_id}: {proc.stdout}{proc.stderr}"


# --------------------------------------------------------------------------------------------
# Comparing the two tools


def qemu_to_qimg(stderr: str) -> str:
    """qemu-img's stderr as qimg is expected to print it (its own program name)."""
    return re.sub(r"^qemu-img: ", "qimg: ", stderr, flags=re.MULTILINE)


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}"


def assert_same_status(
    ours: subprocess.CompletedProcess[str], theirs: subprocess.CompletedProcess[str]
) -> None:
    if ours.returncode != theirs.returncode:
        pytest.fail(
            f"exit status differs\n=== qimg: {describe(ours)}\n=== qemu-img: {describe(theirs)}",
            False,
        )


# Errors qimg words its own way on purpose (naming the image and what to do): qemu-img's
# message -> a fragment of qimg's one-line message.
QIMG_WORDING = {
    "This image format does not support checks": "images have no metadata to check",
    "File contains external, encrypted or compressed clusters.": "use --output=json",
    "qcow2 header too short": "qcow2 header is truncated",
}


def reworded(ours: str, theirs: str) -> bool:
    """Whether qemu-img's stderr is one of the deliberately reworded errors and qimg
    printed its own version of it as one ``qimg:`` line."""
    for qemu_text, qimg_fragment in QIMG_WORDING.items():
        if qemu_text in theirs:
            lines = ours.splitlines()
            return len(lines) == 1 and lines[0].startswith("qimg: ") and qimg_fragment in ours
    return False


def assert_same_run(
    ours: subprocess.CompletedProcess[str], theirs: subprocess.CompletedProcess[str]
) -> None:
    """Same exit status, same stdout, same stderr (modulo the program name and the
    deliberately reworded errors of QIMG_WORDING)."""
    assert_same_status(ours, theirs)
    if ours.stdout != theirs.stdout:
        pytest.fail("stdout differs\n" + unified_diff(ours.stdout, theirs.stdout), False)
    if reworded(ours.stderr, theirs.stderr):
        return
    expected_stderr = qemu_to_qimg(theirs.stderr)
    if ours.stderr != expected_stderr:
        pytest.fail("stderr differs\n" + unified_diff(ours.stderr, expected_stderr), False)


def unified_diff(ours: str, theirs: str) -> str:
    """qemu-img's text to qimg's, as a unified diff (``-`` qemu-img, ``+`` qimg)."""
    lines = difflib.unified_diff(
        theirs.splitlines(keepends=True),
        ours.splitlines(keepends=True),
        "qemu-img",
        "qimg",
        n=2,
    )
    return "".join(line if line.endswith("\n") else line + "\\ no newline\n" for line in lines)


def run_both(
    run_qimg: RunCommand, run_qemu_img: RunCommand, *args: str | Path | int
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    return run_qimg(*args), run_qemu_img(*args)


_DISK_USAGE = re.compile(r'("actual-size": )\d+|(disk size: ).*')


def assert_same_info(run_qimg: RunCommand, run_qemu_img: RunCommand, *args: str | Path) -> None:
    """Like assert_same_run, but disk usage may have changed between the runs.

    qemu-img runs before and after qimg; only if its two runs disagree (the files' allocation
    changed meanwhile) are ``actual-size`` and ``disk size`` left out of the comparison.
    """
    theirs = run_qemu_img(*args)
    ours = run_qimg(*args)
    again = run_qemu_img(*args)
    if theirs.stdout != again.stdout:

        def mask(text: str) -> str:
            return _DISK_USAGE.sub(lambda m: (m.group(1) or m.group(2)) + "<masked>", text)

        ours = subprocess.CompletedProcess(
            ours.args, ours.returncode, mask(ours.stdout), ours.stderr
        )
        theirs = subprocess.CompletedProcess(
            theirs.args, theirs.returncode, mask(theirs.stdout), theirs.stderr
        )
    if theirs.returncode == ours.returncode == 0 and args[1:2] == ("--output=json",):
        assert json.loads(ours.stdout) == json.loads(theirs.stdout)  # then the text: key order
    assert_same_run(ours, theirs)


# --------------------------------------------------------------------------------------------
# Sparse files


def data_ranges(path: Path) -> list[tuple[int, int]]:
    """Byte ranges of *path* that are not holes (SEEK_DATA / SEEK_HOLE)."""
    with path.open("rb") as f:
        return seek_data_ranges(f.fileno(), os.fstat(f.fileno()).st_size)


def holes(ranges: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    gaps: list[tuple[int, int]] = []
    pos = 0
    for lo, hi in ranges:
        if lo > pos:
            gaps.append((pos, lo))
        pos = max(pos, hi)
    if pos < size:
        gaps.append((pos, size))
    return gaps


def intersect(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(max(lo, blo), min(hi, bhi)) for lo, hi in a for blo, bhi in b if lo < bhi and blo < hi]


def assert_no_less_sparse(ours: Path, theirs: Path) -> None:
    """Every hole in qemu-img's output is a hole in qimg's, and qimg uses no more blocks."""
    size = theirs.stat().st_size
    ours_data, theirs_data = data_ranges(ours), data_ranges(theirs)
    extra = intersect(ours_data, holes(theirs_data, size))
    assert not extra, (
        f"qimg wrote data where qemu-img left holes: {extra[:8]}\n"
        f"qimg data {ours_data[:16]}\nqemu-img data {theirs_data[:16]}"
    )
    assert ours.stat().st_blocks <= theirs.stat().st_blocks


def assert_no_more_holes(ours: Path, theirs: Path) -> None:
    """Every range qemu-img allocated (e.g. with -S 0) is allocated in qimg's output too."""
    size = theirs.stat().st_size
    ours_data, theirs_data = data_ranges(ours), data_ranges(theirs)
    missing = intersect(theirs_data, holes(ours_data, size))
    assert not missing, f"qimg left holes where qemu-img allocated: {missing[:8]}"


def first_difference(a: bytes, b: bytes) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"first difference at byte {i} ({i:#x}): qimg {x:#04x}, qemu-img {y:#04x}"
    return f"lengths differ: qimg {len(a)}, qemu-img {len(b)}"


def assert_equal_bytes(ours: bytes | bytearray | memoryview, theirs: bytes, what: str) -> None:
    # Not a plain assert: pytest's assertion-pass hook (enabled in pyproject.toml) would build
    # the repr of megabytes of operands on every passing comparison.
    if ours != theirs:
        pytest.fail(f"{what}: {first_difference(bytes(ours), theirs)}", False)


def assert_same_bytes(ours: Path, theirs: Path) -> None:
    assert_equal_bytes(ours.read_bytes(), theirs.read_bytes(), f"{ours} vs {theirs}")


# --------------------------------------------------------------------------------------------
# 1. convert -O raw


def test_convert_to_raw_matches_qemu_img(
    image: ReadImage, tmp_path: Path, run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    ours, theirs = tmp_path / "qimg.raw", tmp_path / "qemu-img.raw"
    assert_same_run(
        run_qimg("convert", "-O", "raw", image.arg, ours),
        run_qemu_img("convert", "-O", "raw", image.arg, theirs),
    )
    assert_same_bytes(ours, theirs)
    assert_no_less_sparse(ours, theirs)


CONVERT_VARIANT_IDS = ["qcow2-patterns", "chain-top", "qcow2-extl2-backing", "raw-sparse"]


@pytest.mark.parametrize("sparse", ["0", "64k", "512"])
@pytest.mark.parametrize("image_id", CONVERT_VARIANT_IDS)
def test_convert_sparse_size_matches_qemu_img(
    image_id: str,
    sparse: str,
    corpus: ReadCorpus,
    tmp_path: Path,
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
) -> None:
    image = corpus.images[image_id]
    ours, theirs = tmp_path / "qimg.raw", tmp_path / "qemu-img.raw"
    args = ["-f", image.fmt, "-O", "raw", "-S", sparse, image.arg]
    assert_same_run(run_qimg("convert", *args, ours), run_qemu_img("convert", *args, theirs))
    assert_same_bytes(ours, theirs)
    if sparse == "0":  # "the destination image will always be fully allocated"
        assert_no_more_holes(ours, theirs)
    else:
        assert_no_less_sparse(ours, theirs)


@pytest.mark.parametrize("extra", [0, 64 * KiB], ids=["same-size", "larger-target"])
@pytest.mark.parametrize("image_id", CONVERT_VARIANT_IDS)
def test_convert_into_existing_target_matches_qemu_img(
    image_id: str,
    extra: int,
    corpus: ReadCorpus,
    tmp_path: Path,
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
) -> None:
    """-n: the target is neither created nor truncated, and its old 0xff bytes are overwritten."""
    image = corpus.images[image_id]
    size = corpus.reference(image).stat().st_size
    ours, theirs = tmp_path / "qimg.raw", tmp_path / "qemu-img.raw"
    for target in (ours, theirs):
        target.write_bytes(fill(0xFF, size + extra))
    args = ["-n", "-f", image.fmt, "-O", "raw", image.arg]
    assert_same_run(run_qimg("convert", *args, ours), run_qemu_img("convert", *args, theirs))
    assert_same_bytes(ours, theirs)


# --------------------------------------------------------------------------------------------
# 2. map


@pytest.mark.parametrize("output", ["json", "human"])
def test_map_matches_qemu_img(
    image: ReadImage, output: str, run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    assert_same_run(*run_both(run_qimg, run_qemu_img, "map", f"--output={output}", image.arg))


@pytest.mark.parametrize(
    "window",
    [
        ["--start-offset=65536"],
        ["--max-length=1000000"],
        ["--start-offset=100000", "--max-length=300000"],
        ["--start-offset=1000", "--max-length=1"],
        ["--start-offset=64M"],
        ["--max-length=0"],
    ],
    ids=lambda w: "+".join(a.lstrip("-") for a in w),
)
@pytest.mark.parametrize("output", ["json", "human"])
@pytest.mark.parametrize("image_id", ["qcow2-patterns", "chain-top", "raw-odd-length"])
def test_map_window_matches_qemu_img(
    image_id: str,
    window: list[str],
    output: str,
    corpus: ReadCorpus,
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
) -> None:
    image = corpus.images[image_id]
    argv = ["map", "-f", image.fmt, f"--output={output}", *window, image.arg]
    assert_same_run(*run_both(run_qimg, run_qemu_img, *argv))


# --------------------------------------------------------------------------------------------
# 3. info


@pytest.mark.parametrize("output", ["json", "human"])
def test_info_matches_qemu_img(
    image: ReadImage, output: str, run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    assert_same_info(run_qimg, run_qemu_img, "info", f"--output={output}", image.arg)


def test_info_with_format_matches_qemu_img(
    qcow2_image: ReadImage, run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    image = qcow2_image
    assert_same_info(run_qimg, run_qemu_img, "info", "--output=json", "-f", image.fmt, image.arg)


@pytest.mark.parametrize("output", ["json", "human"])
def test_info_backing_chain_matches_qemu_img(
    backed_image: ReadImage, output: str, run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    image = backed_image
    assert_same_info(
        run_qimg, run_qemu_img, "info", f"--output={output}", "--backing-chain", image.arg
    )


def test_info_backing_chain_of_raw_file_matches_qemu_img(
    corpus: ReadCorpus, run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    image = corpus.images["raw-sparse"]
    assert_same_info(run_qimg, run_qemu_img, "info", "--output=json", "--backing-chain", image.arg)


# --------------------------------------------------------------------------------------------
# 4. check


@pytest.mark.parametrize("output", ["json", "human"])
def test_check_matches_qemu_img(
    image: ReadImage, output: str, run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    assert_same_run(*run_both(run_qimg, run_qemu_img, "check", f"--output={output}", image.arg))


@pytest.mark.parametrize(
    "image_id", ["qcow2-patterns", "qcow2-leaked-cluster", "qcow2-corrupt-refcount", "raw-sparse"]
)
def test_check_with_format_matches_qemu_img(
    image_id: str, corpus: ReadCorpus, run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    image = corpus.images[image_id]
    argv = ["check", "-f", image.fmt, image.arg]
    assert_same_run(*run_both(run_qimg, run_qemu_img, *argv))


# --------------------------------------------------------------------------------------------
# 5. compare


def test_compare_with_own_raw_conversion_is_identical(
    image: ReadImage, corpus: ReadCorpus, run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    ref = corpus.reference(image)
    ours, theirs = run_both(run_qimg, run_qemu_img, "compare", image.arg, ref)
    assert theirs.returncode == 0, describe(theirs)
    assert_same_run(ours, theirs)


def _flip_one_byte(run_qemu_io: RunCommand, source: Path, target: Path, offset: int) -> None:
    shutil.copyfile(source, target)
    with source.open("rb") as f:
        f.seek(offset)
        old = f.read(1)[0]
    proc = run_qemu_io("-f", "raw", "-c", f"write -P {old ^ 0xFF:#x} {offset} 1", target)
    assert proc.returncode == 0, describe(proc)


def _diff_offset(ref: Path, image_id: str, where: str) -> int:
    data = ref.read_bytes()
    rng = random.Random(f"{image_id}/{where}")
    start = rng.randrange(len(data))
    if where == "random":
        return start
    for step in range(len(data)):  # the next non-zero byte, wrapping around
        offset = (start + step) % len(data)
        if data[offset]:
            return offset
    raise AssertionError(f"{image_id} reads as all zeros; no data byte to change")


def assert_same_one_byte_difference(
    image: ReadImage,
    offset: int,
    corpus: ReadCorpus,
    tmp_path: Path,
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    run_qemu_io: RunCommand,
) -> None:
    ref = corpus.reference(image)
    changed = tmp_path / "changed.raw"
    _flip_one_byte(run_qemu_io, ref, changed, offset)
    ours, theirs = run_both(
        run_qimg, run_qemu_img, "compare", "-f", image.fmt, "-F", "raw", image.arg, changed
    )
    assert theirs.returncode == 1, describe(theirs)  # the test's own premise
    assert_same_run(ours, theirs)


@pytest.mark.parametrize("where", ["random", "in-data"])
def test_compare_one_byte_difference_matches_qemu_img(
    nonempty_image: ReadImage,
    where: str,
    corpus: ReadCorpus,
    tmp_path: Path,
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    run_qemu_io: RunCommand,
) -> None:
    image = nonempty_image
    offset = _diff_offset(corpus.reference(image), image.id, where)
    assert_same_one_byte_difference(
        image, offset, corpus, tmp_path, run_qimg, run_qemu_img, run_qemu_io
    )


@pytest.mark.parametrize(
    "image_id",
    ["raw-odd-length", "qcow2-odd-size", "chain-small-overlay", "backing-odd-length-raw"],
)
def test_compare_last_byte_difference_matches_qemu_img(
    image_id: str,
    corpus: ReadCorpus,
    tmp_path: Path,
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    run_qemu_io: RunCommand,
) -> None:
    image = corpus.images[image_id]
    offset = corpus.reference(image).stat().st_size - 1
    assert_same_one_byte_difference(
        image, offset, corpus, tmp_path, run_qimg, run_qemu_img, run_qemu_io
    )


SIZE_COMPARE_IDS = ["qcow2-patterns", "chain-top", "raw-odd-length"]


@pytest.mark.parametrize("strict", [[], ["-s"]], ids=["lax", "strict"])
@pytest.mark.parametrize(
    ("change", "order"),
    [
        ("grown-zeros", "image-first"),
        ("grown-data", "image-first"),
        ("shrunk", "image-first"),
        ("grown-data", "copy-first"),
    ],
    ids=["grown-zeros", "grown-data", "shrunk", "grown-data-copy-first"],
)
@pytest.mark.parametrize("image_id", SIZE_COMPARE_IDS)
def test_compare_different_sizes_matches_qemu_img(
    image_id: str,
    change: str,
    order: str,
    strict: list[str],
    corpus: ReadCorpus,
    tmp_path: Path,
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
) -> None:
    image = corpus.images[image_id]
    ref = corpus.reference(image)
    other = tmp_path / "other.raw"
    shutil.copyfile(ref, other)
    size = ref.stat().st_size
    with other.open("r+b") as f:
        if change == "grown-zeros":
            f.truncate(size + 64 * KiB)
        elif change == "grown-data":
            f.truncate(size + 64 * KiB)
            f.seek(size + 4 * KiB + 3)
            f.write(b"\x01")
        else:
            f.truncate(size - 512)
    pair: list[str | Path] = [image.arg, other]
    formats = ["-f", image.fmt, "-F", "raw"]
    if order == "copy-first":
        pair.reverse()
        formats = ["-f", "raw", "-F", image.fmt]
    assert_same_run(*run_both(run_qimg, run_qemu_img, "compare", *strict, *formats, *pair))


COMPARE_PAIRS = [
    ("qcow2-zlib", "qcow2-zlib-cluster4k"),  # same data, different layouts
    ("qcow2-zlib", "qcow2-zstd-extl2"),
    ("qcow2-zlib", "qcow2-zstd"),  # differ
    ("chain-top", "chain-mid"),  # sizes differ, top's extra area has data
    ("chain-mid", "chain-small-overlay"),
    ("chain-mid", "chain-compat0.10-over-raw"),
    ("qcow2-prealloc-metadata", "qcow2-prealloc-full"),
    ("raw-sparse", "qcow2-patterns"),
]


@pytest.mark.parametrize("strict", [[], ["-s"]], ids=["lax", "strict"])
@pytest.mark.parametrize("pair", COMPARE_PAIRS, ids=lambda p: f"{p[0]}-vs-{p[1]}")
def test_compare_two_images_matches_qemu_img(
    pair: tuple[str, str],
    strict: list[str],
    corpus: ReadCorpus,
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
) -> None:
    a, b = (corpus.images[i] for i in pair)
    argv = ["compare", *strict, a.arg, b.arg]
    assert_same_run(*run_both(run_qimg, run_qemu_img, *argv))


_PROGRESS = re.compile(rb" *\(\d+\.\d\d/100%\)\r")


def _run_bytes(argv: list[str | Path]) -> subprocess.CompletedProcess[bytes]:
    """Like the run_* fixtures, but in bytes: ``\\r`` must not become a newline."""
    return subprocess.run(
        argv, capture_output=True, check=False, timeout=300, stdin=subprocess.DEVNULL
    )


@pytest.mark.parametrize("command", ["compare-identical", "compare-one-byte-changed", "convert"])
def test_progress_output_ends_like_qemu_img(
    command: str,
    corpus: ReadCorpus,
    tmp_path: Path,
    qemu_img: str,
    run_qemu_io: RunCommand,
) -> None:
    """-p: the ticks in between may differ, but the first and last tick and the rest do not."""
    image = corpus.images["qcow2-patterns"]
    ref = corpus.reference(image)
    if command == "convert":
        ours_args: list[str | Path] = ["convert", "-p", "-O", "raw", image.arg, tmp_path / "a"]
        theirs_args: list[str | Path] = ["convert", "-p", "-O", "raw", image.arg, tmp_path / "b"]
    else:
        other = ref
        if command == "compare-one-byte-changed":
            other = tmp_path / "changed.raw"
            _flip_one_byte(run_qemu_io, ref, other, 3 * MiB + 5)
        ours_args = theirs_args = ["compare", "-p", image.arg, other]
    ours = _run_bytes([sys.executable, "-m", "qimg", *ours_args])
    theirs = _run_bytes([qemu_img, *theirs_args])
    assert ours.returncode == theirs.returncode, (ours, theirs)
    ticks = (_PROGRESS.findall(ours.stdout), _PROGRESS.findall(theirs.stdout))
    assert (ticks[0][:1], ticks[0][-1:]) == (ticks[1][:1], ticks[1][-1:]), (
        f"first/last progress ticks differ: qimg {ticks[0]!r}, qemu-img {ticks[1]!r}"
    )
    assert _PROGRESS.sub(b"", ours.stdout) == _PROGRESS.sub(b"", theirs.stdout), (
        f"qimg stdout {ours.stdout!r}\nqemu-img stdout {theirs.stdout!r}"
    )
    assert ours.stderr.decode() == qemu_to_qimg(theirs.stderr.decode())


# --------------------------------------------------------------------------------------------
# 6. measure on qcow2 inputs


@pytest.mark.parametrize(
    "options",
    [[], ["--output=json", "-o", "cluster_size=4k"]],
    ids=["human", "json-cluster4k"],
)
def test_measure_qcow2_input_matches_qemu_img(
    qcow2_image: ReadImage, options: list[str], run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    argv = ["measure", *options, "-O", "qcow2", qcow2_image.arg]
    assert_same_run(*run_both(run_qimg, run_qemu_img, *argv))


# --------------------------------------------------------------------------------------------
# Images that cannot be read: the same exit status, and the same reason at the end of the message


@pytest.fixture(scope="module")
def broken(
    tmp_path_factory: pytest.TempPathFactory, corpus: ReadCorpus, run_qemu_img: RunCommand
) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("broken")
    truncated = directory / "truncated.qcow2"
    truncated.write_bytes(corpus.images["qcow2-patterns"].path.read_bytes()[:100])
    orphan = directory / "orphan.qcow2"
    proc = run_qemu_img(
        "create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", orphan, "1M"
    )
    assert proc.returncode == 0, proc.stderr
    return {
        "missing": directory / "missing.qcow2",
        "raw": corpus.images["raw-sparse"].path,
        "truncated": truncated,
        "orphan": orphan,
        "out": directory / "out.raw",
    }


ERROR_CASES = {
    "info-missing-file": ["info", "{missing}"],
    "info-raw-as-qcow2": ["info", "-f", "qcow2", "{raw}"],
    "info-truncated-header": ["info", "{truncated}"],
    "info-backing-chain-missing-backing": ["info", "--backing-chain", "{orphan}"],
    "map-raw-as-qcow2": ["map", "-f", "qcow2", "{raw}"],
    "map-missing-backing": ["map", "{orphan}"],
    "check-missing-file": ["check", "{missing}"],
    "check-missing-backing": ["check", "{orphan}"],
    "compare-missing-file": ["compare", "{missing}", "{raw}"],
    "compare-raw-as-qcow2": ["compare", "-f", "qcow2", "{raw}", "{raw}"],
    "compare-missing-backing": ["compare", "{raw}", "{orphan}"],
    "convert-missing-file": ["convert", "-O", "raw", "{missing}", "{out}"],
    "convert-missing-backing": ["convert", "-O", "raw", "{orphan}", "{out}"],
    "measure-missing-file": ["measure", "-O", "qcow2", "{missing}"],
}


@pytest.mark.parametrize("argv", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_unreadable_image_fails_like_qemu_img(
    argv: list[str], broken: dict[str, Path], run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    args = [str(broken[a[1:-1]]) if a.startswith("{") else a for a in argv]
    ours, theirs = run_both(run_qimg, run_qemu_img, *args)
    assert theirs.returncode != 0, describe(theirs)  # the case's own premise
    assert_same_status(ours, theirs)
    assert ours.stdout == theirs.stdout
    reason = theirs.stderr.rstrip("\n").rsplit(": ", 1)[-1]
    if reworded(ours.stderr, theirs.stderr):
        return
    if not (ours.stderr.startswith("qimg: ") and ours.stderr.endswith(f": {reason}\n")):
        pytest.fail(
            f"qimg's message does not end in qemu-img's reason {reason!r}\n"
            f"qimg:     {ours.stderr}qemu-img: {theirs.stderr}",
            False,
        )


@pytest.mark.parametrize("output", ["json", "human"])
def test_info_without_backing_chain_does_not_open_the_backing_file(
    output: str, broken: dict[str, Path], run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    """qemu-img info reads only the image itself: a missing backing file is no error."""
    assert_same_info(run_qimg, run_qemu_img, "info", f"--output={output}", broken["orphan"])


# --------------------------------------------------------------------------------------------
# 7. The Python API (qimg.open, qimg.check), against the same oracle


@pytest.fixture
def opened(image: ReadImage) -> Iterator[qimg.Image]:
    with qimg.open(image.arg) as handle:
        yield handle


def test_api_reads_like_qemu_img_convert(
    opened: qimg.Image, image: ReadImage, corpus: ReadCorpus
) -> None:
    ref = corpus.reference(image).read_bytes()
    assert (opened.size, opened.format) == (len(ref), image.fmt)
    rng = random.Random(image.id)
    spans = [(0, len(ref)), (0, 0), (len(ref), 0)]
    if ref:
        spans += [(len(ref) - 1, 1), (0, 1)]
        spans += [
            (off, rng.randrange(min(256 * KiB, len(ref) - off) + 1))
            for off in (rng.randrange(len(ref)) for _ in range(32))
        ]
    for offset, length in spans:
        expected = ref[offset : offset + length]
        assert_equal_bytes(opened.read(offset, length), expected, f"read({offset}, {length})")
        buf = bytearray(length)
        assert opened.readinto(offset, buf) == length, f"readinto({offset}, <{length} bytes>)"
        assert_equal_bytes(buf, expected, f"readinto({offset}, <{length} bytes>)")
        view = memoryview(bytearray(length + 2))[1:-1]
        assert opened.readinto(offset, view) == length
        assert_equal_bytes(view, expected, f"readinto({offset}, <memoryview of {length}>)")


def test_api_open_with_explicit_format_reads_the_same(image: ReadImage, corpus: ReadCorpus) -> None:
    ref = corpus.reference(image).read_bytes()
    with qimg.open(image.arg, image.fmt) as img:
        assert_equal_bytes(img.read(0, len(ref)), ref, f"read(0, {len(ref)})")


_MAP_KEYS = ("start", "length", "depth", "present", "zero", "data", "compressed", "offset")


def _extents(entries: list[Any]) -> list[dict[str, Any]]:
    """qemu-img map JSON entries and MapExtent values, in one comparable form."""
    return [
        {k: e.get(k) if isinstance(e, dict) else getattr(e, k) for k in _MAP_KEYS} for e in entries
    ]


def _qemu_map(run_qemu_img: RunCommand, *args: str) -> list[dict[str, Any]]:
    proc = run_qemu_img("map", "--output=json", *args)
    assert proc.returncode == 0, proc.stderr
    return _extents(json.loads(proc.stdout))


def test_api_map_matches_qemu_img(
    opened: qimg.Image, image: ReadImage, run_qemu_img: RunCommand
) -> None:
    assert _extents(opened.map()) == _qemu_map(run_qemu_img, image.arg)


@pytest.mark.parametrize(("start", "length"), [(65536, None), (100000, 300000), (1000, 1)], ids=str)
@pytest.mark.parametrize("image_id", ["qcow2-patterns", "chain-top", "raw-odd-length"])
def test_api_map_window_matches_qemu_img(
    image_id: str, start: int, length: int | None, corpus: ReadCorpus, run_qemu_img: RunCommand
) -> None:
    image = corpus.images[image_id]
    window = [f"--start-offset={start}"] + ([] if length is None else [f"--max-length={length}"])
    with qimg.open(image.arg) as img:
        ours = _extents(img.map(start, length))
    assert ours == _qemu_map(run_qemu_img, *window, image.arg)


def _without_actual_size(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_actual_size(v) for k, v in value.items() if k != "actual-size"}
    if isinstance(value, list):
        return [_without_actual_size(v) for v in value]
    return value


def test_api_info_matches_qemu_img(
    opened: qimg.Image, image: ReadImage, run_qemu_img: RunCommand
) -> None:
    proc = run_qemu_img("info", "--output=json", image.arg)
    assert proc.returncode == 0, proc.stderr
    theirs = _without_actual_size(json.loads(proc.stdout))
    assert _without_actual_size(opened.info()) == theirs


def test_api_check_matches_qemu_img(qcow2_image: ReadImage, run_qemu_img: RunCommand) -> None:
    """Every ImageCheck member, the exit status, and one message per stderr line."""
    image = qcow2_image
    proc = run_qemu_img("check", "--output=json", image.arg)
    theirs: dict[str, Any] = json.loads(proc.stdout)
    report = qimg.check(image.arg)
    assert report.as_json() == theirs
    for key, value in theirs.items():
        assert getattr(report, key.replace("-", "_")) == value, key
    assert report.exit_status == proc.returncode
    assert report.messages == proc.stderr.splitlines()


def test_api_check_refuses_raw_images(corpus: ReadCorpus) -> None:
    with pytest.raises(qimg.QimgError, match="does not support checks"):
        qimg.check(corpus.images["raw-sparse"].arg)


@pytest.mark.parametrize("name", ["\u00e9\u2603.raw", "\U0001f600.raw", "tab\tname.raw"])
def test_info_json_escapes_file_names_as_qemu_img_does(
    tmp_path: Path, name: str, run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    path = tmp_path / name
    path.write_bytes(bytes(65536))
    ours = run_qimg("info", "--output=json", "-f", "raw", path)
    theirs = run_qemu_img("info", "--output=json", "-f", "raw", path)
    assert ours.returncode == theirs.returncode == 0, ours.stderr
    # Member order and escapes (upper-case \u digits, surrogate pairs) as qemu-img writes them.
    line = next(x for x in theirs.stdout.splitlines() if '"filename"' in x)
    assert line in ours.stdout.splitlines()
