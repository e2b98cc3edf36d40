"""``qimg convert -O qcow2`` (and ``-n`` into raw) against ``qemu-img convert``.

Every source is made with QEMU's tools (raw files get their random bytes from Python): raw
with random data, zero runs and holes and an odd length; qcow2 with patterns, zero writes,
discards and unaligned writes; zlib and zstd compressed clusters; a three-layer backing chain
whose top is longer than its backing file; extended L2 subclusters over a backing file;
compat=0.10 with a length that is not a multiple of the cluster size.

Each conversion runs through ``qimg`` and through ``qemu-img`` with the same arguments. qimg's
output must pass ``qemu-img check`` (exit 0, no leaks), read the same as its source
(``qemu-img compare``; with ``-B`` the output's chain against the source's), show the requested
options in ``qemu-img info --output=json``, and be byte-identical to qemu-img's output, except
in these cases, where its file may not be longer than qemu-img's (plus the slack shown) and
``qemu-img map`` must still report the same allocation (data, zero, compressed, unallocated,
per guest range):

- ``-c`` (zlib or zstd), slack 1 % + 4 KiB: other compressor builds (zlib-rs through flate2,
  zstd's one-shot API), so other compressed bytes of other lengths, packed differently.
- ``preallocation=falloc`` and ``full``, no slack: qimg keeps all metadata in front of the data
  on purpose (see README); qemu-img moves the refcount table behind the data.
- data beyond what the first refcount block covers (qemu-img's file longer than
  ``cluster_size * cluster_size * 8 / refcount_bits``; here: 512-byte clusters), no slack:
  new refcount blocks land where qemu-img puts them (test at the end), but when the refcount
  table itself must grow (small clusters) qimg moves it differently.
- ``-W``, no slack: out-of-order writes; qemu-img's own layout changes from run to run.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import pytest
from corpus import Corpus, Image, Recipe, compressed, created

import qimg

RunCommand: TypeAlias = Callable[..., subprocess.CompletedProcess[str]]

pytestmark = pytest.mark.qemu

KiB = 1024
MiB = 1024 * KiB

# Why qimg's bytes may differ from qemu-img's (see the table above).
COMPRESSOR = "another compressor: other compressed bytes"
METADATA_FIRST = "qimg keeps all preallocated metadata in front of the data"
REFBLOCK_PLACEMENT = "the refcount table had to grow: qimg moves it elsewhere than qemu-img"
OUT_OF_ORDER = "-W: qemu-img's layout changes from run to run"


def compressed_slack(reference_length: int) -> int:
    return reference_length // 100 + 4 * KiB


# --------------------------------------------------------------------------------------------
# The sources: each made when a test first asks the corpus for it (see corpus.py)


def mixed_raw(corpus: Corpus) -> Image:
    """Random data, zeroes written as data, holes, a zero run inside random data, unaligned
    extents and a length that is no multiple of 512."""
    rng = random.Random(0xC0FFEE)
    size = 5 * MiB + 1000
    raw = corpus.create("mixed.raw", "raw", size)
    middle = bytearray(rng.randbytes(512 * KiB))
    middle[128 * KiB : 192 * KiB] = bytes(64 * KiB)
    with raw.path.open("r+b") as f:
        for offset, data in (
            (0, rng.randbytes(768 * KiB)),
            (768 * KiB, bytes(256 * KiB)),
            (2 * MiB + 1000, rng.randbytes(70000)),
            (3 * MiB + 512 * KiB, bytes(middle)),
            (size - 1000, rng.randbytes(1000)),
        ):
            f.seek(offset)
            f.write(data)
    return raw


SOURCES: dict[str, Recipe] = {
    "raw": mixed_raw,
    "qcow2": created(
        "patterns.qcow2",
        "qcow2",
        6 * MiB,
        "write -P 0x11 0 1M",
        "write -P 0x22 1536k 64k",
        "write -z 2M 512k",
        "write -P 0 3M 256k",
        "discard 256k 128k",
        "write -P 0x33 4195304 5000",
        "write -P 0x44 6140k 4k",
    ),
    # Compressed clusters: converted with -c, then partly overwritten (one cluster
    # decompressed for the write) and given more compressed clusters by qemu-io.
    "zlib": compressed("zlib.qcow2", "raw", "write -P 0x66 64k 4k", "write -c -P 0x77 4M 128k"),
    "zstd": compressed(
        "zstd.qcow2",
        "qcow2",
        "write -P 0x66 64k 4k",
        "write -c -P 0x77 5M 128k",
        options="compression_type=zstd",
    ),
    # A chain of three: raw base, qcow2 middle, a top longer than the middle.
    "chain-base": created("base.raw", "raw", 6 * MiB, "write -P 0xaa 0 3M", "write -P 0xab 5M 1M"),
    "chain-mid": created(
        "mid.qcow2",
        "qcow2",
        None,
        "write -z 1M 512k",
        "write -P 0xbb 2M 64k",
        "discard 2560k 64k",
        "write -P 0xbc 3M 1M",
        backing="chain-base",
    ),
    "chain": created(
        "top.qcow2",
        "qcow2",
        7 * MiB,
        "write -z 0 64k",
        "write -P 0xcc 100k 4k",
        "write -P 0xcd 3584k 64k",
        "write -P 0xdd 6208k 64k",
        "write -P 0 6400k 64k",
        backing="chain-mid",
    ),
    # Extended L2 over a full backing file: subclusters written, zeroed, left unallocated.
    "extl2-base": created("xbase.qcow2", "qcow2", 6 * MiB, "write -P 0x12 0 6M"),
    "extl2": created(
        "extl2.qcow2",
        "qcow2",
        None,
        "write -P 0x21 4k 2k",
        "write -z 128k 2k",
        "write -P 0 192k 64k",
        "write -P 0x23 1048676 3000",
        "write -z 2M 64k",
        "write -P 0x24 5M 128k",
        "discard 5M 2k",
        options="extended_l2=on",
        backing="extl2-base",
    ),
    # compat=0.10, 5000000 bytes: neither a multiple of the cluster size nor of 512.
    "v2": created(
        "v2.qcow2",
        "qcow2",
        5000000,
        "write -P 7 0 100k",
        "write -z 200k 64k",
        "discard 64k 64k",
        "write -P 8 4998000 2000",
        options="compat=0.10",
    ),
}


@pytest.fixture(scope="module")
def corpus(
    tmp_path_factory: pytest.TempPathFactory, run_qemu_img: RunCommand, run_qemu_io: RunCommand
) -> Corpus:
    root = tmp_path_factory.mktemp("convert-corpus")
    return Corpus(root, run_qemu_img, run_qemu_io, SOURCES)


ALL_SOURCES = ("raw", "qcow2", "zlib", "zstd", "chain", "extl2", "v2")
# Options that change the layout less get fewer sources: a raw-backed chain flattened, zero
# clusters and discards, an odd length.
SOME_SOURCES = ("qcow2", "chain", "v2")


# --------------------------------------------------------------------------------------------
# What qemu-img says about an output


def info(run_qemu_img: RunCommand, path: Path) -> dict[str, Any]:
    proc = run_qemu_img("info", "--output=json", path)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def lookup(d: Mapping[str, Any], dotted: str) -> Any:
    """``d["a"]["b"]`` for ``"a.b"``; None when a key is missing."""
    value: Any = d
    for key in dotted.split("."):
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value


def comparable_info(d: Mapping[str, Any]) -> dict[str, Any]:
    """An info dictionary without what names or measures the file itself."""
    return {k: v for k, v in d.items() if k not in ("filename", "actual-size", "children")}


def assert_checks_clean(run_qemu_img: RunCommand, path: Path) -> None:
    proc = run_qemu_img("check", "--output=json", path)
    assert proc.returncode == 0, f"qemu-img check {path.name}: {proc.stdout}{proc.stderr}"
    report = json.loads(proc.stdout)
    assert report.get("corruptions", 0) == 0
    assert report.get("leaks", 0) == 0
    assert report.get("check-errors", 0) == 0


def assert_same_content(run_qemu_img: RunCommand, a: Path, a_fmt: str, b: Path, b_fmt: str) -> None:
    proc = run_qemu_img("compare", "-f", a_fmt, "-F", b_fmt, a, b)
    assert proc.returncode == 0, f"qemu-img compare {a.name} {b.name}: {proc.stdout}{proc.stderr}"


Shape: TypeAlias = list[tuple[int, int, int, bool, bool, bool, bool]]


def shape(run_qemu_img: RunCommand, path: Path) -> Shape:
    """``qemu-img map`` without host offsets, neighbours of the same kind merged: what is
    data, zero, compressed or unallocated where, and at which depth of the chain."""
    proc = run_qemu_img("map", "--output=json", path)
    assert proc.returncode == 0, proc.stderr
    merged: Shape = []
    for e in json.loads(proc.stdout):
        kind = (e["depth"], e["present"], e["zero"], e["data"], e.get("compressed", False))
        if merged and merged[-1][2:] == kind and merged[-1][0] + merged[-1][1] == e["start"]:
            last = merged[-1]
            merged[-1] = (last[0], last[1] + e["length"], *kind)
        else:
            merged.append((e["start"], e["length"], *kind))
    return merged


def refblock_coverage(d: Mapping[str, Any]) -> int:
    """Host bytes the first refcount block of an image with these options covers."""
    cluster = int(d["cluster-size"])
    bits = int(lookup(d, "format-specific.data.refcount-bits"))
    return cluster * (cluster * 8 // bits)


def assert_like_reference(
    run_qemu_img: RunCommand,
    ours: Path,
    ref: Path,
    differs: str | None,
    slack: int = 0,
) -> None:
    """Byte-identical to qemu-img's output, unless *differs* says why it may not be: then no
    longer than it plus *slack*, with the same allocation per guest range."""
    if differs is None:
        assert ours.read_bytes() == ref.read_bytes(), (
            f"{ours.name} is not byte-identical to qemu-img's {ref.name}"
        )
        return
    ours_len, ref_len = ours.stat().st_size, ref.stat().st_size
    assert ours_len <= ref_len + slack, (
        f"{ours.name}: {ours_len} bytes, qemu-img's {ref_len} (+{slack} allowed; {differs})"
    )
    assert shape(run_qemu_img, ours) == shape(run_qemu_img, ref), differs


# --------------------------------------------------------------------------------------------
# The matrix: every source x every output variant


QCOW2_DEFAULTS: dict[str, object] = {
    "format": "qcow2",
    "cluster-size": 65536,
    "format-specific.data.compat": "1.1",
    "format-specific.data.compression-type": "zlib",
    "format-specific.data.lazy-refcounts": False,
    "format-specific.data.refcount-bits": 16,
    "format-specific.data.extended-l2": False,
    "format-specific.data.corrupt": False,
}


@dataclass(frozen=True)
class Variant:
    id: str
    args: tuple[str, ...]
    #: What `qemu-img info --output=json` must show, beyond QCOW2_DEFAULTS (None: absent).
    expect: Mapping[str, object] = field(default_factory=dict)
    #: Why the output may differ from qemu-img's byte for byte; None: it must not.
    differs: str | None = None
    compressed: bool = False
    sources: tuple[str, ...] = ALL_SOURCES
    #: Small clusters: the data may outgrow the first refcount block (REFBLOCK_PLACEMENT).
    small_clusters: bool = False
    #: falloc/full: the file must be as long as qemu-img's and allocated on disk as much.
    allocated: bool = False

    def expected_info(self) -> dict[str, object]:
        return {**QCOW2_DEFAULTS, **self.expect}


V2_INFO: dict[str, object] = {
    "format-specific.data.compat": "0.10",
    "format-specific.data.lazy-refcounts": None,
    "format-specific.data.extended-l2": None,
    "format-specific.data.corrupt": None,
}

VARIANTS = [
    Variant("plain", ()),
    Variant("zlib", ("-c",), differs=COMPRESSOR, compressed=True),
    Variant(
        "zstd",
        ("-c", "-o", "compression_type=zstd"),
        {"format-specific.data.compression-type": "zstd"},
        differs=COMPRESSOR,
        compressed=True,
    ),
    Variant("cluster512", ("-o", "cluster_size=512"), {"cluster-size": 512}, small_clusters=True),
    Variant("cluster4k", ("-o", "cluster_size=4k"), {"cluster-size": 4096}),
    Variant(
        "cluster64k", ("-o", "cluster_size=64k"), {"cluster-size": 65536}, sources=SOME_SOURCES
    ),
    Variant(
        "cluster2M",
        ("-o", "cluster_size=2M"),
        {"cluster-size": 2 * MiB},
        sources=("raw", "chain", "v2"),
    ),
    Variant("compat0.10", ("-o", "compat=0.10"), V2_INFO),
    Variant("extended_l2", ("-o", "extended_l2=on"), {"format-specific.data.extended-l2": True}),
    Variant(
        "lazy_refcounts",
        ("-o", "lazy_refcounts=on"),
        {"format-specific.data.lazy-refcounts": True},
        sources=SOME_SOURCES,
    ),
    Variant(
        "refcount1",
        ("-o", "refcount_bits=1"),
        {"format-specific.data.refcount-bits": 1},
        sources=SOME_SOURCES,
    ),
    Variant(
        "refcount64",
        ("-o", "refcount_bits=64"),
        {"format-specific.data.refcount-bits": 64},
        sources=SOME_SOURCES,
    ),
    Variant("prealloc-off", ("-o", "preallocation=off"), sources=SOME_SOURCES),
    Variant("prealloc-metadata", ("-o", "preallocation=metadata")),
    Variant(
        "prealloc-falloc",
        ("-o", "preallocation=falloc"),
        differs=METADATA_FIRST,
        sources=SOME_SOURCES,
        allocated=True,
    ),
    Variant(
        "prealloc-full",
        ("-o", "preallocation=full"),
        differs=METADATA_FIRST,
        sources=SOME_SOURCES,
        allocated=True,
    ),
    Variant("S0", ("-S", "0")),
    Variant("S64k", ("-S", "64k"), sources=SOME_SOURCES),
    Variant("m1", ("-m", "1"), sources=SOME_SOURCES),
    Variant("W", ("-W",), differs=OUT_OF_ORDER, sources=SOME_SOURCES),
]

MATRIX = [
    pytest.param(name, variant, id=f"{name}-{variant.id}")
    for variant in VARIANTS
    for name in variant.sources
]


def source_args(source: Image) -> list[str]:
    return ["-f", source.fmt]


@pytest.mark.parametrize(("name", "variant"), MATRIX)
def test_convert_to_qcow2_matches_qemu_img(
    corpus: Corpus,
    tmp_path: Path,
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    name: str,
    variant: Variant,
) -> None:
    source = corpus[name]
    ours, ref = tmp_path / "qimg.qcow2", tmp_path / "qemu.qcow2"
    args = [*variant.args, *source_args(source), "-O", "qcow2"]
    proc = run_qimg("convert", *args, source.path, ours)
    assert proc.returncode == 0 and not proc.stderr and not proc.stdout, proc.stderr
    ref_proc = run_qemu_img("convert", *args, source.path, ref)
    assert ref_proc.returncode == 0, ref_proc.stderr

    assert_checks_clean(run_qemu_img, ours)
    assert_same_content(run_qemu_img, source.path, source.fmt, ours, "qcow2")

    got = info(run_qemu_img, ours)
    for key, want in variant.expected_info().items():
        assert lookup(got, key) == want, f"info {key}"
    assert got.get("backing-filename") is None
    if ours.read_bytes() != ref.read_bytes():
        assert comparable_info(got) == comparable_info(info(run_qemu_img, ref))

    differs = variant.differs
    if differs is None and ref.stat().st_size > refblock_coverage(got):
        assert variant.small_clusters, "the source is too big to prove byte identity"
        differs = REFBLOCK_PLACEMENT
    slack = compressed_slack(ref.stat().st_size) if variant.compressed else 0
    assert_like_reference(run_qemu_img, ours, ref, differs, slack)
    if variant.allocated:
        assert ours.stat().st_size == ref.stat().st_size
        assert ours.stat().st_blocks * 512 >= ref.stat().st_blocks * 512 - 64 * KiB


# --------------------------------------------------------------------------------------------
# -B: the output keeps only the top layer


@dataclass(frozen=True)
class BackingCase:
    id: str
    source: str
    backing: str
    args: tuple[str, ...] = ()
    differs: str | None = None
    compressed: bool = False
    #: Name the backing file with -o backing_file=...,backing_fmt=... instead of -B/-F.
    as_option: bool = False


BACKING_CASES = [
    BackingCase("top-over-mid", "chain", "chain-mid"),
    BackingCase("top-over-mid-option", "chain", "chain-mid", as_option=True),
    BackingCase("top-over-mid-zlib", "chain", "chain-mid", ("-c",), COMPRESSOR, True),
    BackingCase(
        "top-over-mid-zstd",
        "chain",
        "chain-mid",
        ("-c", "-o", "compression_type=zstd"),
        COMPRESSOR,
        True,
    ),
    BackingCase("top-over-mid-S0", "chain", "chain-mid", ("-S", "0")),
    BackingCase("top-over-mid-zlib-S0", "chain", "chain-mid", ("-c", "-S", "0"), COMPRESSOR, True),
    BackingCase("top-over-mid-cluster4k", "chain", "chain-mid", ("-o", "cluster_size=4k")),
    BackingCase("top-over-mid-compat0.10", "chain", "chain-mid", ("-o", "compat=0.10")),
    BackingCase("top-over-mid-extended_l2", "chain", "chain-mid", ("-o", "extended_l2=on")),
    BackingCase("mid-over-raw", "chain-mid", "chain-base"),
    BackingCase("mid-over-raw-m1", "chain-mid", "chain-base", ("-m", "1")),
    BackingCase("subclusters", "extl2", "extl2-base"),
    BackingCase("subclusters-extended_l2", "extl2", "extl2-base", ("-o", "extended_l2=on")),
    BackingCase("subclusters-zlib", "extl2", "extl2-base", ("-c",), COMPRESSOR, True),
    BackingCase("subclusters-S0", "extl2", "extl2-base", ("-S", "0")),
]


@pytest.mark.parametrize("case", BACKING_CASES, ids=lambda c: c.id)
def test_backing_file_output_matches_qemu_img(
    corpus: Corpus,
    tmp_path: Path,
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    case: BackingCase,
) -> None:
    source, backing = corpus[case.source], corpus[case.backing]
    assert source.backing == backing.path, "the output gets the source's own backing file"
    if case.as_option:
        how = ["-o", f"backing_file={backing.path},backing_fmt={backing.fmt}"]
    else:
        how = ["-B", str(backing.path), "-F", backing.fmt]
    args = [*case.args, *how, "-f", source.fmt, "-O", "qcow2"]
    ours, ref = tmp_path / "qimg.qcow2", tmp_path / "qemu.qcow2"
    proc = run_qimg("convert", *args, source.path, ours)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    ref_proc = run_qemu_img("convert", *args, source.path, ref)
    assert ref_proc.returncode == 0, ref_proc.stderr

    assert_checks_clean(run_qemu_img, ours)
    # The whole chains read the same.
    assert_same_content(run_qemu_img, source.path, "qcow2", ours, "qcow2")
    got = info(run_qemu_img, ours)
    assert got["backing-filename"] == str(backing.path)
    assert got["backing-filename-format"] == backing.fmt
    assert comparable_info(got) == comparable_info(info(run_qemu_img, ref))
    slack = compressed_slack(ref.stat().st_size) if case.compressed else 0
    assert_like_reference(run_qemu_img, ours, ref, case.differs, slack)


def test_backing_file_output_holds_no_more_than_the_top_layer(
    corpus: Corpus, tmp_path: Path, run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    """What the output holds itself lies where the source's top layer holds something."""
    source, backing = corpus["chain"], corpus["chain-mid"]
    ours = tmp_path / "qimg.qcow2"
    proc = run_qimg("convert", "-B", backing.path, "-F", "qcow2", "-O", "qcow2", source.path, ours)
    assert proc.returncode == 0, proc.stderr

    def own(path: Path) -> list[tuple[int, int]]:
        """Guest ranges the image itself decides (allocated, or zero at depth 0), merged."""
        ranges: list[tuple[int, int]] = []
        for s, n, depth, present, *_ in shape(run_qemu_img, path):
            if depth != 0 or not present:
                continue
            if ranges and ranges[-1][1] == s:
                ranges[-1] = (ranges[-1][0], s + n)
            else:
                ranges.append((s, s + n))
        return ranges

    top = own(source.path)
    assert top, "the source's top layer holds something"
    for start, end in own(ours):
        assert any(a <= start and end <= b for a, b in top), (start, end)


