"""Open images: the Python API for reading, and the facts ``info`` prints."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from qimg import _core
from qimg.errors import UsageError
from qimg.prealloc import PreallocMode
from qimg.qjson import JsonValue, human_lines
from qimg.sizes import size_to_str

if TYPE_CHECKING:
    # Python 3.12 has it as collections.abc.Buffer; only the type checker needs it.
    from typing_extensions import Buffer

__all__ = ["Image", "MapExtent", "open_image"]


@dataclass(frozen=True)
class MapExtent:
    """A run of guest bytes with one allocation status, as ``map`` prints it."""

    start: int
    length: int
    depth: int
    """How far down the backing chain the bytes come from (0: the image itself)."""
    present: bool
    zero: bool
    data: bool
    compressed: bool
    offset: int | None
    """Host offset in ``filename`` when the bytes are stored there plainly."""
    filename: str | None


class Image:
    """An open image (with its backing chain). Use as a context manager or
    call :meth:`close`; I/O after closing raises ``ValueError``.

    Images opened with ``writable=True`` also take writes; closing one
    writes back everything (an image that is never closed is written back
    when it is garbage collected, but errors then go unreported)."""

    def __init__(self, core: _core.Image) -> None:
        self._core: _core.Image | None = core

    @property
    def _img(self) -> _core.Image:
        if self._core is None:
            raise ValueError("I/O operation on a closed image")
        return self._core

    def close(self) -> None:
        core, self._core = self._core, None
        if core is not None and core.writable:
            core.close()

    def __enter__(self) -> Image:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def size(self) -> int:
        """Virtual size in bytes."""
        return self._img.size

    @property
    def format(self) -> str:
        return self._img.format

    @property
    def filename(self) -> str:
        return self._img.filename

    def read(self, offset: int, length: int) -> bytes:
        """``length`` guest bytes at ``offset`` (the range must lie inside the image)."""
        return self._img.read(offset, length)

    @property
    def writable(self) -> bool:
        return self._img.writable

    def write(self, offset: int, data: Buffer) -> None:
        """Writes ``data`` (bytes, bytearray, memoryview, ...) at guest ``offset``."""
        self._img.write(offset, _as_bytes(data))

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Makes ``length`` bytes at ``offset`` read as zeroes; ``unmap`` lets
        the image release their space."""
        self._img.write_zeroes(offset, length, unmap=unmap)

    def discard(self, offset: int, length: int) -> None:
        """Releases the whole clusters of the range. Afterwards they read as
        zeroes (qcow2 v3, raw) or from the backing file (qcow2 v2)."""
        self._img.discard(offset, length)

    def write_compressed(self, offset: int, data: Buffer) -> None:
        """Stores one whole, unallocated qcow2 cluster compressed."""
        self._img.write_compressed(offset, _as_bytes(data))

    def flush(self) -> None:
        """Makes every write so far durable."""
        self._img.flush()

    @property
    def backing_file(self) -> str | None:
        """The backing file name as the image records it (None without one)."""
        name = self._img.details().get("backing_filename")
        return None if name is None else str(name)

    @property
    def backing_format(self) -> str | None:
        """The backing file format the image records, if any."""
        fmt = self._img.details().get("backing_format")
        return None if fmt is None else str(fmt)

    def amend(
        self,
        *,
        compat: str | None = None,
        lazy_refcounts: bool | None = None,
        refcount_bits: int | None = None,
        size: int | None = None,
    ) -> None:
        """Changes qcow2 options in place, as ``qemu-img amend`` does; None
        keeps an option. Use the image only to close it afterwards."""
        self._img.amend(
            compat=compat, lazy_refcounts=lazy_refcounts, refcount_bits=refcount_bits, size=size
        )

    def resize(self, size: int, *, preallocation: PreallocMode = PreallocMode.OFF) -> None:
        """Sets the virtual size (a multiple of 512). Growing preallocates the
        new area as ``preallocation`` says; shrinking discards everything past
        the new end."""
        self._img.resize(size, preallocation=preallocation.value)

    def readinto(self, offset: int, buffer: bytearray | memoryview) -> int:
        """Fills ``buffer`` with guest bytes at ``offset``; returns the count."""
        if isinstance(buffer, bytearray):
            return self._img.readinto(offset, buffer)
        view = memoryview(buffer).cast("B")
        view[:] = self._img.read(offset, view.nbytes)
        return view.nbytes

    def map(self, start: int = 0, length: int | None = None) -> list[MapExtent]:
        """Allocation extents of ``[start, start + length)``, merged as ``qemu-img map`` does."""
        return [MapExtent(*e) for e in self._img.map(start, length)]

    def backing(self) -> Image | None:
        core = self._img.backing()
        return Image(core) if core is not None else None

    def info(self) -> dict[str, JsonValue]:
        """The ImageInfo object ``qemu-img info --output=json`` prints for this image."""
        return image_info(self._img)

    def chain(self) -> list[Image]:
        """This image and every image below it in the backing chain."""
        out: list[Image] = [self]
        while (below := out[-1].backing()) is not None:
            out.append(below)
        return out


def _as_bytes(data: Buffer) -> bytes | bytearray:
    # The core takes bytes and bytearray; other buffers are copied once here.
    return data if isinstance(data, bytes | bytearray) else bytes(data)


