"""Preallocation modes and their one parser."""

from __future__ import annotations

import enum

from qimg.errors import InvalidOptionError

__all__ = ["PreallocMode"]


class PreallocMode(enum.Enum):
    """How much of an image is allocated when it is created."""

    OFF = "off"
    """Nothing beyond what the format needs to exist."""
    METADATA = "metadata"
    """All metadata; the data region stays a hole (qcow2 only)."""
    FALLOC = "falloc"
    """Metadata, and the data region reserved with fallocate."""
    FULL = "full"
    """Metadata, and the data region written with zeroes."""

    @classmethod
    def parse(cls, text: str, *, allowed: tuple[PreallocMode, ...] | None = None) -> PreallocMode:
        """The mode named ``text``; the error names the value and the choices."""
        choices = allowed if allowed is not None else tuple(cls)
        for mode in choices:
            if mode.value == text:
                return mode
        names = ", ".join(m.value for m in choices)
        raise InvalidOptionError(
            f"Parameter 'preallocation' does not accept value '{text}' (allowed values: {names})"
        )

    def __str__(self) -> str:
        return self.value
