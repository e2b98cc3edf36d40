"""The Python API: qimg.create and qimg.measure, and their errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import qimg
from qimg import _core


def test_create_metadata_prealloc_file_length_equals_measure(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    qimg.create(path, 1 << 30, format="qcow2", options={"preallocation": "metadata"})
    m = qimg.measure("qcow2", size=1 << 30, options={"preallocation": "metadata"})
    assert path.stat().st_size == m.fully_allocated
    # The data region is a hole: only the metadata occupies disk blocks.
    assert path.stat().st_blocks * 512 < 4 << 20


def test_create_accepts_an_option_string_like_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "b.qcow2"
    qimg.create(path, 64 << 20, format="qcow2", options="cluster_size=4k,preallocation=falloc")
    m = qimg.measure("qcow2", size=64 << 20, options={"cluster_size": "4k"})
    assert path.stat().st_size == m.fully_allocated


def test_spec_reports_layout_before_anything_is_written(tmp_path: Path) -> None:
    request = _core.CreateRequest(
        "qcow2", [("size", 64 << 20), ("cluster_size", 65536), ("preallocation", "metadata")]
    )
    assert request.file_length == request.metadata_length + (64 << 20)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("options", "error", "text"),
    [
        ({"cluster_size": "1023"}, qimg.InvalidOptionError, "power of two between 512 and 2048k"),
        ({"refcount_bits": "3"}, qimg.InvalidOptionError, "Refcount width must be a power of two"),
        ({"compat": "0.10", "lazy_refcounts": "on"}, qimg.InvalidOptionError, "Lazy refcounts"),
        ({"preallocation": "1234"}, qimg.InvalidOptionError, "'1234'"),
        ({"cluster_size": "512"}, qimg.ImageTooLargeError, "too large for file format 'qcow2'"),
    ],
)
def test_invalid_options_raise_typed_errors_and_leave_files_alone(
    tmp_path: Path, options: dict[str, str], error: type[Exception], text: str
) -> None:
    path = tmp_path / "c.qcow2"
    path.write_bytes(b"precious")
    with pytest.raises(error, match=text):
        qimg.create(path, 1 << 60, format="qcow2", options=options)
    assert path.read_bytes() == b"precious"


def test_io_errors_carry_errno(tmp_path: Path) -> None:
    with pytest.raises(qimg.ImageIOError) as err:
        qimg.create(tmp_path / "missing-dir" / "x.qcow2", 1 << 20, format="qcow2")
    assert err.value.errno == 2
    assert "No such file or directory" in str(err.value)
    assert isinstance(err.value, OSError)


def test_measure_raw_source_counts_clusters_with_data(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.truncate(16 << 20)
        f.seek(5 << 20)
        f.write(b"x" * 10)
    m = qimg.measure("qcow2", filename=src)
    empty = qimg.measure("qcow2", size=16 << 20)
    assert m.required == empty.required + 65536
    assert m.fully_allocated == empty.fully_allocated
    assert os.path.getsize(src) == 16 << 20


def test_public_functions_stay_functions_whatever_is_imported_first() -> None:
    # The public functions live in modules named otherwise (qimg.create in
    # qimg.creation, ...): importing every home first (qimg.conversion imports
    # qimg.creation) leaves each package attribute the function. A fresh interpreter,
    # to control the order.
    code = (
        "import importlib, qimg\n"
        "homes = {'check': 'consistency', 'commit': 'committing', 'compare': 'comparison',\n"
        "         'convert': 'conversion', 'create': 'creation', 'dd': 'blockcopy',\n"
        "         'info': 'info_report', 'measure': 'measurement', 'rebase': 'rebasing',\n"
        "         'scrub': 'scrubbing'}\n"
        "mods = {n: importlib.import_module('qimg.' + m) for n, m in homes.items()}\n"
        "for name, mod in mods.items():\n"
        "    f = getattr(qimg, name)\n"
        "    assert callable(f) and f is getattr(mod, name), (name, f)\n"
        "    assert f.__module__ == mod.__name__, (name, f.__module__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert (proc.returncode, proc.stderr) == (0, "")
