"""What ``qemu-img info --output=json`` says of an image, typed.

The dictionaries keep QEMU's member names (``"virtual-size"``, ``"dirty-flag"``,
...), so that code written against ``qemu-img info --output=json`` reads them
unchanged; the TypedDicts below say which members are always there.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Literal, TypedDict, Union, overload

if sys.version_info >= (3, 11):
    from typing import NotRequired
else:
    from typing_extensions import NotRequired

if TYPE_CHECKING:
    from qimg.events import EventCallback
    from qimg.spec import ImageSpec

__all__ = [
    "BitmapInfo",
    "ChildInfo",
    "FileFormatSpecific",
    "FormatSpecific",
    "ImageInfo",
    "Qcow2Data",
    "Qcow2FormatSpecific",
    "SnapshotInfo",
    "info",
]

SnapshotInfo = TypedDict(
    "SnapshotInfo",
    {
        "id": str,
        "name": str,
        "vm-state-size": int,
        "date-sec": int,
        "date-nsec": int,
        "vm-clock-sec": int,
        "vm-clock-nsec": int,
        "icount": NotRequired[int],
    },
)
"""One internal snapshot of a qcow2 image (``icount`` only when it was recorded)."""


class BitmapInfo(TypedDict):
    name: str
    granularity: int
    flags: list[Literal["in-use", "auto"]]


"""A persistent dirty bitmap: ``auto`` follows guest writes, ``in-use`` was not
stored cleanly (its bits are stale)."""

Qcow2Data = TypedDict(
    "Qcow2Data",
    {
        "compat": str,
        "extended-l2": NotRequired[bool],
        "lazy-refcounts": NotRequired[bool],
        "corrupt": NotRequired[bool],
        "refcount-bits": int,
        "bitmaps": NotRequired[list[BitmapInfo]],
        "compression-type": str,
    },
)
"""qcow2 settings; the members marked not required are absent from compat=0.10 images."""


class Qcow2FormatSpecific(TypedDict):
    type: Literal["qcow2"]
    data: Qcow2Data


class _Empty(TypedDict):
    pass


class FileFormatSpecific(TypedDict):
    type: Literal["file"]
    data: _Empty


FormatSpecific = Union[Qcow2FormatSpecific, FileFormatSpecific]  # noqa: UP007 (runtime on 3.10)

ImageInfo = TypedDict(
    "ImageInfo",
    {
        "filename": str,
        "format": str,
        "dirty-flag": NotRequired[bool],
        "actual-size": NotRequired[int],
        "virtual-size": int,
        "cluster-size": NotRequired[int],
        "backing-filename": NotRequired[str],
        "full-backing-filename": NotRequired[str],
        "backing-filename-format": NotRequired[str],
        "snapshots": NotRequired[list[SnapshotInfo]],
        "format-specific": NotRequired[FormatSpecific],
        "children": NotRequired[list["ChildInfo"]],
    },
)
"""An image (or a node of a node tree), as ``qemu-img info --output=json`` prints it.
``filename``, ``format`` and ``virtual-size`` are always there; ``children`` are the
nodes below (``file``, ``backing``, a quorum's ``children.N``), each with its own
ImageInfo."""


class ChildInfo(TypedDict):
    name: str
    info: ImageInfo


@overload
def info(
    spec: ImageSpec,
    *,
    backing_chain: Literal[False] = False,
    format: str | None = None,
    image_opts: bool = False,
    force_share: bool = False,
    events: EventCallback | None = None,
) -> ImageInfo: ...


@overload
def info(
    spec: ImageSpec,
    *,
    backing_chain: Literal[True],
    format: str | None = None,
    image_opts: bool = False,
    force_share: bool = False,
    events: EventCallback | None = None,
) -> list[ImageInfo]: ...


def info(
    spec: ImageSpec,
    *,
    backing_chain: bool = False,
    format: str | None = None,
    image_opts: bool = False,
    force_share: bool = False,
    events: EventCallback | None = None,
) -> ImageInfo | list[ImageInfo]:
    """What ``qemu-img info --output=json`` prints for ``spec`` (a file name or a
    node-tree spec, see :func:`qimg.open`): one :data:`ImageInfo`, or with
    ``backing_chain`` a list of them, the image first and its backing files below.
    ``force_share`` is qemu-img's ``-U``. As qemu-img does, plain info names the
    backing file without opening it."""
    from qimg.image import open_image

    with open_image(
        spec,
        format,
        backing=backing_chain,
        image_opts=image_opts,
        events=events,
        force_share=force_share,
        purpose="inspect",
    ) as image:
        if not backing_chain:
            return image.info()
        return [img.info() for img in image.chain()]
