"""``qimg io``: qemu-io's command language, checked piece by piece and against qemu-io itself.

The unit tests pin the formats and parsers with values qemu-io 10.0 printed (number syntax,
sizes in reports, hex dumps, getopt behaviour, refusals) and run the interpreter on an
in-memory image. The interop tests run the same command lines through ``qemu-io`` and
``qimg io`` on the same images (made by qemu-img and qemu-io) and compare stdout, stderr (with
``qemu-io:`` read as ``qimg:``) and the exit status, with the timings filtered out as QEMU's
iotests filter them. Writes are checked both ways: images written by ``qimg io`` must read back
identically through qemu-io and pass ``qemu-img check``, and images written by qemu-io must read
back identically through ``qimg io``.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import pytest
from corpus import Corpus, Image, Recipe, commands, created

from qimg.errors import ImageIOError
from qimg.image import MapExtent
from qimg.info_report import ImageInfo
from qimg.qemu_io import (
    Interpreter,
    NumberError,
    getopt,
    hex_dump,
    parse_number,
    parse_pattern,
    refusal,
    report,
    size_text,
    split_command,
    time_text,
)

RunCommand: TypeAlias = Callable[..., subprocess.CompletedProcess[str]]

KiB = 1024
MiB = 1024 * KiB

# --------------------------------------------------------------------------------------------
# Numbers

# (text, value) pairs qemu-io 10.0.2 read this way (`read TEXT 0` on a 15 TiB raw file).
NUMBERS = [
    ("0", 0),
    ("010", 10),  # decimal, not octal
    ("017", 17),
    ("0x10", 16),
    ("0X1F", 31),
    ("0x00005", 5),
    ("0x1b", 27),  # b and e are hex digits here, not suffixes
    ("0x1e", 30),
    ("+5", 5),
    ("+0x10", 16),
    ("\t5", 5),
    ("5b", 5),
    ("1B", 1),
    ("1K", 1024),
    ("1m", MiB),
    ("1.5K", 1536),
    ("1.5m", 1536 * KiB),
    ("1.5g", 1536 * MiB),
    ("1.5t", 1649267441664),
    ("0.5M", 512 * KiB),
    (".5k", 512),
    ("+.5k", 512),
    ("5.k", 5120),
    ("1.k", 1024),
    ("1.", 1),
    ("3.b", 3),
    ("3.0b", 3),
    ("3.00k", 3072),
    ("00.5k", 512),
    ("01.5k", 1536),
    ("0.0k", 0),
    ("0.1k", 102),
    ("0.1t", 109951162778),  # rounded to the nearest byte
    ("0.001t", 1099511628),
    ("1.0005k", 1025),
    ("1.00048828125k", 1025),  # exactly half a byte rounds up
    ("0.3333333333333333333333k", 341),
    ("0.00000000000000000001k", 0),
    ("0.9999999999999999999999k", 1024),
    ("1.9999999999999999999999k", 2048),
    ("0.99999999999999999999999999T", 1 << 40),
    ("1.5e", 3 << 59),
    ("0x7fffffffffffffff", (1 << 63) - 1),
    ("9223372036854775807", (1 << 63) - 1),
]

NOT_NUMBERS = [
    "1x", "foo", "1e3", "1.5e3k", "1.5E3k", ".k", ".", "0x", "0X", "0xk", "0xg", "0x1k", "0x1.5",
    "0x1.5k", "0x+10", "0x-1", "0x0x5", "00x10", "x10", "k", "1..5k", "1.5.k", "1.-5k", "1.+5k",
    "1.infk", "1.nank", "infk", "1.0x1p3k", "0.5", "1.5", "1.7", "0.5b", "2.5b", "1.5b", "1kB",
    "1.5kb", "0.5kk", "5x", "1_0", "0b101", "++5", "-", "+", "+-1", "-abc", "-1k", "-1.5k",
    "-.5k", "-0x5", "1e0", "99999999999999999999999k",
]  # fmt: skip

TOO_LARGE = [
    "-1", "-0", "8E", "16E", "15.99999E", "7.999999999999999999E", "0x8000000000000000",
    "0xffffffffffffffff", "0x10000000000000000", "18446744073709551615", "9223372036854775808",
    "9999999999999999999", "99999999999999999999999", "17179869183G",
]  # fmt: skip


@pytest.mark.parametrize(("text", "value"), NUMBERS)
def test_parse_number_reads_what_qemu_io_reads(text: str, value: int) -> None:
    assert parse_number(text) == value


@pytest.mark.parametrize("text", NOT_NUMBERS)
def test_parse_number_refuses_what_qemu_io_calls_non_numeric(text: str) -> None:
    with pytest.raises(NumberError) as info:
        parse_number(text)
    assert info.value.line() == (
        f"Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {text}"
    )


@pytest.mark.parametrize("text", TOO_LARGE)
def test_parse_number_refuses_what_qemu_io_calls_too_large(text: str) -> None:
    with pytest.raises(NumberError) as info:
        parse_number(text)
    assert info.value.line() == f"Parsing error: argument too large -- {text}"


@pytest.mark.parametrize(
    ("text", "value"),
    [("0", 0), ("255", 255), ("0xcd", 0xCD), ("0XFF", 255), ("010", 8), ("+7", 7), ("-0", 0),
     ("\t9", 9), ("", 0)],
)  # fmt: skip
def test_parse_pattern_takes_c_integers_of_one_byte(text: str, value: int) -> None:
    assert parse_pattern(text) == value


@pytest.mark.parametrize("text", ["256", "-1", "0x1g", "0x", "08", "1k", "abc", "0x100", " "])
def test_parse_pattern_refuses_anything_else(text: str) -> None:
    assert parse_pattern(text) is None


# --------------------------------------------------------------------------------------------
# Output formats


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0 bytes"),
        (1, "1 bytes"),
        (40, "40 bytes"),
        (273.709467, "273.709467 bytes"),
        (12.0004, "12 bytes"),  # qemu-io cuts at the first ".000", even among six decimals
        (1024, "1 KiB"),
        (65536, "64 KiB"),
        (1.5 * 1024, "1.500 KiB"),
        (4128768, "3.938 MiB"),
        (1114112, "1.062 MiB"),
        (2 * MiB, "2 MiB"),
        (24.057 * MiB, "24.057 MiB"),
        (2305843009213693952 - 2 * 2**50, "1.998 EiB"),
        (float("inf"), "inf EiB"),
    ],
)
def test_size_text_matches_qemu_io(value: float, text: str) -> None:
    assert size_text(value) == text


def test_time_text_below_a_second_and_above() -> None:
    assert time_text(0) == "00.00 sec"
    assert time_text(4_999_999) == "00.00 sec"
    assert time_text(520_000_000) == "00.52 sec"
    assert time_text(1_500_000_000) == "0:00:01.50"
    assert time_text(3723_250_000_000) == "1:02:03.25"
    assert time_text(20_000_000, fixed=True) == "0:00:00.02"


def test_report_lines() -> None:
    assert report("wrote", 500_000_000, 0, 65536, 65536) == (
        "wrote 65536/65536 bytes at offset 0\n"
        "64 KiB, 1 ops; 00.50 sec (128 KiB/sec and 2.0000 ops/sec)"
    )
    assert report("read", 2_000_000_000, 512, 1, 1) == (
        "read 1/1 bytes at offset 512\n"
        "1 bytes, 1 ops; 0:00:02.00 (0.500000 bytes/sec and 0.5000 ops/sec)"
    )
    assert report("discard", 250_000_000, 0, 16, 16, machine=True) == (
        "16,1,0:00:00.25,64.000,4.000"
    )


def test_hex_dump_shows_letters_and_digits_only() -> None:
    data = bytes(range(0x2E, 0x2E + 16)) + b"\xff\x00Az"
    assert list(hex_dump(data, 0x1F0)) == [
        "000001f0:  2e 2f 30 31 32 33 34 35 36 37 38 39 3a 3b 3c 3d  ..0123456789....",
        "00000200:  ff 00 41 7a  ..Az",
    ]
    assert list(hex_dump(b"", 0)) == []
    assert next(hex_dump(b"\x11", 1 << 40)) == "10000000000:  11  ."


# --------------------------------------------------------------------------------------------
# Command lines


def test_split_command_splits_at_spaces_only() -> None:
    assert split_command("  read   0\t1  ") == ["read", "0\t1"]
    assert split_command("") == []


def test_getopt_permutes_and_stops_at_double_dash() -> None:
    g = getopt("read", ["0", "-qv", "1", "-P0x11", "--", "-5"], "bCl:pP:qrs:v")
    assert g.options == [("q", None), ("v", None), ("P", "0x11")]
    assert g.operands == ["0", "1", "-5"]
    assert g.error is None
    g = getopt("read", ["-P", "-1", "0", "1"], "P:")
    assert g.options == [("P", "-1")] and g.operands == ["0", "1"]


def test_getopt_errors_name_the_command_as_typed() -> None:
    assert getopt("r", ["-x", "0"], "qv").error == "r: invalid option -- 'x'"
    assert getopt("read", ["--foo"], "qv").error == "read: invalid option -- '-'"
    g = getopt("read", ["-q", "0", "1", "-P"], "qP:")
    assert g.options == [("q", None)]
    assert g.error == "read: option requires an argument -- 'P'"


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("readv 0 512", "qemu-io command 'readv' is not supported by qimg io"),
        ("t 1M", "qemu-io command 't' is not supported by qimg io"),
        ("write -r 0 64k", "'write -r' (registered I/O buffers) is not supported by qimg io"),
        ("w -zn 0 64k", "'write -n' (zero writes without fallback) is not supported by qimg io"),
        ("read -b 0 512", "'read -b' (reading the VM state) is not supported by qimg io"),
        ("read 0 512 -r", "'read -r' (registered I/O buffers) is not supported by qimg io"),
    ],
)
def test_refusal_names_what_qimg_lacks(line: str, reason: str) -> None:
    assert refusal(line) == reason


@pytest.mark.parametrize(
    "line", ["", "read 0 1", "bogus 1", "write -b", "read -x -b 0 1", "write -P 0 0 1", "help t"]
)
def test_refusal_leaves_other_lines_to_the_run(line: str) -> None:
    assert refusal(line) is None


# --------------------------------------------------------------------------------------------
# The interpreter on an in-memory image


class MemoryImage:
    """A raw image in memory that records the requests it gets."""

    def __init__(self, size: int, fail_with: int = 0) -> None:
        self.data = bytearray(size)
        self.calls: list[tuple[object, ...]] = []
        self.fail_with = fail_with

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def format(self) -> str:
        return "raw"

    def info(self) -> ImageInfo:
        return {"filename": "memory", "format": "raw", "virtual-size": self.size}

    def _check(self) -> None:
        if self.fail_with:
            raise ImageIOError("simulated failure", self.fail_with)

    def read(self, offset: int, length: int) -> bytes:
        self._check()
        return bytes(self.data[offset : offset + length])

    def map(self, start: int = 0, length: int | None = None) -> list[MapExtent]:
        end = self.size if length is None else start + length
        return [MapExtent(start, end - start, 0, True, False, True, False, start, "mem")]

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check()
        self.calls.append(("write", offset, len(data)))
        self.data[offset : offset + len(data)] = data

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        self._check()
        self.calls.append(("write_zeroes", offset, length, unmap))
        self.data[offset : offset + length] = bytes(length)

    def write_compressed(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        raise AssertionError("a raw image takes no compressed writes")

    def discard(self, offset: int, length: int) -> None:
        self._check()
        self.calls.append(("discard", offset, length))

    def flush(self) -> None:
        self._check()
        self.calls.append(("flush",))


@dataclass
class Session:
    image: MemoryImage
    interpreter: Interpreter
    out: io.StringIO
    err: io.StringIO

    def run(self, *lines: str) -> tuple[str, str]:
        """Runs the lines; returns what they printed on stdout and stderr (then forgets it)."""
        for line in lines:
            if not self.interpreter.run(line):
                break
        out, err = self.out.getvalue(), self.err.getvalue()
        for stream in (self.out, self.err):
            stream.seek(0)
            stream.truncate()
        return filter_timings(out), err


def session(size: int = 1 * MiB, **kwargs: bool) -> Session:
    image = MemoryImage(size)
    out, err = io.StringIO(), io.StringIO()
    ticks = iter(range(0, 1 << 62, 250_000_000))  # each request takes 0.25 s
    interpreter = Interpreter(image, out, err, clock=lambda: next(ticks), **kwargs)
    return Session(image, interpreter, out, err)


TIMING = re.compile(
    r"[0-9]+ ops; ([0-9]+:)*[0-9]+\.[0-9]+( sec)? \(([0-9.]+|inf|nan) [A-Za-z]+/sec "
    r"and ([0-9.]+|inf|nan) ops/sec\)"
)
MACHINE_TIMING = re.compile(r"^([0-9]+),1,[0-9]+:[0-9]{2}:[0-9.]+,[^,]+,[^,]+$", re.M)


def filter_timings(text: str) -> str:
    """What iotests/common.rc's _filter_qemu_io does, plus the same for ``-C`` lines."""
    text = TIMING.sub("X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)", text)
    text = MACHINE_TIMING.sub(r"\1,1,TIME,RATE,RATE", text)
    return text.replace("qemu-io> ", "")


