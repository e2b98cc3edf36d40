"""The command language of ``qemu-io``, for ``qimg io``.

One :class:`Interpreter` runs command lines such as ``write -P 0x11 0 64k`` or ``read -v 512 1k``
on an open image and prints what qemu-io 10.0 prints for them: the ``wrote ... bytes at offset``
report and its timing line, pattern verification failures, ``-v`` hex dumps, ``map`` runs, and
qemu-io's messages for malformed numbers, bad option use and failed requests, each on the stream
qemu-io uses (stdout for a command's own messages, stderr for the interpreter's).

The subset: ``read``, ``write``, ``discard``, ``flush``, ``map``, ``alloc``, ``length``,
``help`` and ``quit`` (with qemu-io's one-letter aliases). Other qemu-io commands, and options of
these commands that qimg does not implement, are refused by name (see :func:`refusal`), never
ignored.
"""

from __future__ import annotations

import errno
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TextIO

from qimg.errors import ImageIOError, QimgError
from qimg.image import MapExtent

if TYPE_CHECKING:
    from qimg.info_report import ImageInfo

__all__ = [
    "COMMANDS",
    "MAX_REQUEST",
    "QEMU_IO_ONLY",
    "CommandInfo",
    "Getopt",
    "Interpreter",
    "IoImage",
    "NumberError",
    "getopt",
    "hex_dump",
    "parse_number",
    "parse_pattern",
    "refusal",
    "report",
    "size_text",
    "split_command",
    "time_text",
]

#: The largest request qemu's block layer accepts: INT_MAX rounded down to 512 bytes.
MAX_REQUEST = 0x7FFF_FE00

#: What ``write`` fills its buffer with when no ``-P`` is given.
DEFAULT_WRITE_PATTERN = 0xCD

INT64_MAX = (1 << 63) - 1
U64_LIMIT = 1 << 64


