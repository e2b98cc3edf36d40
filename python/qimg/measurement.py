"""``measure``: the file size a new image needs, with qemu-img's numbers."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

from qimg import _core
from qimg.creation import OptionValue, option_items, qcow2_spec
from qimg.deprecated import renamed
from qimg.errors import UsageError
from qimg.events import EventCallback
from qimg.formats import format_info
from qimg.image import Image, drain_events, open_image
from qimg.options import OptionItem
from qimg.prealloc import PreallocMode

# typing.TYPE_CHECKING without importing typing.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from qimg.info_report import BitmapInfo
    from qimg.snapshot_ref import SnapshotRef
    from qimg.spec import ImageSpec

__all__ = ["Measurement", "bitmaps_size", "measure", "measure_items"]


@dataclass(frozen=True)
class Measurement:
    required: int
    """Bytes the new image needs for the source's data."""
    fully_allocated: int
    """Bytes with every cluster allocated."""
    bitmaps: int | None = None
    """Bytes for persistent bitmaps, where the source can carry them."""

    def human(self) -> str:
        lines = [
            f"required size: {self.required}",
            f"fully allocated size: {self.fully_allocated}",
        ]
        if self.bitmaps is not None:
            lines.append(f"bitmaps size: {self.bitmaps}")
        return "\n".join(lines)

    def as_json(self) -> dict[str, int]:
        out: dict[str, int] = {}
        if self.bitmaps is not None:
            out["bitmaps"] = self.bitmaps
        out["required"] = self.required
        out["fully-allocated"] = self.fully_allocated
        return out


def measure_items(
    out_fmt: str,
    options: list[OptionItem],
    *,
    size: int | None = None,
    filename: ImageSpec | None = None,
    fmt: str | None = None,
    image_opts: bool = False,
    events: EventCallback | None = None,
    force_share: bool = False,
    snapshot: str | SnapshotRef | None = None,
) -> Measurement:
    """Measures for the target format ``out_fmt`` with ``-o`` items, either
    an empty image of ``size`` bytes or the data of image ``filename`` (a file
    name or a node-tree spec, see :func:`qimg.open`), or of its internal
    ``snapshot`` (``-l``)."""
    if (size is None) == (filename is None):
        raise UsageError(
            "--size N cannot be used together with a filename"
            if size is not None
            else "Either --size N or one filename must be specified"
        )
    if snapshot is not None and filename is None:
        raise UsageError("-l names a snapshot of a source image; it needs a filename")
    if fmt is not None and filename is None:
        raise UsageError("-f names the format of a source image; it needs a filename, not --size")
    info = format_info(out_fmt)
    parsed = info.parse(options)

    source: Image | None = None
    if filename is not None:
        source = open_image(
            filename,
            fmt,
            image_opts=image_opts,
            events=events,
            force_share=force_share,
            snapshot=snapshot,
        )
        virtual_size = source.size
    else:
        assert size is not None
        virtual_size = size

    prealloc = info.preallocation(parsed)
    if info.name == "raw":
        if source is not None:
            source.close()
        raw = _core.measure_raw(virtual_size)
        return Measurement(raw.required, raw.fully_allocated, raw.bitmaps)

    # Built with create's validation, so measure refuses what create would. Backing
    # and preallocation are passed to the measurement itself: measure does not
    # check their combination (qemu-img does not either).
    spec = qcow2_spec(parsed, 0, PreallocMode.OFF)
    data = 0
    source_bitmaps: int | None = None
    if source is not None:
        with source:
            try:
                data = source._img.data_bytes(spec.cluster_size)
            finally:
                drain_events([source])
            details = source._img.details()
            specific = details.format_specific
            if (
                details.format == "qcow2"
                and specific is not None
                and specific.get("compat") == "1.1"
                and spec.version >= 3
            ):
                # Only v3 qcow2 can carry persistent bitmaps, into a v3 target.
                found_bitmaps = cast("list[BitmapInfo]", specific.get("bitmaps", []))
                source_bitmaps = bitmaps_size(
                    details.virtual_size, found_bitmaps, spec.cluster_size
                )
    found = _core.measure_qcow2(
        spec,
        virtual_size=virtual_size,
        data=data,
        has_source=filename is not None,
        preallocation=prealloc.value,
        has_backing="backing_file" in parsed,
    )
    bitmaps = source_bitmaps if found.bitmaps is None else found.bitmaps
    return Measurement(found.required, found.fully_allocated, bitmaps)


def bitmaps_size(virtual_size: int, bitmaps: Sequence[BitmapInfo], cluster_size: int) -> int:
    """Bytes the persistent bitmaps of a ``virtual_size`` image take in a qcow2 image with
    ``cluster_size`` clusters: each bitmap's data clusters and its table, and the
    directory that lists them all (what ``qemu-img measure`` reports as bitmaps size)."""

    def clusters(n: int) -> int:
        return -(-n // cluster_size)

    total = 0
    directory = 0
    for bitmap in bitmaps:
        bits = -(-virtual_size // bitmap["granularity"])
        data_clusters = clusters(-(-bits // 8))
        total += (data_clusters + clusters(data_clusters * 8)) * cluster_size
        # A directory entry: 24 bytes, then the name, padded to 8 bytes.
        directory += -(-(24 + len(bitmap["name"].encode())) // 8) * 8
    if bitmaps:
        total += clusters(directory) * cluster_size
    return total


def measure(
    out_format: str | None = None,
    *,
    size: int | None = None,
    filename: ImageSpec | None = None,
    format: str | None = None,
    options: Mapping[str, OptionValue] | str | None = None,
    image_opts: bool = False,
    events: EventCallback | None = None,
    fmt: str | None = None,
    out_fmt: str | None = None,
    snapshot: str | SnapshotRef | None = None,
) -> Measurement:
    """Python API for ``qemu-img measure``: how large an image of ``out_format``
    (``-O``; raw unless given, as for qemu-img) would be, for ``size`` bytes or for
    the contents of ``filename`` (a file name or a node-tree spec, see
    :func:`qimg.open`, of format ``format``, probed when None). ``options`` is an
    ``-o`` string or a mapping; ``snapshot`` measures an internal snapshot of
    ``filename`` instead (an ID or name, or a :class:`~qimg.snapshot_ref.SnapshotRef`).
    ``fmt`` and ``out_fmt`` are the deprecated old names of ``format`` and
    ``out_format``."""
    target = renamed(out_format, out_fmt, new="out_format", old="out_fmt") or "raw"
    source_format = renamed(format, fmt, new="format", old="fmt")
    name = os.fspath(filename) if isinstance(filename, os.PathLike) else filename
    return measure_items(
        target,
        option_items(options),
        size=size,
        filename=name,
        fmt=source_format,
        image_opts=image_opts,
        events=events,
        snapshot=snapshot,
    )
