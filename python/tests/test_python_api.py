"""The typed Python API: qimg.compare, qimg.info, Image.open_stream, one name for the
format, CLI defaults, exceptions users catch, callbacks on the caller's thread, and a
user's script that mypy --strict checks (and a misspelt name it rejects)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import warnings
from pathlib import Path

import pytest

import qimg
from conftest import RunCommand, assert_ok
from qimg.errors import InvalidOptionError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "pipeline.py"
MiB = 1 << 20


def _qcow2(path: Path, size: int = 4 * MiB, writes: dict[int, bytes] | None = None) -> Path:
    qimg.create(path, size, format="qcow2")
    with qimg.open(path, writable=True) as image:
        for offset, data in (writes or {}).items():
            image.write(offset, data)
    return path


# --- qimg.compare -------------------------------------------------------------


def test_compare_says_identical_for_a_conversion(tmp_path: Path) -> None:
    src = _qcow2(tmp_path / "a.qcow2", writes={MiB: b"x" * 4096})
    qimg.convert(src, tmp_path / "a.raw")
    result = qimg.compare(src, tmp_path / "a.raw")
    assert result.identical
    assert result.outcome == "identical" and result.offset is None
    assert result.message() == "Images are identical."


def test_compare_finds_the_first_differing_offset_as_qemu_img_does(
    tmp_path: Path, run_qemu_img: RunCommand
) -> None:
    a = _qcow2(tmp_path / "a.qcow2", writes={MiB: b"x" * 4096})
    b = _qcow2(tmp_path / "b.qcow2", writes={MiB: b"x" * 4096, MiB + 1536: b"y"})
    result = qimg.compare(a, b)
    assert not result.identical
    assert result.outcome == "content-mismatch"
    theirs = run_qemu_img("compare", a, b)
    assert theirs.returncode == 1
    assert theirs.stdout.strip() == result.message() == f"Content mismatch at offset {MiB + 1536}!"


def test_compare_of_different_sizes_strict_and_not(tmp_path: Path) -> None:
    small = _qcow2(tmp_path / "small.qcow2", size=2 * MiB)
    large = _qcow2(tmp_path / "large.qcow2", size=4 * MiB)
    relaxed = qimg.compare(small, large)
    assert relaxed.identical and relaxed.sizes_differ and relaxed.warns_about_size
    strict = qimg.compare(small, large, strict=True)
    assert strict.outcome == "size-mismatch" and not strict.identical


def test_compare_takes_open_images_and_leaves_them_open(tmp_path: Path) -> None:
    a = _qcow2(tmp_path / "a.qcow2")
    with qimg.open(a) as one, qimg.open(a) as two:
        assert qimg.compare(one, two).identical
        assert one.read(0, 512) == bytes(512)  # still open


def test_compare_of_a_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    a = _qcow2(tmp_path / "a.qcow2")
    with pytest.raises(FileNotFoundError, match=r"missing\.qcow2"):
        qimg.compare(a, tmp_path / "missing.qcow2")


# --- qimg.info ------------------------------------------------------------------


def test_info_is_what_qemu_img_info_json_prints(tmp_path: Path, run_qemu_img: RunCommand) -> None:
    base = _qcow2(tmp_path / "base.qcow2", writes={0: b"b" * 512})
    top = tmp_path / "top.qcow2"
    qimg.create(top, 4 * MiB, format="qcow2", backing_file=str(base), backing_fmt="qcow2")
    ours = qimg.info(top)
    theirs = json.loads(run_qemu_img("info", "--output=json", top).stdout)
    assert ours == theirs
    assert ours["backing-filename"] == str(base)
    chain = qimg.info(top, backing_chain=True)
    assert [i["filename"] for i in chain] == [str(top), str(base)]
    assert chain == json.loads(run_qemu_img("info", "--output=json", "--backing-chain", top).stdout)


def test_image_info_follows_amend_and_resize_on_the_same_handle(
    tmp_path: Path, run_qemu_img: RunCommand
) -> None:
    path = tmp_path / "a.qcow2"
    qimg.create(path, 4 * MiB, format="qcow2", options={"compat": "0.10"})
    with qimg.open(path, writable=True) as image:
        image.write(0, b"a" * 65536)
        image.amend(compat="1.1", lazy_refcounts=True)
        specific = image.info()["format-specific"]
        assert specific["type"] == "qcow2"
        assert specific["data"] == {
            "compat": "1.1",
            "extended-l2": False,
            "lazy-refcounts": True,
            "corrupt": False,
            "refcount-bits": 16,
            "compression-type": "zlib",
        }
        image.resize(8 * MiB)
        assert image.info()["virtual-size"] == 8 * MiB
        # The reopened node writes by the new header's rules (zero clusters of v3).
        image.write_zeroes(0, 65536)
        image.write(65536, b"b" * 512)
        assert image.read(0, 512) == bytes(512)
        ours = image.info()
    assert_ok(run_qemu_img("check", path))
    theirs = json.loads(run_qemu_img("info", "--output=json", path).stdout)
    ours_static = {k: v for k, v in ours.items() if k not in ("actual-size", "children")}
    assert ours_static == {k: v for k, v in theirs.items() if k not in ("actual-size", "children")}


def test_image_handle_used_after_amend_reads_what_was_written(tmp_path: Path) -> None:
    path = _qcow2(tmp_path / "a.qcow2", writes={0: b"z" * 4096})
    with qimg.open(path, writable=True) as image:
        image.amend(refcount_bits=64)
        assert image.read(0, 4096) == b"z" * 4096
        image.write(MiB, b"w" * 512)
    with qimg.open(path) as image:
        assert image.read(MiB, 512) == b"w" * 512
        assert image.info()["format-specific"]["data"]["refcount-bits"] == 64  # type: ignore[typeddict-item]


# --- Image.open_stream ----------------------------------------------------------


def test_stream_reads_the_guest_bytes_for_hashlib_and_shutil(tmp_path: Path) -> None:
    path = _qcow2(tmp_path / "a.qcow2", writes={0: b"head", 3 * MiB: b"tail" * 100})
    qimg.convert(path, tmp_path / "a.raw")
    raw = (tmp_path / "a.raw").read_bytes()
    with qimg.open(path) as image, image.open_stream() as stream:
        assert isinstance(stream, io.RawIOBase)
        assert stream.readable() and stream.seekable() and not stream.writable()
        assert stream.read() == raw
        assert stream.read(10) == b""  # at the end
        stream.seek(0)
        copy = io.BytesIO()
        shutil.copyfileobj(stream, copy)
        assert copy.getvalue() == raw
        stream.seek(0)
        buffered = io.BufferedReader(stream)
        sha = hashlib.sha256()
        while chunk := buffered.read(3000):
            sha.update(chunk)
        assert sha.hexdigest() == hashlib.sha256(raw).hexdigest()


def test_stream_seek_and_tell_follow_io_rules(tmp_path: Path) -> None:
    path = _qcow2(tmp_path / "a.qcow2", writes={MiB: b"0123456789"})
    with qimg.open(path) as image, image.open_stream() as stream:
        assert stream.seek(MiB) == MiB
        assert stream.read(4) == b"0123"
        assert stream.seek(2, io.SEEK_CUR) == MiB + 6
        assert stream.read(2) == b"67"
        assert stream.seek(-1, io.SEEK_END) == 4 * MiB - 1
        assert stream.read(5) == b"\0"
        with pytest.raises(ValueError, match="negative seek"):
            stream.seek(-1)
        with pytest.raises(io.UnsupportedOperation):
            stream.write(b"x")
        with pytest.raises(io.UnsupportedOperation):
            stream.fileno()
    with pytest.raises(ValueError, match="closed"):
        stream.read(1)


def test_stream_writes_into_a_writable_image_and_stops_at_its_end(tmp_path: Path) -> None:
    path = _qcow2(tmp_path / "a.qcow2", size=MiB)
    with qimg.open(path, writable=True) as image:
        with image.open_stream() as stream:
            assert stream.writable() and stream.mode == "r+b"
            stream.seek(4096)
            assert stream.write(b"hello") == 5
            stream.seek(MiB - 3)
            assert stream.write(b"abcdef") == 3  # what fits
            with pytest.raises(OSError) as failure:
                stream.write(b"more")
            assert failure.value.errno == 28  # ENOSPC, as a full device says
        assert image.read(4096, 5) == b"hello"  # the image stays open
    with qimg.open(path) as image:
        assert image.read(MiB - 3, 3) == b"abc"


def test_stream_feeds_tarfile(tmp_path: Path) -> None:
    path = _qcow2(tmp_path / "a.qcow2", size=MiB, writes={0: b"tarred"})
    archive = tmp_path / "a.tar"
    with qimg.open(path) as image, image.open_stream() as stream, tarfile.open(archive, "w") as tar:
        member = tarfile.TarInfo("disk.raw")
        member.size = image.size
        tar.addfile(member, stream)
    with tarfile.open(archive) as tar:
        extracted = tar.extractfile("disk.raw")
        assert extracted is not None
        assert extracted.read(6) == b"tarred"


# --- names, defaults, errors, repr ----------------------------------------------


def test_format_is_the_one_name_and_fmt_still_works_with_a_warning(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qimg.create(tmp_path / "new.qcow2", MiB, format="qcow2")
    with pytest.warns(DeprecationWarning, match="fmt= parameter is deprecated; use format="):
        qimg.create(tmp_path / "old.qcow2", MiB, fmt="qcow2")
    assert qimg.info(tmp_path / "old.qcow2")["format"] == "qcow2"
    with pytest.warns(DeprecationWarning, match="out_fmt="):
        qimg.convert(tmp_path / "old.qcow2", tmp_path / "c.qcow2", out_fmt="qcow2")
    assert qimg.info(tmp_path / "c.qcow2")["format"] == "qcow2"
    with pytest.raises(TypeError, match="both format= and fmt="):
        qimg.create(tmp_path / "x.qcow2", MiB, format="qcow2", fmt="qcow2")


def test_create_and_measure_default_to_raw_as_the_command_line_does(tmp_path: Path) -> None:
    qimg.create(tmp_path / "a.img", MiB)
    assert qimg.info(tmp_path / "a.img")["format"] == "raw"
    assert qimg.measure(size=MiB).required == MiB
    assert qimg.measure(size=MiB) == qimg.measure("raw", size=MiB)


def test_errors_subclass_the_builtins_users_catch(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        qimg.open(tmp_path / "missing.qcow2")
    with pytest.raises(IsADirectoryError):
        qimg.open(tmp_path)
    path = _qcow2(tmp_path / "a.qcow2")
    with qimg.open(path) as image:
        for offset, length in ((0, -5), (-1, 5), (-(1 << 70), 1)):
            with pytest.raises(ValueError, match="must not be negative"):
                image.read(offset, length)
        with pytest.raises(ValueError, match="outside the image"):
            image.read(4 * MiB, 1)
    with pytest.raises(InvalidOptionError):
        qimg.create(tmp_path / "b.qcow2", MiB, format="qcow2", options={"cluster_size": "3k"})


def test_repr_says_what_is_open(tmp_path: Path) -> None:
    path = _qcow2(tmp_path / "a.qcow2")
    image = qimg.open(path)
    assert repr(image) == f"<qimg.Image {str(path)!r} format=qcow2 size={4 * MiB} read-only>"
    image.close()
    assert repr(image) == "<qimg.Image (closed)>"
    assert "content-mismatch" in repr(qimg.CompareResult("content-mismatch", 0, 1, 1))


# --- callbacks --------------------------------------------------------------------


def test_callbacks_run_on_the_callers_thread(tmp_path: Path) -> None:
    src = _qcow2(tmp_path / "a.qcow2", size=16 * MiB, writes={0: b"x" * MiB})
    caller = threading.get_ident()
    seen: dict[str, set[int]] = {
        "convert": set(),
        "compare": set(),
        "scrub": set(),
        "events": set(),
    }
    progress: list[int] = []

    def convert_progress(done: int, total: int) -> None:
        seen["convert"].add(threading.get_ident())
        progress.append(done)

    qimg.convert(src, tmp_path / "b.raw", progress=convert_progress)
    assert progress == sorted(progress) and progress[-1] == 16 * MiB
    qimg.compare(
        src, tmp_path / "b.raw", progress=lambda d, t: seen["compare"].add(threading.get_ident())
    )
    replicas = []
    for name in ("r0", "r1", "r2"):
        shutil.copy(tmp_path / "b.raw", tmp_path / name)
        replicas.append(
            {"driver": "raw", "file": {"driver": "file", "filename": str(tmp_path / name)}}
        )
    with open(tmp_path / "r2", "r+b") as f:
        f.write(b"bad")
    spec = {"driver": "quorum", "vote-threshold": 2, "children": replicas}
    report = qimg.scrub(
        spec,
        progress=lambda d, t: seen["scrub"].add(threading.get_ident()),
        events=lambda e: seen["events"].add(threading.get_ident()),
    )
    assert report is not None
    assert all(threads == {caller} for threads in seen.values()), seen


# --- the package as a type checker sees it ----------------------------------------


def test_the_example_pipeline_runs(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE)], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "disk.qcow2: qcow2 (compat 1.1), 67108864 bytes" in proc.stdout


def _mypy(script: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--python-version",
            "3.10",
            str(script),
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=script.parent,
        env={**os.environ, "MYPYPATH": ""},
    )


def test_mypy_strict_accepts_the_example_pipeline(tmp_path: Path) -> None:
    script = tmp_path / "pipeline.py"
    shutil.copy(EXAMPLE, script)
    proc = _mypy(script)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_strict_rejects_a_misspelt_name(tmp_path: Path) -> None:
    script = tmp_path / "typo.py"
    script.write_text("import qimg\n\nresult = qimg.comapre('a.qcow2', 'b.qcow2')\nprint(result)\n")
    proc = _mypy(script)
    assert proc.returncode == 1, proc.stdout
    assert 'Module has no attribute "comapre"' in proc.stdout
    with pytest.raises(AttributeError, match="comapre"):
        getattr(qimg, "comapre")  # noqa: B009 - the name is misspelt on purpose