class IoImage(Protocol):
    """What the interpreter needs of an open image (``qimg.Image`` provides it)."""

    @property
    def size(self) -> int: ...

    @property
    def format(self) -> str: ...

    def info(self) -> ImageInfo: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def map(self, start: int = 0, length: int | None = None) -> list[MapExtent]: ...

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None: ...

    def write_compressed(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def discard(self, offset: int, length: int) -> None: ...

    def flush(self) -> None: ...


# --------------------------------------------------------------------------------------------
# Numbers: offsets and lengths the way qemu-io reads them


class NumberError(ValueError):
    """A number argument qemu-io would not take; :meth:`line` is what it prints."""

    def __init__(self, text: str, too_large: bool) -> None:
        super().__init__(text)
        self.text = text
        self.too_large = too_large

    def line(self) -> str:
        if self.too_large:
            return f"Parsing error: argument too large -- {self.text}"
        return (
            f"Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {self.text}"
        )


# C's isspace() in the C locale.
_C_SPACE = " \t\n\v\f\r"
_SHIFTS = {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_DECIMAL = re.compile(r"([+-]?)([0-9]+)")
_HEX = re.compile(r"\+?0[xX]([0-9a-fA-F]+)")
_FRACTION = re.compile(r"\.([0-9]*)")
_BARE_FRACTION = re.compile(r"\+?\.([0-9]+)")


def parse_number(text: str) -> int:
    """A byte count or offset as qemu-io reads it: decimal or ``0x`` hex, an optional binary
    suffix (``b k m g t p e``, either case), a decimal fraction only together with a suffix
    other than ``b`` (``1.5k`` is 1536, rounded to the nearest byte), at most ``INT64_MAX``.

    Raises :class:`NumberError` (not a number, or too large) otherwise.
    """
    s = text.lstrip(_C_SPACE)
    fraction_digits: str | None = None
    m = _DECIMAL.match(s)
    if m:
        sign, digits = m.groups()
        rest = s[m.end() :]
        if sign == "-" or int(digits) >= U64_LIMIT:
            # Negative or beyond 64 bits is "too large" -- unless more text follows.
            raise NumberError(text, too_large=not rest)
        value = int(digits)
        if value == 0 and rest[:1] in ("x", "X"):
            return _parse_hex(text, s)
        f = _FRACTION.match(rest)
        if f:
            fraction_digits = f.group(1)
            rest = rest[f.end() :]
    else:
        f = _BARE_FRACTION.match(s)
        if not f:
            raise NumberError(text, too_large=False)
        value = 0
        fraction_digits = f.group(1)
        rest = s[f.end() :]
    # The fraction as 64-bit fixed point, from its nearest double (as strtod gives it).
    fixed = 0
    if fraction_digits:
        fixed = min(int(float("0." + fraction_digits) * U64_LIMIT), U64_LIMIT - 1)
    shift = _SHIFTS.get(rest[:1].lower()) if rest else None
    if shift is not None:
        rest = rest[1:]
    if rest:
        raise NumberError(text, too_large=False)
    if not shift:
        if fixed:
            raise NumberError(text, too_large=False)  # a fraction of a byte
        result = value
    else:
        scaled = fixed << shift
        result = (value << shift) + (scaled >> 64) + ((scaled >> 63) & 1)
    if result > INT64_MAX:
        raise NumberError(text, too_large=True)
    return result


def _parse_hex(text: str, s: str) -> int:
    m = _HEX.match(s)
    if not m:
        raise NumberError(text, too_large=False)
    rest = s[m.end() :]
    if rest:
        # Neither fractions nor suffixes go with hex numbers.
        raise NumberError(text, too_large=False)
    value = int(m.group(1), 16)
    if value > INT64_MAX:
        raise NumberError(text, too_large=True)
    return value


_PATTERN_NUMBER = re.compile(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


def parse_pattern(text: str) -> int | None:
    """A pattern byte as ``-P`` takes it (C integer syntax: decimal, ``0x`` hex, ``0`` octal,
    0 to 255); None when it is not one."""
    if text == "":
        return 0
    m = _PATTERN_NUMBER.fullmatch(text)
    if not m:
        return None
    sign, digits = m.groups()
    if digits[:2].lower() == "0x":
        value = int(digits[2:], 16)
    elif digits.startswith("0"):
        value = int(digits, 8)
    else:
        value = int(digits)
    if sign == "-":
        value = -value
    return value if 0 <= value <= 0xFF else None


# --------------------------------------------------------------------------------------------
# Output formats


_BINARY_UNITS = ((60, "EiB"), (50, "PiB"), (40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB"))


def size_text(value: float) -> str:
    """A byte count the way qemu-io's reports show it: ``64 KiB``, ``3.938 MiB``, ``40 bytes``,
    ``273.709467 bytes`` (three decimals in the largest binary unit not above the value, all
    decimals below 1 KiB, and a run of zero decimals dropped)."""
    value = float(value)  # as C converts it, before dividing
    for shift, unit in _BINARY_UNITS:
        if value >= 1 << shift:
            text, suffix = f"{value / (1 << shift):.3f}", f" {unit}"
            break
    else:
        text, suffix = f"{value:f}", " bytes"
    cut = text.find(".000")
    return (text[:cut] if cut >= 0 else text) + suffix


def time_text(elapsed_ns: int, fixed: bool = False) -> str:
    """Elapsed time in a report: ``00.01 sec`` below one second, else (or when ``fixed``, for
    ``-C``) hours, minutes and seconds as ``0:01:02.50``."""
    seconds, nanos = divmod(elapsed_ns, 1_000_000_000)
    fraction = nanos / 1e9
    if fixed or seconds:
        return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60 + fraction:05.2f}"
    return f"{fraction:05.2f} sec"


def _rate(amount: int, elapsed_ns: int) -> float:
    if elapsed_ns:
        return amount / (elapsed_ns / 1e9)
    return math.inf if amount else math.nan


def report(
    op: str, elapsed_ns: int, offset: int, count: int, total: int, machine: bool = False
) -> str:
    """What follows a successful request: two lines, or with ``-C`` one comma-separated line
    (bytes, ops, time, bytes/sec, ops/sec). Always one operation."""
    if machine:
        return (
            f"{total},1,{time_text(elapsed_ns, fixed=True)},"
            f"{_rate(total, elapsed_ns):.3f},{_rate(1, elapsed_ns):.3f}"
        )
    return (
        f"{op} {total}/{count} bytes at offset {offset}\n"
        f"{size_text(total)}, 1 ops; {time_text(elapsed_ns)} "
        f"({size_text(_rate(total, elapsed_ns))}/sec and {_rate(1, elapsed_ns):.4f} ops/sec)"
    )


# Letters and digits stay, every other byte is shown as '.'.
_DUMP_CHARS = bytes(
    b if (0x30 <= b <= 0x39 or 0x41 <= b <= 0x5A or 0x61 <= b <= 0x7A) else 0x2E for b in range(256)
)


def hex_dump(data: bytes | bytearray | memoryview, offset: int) -> Iterator[str]:
    """``read -v``: 16 bytes a line, the guest offset in hex, the bytes, then the letters and
    digits among them."""
    view = memoryview(data)
    for i in range(0, len(view), 16):
        chunk = bytes(view[i : i + 16])
        shown = chunk.translate(_DUMP_CHARS).decode("ascii")
        yield f"{offset + i:08x}:  {chunk.hex(' ')}  {shown}"


# --------------------------------------------------------------------------------------------
# Command lines


def split_command(line: str) -> list[str]:
    """A command line's words: split at spaces only (a tab is part of a word), as qemu-io does."""
    return [word for word in line.split(" ") if word]


@dataclass(frozen=True)
class Getopt:
    """One command's options in order, its operands, and the error that stopped parsing."""

    options: list[tuple[str, str | None]]
    operands: list[str]
    error: str | None


def getopt(name: str, args: Sequence[str], spec: str) -> Getopt:
    """getopt() with GNU argument permutation (options may follow operands; ``--`` ends
    options; no long options, so ``--x`` is option ``-`` and invalid), as qemu-io's commands
    parse their arguments. ``spec`` is getopt's option string
    (``"CqP:"``: letters, ``:`` after those that take a value)."""
    takes_value = {c: spec[i + 1 : i + 2] == ":" for i, c in enumerate(spec) if c != ":"}
    options: list[tuple[str, str | None]] = []
    operands: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            operands.extend(args[i:])
            break
        if not arg.startswith("-") or arg == "-":
            operands.append(arg)
            continue
        j = 1
        while j < len(arg):
            c = arg[j]
            j += 1
            if c not in takes_value:
                return Getopt(options, operands, f"{name}: invalid option -- '{c}'")
            if not takes_value[c]:
                options.append((c, None))
                continue
            if j < len(arg):
                options.append((c, arg[j:]))
            elif i < len(args):
                options.append((c, args[i]))
                i += 1
            else:
                return Getopt(options, operands, f"{name}: option requires an argument -- '{c}'")
            break
    return Getopt(options, operands, None)


@dataclass(frozen=True)
class CommandInfo:
    name: str
    altname: str | None
    argmin: int
    argmax: int | None  # None: no limit
    synopsis: str
    oneline: str
    details: str = ""
    optstring: str = ""  # getopt's string, including the qemu-io options qimg refuses
    writes: bool = False  # needs an image opened read-write
    refused: tuple[tuple[str, str], ...] = ()  # (option letter, what it does in qemu-io)

    def usage(self, name: str | None = None) -> str:
        """The line qemu-io prints for a misused command: name, synopsis, what it does."""
        parts = (name or self.name, self.synopsis, "--", self.oneline)
        return " ".join(part for part in parts if part)


_COMMANDS = (
    CommandInfo(
        "alloc",
        "a",
        1,
        2,
        "offset [count]",
        "how many bytes of a range are allocated in the image itself",
        details="""
 Counts the bytes of COUNT bytes (default 512) at OFFSET that the image itself
 allocates (data or zero clusters, not its backing file). The range ends at the
 end of the image.
""",
    ),
    CommandInfo(
        "discard",
        "d",
        2,
        None,
        "[-Cq] off len",
        "discard a range of bytes",
        details="""
 Discards LEN bytes at OFFSET: the image may deallocate them.
 -C  print the statistics as one comma-separated line
 -q  quiet: print no statistics
""",
        optstring="Cq",
        writes=True,
    ),
    CommandInfo("flush", "f", 0, 0, "", "write everything still cached to the disk"),
    CommandInfo("help", "?", 0, 1, "[command]", "list the commands, or explain one"),
    CommandInfo("length", "l", 0, 0, "", "print the virtual size of the image"),
    CommandInfo("map", None, 0, 0, "", "list the ranges the image itself allocates"),
    CommandInfo("quit", "q", 0, None, "", "stop; the remaining commands are not run"),
    CommandInfo(
        "read",
        "r",
        2,
        None,
        "[-Cpqv] [-P pattern [-s off] [-l len]] off len",
        "read bytes at an offset",
        details="""
 Reads LEN bytes at OFFSET (both accept k, M, G, ... suffixes, and 0x hex).
 -C  print the statistics as one comma-separated line
 -p  accepted and ignored, as by qemu-io
 -P  check that the bytes all equal PATTERN (0 to 255)
 -s  with -P: check from this offset into the bytes read
 -l  with -P: check this many bytes
 -q  quiet: print no statistics
 -v  dump the bytes read in hex
""",
        optstring="bCl:pP:qrs:v",
        refused=(("b", "reading the VM state"), ("r", "registered I/O buffers")),
    ),
    CommandInfo(
        "write",
        "w",
        2,
        None,
        "[-cCfpquz] [-P pattern | -s source_file] off len",
        "write bytes at an offset",
        details="""
 Writes LEN bytes at OFFSET, all equal to 0xcd unless told otherwise.
 -c  store whole qcow2 clusters compressed (offset and length whole clusters,
     the length may end at the end of the image; clusters must be unallocated)
 -C  print the statistics as one comma-separated line
 -f  force unit access: the data is flushed to the disk before the command ends
 -p  accepted and ignored, as by qemu-io
 -P  write this byte (0 to 255)
 -s  write the contents of this file, repeated as often as needed
 -q  quiet: print no statistics
 -z  write zeroes (the image may record them without storing data)
 -u  with -z: the image may also deallocate the range
""",
        optstring="bcCfnpP:qrs:uz",
        writes=True,
        refused=(
            ("b", "writing the VM state"),
            ("n", "zero writes without fallback"),
            ("r", "registered I/O buffers"),
        ),
    ),
)

COMMANDS = {c.name: c for c in _COMMANDS}
_BY_NAME = {**COMMANDS, **{c.altname: c for c in _COMMANDS if c.altname}}

#: qemu-io's other commands (and their aliases), which qimg io refuses by name.
QEMU_IO_ONLY = frozenset(
    ("abort", "aio_flush", "aio_read", "aio_write", "break", "close", "c", "info", "i", "open",
     "o", "readv", "remove_break", "reopen", "resume", "sigraise", "sleep", "truncate", "t",
     "wait_break", "writev", "zone_append", "zap", "zone_close", "zc", "zone_finish", "zf",
     "zone_open", "zo", "zone_report", "zrp", "zone_reset", "zrs")
)  # fmt: skip


def refusal(line: str) -> str | None:
    """Why qimg io will not run this command line, when it names a qemu-io command or option
    that qimg does not implement (None otherwise; malformed lines are left to the run, which
    reports them as qemu-io does)."""
    words = split_command(line)
    if not words:
        return None
    name = words[0]
    if name in QEMU_IO_ONLY:
        return f"qemu-io command '{name}' is not supported by qimg io"
    info = _BY_NAME.get(name)
    if info is None or not info.refused or not _count_ok(info, len(words) - 1):
        return None
    refused = dict(info.refused)
    for c, _ in getopt(name, words[1:], info.optstring).options:
        if c in refused:
            return f"'{info.name} -{c}' ({refused[c]}) is not supported by qimg io"
    return None


def _count_ok(info: CommandInfo, count: int) -> bool:
    return count >= info.argmin and (info.argmax is None or count <= info.argmax)


# --------------------------------------------------------------------------------------------
# The interpreter


class _Failed(Exception):
    """Ends a command that has printed why it failed."""


class Interpreter:
    """Runs qemu-io command lines on ``image``, printing to ``out`` and ``err``.

    ``read_only``: write commands fail as on a read-only qemu-io image. (On a raw image whose
    format was probed, the image itself refuses writes that would make its first sector look
    like another format, with "Operation not permitted", as qemu does.)
    :attr:`failed` tells whether any command failed (qemu-io then exits with status 1).
    """

    def __init__(
        self,
        image: IoImage,
        out: TextIO,
        err: TextIO,
        *,
        read_only: bool = False,
        clock: Callable[[], int] = time.perf_counter_ns,
    ) -> None:
        self.image = image
        self.out = out
        self.err = err
        self.read_only = read_only
        self.clock = clock
        self.failed = False

    # -- output

    def say(self, text: str) -> None:
        self.out.write(text + "\n")

    def complain(self, text: str) -> None:
        """A message for stderr, after everything printed so far on stdout."""
        self.out.flush()
        self.err.write(text + "\n")
        self.err.flush()

    # -- running

    def run(self, line: str) -> bool:
        """Runs one command line; False when the run ends here: ``quit``, or a command qimg
        io refuses (see :func:`refusal`; it counts as failed)."""
        words = split_command(line)
        if not words:
            return True
        reason = refusal(line)
        if reason is not None:
            self.complain(f"qimg: {reason}")
            self.failed = True
            return False
        name, args = words[0], words[1:]
        info = _BY_NAME.get(name)
        try:
            if info is None:
                self.complain(f'command "{name}" not found')
                raise _Failed
            if info.name == "quit":
                return False
            self._check_count(info, name, len(args))
            if info.writes and self.read_only:
                self.complain("qimg: Block node is read-only")
                raise _Failed
            handler: Callable[[CommandInfo, str, list[str]], None] = getattr(
                self, f"_cmd_{info.name}"
            )
            handler(info, name, args)
        except _Failed:
            self.failed = True
        self.out.flush()
        return True

    def _check_count(self, info: CommandInfo, name: str, count: int) -> None:
        if _count_ok(info, count):
            return
        if info.argmax is None:
            expected = f"at least {info.argmin}"
        elif info.argmin == info.argmax:
            expected = f"{info.argmin}"
        else:
            expected = f"between {info.argmin} and {info.argmax}"
        self.complain(f"bad argument count {count} to {name}, expected {expected} arguments")
        raise _Failed

    # -- pieces the commands share

    def _usage(self, info: CommandInfo, name: str) -> _Failed:
        self.say(info.usage(name))
        return _Failed()

    def _options(self, info: CommandInfo, name: str, args: list[str]) -> Getopt:
        # Options qimg refuses never get here: run() checks refusal() first.
        return getopt(name, args, info.optstring)

    def _finish_options(self, info: CommandInfo, name: str, parsed: Getopt, operands: int) -> None:
        if parsed.error is not None:
            self.complain(parsed.error)
            raise self._usage(info, name)
        if len(parsed.operands) != operands:
            raise self._usage(info, name)

    def _number(self, text: str) -> int:
        try:
            return parse_number(text)
        except NumberError as err:
            self.say(err.line())
            raise _Failed from None

    def _pattern(self, text: str) -> int:
        value = parse_pattern(text)
        if value is None:
            self.say(f"{text} is not a valid pattern byte")
            raise _Failed
        return value

    def _length(self, text: str, hint: str = "") -> int:
        value = self._number(text)
        if value > MAX_REQUEST:
            self.say(f"length cannot exceed {MAX_REQUEST}{hint}, given {text}")
            raise _Failed
        return value

    def _request(self, op: str, offset: int, length: int, action: Callable[[], None]) -> int:
        """Runs one request on the image; returns its duration in nanoseconds. A range that
        does not lie inside the image fails as qemu's block layer fails it."""
        start = self.clock()
        reason: str | None = None
        if offset > self.image.size or length > self.image.size - offset:
            reason = os.strerror(errno.EIO)
        else:
            try:
                action()
            except QimgError as exc:
                reason = self._reason(exc)
        elapsed = self.clock() - start
        if reason is not None:
            self.say(f"{op} failed: {reason}")
            raise _Failed
        return elapsed

    def _reason(self, exc: QimgError) -> str:
        """The strerror() text for a failed request; other failures are explained on stderr
        first and count as I/O errors, as qemu reports corrupt images."""
        if isinstance(exc, ImageIOError) and exc.errno:
            return os.strerror(exc.errno)
        where = f"{exc.subject}: " if exc.subject else ""
        self.complain(f"qimg: {where}{exc}")
        return os.strerror(errno.EIO)

    def _allocated_runs(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """(start, length, allocated) runs of the range, merged: allocated means stored by the
        image itself (data or zeroes), not left to its backing file or unallocated."""
        run_start, run_len, run_alloc = offset, 0, False
        for e in self.image.map(offset, length):
            allocated = e.depth == 0 and e.present
            if run_len and allocated != run_alloc:
                yield run_start, run_len, run_alloc
                run_start, run_len = e.start, 0
            if not run_len:
                run_start, run_alloc = e.start, allocated
            run_len += e.length
        if run_len:
            yield run_start, run_len, run_alloc

    # -- the commands

    def _cmd_read(self, info: CommandInfo, name: str, args: list[str]) -> None:
        parsed = self._options(info, name, args)
        machine = quiet = verbose = False
        pattern: int | None = None
        check_from: int | None = None
        check_len: int | None = None
        for c, value in parsed.options:
            if c == "C":
                machine = True
            elif c == "l":
                check_len = self._number(value or "")
            elif c == "P":
                pattern = self._pattern(value or "")
            elif c == "q":
                quiet = True
            elif c == "s":
                check_from = self._number(value or "")
            elif c == "v":
                verbose = True
        self._finish_options(info, name, parsed, 2)
        offset = self._number(parsed.operands[0])
        count = self._length(parsed.operands[1])
        if pattern is None and (check_from is not None or check_len is not None):
            raise self._usage(info, name)
        check_from = check_from or 0
        if check_len is None:
            check_len = count - check_from
        if check_len < 0 or check_from + check_len > count:
            self.say("pattern verification range exceeds end of read data")
            raise _Failed
        data = b""

        def read() -> None:
            nonlocal data
            data = self.image.read(offset, count)

        elapsed = self._request("read", offset, count, read)
        ok = True
        if pattern is not None:
            end = check_from + check_len
            if data.count(pattern, check_from, end) != check_len:
                self.say(
                    f"Pattern verification failed at offset {offset + check_from}, "
                    f"{check_len} bytes"
                )
                ok = False
        if not quiet:
            if verbose:
                for line in hex_dump(data, offset):
                    self.say(line)
            self.say(report("read", elapsed, offset, count, count, machine))
        if not ok:
            raise _Failed

    def _cmd_write(self, info: CommandInfo, name: str, args: list[str]) -> None:
        parsed = self._options(info, name, args)
        machine = quiet = fua = zero = unmap = compressed = False
        pattern: int | None = None
        source: str | None = None
        for c, value in parsed.options:
            if c == "c":
                compressed = True
            elif c == "C":
                machine = True
            elif c == "f":
                fua = True
            elif c == "P":
                pattern = self._pattern(value or "")
            elif c == "q":
                quiet = True
            elif c == "s":
                source = value
            elif c == "u":
                unmap = True
            elif c == "z":
                zero = True
        self._finish_options(info, name, parsed, 2)
        if fua and compressed:
            self.say("-f and -b or -c cannot be specified at the same time")
            raise _Failed
        if unmap and not zero:
            self.say("-u requires -z to be specified")
            raise _Failed
        if zero + (pattern is not None) + (source is not None) > 1:
            self.say("Only one of -z, -P, and -s can be specified at the same time")
            raise _Failed
        offset = self._number(parsed.operands[0])
        count = self._length(parsed.operands[1], " without -n")
        if compressed:
            for number, what in ((offset, "offset"), (count, "count")):
                if number % 512:
                    self.say(f"{number} is not a sector-aligned value for '{what}'")
                    raise _Failed
        data: bytes | None = None
        if source is not None:
            data = self._source_data(source, count)
        elif not zero:
            data = bytes([DEFAULT_WRITE_PATTERN if pattern is None else pattern]) * count
        image = self.image

        def write() -> None:
            if data is None:
                image.write_zeroes(offset, count, unmap=unmap)
            elif compressed:
                self._write_compressed(offset, data)
            else:
                image.write(offset, data)
            if fua:
                image.flush()

        elapsed = self._request("write", offset, count, write)
        if not quiet:
            self.say(report("wrote", elapsed, offset, count, count, machine))

    def _write_compressed(self, offset: int, data: bytes) -> None:
        """``write -c``: each cluster of the range stored compressed, in order, failing as
        qemu does: not qcow2 (ENOTSUP), not whole clusters (EINVAL, unless the range ends at
        the end of the image), a cluster the image already allocates (EIO)."""
        image = self.image
        cluster = image.info().get("cluster-size") if image.format == "qcow2" else None
        if not isinstance(cluster, int):
            raise ImageIOError("compressed writes need qcow2", errno.ENOTSUP)
        end = offset + len(data)
        if offset % cluster or (len(data) % cluster and end != image.size):
            raise ImageIOError("compressed writes take whole clusters", errno.EINVAL)
        view = memoryview(data)
        for start in range(offset, end, cluster):
            length = min(cluster, end - start)
            if any(alloc for _, _, alloc in self._allocated_runs(start, length)):
                raise ImageIOError("the cluster is allocated", errno.EIO)
            image.write_compressed(start, view[start - offset : start - offset + length])

    def _source_data(self, path: str, count: int) -> bytes:
        """``write -s``: the file's first COUNT bytes, repeated to fill COUNT bytes."""
        try:
            with open(path, "rb") as f:
                head = f.read(count)
        except OSError as exc:
            self.complain(f"{path}: {exc.strerror}")
            raise _Failed from None
        if not head:
            self.complain(f"{path}: file is empty")
            raise _Failed
        whole, part = divmod(count, len(head))
        return head * whole + head[:part]

    def _cmd_discard(self, info: CommandInfo, name: str, args: list[str]) -> None:
        parsed = self._options(info, name, args)
        machine = quiet = False
        for c, _ in parsed.options:
            if c == "C":
                machine = True
            elif c == "q":
                quiet = True
        self._finish_options(info, name, parsed, 2)
        offset = self._number(parsed.operands[0])
        count = self._length(parsed.operands[1])
        image = self.image
        elapsed = self._request("discard", offset, count, lambda: image.discard(offset, count))
        if not quiet:
            self.say(report("discard", elapsed, offset, count, count, machine))

    def _cmd_flush(self, info: CommandInfo, name: str, args: list[str]) -> None:
        try:
            self.image.flush()
        except QimgError as exc:
            self.complain(f"qimg: flush failed: {self._reason(exc)}")
            raise _Failed from None

    def _cmd_map(self, info: CommandInfo, name: str, args: list[str]) -> None:
        if not self.image.size:
            return
        for start, length, allocated in self._allocated_runs(0, self.image.size):
            state = "    allocated" if allocated else "not allocated"
            self.say(
                f"{size_text(length)} ({length:#x}) bytes {state} at offset "
                f"{size_text(start)} ({start:#x})"
            )

    def _cmd_alloc(self, info: CommandInfo, name: str, args: list[str]) -> None:
        offset = self._number(args[0])
        count = self._number(args[1]) if len(args) > 1 else 512
        count = max(0, min(count, self.image.size - offset))
        allocated = 0
        if count:
            runs = self._allocated_runs(offset, count)
            allocated = sum(length for _, length, alloc in runs if alloc)
        self.say(f"{allocated}/{count} bytes allocated at offset {size_text(offset)}")

    def _cmd_length(self, info: CommandInfo, name: str, args: list[str]) -> None:
        self.say(size_text(self.image.size))

    def _cmd_help(self, info: CommandInfo, name: str, args: list[str]) -> None:
        if not args:
            for command in _COMMANDS:
                alias = f"(or {command.altname})" if command.altname else ""
                parts = (command.name, alias, command.synopsis, "--", command.oneline)
                self.say(" ".join(part for part in parts if part))
            self.say("")
            self.say("'help COMMAND' explains one command and its options.")
            return
        wanted = _BY_NAME.get(args[0])
        if wanted is None:
            if args[0] in QEMU_IO_ONLY:
                self.say(f"command {args[0]} is a qemu-io command that qimg io does not support")
            else:
                self.say(f"command {args[0]} not found")
            raise _Failed
        self.say(wanted.usage(args[0]))
        if wanted.details:
            self.say(wanted.details.rstrip("\n"))
            self.say("")
