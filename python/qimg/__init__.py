"""qimg: qemu-img compatible disk image toolkit (qcow2, raw) with a Rust core.

>>> import qimg
>>> qimg.create("disk.qcow2", 10 << 30, fmt="qcow2", options={"preallocation": "metadata"})
>>> qimg.measure("qcow2", size=10 << 30).fully_allocated
10739318784
"""

from __future__ import annotations

from qimg._core import __version__
from qimg.create import create
from qimg.errors import (
    ImageIOError,
    ImageTooLargeError,
    InvalidImageError,
    InvalidOptionError,
    QimgError,
    UsageError,
)
from qimg.measure import Measurement, measure
from qimg.prealloc import PreallocMode

__all__ = [
    "ImageIOError",
    "ImageTooLargeError",
    "InvalidImageError",
    "InvalidOptionError",
    "Measurement",
    "PreallocMode",
    "QimgError",
    "UsageError",
    "__version__",
    "create",
    "measure",
]
