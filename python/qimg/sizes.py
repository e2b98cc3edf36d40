"""Byte counts in the short form qemu-img prints (``324 KiB``)."""

from __future__ import annotations

import math

__all__ = ["size_to_str"]

_UNITS = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")


def size_to_str(value: int) -> str:
    """Three significant digits in the largest binary unit that keeps the
    number below 1000 (``0.977 KiB`` for 1000 bytes, ``1 MiB`` for 1048576)."""
    _mantissa, exponent = math.frexp(value / (1000.0 / 1024.0))
    unit = max(0, int((exponent - 1) / 10))
    unit = min(unit, len(_UNITS) - 1)
    return f"{value / (1 << (unit * 10)):0.3g} {_UNITS[unit]}B"