def open_image(
    path: str | os.PathLike[str],
    format: str | None = None,
    *,
    backing: bool = True,
    writable: bool = False,
    cache: str = "writeback",
) -> Image:
    """Opens an image (read-only unless ``writable``; its backing chain is
    always read-only); ``format`` None probes it as qemu-img does.

    ``cache`` is ``"writeback"`` (flushes reach the disk) or ``"unsafe"``
    (flushes are skipped: faster, but a power failure may lose or reorder
    writes; what qemu-img convert uses for its output by default)."""
    if cache not in CACHE_MODES:
        raise UsageError(
            f"Cache mode '{cache}' is not supported by qimg (use {' or '.join(CACHE_MODES)})"
        )
    return Image(
        _core.open_image(
            os.fspath(path),
            format,
            no_backing=not backing,
            writable=writable,
            unsafe_cache=cache == "unsafe",
        )
    )


#: The cache modes qimg implements (qemu's others are refused by name).
CACHE_MODES = ("writeback", "unsafe")


def _file_child(d: dict[str, Any]) -> dict[str, JsonValue]:
    # Members in QAPI order; the printer reorders them as qemu-img does.
    return {
        "name": "file",
        "info": {
            "filename": d["file_filename"],
            "format": "file",
            "dirty-flag": False,
            "actual-size": d["actual_size"],
            "virtual-size": d["file_length"],
            "format-specific": {"type": "file", "data": {}},
            "children": [],
        },
    }


def image_info(core: _core.Image) -> dict[str, JsonValue]:
    d = core.details()
    info: dict[str, JsonValue] = {
        "filename": d["filename"],
        "format": d["format"],
        "dirty-flag": bool(d.get("dirty", False)),
    }
    if "actual_size" in d:
        info["actual-size"] = d["actual_size"]
    info["virtual-size"] = d["virtual_size"]
    if "cluster_size" in d:
        info["cluster-size"] = d["cluster_size"]
    if "backing_filename" in d:
        info["backing-filename"] = d["backing_filename"]
        info["full-backing-filename"] = d["full_backing_filename"]
        if d.get("backing_format") is not None:
            info["backing-filename-format"] = d["backing_format"]
    if "snapshots" in d:
        info["snapshots"] = [
            {
                "id": s["id"],
                "name": s["name"],
                "vm-state-size": s["vm_state_size"],
                "date-sec": s["date_sec"],
                "date-nsec": s["date_nsec"],
                "vm-clock-sec": s["vm_clock_nsec"] // 1_000_000_000,
                "vm-clock-nsec": s["vm_clock_nsec"] % 1_000_000_000,
                "icount": s["icount"] if s["icount"] is not None else 0,
            }
            for s in d["snapshots"]
        ]
    if "qcow2" in d:
        q = d["qcow2"]
        data: dict[str, JsonValue] = {"compat": q["compat"]}
        if "extended_l2" in q:
            data["extended-l2"] = q["extended_l2"]
        if "lazy_refcounts" in q:
            data["lazy-refcounts"] = q["lazy_refcounts"]
        if "corrupt" in q:
            data["corrupt"] = q["corrupt"]
        data["refcount-bits"] = q["refcount_bits"]
        data["compression-type"] = q.get("compression_type", "zlib")
        info["format-specific"] = {"type": "qcow2", "data": data}
    if "file_filename" in d:
        info["children"] = [_file_child(d)]
    return info


def _snapshot_table(snapshots: list[Any]) -> list[str]:
    heading = f"{'ID':<7} {'TAG':<16} {'VM_SIZE':>8} {'DATE':>19} {'VM_CLOCK':>15} {'ICOUNT':>10}"
    lines = ["Snapshot list:", heading]
    for s in snapshots:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["date-sec"]))
        clock_ms = s["vm-clock-sec"] * 1000 + s["vm-clock-nsec"] // 1_000_000
        hours, rest = divmod(clock_ms, 3_600_000)
        minutes, rest = divmod(rest, 60_000)
        seconds, millis = divmod(rest, 1000)
        clock = f"{hours:04d}:{minutes:02d}:{seconds:02d}.{millis:03d}"
        lines.append(
            f"{s['id']:<7} {s['name']:<16} {size_to_str(s['vm-state-size']):>8} "
            f"{date:>19} {clock:>15} {s['icount']:>10}"
        )
    return lines


def info_human(info: dict[str, Any]) -> str:
    """The text ``qemu-img info`` prints for one image."""
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)",
        f"disk size: {size_to_str(info['actual-size'])}",
    ]
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if "backing-filename" in info:
        name, full = info["backing-filename"], info["full-backing-filename"]
        lines.append(f"backing file: {name}" + (f" (actual path: {full})" if full != name else ""))
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if info.get("snapshots"):
        lines.extend(_snapshot_table(info["snapshots"]))
    if "format-specific" in info:
        lines.append("Format specific information:")
        lines.extend(human_lines(info["format-specific"]["data"], 4))
    for child in info.get("children", []):
        c = child["info"]
        lines.append(f"Child node '/{child['name']}':")
        lines.append(f"    filename: {c['filename']}")
        lines.append(f"    protocol type: {c['format']}")
        lines.append(
            f"    file length: {size_to_str(c['virtual-size'])} ({c['virtual-size']} bytes)"
        )
        lines.append(f"    disk size: {size_to_str(c['actual-size'])}")
    return "\n".join(lines)