T = "X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)"


def test_write_then_read_back_with_patterns() -> None:
    s = session()
    assert s.run("write -P 0x11 0 64k", "write 64k 1", "read -P 0x11 0 64k") == (
        f"wrote 65536/65536 bytes at offset 0\n64 KiB, {T}\n"
        f"wrote 1/1 bytes at offset 65536\n1 bytes, {T}\n"
        f"read 65536/65536 bytes at offset 0\n64 KiB, {T}\n",
        "",
    )
    # bytes, not the bytearray: with CI set, pytest diffs even passing comparisons
    # (the assertion pass hook pytest-golden needs), and a bytearray against bytes
    # makes that diff quadratic in the 64 KiB.
    assert bytes(s.image.data[:65537]) == b"\x11" * 65536 + b"\xcd"
    assert not s.interpreter.failed


def test_pattern_failure_is_reported_before_the_dump_and_fails_the_command() -> None:
    s = session()
    s.image.data[3] = 0x41
    out, _ = s.run("read -v -P 0 -s 2 -l 4 0 20")
    assert out == (
        "Pattern verification failed at offset 2, 4 bytes\n"
        "00000000:  00 00 00 41 00 00 00 00 00 00 00 00 00 00 00 00  ...A............\n"
        "00000010:  00 00 00 00  ....\n"
        f"read 20/20 bytes at offset 0\n20 bytes, {T}\n"
    )
    assert s.interpreter.failed
    s.interpreter.failed = False
    assert s.run("read -q -P 0 4 4", "read -q -v 0 4") == ("", "")
    assert not s.interpreter.failed


