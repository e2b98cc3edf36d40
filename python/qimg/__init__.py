"""qimg: qemu-img compatible disk image toolkit (qcow2, raw) with a Rust core.

>>> import qimg
>>> qimg.create("disk.qcow2", 10 << 30, format="qcow2", options={"preallocation": "metadata"})
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

import importlib

from qimg._core import __version__

# typing.TYPE_CHECKING without importing typing: every command line imports this module.
TYPE_CHECKING = False
if TYPE_CHECKING:
    # What type checkers see: every public name, imported from its home. At run
    # time the same names load on first use (below), so that `import qimg` and
    # every command line stay quick; an unknown name is an error for both.
    from typing import Any

    from qimg.blockcopy import dd
    from qimg.committing import commit
    from qimg.comparison import CompareResult, compare
    from qimg.consistency import CheckReport, check
    from qimg.conversion import convert
    from qimg.creation import create
    from qimg.errors import (
        CancelledError,
        ImageIOError,
        ImageIsADirectoryError,
        ImageLockedError,
        ImageNotFoundError,
        ImagePermissionError,
        ImageTooLargeError,
        InvalidImageError,
        InvalidOptionError,
        NoSpaceError,
        QimgError,
        ReadOnlyError,
        UnsupportedError,
        UsageError,
    )
    from qimg.events import Event, EventStream
    from qimg.image import Image, MapExtent
    from qimg.image import open_image as open
    from qimg.info_report import ImageInfo, info
    from qimg.measurement import Measurement, measure
    from qimg.prealloc import PreallocMode
    from qimg.rebasing import rebase
    from qimg.scrubbing import ScrubReport, scrub
    from qimg.spec import ImageSpec, NodeSpec, parse_spec
    from qimg.stream import ImageStream

# Where each public name lives.
_HOMES = {
    "CheckReport": "qimg.consistency",
    "check": "qimg.consistency",
    "commit": "qimg.committing",
    "CompareResult": "qimg.comparison",
    "compare": "qimg.comparison",
    "convert": "qimg.conversion",
    "create": "qimg.creation",
    "dd": "qimg.blockcopy",
    "CancelledError": "qimg.errors",
    "ImageIOError": "qimg.errors",
    "ImageIsADirectoryError": "qimg.errors",
    "ImageLockedError": "qimg.errors",
    "ImageNotFoundError": "qimg.errors",
    "ImagePermissionError": "qimg.errors",
    "ImageTooLargeError": "qimg.errors",
    "InvalidImageError": "qimg.errors",
    "InvalidOptionError": "qimg.errors",
    "NoSpaceError": "qimg.errors",
    "QimgError": "qimg.errors",
    "ReadOnlyError": "qimg.errors",
    "UnsupportedError": "qimg.errors",
    "UsageError": "qimg.errors",
    "Event": "qimg.events",
    "EventStream": "qimg.events",
    "Image": "qimg.image",
    "ImageSpec": "qimg.spec",
    "MapExtent": "qimg.image",
    "open": "qimg.image",
    "ImageInfo": "qimg.info_report",
    "info": "qimg.info_report",
    "Measurement": "qimg.measurement",
    "measure": "qimg.measurement",
    "PreallocMode": "qimg.prealloc",
    "rebase": "qimg.rebasing",
    "ScrubReport": "qimg.scrubbing",
    "scrub": "qimg.scrubbing",
    "NodeSpec": "qimg.spec",
    "parse_spec": "qimg.spec",
    "ImageStream": "qimg.stream",
}
_RENAMED = {"open": "open_image"}

if not TYPE_CHECKING:
    # Hidden from type checkers on purpose: they see the imports above, so that a
    # misspelt name (qimg.comapre) is reported before the code runs.

    def __getattr__(name: str) -> Any:
        home = _HOMES.get(name)
        if home is None:
            raise AttributeError(f"module 'qimg' has no attribute '{name}'")
        value = getattr(importlib.import_module(home), _RENAMED.get(name, name))
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))


__all__ = [
    "CancelledError",
    "CheckReport",
    "CompareResult",
    "Event",
    "EventStream",
    "Image",
    "ImageIOError",
    "ImageInfo",
    "ImageIsADirectoryError",
    "ImageLockedError",
    "ImageNotFoundError",
    "ImagePermissionError",
    "ImageSpec",
    "ImageStream",
    "ImageTooLargeError",
    "InvalidImageError",
    "InvalidOptionError",
    "MapExtent",
    "Measurement",
    "NoSpaceError",
    "NodeSpec",
    "PreallocMode",
    "QimgError",
    "ReadOnlyError",
    "ScrubReport",
    "UnsupportedError",
    "UsageError",
    "__version__",
    "check",
    "commit",
    "compare",
    "convert",
    "create",
    "dd",
    "info",
    "measure",
    "open",
    "parse_spec",
    "rebase",
    "scrub",
]
