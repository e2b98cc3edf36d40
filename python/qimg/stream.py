"""A file object over an open image's guest bytes (:meth:`qimg.Image.open_stream`)."""

from __future__ import annotations

import errno
import io
from typing import TYPE_CHECKING

from qimg.errors import NoSpaceError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

    from qimg.image import Image

__all__ = ["ImageStream"]

# readall() reads the rest of the image in pieces of this size.
_READALL_CHUNK = 4 << 20


class ImageStream(io.RawIOBase):
    """The guest bytes of ``image`` as an unbuffered binary file: ``read``, ``readinto``,
    ``seek`` and ``tell``, and ``write`` when the image is open for writing.

    An image has a fixed size: reading at or past the end returns ``b""``, a write
    that runs past the end writes what fits and returns that count, and a write at
    the end raises ``OSError(ENOSPC)``, as a block device does. ``close()`` flushes
    writes and leaves the image open. Wrap it in :class:`io.BufferedReader` for
    many small reads."""

    def __init__(self, image: Image) -> None:
        super().__init__()
        self._image = image
        self._pos = 0
        self._writable = image.writable

    @property
    def name(self) -> str:
        return self._image.filename

    @property
    def mode(self) -> str:
        return "r+b" if self._writable else "rb"

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"pos={self._pos}"
        return f"<qimg.ImageStream {self._image.filename!r} mode={self.mode!r} {state}>"

    def readable(self) -> bool:
        self._check_open()
        return True

    def writable(self) -> bool:
        self._check_open()
        return self._writable

    def seekable(self) -> bool:
        self._check_open()
        return True

    def tell(self) -> int:
        self._check_open()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._check_open()
        if whence == io.SEEK_SET:
            base = 0
        elif whence == io.SEEK_CUR:
            base = self._pos
        elif whence == io.SEEK_END:
            base = self._image.size
        else:
            raise ValueError(f"invalid whence ({whence}; use 0, 1 or 2)")
        pos = base + offset
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        self._check_open()
        view = memoryview(buffer).cast("B")
        count = max(0, min(view.nbytes, self._image.size - self._pos))
        if count == 0:
            return 0
        if isinstance(buffer, bytearray) and count == len(buffer):
            self._image.readinto(self._pos, buffer)  # the core fills it in place
        else:
            self._image.readinto(self._pos, view[:count])
        self._pos += count
        return count

    def readall(self) -> bytes:
        parts: list[bytes] = []
        while chunk := self.read(_READALL_CHUNK):
            parts.append(chunk)
        return b"".join(parts)

    def write(self, data: ReadableBuffer, /) -> int:
        self._check_open()
        if not self._writable:
            raise io.UnsupportedOperation("the image is read-only (open it with writable=True)")
        view = memoryview(data).cast("B")
        if view.nbytes == 0:
            return 0
        count = min(view.nbytes, self._image.size - self._pos)
        if count <= 0:
            raise NoSpaceError(
                f"Write at offset {self._pos} is past the end of the image "
                f"({self._image.size} bytes)",
                errno.ENOSPC,
            )
        self._image.write(self._pos, view[:count])
        self._pos += count
        return count

    def flush(self) -> None:
        if not self.closed and self._writable:
            self._image.flush()

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on a closed image stream")