def test_zero_writes_unmap_discard_and_flush_reach_the_image() -> None:
    s = session()
    s.run("write -P 1 0 8k", "write -z 1k 1k", "w -zu -q 2k 1k", "discard -q 4k 4k", "flush")
    s.run("write -f -q -P 2 0 1", "d 0 0", "f")
    assert s.image.calls == [
        ("write", 0, 8192),
        ("write_zeroes", 1024, 1024, False),
        ("write_zeroes", 2048, 1024, True),
        ("discard", 4096, 4096),
        ("flush",),
        ("write", 0, 1),
        ("flush",),
        ("discard", 0, 0),
        ("flush",),
    ]
    assert not s.interpreter.failed


def test_write_from_a_file_repeats_it(tmp_path: Path) -> None:
    source = tmp_path / "src.bin"
    source.write_bytes(b"abc")
    (tmp_path / "empty.bin").write_bytes(b"")
    s = session()
    assert s.run(f"write -q -s {source} 1 10") == ("", "")
    assert s.image.data[:12] == b"\0abcabcabca\0"
    out, err = s.run(f"write -s {tmp_path / 'nosuch'} 0 1", f"write -s {tmp_path} 0 1")
    assert out == ""
    assert err == f"{tmp_path / 'nosuch'}: No such file or directory\n{tmp_path}: Is a directory\n"
    _, err = s.run(f"write -s {tmp_path / 'empty.bin'} 0 4", f"write -s {source} 0 0")
    assert err == f"{tmp_path / 'empty.bin'}: file is empty\n{source}: file is empty\n"
    assert s.interpreter.failed


