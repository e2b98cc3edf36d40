"""``convert -C`` (copy offloading): data that lies plainly in local files goes into a raw
local output by copy_file_range, inside the kernel. The output must be what qemu-img's
``convert -C`` writes, byte for byte and hole for hole; what cannot be copied that way
(compressed clusters, a qcow2 output) is copied as usual; ``-C`` with ``-c`` or ``-S`` is
refused as qemu-img refuses it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import qimg
from conftest import RunCommand, assert_ok
from qimg.errors import UsageError

pytestmark = pytest.mark.qemu

MiB = 1 << 20


def _raw(tmp: Path, qemu_img: RunCommand, qemu_io: RunCommand) -> Path:
    path = tmp / "src.raw"
    with open(path, "wb") as f:
        f.truncate(32 * MiB)
        f.seek(MiB)
        f.write(os.urandom(3 * MiB))
        f.seek(8 * MiB)
        f.write(bytes(MiB))  # zeroes written as data: -C copies them as data
        f.seek(20 * MiB + 512)
        f.write(b"\x11" * 1000)
    return path


def _qcow2(tmp: Path, qemu_img: RunCommand, qemu_io: RunCommand) -> Path:
    path = tmp / "src.qcow2"
    assert_ok(qemu_img("create", "-f", "qcow2", path, str(32 * MiB)))
    assert_ok(
        qemu_io(
            *("-f", "qcow2"),
            *("-c", "write -P 0x21 1M 3M"),
            *("-c", "write -z 5M 1M"),
            *("-c", "write -P 0 8M 1M"),
            *("-c", "write -P 0x33 31M 64k"),
            path,
        )
    )
    return path


def _backed(tmp: Path, qemu_img: RunCommand, qemu_io: RunCommand) -> Path:
    base = tmp / "base.qcow2"
    assert_ok(qemu_img("create", "-f", "qcow2", base, str(32 * MiB)))
    assert_ok(qemu_io("-f", "qcow2", "-c", "write -P 0x44 0 6M", base))
    top = tmp / "top.qcow2"
    assert_ok(qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top))
    assert_ok(qemu_io("-f", "qcow2", "-c", "write -P 0x55 2M 1M", "-c", "write -z 4M 64k", top))
    return top


def _compressed(tmp: Path, qemu_img: RunCommand, qemu_io: RunCommand) -> Path:
    plain = _qcow2(tmp, qemu_img, qemu_io)
    path = tmp / "src.c.qcow2"
    assert_ok(qemu_img("convert", "-c", "-O", "qcow2", plain, path))
    # Half plain, half compressed.
    assert_ok(qemu_io("-f", "qcow2", "-c", "write -P 0x66 12M 2M", path))
    return path


def _extended_l2(tmp: Path, qemu_img: RunCommand, qemu_io: RunCommand) -> Path:
    path = tmp / "src.l2.qcow2"
    assert_ok(qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on", path, str(32 * MiB)))
    assert_ok(
        qemu_io("-f", "qcow2", "-c", "write -P 0x77 2052k 6k", "-c", "write -P 0x78 9M 1M", path)
    )
    return path


Maker = Callable[[Path, RunCommand, RunCommand], Path]
SOURCES: dict[str, Maker] = {
    "raw": _raw,
    "qcow2": _qcow2,
    "backing-chain": _backed,
    "compressed": _compressed,
    "extended-l2": _extended_l2,
}


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.mark.parametrize("kind", sorted(SOURCES))
@pytest.mark.parametrize("out_fmt", ["raw", "qcow2"])
def test_the_output_is_qemu_imgs(
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    run_qemu_io: RunCommand,
    tmp_path: Path,
    kind: str,
    out_fmt: str,
) -> None:
    source = SOURCES[kind](tmp_path, run_qemu_img, run_qemu_io)
    ours, theirs = tmp_path / f"ours.{out_fmt}", tmp_path / f"theirs.{out_fmt}"
    assert_ok(run_qimg("convert", "-C", "-O", out_fmt, source, ours))
    assert_ok(run_qemu_img("convert", "-C", "-O", out_fmt, source, theirs))
    same = run_qemu_img("compare", "-f", out_fmt, "-F", out_fmt, ours, theirs)
    assert same.returncode == 0, same.stdout
    if out_fmt == "raw":
        assert ours.read_bytes() == theirs.read_bytes()
        if kind != "compressed":
            # Holes where the source has none to give, data (zeroes too) where it has.
            assert _allocated(ours) == _allocated(theirs)
    else:
        assert run_qemu_img("check", ours).returncode == 0


def test_data_goes_through_copy_file_range(
    strace: str, run_qemu_img: RunCommand, run_qemu_io: RunCommand, tmp_path: Path
) -> None:
    source = _qcow2(tmp_path, run_qemu_img, run_qemu_io)
    log = tmp_path / "strace.log"
    out = tmp_path / "out.raw"
    proc = subprocess.run(
        [
            *(strace, "-f", "-e", "trace=copy_file_range", "-o", str(log)),
            *(sys.executable, "-m", "qimg", "convert", "-C", "-O", "raw", str(source), str(out)),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert_ok(proc)
    # Calls finish on one line, or (between threads) as "<... copy_file_range resumed>".
    done = re.findall(r"copy_file_range(?:\(.*\)| resumed>\))\s*= (\d+)", log.read_text())
    copied = [int(n) for n in done]
    # 3 MiB + 1 MiB of zeroes + 64 KiB of data clusters, all copied in the kernel.
    assert sum(copied) == 4 * MiB + 64 * 1024, log.read_text()[-2000:]
    without = tmp_path / "plain.raw"
    assert_ok(run_qemu_img("convert", "-O", "raw", source, without))
    assert out.read_bytes() == without.read_bytes()


@pytest.mark.parametrize(
    "flags", [["-c", "-O", "qcow2"], ["-S", "0"], ["-S", "4k"], ["-S", "64k", "-O", "raw"]]
)
def test_refused_with_c_and_s_as_qemu_img_refuses(
    run_qimg: RunCommand,
    run_qemu_img: RunCommand,
    run_qemu_io: RunCommand,
    tmp_path: Path,
    flags: list[str],
) -> None:
    source = _raw(tmp_path, run_qemu_img, run_qemu_io)
    ours = run_qimg("convert", "-C", *flags, source, tmp_path / "ours.img")
    theirs = run_qemu_img("convert", "-C", *flags, source, tmp_path / "theirs.img")
    assert (ours.returncode, ours.stdout) == (theirs.returncode, "") == (1, "")
    assert ours.stderr.removeprefix("qimg: ") == theirs.stderr.removeprefix("qemu-img: ")
    assert not (tmp_path / "ours.img").exists()


def test_into_an_existing_raw_image(
    run_qimg: RunCommand, run_qemu_img: RunCommand, run_qemu_io: RunCommand, tmp_path: Path
) -> None:
    source = _qcow2(tmp_path, run_qemu_img, run_qemu_io)
    target = tmp_path / "disk.raw"
    target.write_bytes(b"\xff" * (32 * MiB))
    assert_ok(run_qimg("convert", "-C", "-n", "-O", "raw", source, target))
    same = run_qemu_img("compare", "-f", "raw", "-F", "qcow2", target, source)
    assert same.returncode == 0, same.stdout


def test_the_python_api_takes_copy_offload(
    run_qemu_img: RunCommand, run_qemu_io: RunCommand, tmp_path: Path
) -> None:
    source = _raw(tmp_path, run_qemu_img, run_qemu_io)
    out = tmp_path / "api.raw"
    qimg.convert(source, out, copy_offload=True)
    assert out.read_bytes() == source.read_bytes()
    with pytest.raises(UsageError, match="Cannot enable copy offloading when -S is used"):
        qimg.convert(source, tmp_path / "no.raw", copy_offload=True, sparse_size=0)
