"""Per-format option tables, as the core's format registry describes them:
the single source for ``-o help`` listings, for validating ``-o`` items, and
for the ``Formatting ...`` line."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from qimg import _core
from qimg.errors import InvalidOptionError, UsageError
from qimg.options import OptionItem, escape_value, parse_bool, parse_number, parse_size
from qimg.prealloc import PreallocMode

__all__ = [
    "FORMATS",
    "FORMAT_NAMES",
    "FormatInfo",
    "OptType",
    "OptionDesc",
    "ParsedOptions",
    "ParsedValue",
    "amend_info",
    "format_info",
    "option_text",
    "option_value",
]


class OptType(enum.Enum):
    STRING = "<str>"
    BOOL = "<bool (on/off)>"
    SIZE = "<size>"
    NUMBER = "<num>"


@dataclass(frozen=True)
class OptionDesc:
    name: str
    type: OptType
    help: str
    default: str | None = None
    """Shown in the ``Formatting`` line when the option is not given."""


@dataclass(frozen=True)
class ParsedValue:
    text: str
    value: int | bool | str

    def shown(self, kind: OptType) -> str:
        """How the value is echoed in the ``Formatting`` line."""
        if kind in (OptType.SIZE, OptType.NUMBER):
            return str(self.value)
        return escape_value(self.text)


ParsedOptions = Mapping[str, ParsedValue]


@dataclass(frozen=True)
class FormatInfo:
    name: str
    format_options: tuple[OptionDesc, ...]
    """In the order qemu-img echoes them in its ``Formatting`` line."""
    protocol_options: tuple[OptionDesc, ...]
    """Options of the ``file`` protocol that apply when a filename is known."""
    echo_order: tuple[str, ...]
    prealloc_modes: tuple[PreallocMode, ...]
    """The preallocation modes this format can create."""
    driver: _core.FormatDriverInfo = field(compare=False, repr=False)
    """The core's driver the table came from; it words the help listings."""
    not_yet: frozenset[str] = frozenset()
    """Options qemu-img knows for this format that qimg refuses for now."""
    amend_options: tuple[str, ...] = ()
    """The options ``amend`` can change (empty: the format has no amend)."""
    amend_not_yet: frozenset[str] = frozenset()
    """Amend options qemu-img has that qimg refuses for now."""

    @property
    def has_backing(self) -> bool:
        """Whether images of this format can name a backing file."""
        return any(o.name == "backing_file" for o in self.all_options())

    def all_options(self) -> tuple[OptionDesc, ...]:
        names = {o.name for o in self.format_options}
        return self.format_options + tuple(o for o in self.protocol_options if o.name not in names)

    def help_text(self, *, with_protocol: bool) -> str:
        return self.driver.help_text(with_protocol)

    def amend_help_text(self) -> str:
        text = self.driver.amend_help_text()
        if text is None:
            raise UsageError(f"Format driver '{self.name}' does not support option amendment")
        return text

    def parse_amend(self, items: Iterable[OptionItem]) -> dict[str, ParsedValue]:
        """Typed values of ``amend -o`` items; options only creation takes are refused."""
        if not self.amend_options:
            raise UsageError(f"Format driver '{self.name}' does not support option amendment")
        table = {o.name: o for o in self.format_options if o.name in self.amend_options}
        creation_only = {o.name for o in self.all_options()} | self.not_yet
        parsed: dict[str, ParsedValue] = {}
        for item in items:
            desc = table.get(item.key)
            if desc is None:
                if item.key in self.amend_not_yet:
                    raise InvalidOptionError(f"Amending '{item.key}' is not supported by qimg yet")
                if item.key in creation_only:
                    raise InvalidOptionError(
                        f"Invalid parameter '{item.key}' "
                        "(this option is only supported for image creation)"
                    )
                raise InvalidOptionError(f"Invalid parameter '{item.key}'")
            text = "on" if item.value is None else item.value
            parsed[desc.name] = ParsedValue(text, _convert(desc, text))
        return parsed

    def parse(self, items: Iterable[OptionItem]) -> dict[str, ParsedValue]:
        """Typed values of ``items``; a later duplicate replaces an earlier one."""
        table = {o.name: o for o in self.all_options()}
        parsed: dict[str, ParsedValue] = {}
        for item in items:
            desc = table.get(item.key)
            if desc is None:
                if item.key in self.not_yet:
                    raise InvalidOptionError(
                        f"Option '{item.key}' is not supported by qimg yet "
                        f"(qimg supports: {', '.join(sorted(table))})"
                    )
                raise InvalidOptionError(f"Invalid parameter '{item.key}'")
            text = "on" if item.value is None else item.value
            parsed[desc.name] = ParsedValue(text, _convert(desc, text))
        return parsed

    def preallocation(self, parsed: ParsedOptions) -> PreallocMode:
        """The ``preallocation`` option's mode, refused if this format lacks it."""
        item = parsed.get("preallocation")
        if item is None:
            return PreallocMode.OFF
        if (
            item.text == PreallocMode.METADATA.value
            and PreallocMode.METADATA not in self.prealloc_modes
        ):
            raise InvalidOptionError("Unsupported preallocation mode: metadata")
        return PreallocMode.parse(item.text, allowed=self.prealloc_modes)

    def echo(self, parsed: ParsedOptions) -> str:
        """The option part of the ``Formatting`` line."""
        table = {o.name: o for o in self.all_options()}
        parts: list[str] = []
        for name in self.echo_order:
            desc = table[name]
            if name in parsed:
                parts.append(f"{name}={parsed[name].shown(desc.type)}")
            elif desc.default is not None:
                parts.append(f"{name}={desc.default}")
        return " ".join(parts)