@pytest.mark.parametrize(
    ("line", "out"),
    [
        ("write -u 0 1", "-u requires -z to be specified\n"),
        ("write -z -P 1 0 1", "Only one of -z, -P, and -s can be specified at the same time\n"),
        ("write -s x -P 1 0 1", "Only one of -z, -P, and -s can be specified at the same time\n"),
        ("write 0 3G", "length cannot exceed 2147483136 without -n, given 3G\n"),
        ("write -z 0 2147483137", "length cannot exceed 2147483136 without -n, given 2147483137\n"),
        ("discard 0 3G", "length cannot exceed 2147483136, given 3G\n"),
        ("read 0 2147483137", "length cannot exceed 2147483136, given 2147483137\n"),
        ("write -P 256 0 1", "256 is not a valid pattern byte\n"),
        ("read -P 0 -l 8 0 4", "pattern verification range exceeds end of read data\n"),
        ("read -P 0 -s 5 0 4", "pattern verification range exceeds end of read data\n"),
        ("write 1M 1", "write failed: Input/output error\n"),
        ("write -z 1048575 2", "write failed: Input/output error\n"),
        ("discard 2M 0", "discard failed: Input/output error\n"),
        ("read 1M 1", "read failed: Input/output error\n"),
        ("write -c 0 64k", "write failed: Operation not supported\n"),
        ("write -c 1 512", "1 is not a sector-aligned value for 'offset'\n"),
        ("write -c 0 1", "1 is not a sector-aligned value for 'count'\n"),
        ("write -c -f -z 0 1", "-f and -b or -c cannot be specified at the same time\n"),
        ("read -s 1 0 4", "read [-Cpqv] [-P pattern [-s off] [-l len]] off len -- "
         "read bytes at an offset\n"),
    ],
)  # fmt: skip
def test_misuse_fails_the_command_without_touching_the_image(line: str, out: str) -> None:
    s = session()
    assert s.run(line) == (out, "")
    assert s.interpreter.failed
    assert s.image.calls == []


def test_interpreter_messages_go_to_stderr() -> None:
    s = session()
    assert s.run("bogus", "read", "flush 1", "help 1 2") == (
        "",
        'command "bogus" not found\n'
        "bad argument count 0 to read, expected at least 2 arguments\n"
        "bad argument count 1 to flush, expected 0 arguments\n"
        "bad argument count 2 to help, expected between 0 and 1 arguments\n",
    )
    out, err = s.run("read -x 0 1")
    assert err == "read: invalid option -- 'x'\n"
    assert out.startswith("read [-Cpqv] ")


def test_quit_stops_the_run() -> None:
    s = session()
    assert s.run("quit", "write 0 1") == ("", "")
    assert s.image.calls == []


def test_read_only_refuses_writes_but_not_flush() -> None:
    s = session(read_only=True)
    assert s.run("write 0 1", "discard 0 1", "write -x 0 1", "flush") == (
        "",
        "qimg: Block node is read-only\n" * 3,
    )
    assert s.image.calls == [("flush",)]


def test_io_errors_print_their_errno_text() -> None:
    s = session()
    s.image.fail_with = 28  # ENOSPC
    assert s.run("write 0 1", "write -z 0 1", "discard 0 1", "read 0 1") == (
        "write failed: No space left on device\n"
        "write failed: No space left on device\n"
        "discard failed: No space left on device\n"
        "read failed: No space left on device\n",
        "",
    )
    assert s.run("flush") == ("", "qimg: flush failed: No space left on device\n")


