"""Per-format option tables: the single source for ``-o help`` listings,
for validating ``-o`` items, and for the ``Formatting ...`` line."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from qimg.errors import InvalidOptionError, UsageError
from qimg.options import OptionItem, escape_value, parse_bool, parse_number, parse_size
from qimg.prealloc import PreallocMode

__all__ = [
    "FORMATS",
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

    def help_line(self) -> str:
        left = f"{self.name}={self.type.value}"
        return f"  {left:<22} - {self.help}"


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

_SIZE = OptionDesc("size", OptType.SIZE, "Virtual size of the disk image in bytes")
_NOCOW = OptionDesc(
    "nocow", OptType.BOOL, "Create the file with copy-on-write disabled (btrfs only)"
)
_EXTENT_HINT = OptionDesc(
    "extent_size_hint",
    OptType.SIZE,
    "Ask the filesystem to allocate in extents of this size (XFS); 0 turns it off",
)


def _prealloc(modes: tuple[PreallocMode, ...]) -> OptionDesc:
    names = ", ".join(m.value for m in modes)
    return OptionDesc(
        "preallocation", OptType.STRING, f"What to allocate up front, one of: {names}"
    )


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
    not_yet: frozenset[str] = frozenset()
    """Options qemu-img knows for this format that qimg refuses for now."""
    amend_options: tuple[str, ...] = ()
    """The options ``amend`` can change (empty: the format has no amend)."""
    amend_not_yet: frozenset[str] = frozenset()
    """Amend options qemu-img has that qimg refuses for now."""

    def all_options(self) -> tuple[OptionDesc, ...]:
        names = {o.name for o in self.format_options}
        return self.format_options + tuple(o for o in self.protocol_options if o.name not in names)

    def help_text(self, *, with_protocol: bool) -> str:
        options = self.all_options() if with_protocol else self.format_options
        lines = [o.help_line() for o in sorted(options, key=lambda o: o.name)]
        if with_protocol:
            return "\n".join(["Supported options:", *lines])
        return "\n".join(
            [
                f"Supported {self.name} options:",
                *lines,
                "",
                "The protocol level may support further options.",
                "Specify the target filename to include those options.",
            ]
        )

    def amend_help_text(self) -> str:
        if not self.amend_options:
            raise UsageError(f"Format driver '{self.name}' does not support option amendment")
        table = {o.name: o for o in self.format_options}
        lines = [table[n].help_line() for n in sorted(self.amend_options)]
        return "\n".join([f"Amend options for '{self.name}':", *lines])

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


QCOW2 = FormatInfo(
    name="qcow2",
    format_options=(
        OptionDesc("cluster_size", OptType.SIZE, "Cluster size in bytes (512 to 2M)", "65536"),
        OptionDesc(
            "extended_l2",
            OptType.BOOL,
            "Split clusters into 32 subclusters (needs clusters of 16k or more)",
            "off",
        ),
        _prealloc(tuple(PreallocMode)),
        OptionDesc(
            "compression_type",
            OptType.STRING,
            "Algorithm for compressed clusters: zlib or zstd (zstd needs v3)",
            "zlib",
        ),
        _SIZE,
        OptionDesc("compat", OptType.STRING, "qcow2 version: v2 (alias 0.10) or v3 (alias 1.1)"),
        OptionDesc("backing_file", OptType.STRING, "Image this one is an overlay of"),
        OptionDesc("backing_fmt", OptType.STRING, "Format of the backing image"),
        OptionDesc(
            "lazy_refcounts",
            OptType.BOOL,
            "Defer refcount updates until the image is closed (needs v3)",
            "off",
        ),
        OptionDesc(
            "refcount_bits",
            OptType.NUMBER,
            "Bits per refcount entry, a power of two up to 64 (only 16 on v2)",
            "16",
        ),
    ),
    protocol_options=(_NOCOW, _EXTENT_HINT),
    echo_order=(
        "cluster_size",
        "extended_l2",
        "preallocation",
        "compression_type",
        "size",
        "compat",
        "backing_file",
        "backing_fmt",
        "lazy_refcounts",
        "refcount_bits",
        "nocow",
        "extent_size_hint",
    ),
    prealloc_modes=tuple(PreallocMode),
    not_yet=frozenset(
        {
            "data_file",
            "data_file_raw",
            "keep_data_file",
            "encryption",
            "encrypt.format",
            "encrypt.key-secret",
            "encrypt.cipher-alg",
            "encrypt.cipher-mode",
            "encrypt.ivgen-alg",
            "encrypt.ivgen-hash-alg",
            "encrypt.hash-alg",
            "encrypt.iter-time",
        }
    ),
    amend_options=(
        "backing_file",
        "backing_fmt",
        "compat",
        "lazy_refcounts",
        "refcount_bits",
        "size",
    ),
    amend_not_yet=frozenset(
        {
            "data_file",
            "data_file_raw",
            "encrypt.iter-time",
            "encrypt.keyslot",
            "encrypt.new-secret",
            "encrypt.old-secret",
            "encrypt.state",
        }
    ),
)

_RAW_PREALLOC = (PreallocMode.OFF, PreallocMode.FALLOC, PreallocMode.FULL)

RAW = FormatInfo(
    name="raw",
    format_options=(_SIZE,),
    protocol_options=(_SIZE, _NOCOW, _prealloc(_RAW_PREALLOC), _EXTENT_HINT),
    echo_order=("size", "nocow", "preallocation", "extent_size_hint"),
    prealloc_modes=_RAW_PREALLOC,
)

FORMATS: Mapping[str, FormatInfo] = {f.name: f for f in (QCOW2, RAW)}

# Formats QEMU has that qimg does not write; named so the error can say why.
_QEMU_CREATABLE = frozenset({"qcow", "qed", "vdi", "vhdx", "vmdk", "vpc", "parallels", "luks"})
_QEMU_READ_ONLY = frozenset({"bochs", "cloop", "dmg", "vvfat"})


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
        raise UsageError(f"qimg does not support the '{name}' format yet (supported: qcow2, raw)")
    raise UsageError(f"Unknown file format '{name}'")
