"""Creating images: every check first, then one call into the Rust core."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from qimg import _core
from qimg.deprecated import renamed
from qimg.devices import resolve_host_device
from qimg.errors import InvalidOptionError, QimgError, UsageError
from qimg.formats import (
    FormatInfo,
    ParsedOptions,
    ParsedValue,
    format_info,
    option_text,
    option_value,
)
from qimg.options import OptionItem, parse_option_lists
from qimg.prealloc import PreallocMode

# typing.TYPE_CHECKING without importing typing or pathlib on the command line's path.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["CreatePlan", "create", "format_values", "option_items", "plan_create"]

OptionValue = str | int | bool


@dataclass(frozen=True)
class CreatePlan:
    """A validated creation request; ``run`` writes the image."""

    filename: str
    info: FormatInfo
    options: ParsedOptions
    request: _core.CreateRequest
    """Checked by the format's driver in the core, before any file is touched."""
    prealloc: PreallocMode
    shown_format: str | None = None
    """The format as the user named it, when that is not the table's (host_device)."""

    def formatting_line(self) -> str:
        fmt = self.shown_format or self.info.name
        return f"Formatting '{self.filename}', fmt={fmt} {self.info.echo(self.options)}"

    def run(self) -> None:
        nocow = bool(option_value(self.options, "nocow", False))
        hint = self.options.get("extent_size_hint")
        hint_value = int(hint.value) if hint is not None else None
        self.request.create(
            _core.local_path(self.filename), nocow=nocow, extent_size_hint=hint_value
        )


def plan_create(
    filename: str,
    fmt: str,
    options: list[OptionItem],
    *,
    size: int | None = None,
    backing_file: str | None = None,
    backing_fmt: str | None = None,
    unsafe: bool = False,
) -> CreatePlan:
    """Validates a creation request completely, touching no file but reading
    the backing image (unless ``unsafe``). On a block device the image is written
    in place: the device must be large enough, and is never resized."""
    shown = fmt if fmt == "host_device" else None
    path = _core.local_path(filename)  # a file: prefix is a protocol, not part of the name
    info = format_info(resolve_host_device(fmt, path))
    parsed = dict(info.parse(options))
    if backing_file is not None:
        parsed["backing_file"] = ParsedValue(backing_file, backing_file)
    if backing_fmt is not None:
        parsed["backing_fmt"] = ParsedValue(backing_fmt, backing_fmt)
    if size is not None:
        if "size" in parsed:
            raise InvalidOptionError(
                "The image size must be specified only once (as -o size= or as the size argument)"
            )
        parsed["size"] = ParsedValue(str(size), size)

    prealloc = info.preallocation(parsed)
    backing = option_text(parsed, "backing_file")
    bfmt = option_text(parsed, "backing_fmt")
    if not info.has_backing and (backing is not None or bfmt is not None):
        raise InvalidOptionError(f"Backing file not supported for file format '{info.name}'")
    if bfmt is not None and backing is None:
        raise InvalidOptionError("Backing format cannot be used without backing file")
    if backing is not None and not unsafe:
        detected, backing_size = _open_backing(filename, backing, bfmt)
        if bfmt is None:
            raise InvalidOptionError(
                f"Backing file specified without backing format "
                f"(detected format: {detected}; add -F {detected})"
            )
        if "size" not in parsed:
            parsed["size"] = ParsedValue(str(backing_size), backing_size)
    elif backing is not None and bfmt is None:
        raise InvalidOptionError(
            "Backing file specified without backing format (with -u, -F is required)"
        )
    if "size" not in parsed:
        raise InvalidOptionError("Image creation needs a size parameter")
    request = _core.CreateRequest(info.name, format_values(parsed))
    return CreatePlan(filename, info, parsed, request, prealloc, shown)


def format_values(parsed: ParsedOptions) -> list[tuple[str, int | bool | str]]:
    """The typed ``-o`` values, for the core's driver (which reads the options it
    knows; the file's own, such as ``nocow``, also go to ``create`` itself)."""
    return [(name, item.value) for name, item in parsed.items()]


def _open_backing(filename: str, backing: str, fmt: str | None) -> tuple[str, int]:
    # Relative names are relative to the new image's directory, as for an
    # existing overlay; only the backing image itself is opened, not its chain.
    path = _core.resolve_backing(filename, backing)
    try:
        image = _core.open_image(path, fmt, no_backing=True)
    except QimgError as err:
        raise InvalidOptionError(f"{err} (the backing file must exist unless -u is given)") from err
    return image.format, image.size


def create(
    filename: str | os.PathLike[str],
    size: int | None = None,
    *,
    format: str | None = None,
    options: Mapping[str, OptionValue] | str | None = None,
    backing_file: str | None = None,
    backing_fmt: str | None = None,
    unsafe: bool = False,
    fmt: str | None = None,
) -> None:
    """Creates an image, like ``qemu-img create``; ``format`` is ``-f`` (raw unless
    given, as for qemu-img).

    ``options`` is either an ``-o`` string (``"cluster_size=4k,preallocation=metadata"``)
    or a mapping of option names to values (``{"preallocation": "metadata"}``).
    ``fmt`` is the deprecated old name of ``format``.
    """
    plan_create(
        os.fspath(filename),
        renamed(format, fmt, new="format", old="fmt") or "raw",
        option_items(options),
        size=size,
        backing_file=backing_file,
        backing_fmt=backing_fmt,
        unsafe=unsafe,
    ).run()


def option_items(options: Mapping[str, OptionValue] | str | None) -> list[OptionItem]:
    """API options (an ``-o`` string or a mapping) as parsed ``-o`` items."""
    if isinstance(options, str):
        items = parse_option_lists([options])
    elif options is None:
        items = []
    else:
        items = [OptionItem(k, _option_text(v)) for k, v in options.items()]
    if any(item.is_help for item in items):
        raise UsageError("'help' is only meaningful on the command line")
    return items


def _option_text(value: OptionValue | PreallocMode | Path) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, PreallocMode):
        return value.value
    return str(value)