def test_map_alloc_and_length() -> None:
    s = session(3 * MiB + 1000)
    assert s.run("map", "alloc 0", "alloc 1 1M", "alloc 3M 1M", "alloc 4M", "length") == (
        "3.001 MiB (0x3003e8) bytes     allocated at offset 0 bytes (0x0)\n"
        "512/512 bytes allocated at offset 0 bytes\n"
        "1048576/1048576 bytes allocated at offset 1 bytes\n"
        "1000/1000 bytes allocated at offset 3 MiB\n"
        "0/0 bytes allocated at offset 4 MiB\n"
        "3.001 MiB\n",
        "",
    )


def test_help_lists_the_commands_and_explains_one() -> None:
    s = session()
    out, _ = s.run("help")
    assert out.splitlines()[0].startswith("alloc (or a) offset [count] -- ")
    assert "write (or w) [-cCfpquz] [-P pattern | -s source_file] off len -- " in out
    out, _ = s.run("help w")
    assert out.startswith("w [-cCfpquz] [-P pattern | -s source_file] off len -- ")
    assert " -u  with -z" in out
    assert not s.interpreter.failed
    assert s.run("help nosuch", "help readv") == (
        "command nosuch not found\ncommand readv is a qemu-io command that qimg io does not "
        "support\n",
        "",
    )
    assert s.interpreter.failed


# --------------------------------------------------------------------------------------------
# Against qemu-io


