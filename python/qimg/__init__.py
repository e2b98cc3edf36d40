"""qimg: qemu-img compatible disk image toolkit (qcow2, raw) with a Rust core.

>>> import qimg
>>> qimg.create("disk.qcow2", 10 << 30, fmt="qcow2", options={"preallocation": "metadata"})
>>> qimg.measure("qcow2", size=10 << 30).fully_allocated
10739318784
>>> with qimg.open("disk.qcow2") as img:
...     img.read(0, 512) == bytes(512)
True
>>> qimg.check("disk.qcow2").corruptions
0
"""

from __future__ import annotations

from qimg._core import __version__
from qimg.check import CheckReport, check
from qimg.convert import convert
from qimg.create import create
from qimg.errors import (
    ImageIOError,
    ImageTooLargeError,
    InvalidImageError,
    InvalidOptionError,
    QimgError,
    UsageError,
)
from qimg.image import Image, MapExtent
from qimg.image import open_image as open
from qimg.measure import Measurement, measure
from qimg.prealloc import PreallocMode

__all__ = [
    "CheckReport",
    "Image",
    "ImageIOError",
    "ImageTooLargeError",
    "InvalidImageError",
    "InvalidOptionError",
    "MapExtent",
    "Measurement",
    "PreallocMode",
    "QimgError",
    "UsageError",
    "__version__",
    "check",
    "convert",
    "create",
    "measure",
    "open",
]