def option_value(parsed: ParsedOptions, name: str, default: int | bool | str) -> int | bool | str:
    """The typed value of option ``name``, or ``default`` when it was not given."""
    item = parsed.get(name)
    return default if item is None else item.value


def option_text(parsed: ParsedOptions, name: str) -> str | None:
    """The text of option ``name`` as given, or None."""
    item = parsed.get(name)
    return None if item is None else item.text


def _convert(desc: OptionDesc, text: str) -> int | bool | str:
    if desc.type is OptType.SIZE:
        return parse_size(text, desc.name)
    if desc.type is OptType.NUMBER:
        return parse_number(text, desc.name)
    if desc.type is OptType.BOOL:
        return parse_bool(text, desc.name)
    return text


def _option(o: _core.FormatOption) -> OptionDesc:
    return OptionDesc(o.name, OptType(o.kind), o.help, o.default)


def _format_info(d: _core.FormatDriverInfo) -> FormatInfo:
    return FormatInfo(
        name=d.name,
        format_options=tuple(_option(o) for o in d.format_options),
        protocol_options=tuple(_option(o) for o in d.protocol_options),
        echo_order=tuple(d.echo_order),
        prealloc_modes=tuple(PreallocMode(m) for m in d.prealloc_modes),
        not_yet=frozenset(d.not_yet),
        amend_options=tuple(d.amend_options),
        amend_not_yet=frozenset(d.amend_not_yet),
        driver=d,
    )


#: qimg's formats, in the core's probing order.
FORMATS: Mapping[str, FormatInfo] = {d.name: _format_info(d) for d in _core.format_drivers()}
FORMAT_NAMES: tuple[str, ...] = tuple(FORMATS)

# Formats QEMU has that qimg does not write; named so the error can say why.
_QEMU_ONLY = _core.qemu_only_formats()
_QEMU_CREATABLE = frozenset(name for name, creatable in _QEMU_ONLY if creatable)
_QEMU_READ_ONLY = frozenset(name for name, creatable in _QEMU_ONLY if not creatable)


def amend_info(name: str) -> FormatInfo:
    """The table of a format ``amend`` can change, or a clear refusal."""
    info = FORMATS.get(name)
    if info is not None and info.amend_options:
        return info
    if info is not None or name in _QEMU_READ_ONLY or name in _QEMU_CREATABLE:
        raise UsageError(f"Format driver '{name}' does not support option amendment")
    raise UsageError(f"Unknown file format '{name}'")


def format_info(name: str) -> FormatInfo:
    """The table of a format qimg can create, or a clear refusal."""
    info = FORMATS.get(name)
    if info is not None:
        return info
    if name in _QEMU_READ_ONLY:
        raise UsageError(f"Format driver '{name}' does not support image creation")
    if name in _QEMU_CREATABLE:
        raise UsageError(
            f"qimg does not support the '{name}' format yet (supported: {', '.join(FORMAT_NAMES)})"
        )
    raise UsageError(f"Unknown file format '{name}'")