def qimg_io(*args: str | Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qimg", "io", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )


@dataclass(frozen=True)
class Transcript:
    stdout: str
    stderr: str
    status: int


def transcript(proc: subprocess.CompletedProcess[str]) -> Transcript:
    stderr = re.sub(r"^qemu-io: ", "qimg: ", proc.stderr, flags=re.M)
    return Transcript(filter_timings(proc.stdout), stderr, proc.returncode)


def both(
    run_qemu_io: RunCommand, fmt: str, path: Path, lines: list[str], *options: str
) -> tuple[Transcript, Transcript]:
    """(qimg io, qemu-io) transcripts of the same command lines on the same image."""
    args = [*options, "-f", fmt, *commands(*lines), str(path)]
    return transcript(qimg_io(*args)), transcript(run_qemu_io(*args))


HISTORY = (
    "write -P 1 0 1M",
    "write -z 128k 64k",
    "discard 256k 128k",
    "write -z -u 512k 64k",
    "write -P 5 1500k 1",
)


def _raw_sparse(c: Corpus) -> Image:
    path = c.root / "sparse.raw"
    path.write_bytes(b"")
    c.qemu_img("resize", "-f", "raw", path, "1M")
    c.qemu_io("raw", path, "write -P 1 64k 64k", "write -P 2 512k 4k")
    return Image(path, "raw")


def _raw_odd(c: Corpus) -> Image:
    path = c.root / "odd.raw"
    path.write_bytes(b"\x01" * 1000)
    return Image(path, "raw")


def _qcow2(file: str, options: str = "") -> Recipe:
    return created(file, "qcow2", "2M", *HISTORY, options=options)


# IMAGES is also the list test_reads_print_what_qemu_io_prints runs over, so the images others
# are made from (base.qcow2, csource.qcow2) are made inside those recipes, not listed.
def _backing(c: Corpus) -> Image:
    base = _qcow2("base.qcow2")(c)
    return c.create(
        "top.qcow2",
        "qcow2",
        "4M",
        "write -P 9 128k 64k",
        "write -P 9 1M 1",
        "write -z 1600k 64k",
        backing=base,
    )


def _compressed(c: Corpus) -> Image:
    return c.compress("compressed.qcow2", _qcow2("csource.qcow2")(c))


IMAGES: dict[str, Recipe] = {
    "raw-sparse": _raw_sparse,
    "raw-odd-length": _raw_odd,
    "qcow2": _qcow2("plain.qcow2"),
    "qcow2-v2": _qcow2("v2.qcow2", "compat=0.10"),
    "qcow2-extended-l2": _qcow2("extl2.qcow2", "extended_l2=on,cluster_size=64k"),
    "qcow2-512b-clusters": _qcow2("c512.qcow2", "cluster_size=512"),
    "qcow2-backing": _backing,
    "qcow2-compressed": _compressed,
}


@pytest.fixture(scope="session")
def corpus(
    tmp_path_factory: pytest.TempPathFactory, run_qemu_img: RunCommand, run_qemu_io: RunCommand
) -> Iterator[Corpus]:
    root = tmp_path_factory.mktemp("io-corpus")
    yield Corpus(root, run_qemu_img, run_qemu_io, IMAGES)
    shutil.rmtree(root, ignore_errors=True)


READS = [
    "read -P 1 0 64k",
    "read -P 0 128k 64k",
    "read -P 9 128k 64k",
    "read -P 0 256k 128k",
    "read -P 1 64k 64k",
    "read -P 2 512k 4k",
    "read -P 5 1500k 1",
    "read -P 1 1499k 1k",
    "read -P 0 1600k 64k",
    "read -v 0 48",
    "read -v 1048560 40",
    "read -v -P 1 -s 8 -l 8 65530 32",
    "read -q -P 7 0 512",
    "read -q 0 512",
    "read 0 0",
    "read 1 1",
    "read 999 1",
    "read 1000 1",
    "map",
    "alloc 0",
    "alloc 64k 128k",
    "alloc 1",
    "alloc 127k 2k",
    "alloc 1M 1M",
    "alloc 0 100M",
    "alloc 100M",
    "length",
]


@pytest.mark.qemu
@pytest.mark.parametrize("name", IMAGES)
def test_reads_print_what_qemu_io_prints(
    name: str, corpus: Corpus, run_qemu_io: RunCommand
) -> None:
    made = corpus[name]
    size_lines = [f"read {x} {y}" for x, y in (("2M", 0), ("2M", 1), ("2097151", 2), ("4M", 0))]
    ours, theirs = both(run_qemu_io, made.fmt, made.path, READS + size_lines, "-r")
    assert ours == theirs


MISUSE = [
    "read", "read 0", "read 1 2 3", "read -x 0 1", "read 0 1 -x", "read --foo 0 1", "read -P",
    "read 0 1 -P", "read -P 256 0 1", "read -P -1 0 1", "read -P 0x1g 0 1", "read -P 010 0 8",
    "read -P 256 -x 0 1", "read -s 1 0 4", "read -l 1 0 4", "read -P 0 -l 8 0 4",
    "read -P 0 -s 5 0 4", "read -P 0 -l -1 0 4", "read -P 0 -l foo 0 4", "read -P 0 -s 4 0 4",
    "read -P 0 -l 0 0 4", "read 0 3G", "read 0 2147483137", "read 9223372036854775807 1",
    "read 9223372036854775808 1", "read -- -1 1", "read -- 0 1", "read -q -- 0 1",
    "read 0 1 -q", "read -qv 0 1", "read -vP 0 0 1", "read -p 0 1", "r 0 1", "bogus",
    "flush 1", "map 1", "length 1", "alloc", "alloc 0 1x", "alloc -- -1", "alloc 0 0",
    "alloc 1 2 3", "help 1 2", "help nosuch", "discard 0", "write 0", "write 0 1", "w 0 1",
    "discard 0 1", "d 0 1", "flush", "f", "", "   ",
]  # fmt: skip


# Lines answered with the command's usage line.
USAGE_LINES = ("read -x", "read 0 1 -x", "read --foo", "read -s", "read -l", "read 1")


@pytest.mark.qemu
def test_misuse_is_reported_as_qemu_io_reports_it(corpus: Corpus, run_qemu_io: RunCommand) -> None:
    made = corpus["qcow2"]
    for line in MISUSE:
        ours, theirs = both(run_qemu_io, made.fmt, made.path, [line], "-r")
        if line.startswith(USAGE_LINES):
            # qemu-io's usage line names its own options; only the first word is shared.
            assert ours.stdout.split(" ")[0] == theirs.stdout.split(" ")[0], line
            assert (ours.stderr, ours.status) == (theirs.stderr, theirs.status), line
            continue
        if line.startswith("read 0 1 -P"):
            assert ours.stderr == theirs.stderr and ours.status == theirs.status, line
            continue
        assert ours == theirs, line


@pytest.fixture(scope="session")
def huge_image(corpus: Corpus) -> Path:
    """A 2 EiB qcow2 image: `read N 0` then prints N for any N up to 2 EiB."""
    return corpus.create("huge.qcow2", "qcow2", "2E", options="cluster_size=2M").path


@pytest.mark.qemu
def test_numbers_are_read_as_qemu_io_reads_them(huge_image: Path, run_qemu_io: RunCommand) -> None:
    texts = [t for t, _ in NUMBERS] + NOT_NUMBERS + TOO_LARGE
    texts = [t if not t.startswith("-") else f"-- {t}" for t in texts]
    texts += ["1.1e", "0.5e", "1.e", "1.5E", "1P", "1.5p", "1e", "2E", "0x1fffffffffffffff"]
    ours, theirs = both(run_qemu_io, "qcow2", huge_image, [f"read {t} 0" for t in texts], "-r")
    assert ours.stdout.splitlines() == theirs.stdout.splitlines()
    assert ours == theirs


@pytest.mark.qemu
def test_commands_from_stdin(corpus: Corpus, run_qemu_io: RunCommand, qemu_io: str) -> None:
    made = corpus["raw-sparse"]
    script = "read -P 1 64k 64k\n\nbogus\nread -q 0 1\n  read   0   2  \nquit\nread 0 3\n"
    ours = transcript(qimg_io("-r", "-f", "raw", made.path, stdin=script))
    proc = subprocess.run(
        [qemu_io, "-r", "-f", "raw", str(made.path)],
        input=script,
        capture_output=True,
        text=True,
        check=False,
    )
    assert ours == transcript(proc)
    # The last line needs no newline.
    ours = transcript(qimg_io("-r", "-f", "raw", made.path, stdin="length"))
    assert ours == Transcript("1 MiB\n", "", 0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-d", "unmap"], "qimg: qemu-io option '-d' (discard modes) is not supported by "
         "qimg io\n"),
        (["--object", "secret,id=s0,data=x"], "qimg: qemu-io option '--object' (QEMU objects) is "
         "not supported by qimg io\n"),
        (["-s"], "qimg: qemu-io option '-s' (temporary snapshots) is not supported by qimg io\n"),
        (["-c", "readv 0 512"], "qimg: qemu-io command 'readv' is not supported by qimg io\n"),
        (["-c", "read 0 1", "-c", "write -b 0 64k"], "qimg: 'write -b' (writing the VM state) is "
         "not supported by qimg io\n"),
    ],
)  # fmt: skip
def test_unsupported_options_are_refused_before_anything_runs(
    tmp_path: Path, args: list[str], message: str
) -> None:
    path = tmp_path / "t.raw"
    path.write_bytes(bytes(4096))
    proc = qimg_io("-r", *args, path)
    assert (proc.stdout, proc.stderr, proc.returncode) == ("", message, 1)


