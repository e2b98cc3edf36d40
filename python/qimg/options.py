"""Option strings as qemu-img reads them: ``-o`` lists and size values.

An ``-o`` list is ``key=value`` items separated by commas; inside a value a
doubled comma ``,,`` stands for one literal comma. Several ``-o`` lists are
joined into one, and a later duplicate key wins. An item that is exactly
``help`` or ``?`` asks for the option list instead of doing anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qimg.errors import InvalidOptionError, UsageError

__all__ = [
    "HELP_WORDS",
    "OptionItem",
    "escape_value",
    "parse_bool",
    "parse_image_size",
    "parse_number",
    "parse_option_lists",
    "parse_size",
    "split_items",
]

HELP_WORDS = frozenset({"help", "?"})

_SUFFIX_SHIFT = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_SIZE_RE = re.compile(
    r"\s*(?P<sign>[+-]?)(?:(?P<hex>0[xX][0-9a-fA-F]+)|(?P<int>[0-9]+)(?P<frac>\.[0-9]*)?)"
    r"(?P<suffix>[bBkKmMgGtTpPeE]?)"
)
SIZE_HINT = "with an optional k, M, G, T, P or E suffix"


@dataclass(frozen=True)
class OptionItem:
    """One ``key=value`` item; ``value`` is None for a bare ``key``."""

    key: str
    value: str | None

    @property
    def is_help(self) -> bool:
        return self.value is None and self.key in HELP_WORDS


def _check_list(text: str) -> None:
    """Refuses lists qemu-img refuses: empty, leading comma, or a trailing
    comma that is not half of an escaped pair."""
    trailing = len(text) - len(text.rstrip(","))
    if not text or text.startswith(",") or trailing % 2 == 1:
        raise UsageError(f"Invalid option list: {text}")


def split_items(text: str) -> list[OptionItem]:
    """The items of one QEMU option string, in order: ``,,`` is a literal comma in a
    value; a ``key`` without ``=`` gives a None value."""
    items: list[OptionItem] = []
    i, n = 0, len(text)
    while i < n:
        j = i
        while j < n and text[j] not in "=,":
            j += 1
        key = text[i:j]
        if j < n and text[j] == "=":
            chars: list[str] = []
            k = j + 1
            while k < n:
                if text[k] == ",":
                    if k + 1 < n and text[k + 1] == ",":
                        chars.append(",")
                        k += 2
                        continue
                    break
                chars.append(text[k])
                k += 1
            items.append(OptionItem(key, "".join(chars)))
            i = k + 1
        else:
            items.append(OptionItem(key, None))
            i = j + 1
    return items


def parse_option_lists(lists: list[str]) -> list[OptionItem]:
    """All items of the given ``-o`` lists, in order (duplicates kept)."""
    for text in lists:
        _check_list(text)
    return split_items(",".join(lists)) if lists else []


def escape_value(value: str) -> str:
    """A value as it must be written inside an option list."""
    return value.replace(",", ",,")


def _parse_size_text(text: str) -> int | None:
    """The byte count ``text`` denotes, or None if it is not a size.
    Negative sizes come back negative so callers can say "out of range"."""
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        return None
    from fractions import Fraction  # exact sizes like 1.5G; spared when no size is given

    suffix = m["suffix"].lower()
    if m["hex"] is not None:
        if suffix:
            return None
        number = Fraction(int(m["hex"], 16))
    else:
        number = Fraction(m["int"] + (m["frac"] or ""))
        if suffix in ("", "b") and number.denominator != 1:
            return None  # a fraction of a byte means nothing
    value = int(number * (1 << _SUFFIX_SHIFT[suffix]))
    return -value if m["sign"] == "-" else value


def parse_size(text: str, name: str) -> int:
    """A size-typed option value: bytes below 2^64, suffixes allowed."""
    value = _parse_size_text(text)
    if value is None:
        raise InvalidOptionError(
            f"Parameter '{name}' expects a non-negative number below 2^64, {SIZE_HINT}"
        )
    if value < 0 or value >= 1 << 64:
        raise InvalidOptionError(f"Value '{text}' is out of range for parameter '{name}'")
    return value


def parse_image_size(text: str) -> int:
    """The size argument of ``create`` (and ``measure --size``)."""
    value = _parse_size_text(text)
    if value is None:
        raise UsageError(f"Invalid image size specified: '{text}' (expected a number {SIZE_HINT})")
    if not 0 <= value < 1 << 63:
        raise UsageError(
            f"Invalid image size specified: '{text}' (must be between 0 and {(1 << 63) - 1})"
        )
    return value


_TRUE = frozenset({"on", "yes", "true", "y"})
_FALSE = frozenset({"off", "no", "false", "n"})


def parse_bool(text: str, name: str) -> bool:
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InvalidOptionError(f"Parameter '{name}' expects 'on' or 'off', not '{text}'")


def parse_number(text: str, name: str) -> int:
    # C's base-0 rules, as qemu-img reads -o numbers: 0x... hex, 0... octal.
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", text):
        value = int(text, 16)
    elif re.fullmatch(r"0[0-7]*", text):
        value = int(text, 8)
    elif re.fullmatch(r"[1-9][0-9]*", text):
        value = int(text, 10)
    else:
        value = -1
    if not 0 <= value < 1 << 64:
        raise InvalidOptionError(f"Parameter '{name}' expects a number, not '{text}'")
    return value
