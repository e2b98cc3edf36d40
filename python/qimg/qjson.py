"""JSON and indented text in the layout qemu-img prints for QAPI objects.

qemu-img keeps an object's members in a 512-bucket hash table and prints
them bucket by bucket, the member added last first within a bucket. Tools
that diff qemu-img's output line by line expect that order, so dicts given
here in QAPI member order are printed in it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["JsonValue", "bucket", "dumps", "human_lines", "json_string", "member_order"]

JsonValue = None | bool | int | str | Sequence["JsonValue"] | Mapping[str, "JsonValue"]

_BUCKETS = 512


def bucket(key: str) -> int:
    """The bucket of QEMU's 512-bucket dictionary that holds ``key``."""
    data = key.encode()
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, byte in enumerate(data):
        value = (value + (byte << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * value + 12345) & 0xFFFFFFFF) % _BUCKETS


def member_order(obj: Mapping[str, JsonValue]) -> list[str]:
    """The keys of ``obj`` (given in insertion order) in qemu-img's print order."""
    keys = list(obj)
    return sorted(keys, key=lambda k: (bucket(k), -keys.index(k)))


def json_string(s: str) -> str:
    """``s`` as a JSON string the way QEMU writes it: non-ASCII and control
    characters as ``\\u`` escapes with four upper-case hex digits (surrogate pairs
    beyond the BMP)."""
    out = ['"']
    for ch in s:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch in "\b\f\n\r\t":
            out.append({"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif code < 0x20 or code >= 0x7F:
            if code > 0xFFFF:
                code -= 0x10000
                out.append(f"\\u{0xD800 | (code >> 10):04X}\\u{0xDC00 | (code & 0x3FF):04X}")
            else:
                out.append(f"\\u{code:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _dump(value: JsonValue, level: int, out: list[str]) -> None:
    pad = "    " * (level + 1)
    end = "    " * level
    if value is None:
        out.append("null")
    elif isinstance(value, bool):
        out.append("true" if value else "false")
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, str):
        out.append(json_string(value))
    elif isinstance(value, Mapping):
        out.append("{")
        for n, key in enumerate(member_order(value)):
            out.append("," if n else "")
            out.append(f"\n{pad}{json_string(key)}: ")
            _dump(value[key], level + 1, out)
        out.append(f"\n{end}}}")
    else:
        out.append("[")
        for n, item in enumerate(value):
            out.append("," if n else "")
            out.append(f"\n{pad}")
            _dump(item, level + 1, out)
        out.append(f"\n{end}]")


def dumps(value: JsonValue) -> str:
    """Pretty JSON as qemu-img prints it (4-space indent, qemu's member order)."""
    out: list[str] = []
    _dump(value, 0, out)
    return "".join(out)


def _scalar(value: JsonValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def human_lines(obj: Mapping[str, JsonValue], indent: int) -> list[str]:
    """``key: value`` lines (dashes in keys shown as spaces), nested objects
    and lists indented by four more spaces, in qemu-img's member order."""
    lines: list[str] = []
    pad = " " * indent
    for key in member_order(obj):
        value = obj[key]
        name = key.replace("-", " ")
        if isinstance(value, Mapping):
            lines.append(f"{pad}{name}:")
            lines.extend(human_lines(value, indent + 4))
        elif isinstance(value, (list, tuple)):
            lines.append(f"{pad}{name}:")
            for n, item in enumerate(value):
                if isinstance(item, Mapping):
                    lines.append(f"{pad}    [{n}]:")
                    lines.extend(human_lines(item, indent + 8))
                else:
                    lines.append(f"{pad}    [{n}]: {_scalar(item)}")
        else:
            lines.append(f"{pad}{name}: {_scalar(value)}")
    return lines