def test_open_errors_are_one_line(tmp_path: Path) -> None:
    proc = qimg_io("-r", "-c", "read 0 1", tmp_path / "nosuch.qcow2")
    assert proc.returncode == 1 and proc.stdout == ""
    assert re.fullmatch(r"qimg: [^\n]*No such file or directory\n", proc.stderr)
    proc = qimg_io("-r")
    assert (proc.stderr, proc.returncode) == ("qimg: Expecting one image file name\n", 1)


# --------------------------------------------------------------------------------------------
# Writes, both ways

# Every kind of request, aligned and not; {source} is a 3-byte file. All of it must print,
# store and allocate what qemu-io prints, stores and allocates.
WRITES = [
    "write -P 0x11 0 64k",
    "write -P 0x22 60k 8k",
    "write -z 128k 64k",
    "write -z -u 192k 64k",
    "discard 256k 64k",
    "write -P 0x33 300k 1",
    "write -P 0x44 1000k 100k",
    "write -z 1020k 8k",
    "write -q -P 0x66 1536k 512k",
    "write -f -P 0x55 512 512",
    "write -s {source} 70k 10",
    "write -C -P 0x77 3k 1k",
    "flush",
    "write -P 1 2M 1",
    "discard 2M 1",
    "write -z 2047k 2k",
    "write 0 0",
    "write -z 0 0",
    "discard 0 0",
    "w -zu 1800k 100k",
    "d -q 1920k 64k",
    "write -c 512 512",
]
# qcow2 only: discards that cover parts of clusters, compressed clusters.
QCOW2_WRITES = [
    "discard 320k 200k",
    "discard 1090k 30k",
    "write -c -P 0x88 1600k 64k",
    "write -c 1664k 128k",
    "write -c 0 64k",
    "write -c 1984k 64k",
    "write -c 1 512",
]
READ_BACK = [
    "read -P 0x11 0 512",
    "read -P 0x55 512 512",
    "read -P 0x11 1k 2k",
    "read -P 0x77 3k 1k",
    "read -P 0x22 60k 8k",
    "read -v 69k 2k",
    "read -P 0 128k 128k",
    "read -P 0 256k 64k",
    "read -P 0x33 300k 1",
    "read -P 0x44 1000k 20k",
    "read -P 0 1020k 8k",
    "read -P 0x44 1028k 72k",
    "read -P 0x66 1536k 64k",
    "read -P 0x88 1600k 64k",
    "read -P 0xcd 1664k 128k",
    "read -P 0 1800k 100k",
    "read -P 0x66 1900k 20k",
    "read -P 0 1920k 64k",
]
ALLOCATION = ["map", "alloc 0 2M", "alloc 128k 128k", "alloc 1M 1M"]

TARGETS: dict[str, tuple[str, list[str]]] = {
    "raw": ("raw", []),
    "qcow2": ("qcow2", []),
    "qcow2-v2": ("qcow2", ["-o", "compat=0.10"]),
    "qcow2-extended-l2": ("qcow2", ["-o", "extended_l2=on"]),
    "qcow2-512b-clusters": ("qcow2", ["-o", "cluster_size=512"]),
    "qcow2-backing": ("qcow2", ["-b", "{base}", "-F", "qcow2"]),
}


@dataclass(frozen=True)
class Written:
    """The same requests made on two copies of one new image: by qemu-io and by qimg io."""

    fmt: str
    by_qemu: Path
    by_qimg: Path
    qemu: Transcript
    qimg: Transcript


@pytest.fixture(scope="session")
def written(corpus: Corpus, run_qemu_io: RunCommand) -> Callable[[str], Written]:
    made: dict[str, Written] = {}
    source = corpus.root / "source.bin"
    source.write_bytes(b"abc")
    base = corpus.create("write-base.qcow2", "qcow2", "2M", "write -P 0x99 0 2M").path

    def make(name: str) -> Written:
        if name not in made:
            fmt, options = TARGETS[name]
            options = [o.format(base=base) for o in options]
            a, b = corpus.root / f"w-{name}.qemu", corpus.root / f"w-{name}.qimg"
            corpus.qemu_img("create", "-q", "-f", fmt, *options, a, "2M")
            shutil.copyfile(a, b)
            script = [w.format(source=source) for w in WRITES]
            if fmt == "qcow2":
                script += QCOW2_WRITES
            args = ["-f", fmt, *commands(*script)]
            theirs = transcript(run_qemu_io(*args, a))
            ours = transcript(qimg_io(*args, b))
            made[name] = Written(fmt, a, b, theirs, ours)
        return made[name]

    return make


