"""``measure``: the file size a new image needs, with qemu-img's numbers."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from qimg import _core
from qimg.creation import OptionValue, format_values, option_items
from qimg.deprecated import renamed
from qimg.errors import UsageError
from qimg.events import EventCallback
from qimg.formats import format_info
from qimg.image import Image, drain_events, open_image
from qimg.options import OptionItem

# typing.TYPE_CHECKING without importing typing.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from qimg.snapshot_ref import SnapshotRef
    from qimg.spec import ImageSpec

__all__ = ["Measurement", "measure", "measure_items"]


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

    # Refused here as create refuses it; the driver checks the rest, as create would
    # (but, as qemu-img, not the combination of backing file and preallocation).
    info.preallocation(parsed)
    try:
        found = _core.measure_image(
            info.name,
            format_values(parsed),
            virtual_size,
            source=None if source is None else source._img,
        )
    finally:
        if source is not None:
            drain_events([source])
            source.close()
    return Measurement(found.required, found.fully_allocated, found.bitmaps)


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
