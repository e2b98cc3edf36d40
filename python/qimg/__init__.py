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

Node trees (a quorum of replicas, ...) open from QEMU's ``json:`` strings,
``--image-opts`` strings or plain dicts; their events go to a callback or an
:class:`EventStream`:

>>> stream = qimg.EventStream()
>>> spec = {"driver": "quorum", "vote-threshold": 2, "children": [
...     {"driver": "raw", "file": {"filename": name}} for name in ("a.raw", "b.raw", "c.raw")]}
>>> with qimg.open(spec, events=stream) as img:
...     data = img.read(0, 65536)  # the version at least two replicas hold
>>> for event in stream:  # e.g. QUORUM_REPORT_BAD for a replica that differs
...     print(event.to_json())
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
from qimg.events import Event, EventStream
from qimg.image import Image, ImageSpec, MapExtent
from qimg.image import open_image as open
from qimg.measure import Measurement, measure
from qimg.prealloc import PreallocMode
from qimg.scrub import ScrubReport, scrub
from qimg.spec import NodeSpec, parse_spec

__all__ = [
    "CheckReport",
    "Event",
    "EventStream",
    "Image",
    "ImageIOError",
    "ImageSpec",
    "ImageTooLargeError",
    "InvalidImageError",
    "InvalidOptionError",
    "MapExtent",
    "Measurement",
    "NodeSpec",
    "PreallocMode",
    "QimgError",
    "ScrubReport",
    "UsageError",
    "__version__",
    "check",
    "convert",
    "create",
    "measure",
    "open",
    "parse_spec",
    "scrub",
]