@pytest.mark.qemu
@pytest.mark.parametrize("name", TARGETS)
def test_writes_print_what_qemu_io_prints(name: str, written: Callable[[str], Written]) -> None:
    w = written(name)
    assert w.qimg == w.qemu
    assert w.qimg.status == 1  # the script has failing requests on purpose
    assert "wrote 65536/65536 bytes at offset 0\n" in w.qimg.stdout


@pytest.mark.qemu
@pytest.mark.parametrize("name", TARGETS)
def test_images_written_by_qimg_io_hold_what_qemu_io_wrote(
    name: str, written: Callable[[str], Written], run_qemu_img: RunCommand
) -> None:
    w = written(name)
    proc = run_qemu_img("compare", "-f", w.fmt, "-F", w.fmt, w.by_qemu, w.by_qimg)
    assert (proc.returncode, proc.stdout) == (0, "Images are identical.\n")
    if w.fmt == "qcow2":
        proc = run_qemu_img("check", "-f", "qcow2", w.by_qimg)
        assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.qemu
@pytest.mark.parametrize("name", TARGETS)
def test_qemu_io_reads_back_what_qimg_io_wrote(
    name: str, written: Callable[[str], Written], run_qemu_io: RunCommand
) -> None:
    w = written(name)
    args = ["-r", "-f", w.fmt, *commands(*READ_BACK)]
    assert transcript(run_qemu_io(*args, w.by_qimg)) == transcript(run_qemu_io(*args, w.by_qemu))


@pytest.mark.qemu
@pytest.mark.parametrize("name", TARGETS)
def test_qimg_io_reads_back_what_qemu_io_wrote(
    name: str, written: Callable[[str], Written], run_qemu_io: RunCommand
) -> None:
    w = written(name)
    args = ["-r", "-f", w.fmt, *commands(*READ_BACK, *ALLOCATION)]
    assert transcript(qimg_io(*args, w.by_qemu)) == transcript(run_qemu_io(*args, w.by_qemu))


@pytest.mark.qemu
@pytest.mark.parametrize("name", TARGETS)
def test_qimg_io_allocates_what_qemu_io_allocates(
    name: str, written: Callable[[str], Written], run_qemu_io: RunCommand
) -> None:
    w = written(name)
    args = ["-r", "-f", w.fmt, *commands(*ALLOCATION)]
    assert transcript(run_qemu_io(*args, w.by_qimg)) == transcript(run_qemu_io(*args, w.by_qemu))


@pytest.mark.qemu
def test_probed_raw_images_stay_raw(tmp_path: Path, run_qemu_io: RunCommand) -> None:
    magic = tmp_path / "magic.bin"
    magic.write_bytes(b"QFI\xfb\0\0\0\3")
    lines = [f"write -s {magic} 0 8", "write -P 0x51 0 1", f"write -s {magic} 512 8"]
    images = []
    for tool in ("qemu-io", "qimg"):
        path = tmp_path / f"{tool}.raw"
        path.write_bytes(bytes(64 * KiB))
        images.append(path)
        args = commands(*lines)
        proc = run_qemu_io(*args, path) if tool == "qemu-io" else qimg_io(*args, path)
        assert filter_timings(proc.stdout) == (
            "write failed: Operation not permitted\n"
            f"wrote 1/1 bytes at offset 0\n1 bytes, {T}\n"
            f"wrote 8/8 bytes at offset 512\n8 bytes, {T}\n"
        )
        assert proc.returncode == 1
    assert images[0].read_bytes() == images[1].read_bytes()
    proc = qimg_io("-c", "read 0 1", images[1])
    assert proc.stderr.startswith("qimg: warning: the format of ")


def test_a_refused_command_ends_the_run() -> None:
    s = session()
    assert s.run("write -q 0 1", "readv 0 512", "write 0 1") == (
        "",
        "qimg: qemu-io command 'readv' is not supported by qimg io\n",
    )
    assert s.image.calls == [("write", 0, 1)]
    assert s.interpreter.failed


def test_stdin_refusals_end_the_run(tmp_path: Path) -> None:
    path = tmp_path / "t.raw"
    path.write_bytes(bytes(4096))
    proc = qimg_io("-f", "raw", path, stdin="write -q -P 1 0 1\nwrite -b 0 512\nwrite 0 1\n")
    assert (proc.stdout, proc.stderr, proc.returncode) == (
        "",
        "qimg: 'write -b' (writing the VM state) is not supported by qimg io\n",
        1,
    )
    assert path.read_bytes()[:2] == b"\x01\x00"
