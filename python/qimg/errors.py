"""Exceptions raised by qimg, from Python and from the Rust core alike.

Every message is complete on its own: the CLI prints it after ``qimg: `` (and
the image name where one is involved) and nothing else.
"""

from __future__ import annotations

__all__ = [
    "CancelledError",
    "ImageIOError",
    "ImageIsADirectoryError",
    "ImageLockedError",
    "ImageNotFoundError",
    "ImagePermissionError",
    "ImageTooLargeError",
    "InvalidImageError",
    "InvalidOptionError",
    "NoSpaceError",
    "QimgError",
    "ReadOnlyError",
    "UnsupportedError",
    "UsageError",
]


class QimgError(Exception):
    """Base class of every error qimg reports.

    ``subject`` names what the error is about (an image file) when the message
    itself does not; the CLI prints it as ``qimg: SUBJECT: MESSAGE``.
    """

    subject: str | None = None

    def about(self, subject: str) -> QimgError:
        """Records what the error is about; returns the same exception."""
        self.subject = subject
        return self


class UsageError(QimgError):
    """The command line itself is malformed (missing or extra arguments)."""


class InvalidOptionError(QimgError, ValueError):
    """An option or value is not acceptable; nothing was written."""


class ImageTooLargeError(InvalidOptionError):
    """The requested size does not fit the format with these options."""


class InvalidImageError(QimgError):
    """An existing image is damaged or not in the format it was opened as."""


class ImageIOError(QimgError, OSError):
    """The operating system refused an I/O operation.

    Raised by the core as ``ImageIOError(message, errno)``.
    """

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.errno = errno

    def __str__(self) -> str:
        return self.message


class ImageNotFoundError(ImageIOError, FileNotFoundError):
    """The image (or a file it names) does not exist."""


class ImagePermissionError(ImageIOError, PermissionError):
    """The operating system denied access to the image."""


class ImageIsADirectoryError(ImageIOError, IsADirectoryError):
    """A directory was given where an image file was expected."""


class ReadOnlyError(ImageIOError):
    """The image lies on a read-only file system or device."""


class NoSpaceError(ImageIOError):
    """The file system (or quota) holding the image is full."""


class ImageLockedError(QimgError, BlockingIOError):
    """Another process (a VM, qemu-nbd, qemu-img) holds the image with
    permissions this open conflicts with; ``force_share`` reads it anyway."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnsupportedError(QimgError):
    """The request is valid, but this image or device cannot carry it out, as qemu-img
    refuses it too (growing a block device, zero clusters in a v2 image)."""


class CancelledError(QimgError):
    """The operation was stopped before it finished."""