# --------------------------------------------------------------------------------------------
# -n: into an existing image


@dataclass(frozen=True)
class ExistingCase:
    id: str
    out_fmt: str
    prefill: int | None  # pattern byte over the whole target, None: a fresh (zero) image
    target_is_zero: bool = False


EXISTING_CASES = [
    ExistingCase("qcow2-with-data", "qcow2", 0x77),
    ExistingCase("qcow2-fresh", "qcow2", None),
    ExistingCase("qcow2-target-is-zero", "qcow2", None, target_is_zero=True),
    ExistingCase("raw-with-data", "raw", 0xFF),
    ExistingCase("raw-target-is-zero", "raw", None, target_is_zero=True),
]

TARGET_SIZE = 8 * MiB  # bigger than every -n source


def make_target(
    run_qemu_img: RunCommand, run_qemu_io: RunCommand, path: Path, fmt: str, prefill: int | None
) -> None:
    proc = run_qemu_img("create", "-q", "-f", fmt, path, TARGET_SIZE)
    assert proc.returncode == 0, proc.stderr
    if prefill is not None:
        proc = run_qemu_io("-f", fmt, "-c", f"write -P {prefill} 0 {TARGET_SIZE}", path)
        assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("case", EXISTING_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("name", ["qcow2", "chain"])
def test_existing_target_matches_qemu_img(
    corpus: Corpus,
    tmp_path: Path,
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    run_qemu_io: RunCommand,
    name: str,
    case: ExistingCase,
) -> None:
    source = corpus[name]
    ours, ref = tmp_path / f"qimg.{case.out_fmt}", tmp_path / f"qemu.{case.out_fmt}"
    make_target(run_qemu_img, run_qemu_io, ours, case.out_fmt, case.prefill)
    shutil.copyfile(ours, ref)
    args = ["-n", *(["--target-is-zero"] if case.target_is_zero else [])]
    args += ["-f", source.fmt, "-O", case.out_fmt]
    proc = run_qimg("convert", *args, source.path, ours)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    ref_proc = run_qemu_img("convert", *args, source.path, ref)
    assert ref_proc.returncode == 0, ref_proc.stderr

    if case.out_fmt == "qcow2":
        assert_checks_clean(run_qemu_img, ours)
    assert_same_content(run_qemu_img, ref, case.out_fmt, ours, case.out_fmt)
    assert info(run_qemu_img, ours)["virtual-size"] == TARGET_SIZE
    # The source's bytes lead the target (the rest keeps what the target held).
    flat = tmp_path / "flat.raw"
    proc = run_qemu_img("convert", "-f", case.out_fmt, "-O", "raw", ours, flat)
    assert proc.returncode == 0, proc.stderr
    size = int(info(run_qemu_img, source.path)["virtual-size"])
    with flat.open("r+b") as f:
        f.truncate(size)
    assert_same_content(run_qemu_img, source.path, source.fmt, flat, "raw")
    assert ours.read_bytes() == ref.read_bytes()


# --------------------------------------------------------------------------------------------
# Several sources, one after the other


# Lengths that are no multiple of the cluster size (nor of 512, for v2) meet in the middle.
SEVERAL = ("v2", "raw")


@pytest.mark.parametrize(
    ("out_fmt", "args", "differs"),
    [
        ("qcow2", (), None),
        ("qcow2", ("-c",), COMPRESSOR),
        ("qcow2", ("-S", "0"), None),
        ("qcow2", ("-m", "1"), None),
        ("qcow2", ("-W",), OUT_OF_ORDER),
        ("raw", (), None),
        ("raw", ("-S", "0"), None),
        ("raw", ("-W", "-m", "3"), None),
    ],
    ids=[
        "qcow2",
        "qcow2-zlib",
        "qcow2-S0",
        "qcow2-m1",
        "qcow2-W",
        "raw",
        "raw-S0",
        "raw-W",
    ],
)
def test_several_sources_match_qemu_img(
    corpus: Corpus,
    tmp_path: Path,
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    out_fmt: str,
    args: tuple[str, ...],
    differs: str | None,
) -> None:
    paths = [corpus[n].path for n in SEVERAL]
    ours, ref = tmp_path / f"qimg.{out_fmt}", tmp_path / f"qemu.{out_fmt}"
    # Probed formats: one -f would apply to every source.
    proc = run_qimg("convert", *args, "-O", out_fmt, *paths, ours)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    ref_proc = run_qemu_img("convert", *args, "-O", out_fmt, *paths, ref)
    assert ref_proc.returncode == 0, ref_proc.stderr

    if out_fmt == "qcow2":
        assert_checks_clean(run_qemu_img, ours)
    assert_same_content(run_qemu_img, ref, out_fmt, ours, out_fmt)
    total = sum(int(info(run_qemu_img, p)["virtual-size"]) for p in paths)
    assert info(run_qemu_img, ours)["virtual-size"] == total
    slack = compressed_slack(ref.stat().st_size) if differs == COMPRESSOR else 0
    assert_like_reference(run_qemu_img, ours, ref, differs, slack)


# --------------------------------------------------------------------------------------------
# The Python API


def test_api_reports_monotonic_progress_up_to_the_total(
    corpus: Corpus, tmp_path: Path, run_qemu_img: RunCommand
) -> None:
    paths = [corpus[n].path for n in SEVERAL]
    total = sum(int(info(run_qemu_img, p)["virtual-size"]) for p in paths)
    seen: list[tuple[int, int]] = []
    out = tmp_path / "api.qcow2"
    qimg.convert(
        paths,
        out,
        out_format="qcow2",
        options={"cluster_size": 4096},
        workers=2,
        progress=lambda done, of: seen.append((done, of)),
    )
    assert seen, "no progress reported"
    assert {of for _, of in seen} == {total}
    done = [d for d, _ in seen]
    assert done == sorted(done)
    assert done[-1] == total
    assert 0 <= done[0] < total
    assert_checks_clean(run_qemu_img, out)
    assert info(run_qemu_img, out)["cluster-size"] == 4096


def test_api_output_is_the_cli_output(
    corpus: Corpus, tmp_path: Path, run_qemu_img: RunCommand
) -> None:
    source, backing = corpus["chain"], corpus["chain-mid"]
    out, ref = tmp_path / "api.qcow2", tmp_path / "qemu.qcow2"
    qimg.convert(
        source.path,
        out,
        format="qcow2",
        out_format="qcow2",
        options="lazy_refcounts=on",
        backing_file=str(backing.path),
        backing_fmt="qcow2",
        sparse_size=64 * KiB,
    )
    proc = run_qemu_img(
        "convert",
        "-f",
        "qcow2",
        "-O",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        "-B",
        backing.path,
        "-F",
        "qcow2",
        "-S",
        "64k",
        source.path,
        ref,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == ref.read_bytes()


def test_size_option_is_overridden_by_the_sources(
    corpus: Corpus, tmp_path: Path, run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    """qemu-img checks a -o size= value, then sizes the output from the sources."""
    source = corpus["v2"]
    ours, ref = tmp_path / "qimg.qcow2", tmp_path / "qemu.qcow2"
    args = ("-O", "qcow2", "-o", "size=64M", source.path)
    assert run_qimg("convert", *args, ours).returncode == 0
    assert run_qemu_img("convert", *args, ref).returncode == 0
    assert ours.read_bytes() == ref.read_bytes()
    assert (
        info(run_qemu_img, ours)["virtual-size"] == info(run_qemu_img, source.path)["virtual-size"]
    )


def test_api_errors_leave_no_target(corpus: Corpus, tmp_path: Path) -> None:
    out = tmp_path / "api.qcow2"
    with pytest.raises(qimg.QimgError, match="Compression and preallocation"):
        qimg.convert(
            corpus["qcow2"].path,
            out,
            out_format="qcow2",
            compress=True,
            options={"preallocation": "metadata"},
        )
    assert not out.exists()
    with pytest.raises(qimg.QimgError):
        qimg.convert(corpus["qcow2"].path, out, out_format="qcow2", workers=0)
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# Errors: exit 1, one line, no new target, an existing target untouched


@dataclass(frozen=True)
class ErrorCase:
    id: str
    #: Arguments before the source and target; "{base}" is the chain's middle image.
    args: tuple[str, ...]
    #: "new": no file at the target before (none after); "existing": a qcow2 image there
    #: (unchanged after); "small": a 1 MiB qcow2 image there (unchanged after).
    target: str = "new"
    source: str = "qcow2"
    #: More sources after the first (corpus names).
    more: tuple[str, ...] = ()
    #: Whether qemu-img fails too (it prints an error but exits 0 for one of them).
    qemu_fails: bool = True
    message: str | None = None


ERROR_CASES = [
    ErrorCase(
        "unknown-option", ("-O", "qcow2", "-o", "foo=bar"), message="Invalid parameter 'foo'"
    ),
    ErrorCase("unknown-option-existing", ("-O", "qcow2", "-o", "foo=bar"), "existing"),
    ErrorCase("bad-cluster-size", ("-O", "qcow2", "-o", "cluster_size=3k")),
    ErrorCase("compress-raw", ("-c", "-O", "raw")),
    ErrorCase("compress-raw-existing", ("-c", "-O", "raw"), "existing"),
    ErrorCase(
        "compress-prealloc",
        ("-c", "-O", "qcow2", "-o", "preallocation=metadata"),
        message="Compression and preallocation not supported at the same time",
    ),
    ErrorCase(
        "compress-falloc-existing", ("-c", "-O", "qcow2", "-o", "preallocation=falloc"), "existing"
    ),
    ErrorCase("m0", ("-m", "0", "-O", "qcow2")),
    ErrorCase("m17", ("-m", "17", "-O", "qcow2"), "existing"),
    ErrorCase("target-is-zero-without-n", ("--target-is-zero", "-O", "qcow2")),
    ErrorCase("target-is-zero-without-n-existing", ("--target-is-zero", "-O", "qcow2"), "existing"),
    ErrorCase(
        "target-is-zero-with-backing",
        ("-n", "--target-is-zero", "-B", "{base}", "-F", "qcow2", "-O", "qcow2"),
        "existing",
        qemu_fails=False,
    ),
    ErrorCase("n-missing-target", ("-n", "-O", "qcow2")),
    ErrorCase("n-small-target", ("-n", "-O", "qcow2"), "small"),
    ErrorCase("n-small-raw-target", ("-n", "-O", "raw"), "small"),
    ErrorCase(
        "backing-without-format",
        ("-B", "{base}", "-O", "qcow2"),
        message="Use of backing file requires explicit backing format",
    ),
    ErrorCase("missing-backing", ("-B", "{missing}", "-F", "qcow2", "-O", "qcow2")),
    ErrorCase("missing-source", ("-O", "qcow2"), source="missing"),
    ErrorCase("unreadable-source", ("-O", "qcow2"), source="broken"),
    ErrorCase("unreadable-source-compressed", ("-c", "-O", "qcow2"), source="broken"),
    ErrorCase("unreadable-source-raw-out", ("-O", "raw"), source="broken"),
    ErrorCase("sparse-size-unaligned-existing", ("-S", "1000", "-O", "qcow2"), "existing"),
    ErrorCase("sparse-size-too-big", ("-S", "32M", "-O", "qcow2")),
    ErrorCase(
        "backing-for-raw-existing",
        ("-B", "{base}", "-F", "qcow2", "-O", "raw"),
        "existing",
        message="Backing file not supported for file format 'raw'",
    ),
    ErrorCase(
        "backing-for-several-sources",
        ("-B", "{base}", "-F", "qcow2", "-O", "qcow2"),
        more=("v2",),
        message="Having a backing file for the target makes no sense when concatenating "
        "multiple input images",
    ),
    ErrorCase(
        "backing-option-for-several-sources",
        ("-o", "backing_file={base},backing_fmt=qcow2", "-O", "qcow2"),
        more=("v2",),
    ),
]


@pytest.fixture(scope="module")
def broken_source(corpus: Corpus) -> Path:
    """The zlib source with garbage in place of its first compressed cluster: opening
    works, reading that cluster fails."""
    path = corpus.root / "broken.qcow2"
    shutil.copyfile(corpus["zlib"].path, path)
    host = first_compressed_host_offset(path)
    with path.open("r+b") as f:
        f.seek(host)
        f.write(b"\xff" * 4096)
    return path


def first_compressed_host_offset(path: Path) -> int:
    """Where the first compressed cluster of a qcow2 image (8-byte L2 entries) starts; qemu-img
    map does not show offsets of compressed clusters."""
    data = path.read_bytes()
    cluster_bits = int.from_bytes(data[20:24], "big")
    l1_size = int.from_bytes(data[36:40], "big")
    l1_offset = int.from_bytes(data[40:48], "big")
    x = 62 - (cluster_bits - 8)
    for i in range(l1_size):
        l2 = int.from_bytes(data[l1_offset + 8 * i : l1_offset + 8 * i + 8], "big")
        l2 &= 0x00FFFFFFFFFFFE00
        if not l2:
            continue
        for j in range((1 << cluster_bits) // 8):
            entry = int.from_bytes(data[l2 + 8 * j : l2 + 8 * j + 8], "big")
            if entry & (1 << 62):
                return entry & ((1 << x) - 1)
    raise AssertionError("no compressed cluster")


@pytest.mark.parametrize("case", ERROR_CASES, ids=lambda c: c.id)
def test_errors_exit_1_with_one_line_and_leave_targets_alone(
    corpus: Corpus,
    broken_source: Path,
    tmp_path: Path,
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    case: ErrorCase,
) -> None:
    if case.source == "broken":
        source = broken_source
    elif case.source == "missing":
        source = tmp_path / "no-such-source.qcow2"
    else:
        source = corpus[case.source].path
    names = {
        "{base}": str(corpus["chain-mid"].path),
        "{missing}": str(tmp_path / "no-such-base.qcow2"),
    }
    args = [a.replace("{base}", names["{base}"]) for a in case.args]
    args = [names.get(a, a) for a in args]
    sources = [source, *(corpus[n].path for n in case.more)]

    def target(name: str) -> Path:
        path = tmp_path / name
        if case.target == "existing":
            proc = run_qemu_img("create", "-q", "-f", "qcow2", path, TARGET_SIZE)
            assert proc.returncode == 0, proc.stderr
        elif case.target == "small":
            proc = run_qemu_img("create", "-q", "-f", "qcow2", path, 1 * MiB)
            assert proc.returncode == 0, proc.stderr
        return path

    ours = target("qimg.out")
    before = ours.read_bytes() if ours.exists() else None
    proc = run_qimg("convert", *args, *sources, ours)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qimg: "), proc.stderr
    if case.message is not None:
        assert lines[0] == f"qimg: {case.message}"
    if before is None:
        assert not ours.exists(), "a target was left behind"
    else:
        assert ours.read_bytes() == before, "the existing target was changed"

    ref = target("qemu.out")
    ref_proc = run_qemu_img("convert", *args, *sources, ref)
    if case.qemu_fails:
        assert ref_proc.returncode != 0, "qemu-img accepts this"
    else:
        assert ref_proc.stderr, "qemu-img says nothing"


# --------------------------------------------------------------------------------------------
# Where the qcow2 write engine puts new refcount blocks


def test_refcount_block_for_new_data_follows_it_as_in_qemu_img(
    tmp_path: Path, run_qimg: RunCommand, run_qemu_img: RunCommand
) -> None:
    source = tmp_path / "full.raw"
    source.write_bytes(random.Random(8).randbytes(8 * MiB))
    ours, ref = tmp_path / "qimg.qcow2", tmp_path / "qemu.qcow2"
    args: Sequence[str] = ("-f", "raw", "-O", "qcow2", "-o", "cluster_size=4k")
    assert run_qimg("convert", *args, source, ours).returncode == 0
    assert run_qemu_img("convert", *args, source, ref).returncode == 0

    def second_refblock(path: Path) -> int:
        data = path.read_bytes()
        reftable = int.from_bytes(data[48:56], "big")
        return int.from_bytes(data[reftable + 8 : reftable + 16], "big")

    assert second_refblock(ours) == second_refblock(ref)
    assert ours.read_bytes() == ref.read_bytes()
