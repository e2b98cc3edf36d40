"""Comparing the guest contents of two images, as ``qemu-img compare`` does."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Literal

from qimg import _core
from qimg.deprecated import renamed
from qimg.events import EventCallback
from qimg.image import (
    Image,
    check_cache_mode,
    drain_events,
    open_image,
    with_events,
)

# typing.TYPE_CHECKING without importing typing.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from qimg.spec import ImageSpec

__all__ = ["CompareResult", "compare"]

#: How a comparison ended: the contents are the same, differ at ``offset``, the
#: sizes differ (strict mode), or an offset's allocation differs (strict mode).
Outcome = Literal["identical", "content-mismatch", "size-mismatch", "status-mismatch"]


@dataclass(frozen=True)
class CompareResult:
    """What :func:`compare` found."""

    outcome: Outcome
    offset: int | None
    """The first guest offset that differs (None when identical, or when the sizes
    differ in strict mode)."""
    size_a: int
    size_b: int

    @property
    def identical(self) -> bool:
        """Whether the images compare equal (``qemu-img compare`` exits 0)."""
        return self.outcome == "identical"

    @property
    def sizes_differ(self) -> bool:
        return self.size_a != self.size_b

    def message(self) -> str:
        """The line ``qemu-img compare`` prints for this result."""
        if self.outcome == "identical":
            return "Images are identical."
        if self.outcome == "size-mismatch":
            return "Strict mode: Image size mismatch!"
        if self.outcome == "status-mismatch":
            return f"Strict mode: Offset {self.offset} block status mismatch!"
        return f"Content mismatch at offset {self.offset}!"

    @property
    def warns_about_size(self) -> bool:
        """Whether ``qemu-img compare`` warns ``Image size mismatch!``: the sizes
        differ (not in strict mode) and the common part compared equal."""
        if not self.sizes_differ or self.outcome in ("size-mismatch", "status-mismatch"):
            return False
        return self.offset is None or self.offset >= min(self.size_a, self.size_b)


def compare(
    a: ImageSpec | Image,
    b: ImageSpec | Image,
    *,
    strict: bool = False,
    format: str | None = None,
    format_b: str | None = None,
    image_opts: bool = False,
    cache: str = "writeback",
    force_share: bool = False,
    progress: Callable[[int, int], None] | None = None,
    events: EventCallback | None = None,
    fmt: str | None = None,
) -> CompareResult:
    """Compares the guest contents of images ``a`` and ``b``, like ``qemu-img compare``.
    Each is a file name or node-tree spec (see :func:`qimg.open`), opened read-only and
    closed again, or an open :class:`~qimg.Image`, left open.

    Without ``strict`` an image that is larger must read as zeroes past the other's
    end; ``strict`` also requires equal sizes and the same allocation status.
    ``format`` is ``a``'s format (``-f``) and ``format_b`` ``b``'s (``-F``); None
    probes; ``fmt`` is the deprecated old name of ``format``. ``cache`` is
    qemu-img's ``-T``. Opening fails as :func:`qimg.open` does; a read error raises
    :class:`~qimg.errors.ImageIOError`. ``progress(done, total)`` and ``events`` are
    called on the calling thread.
    """
    format = renamed(format, fmt, new="format", old="fmt")
    cache = check_cache_mode(cache, source=True)
    with ExitStack() as stack:
        opened: list[Image] = []
        for spec, spec_format in ((a, format), (b, format_b)):
            if isinstance(spec, Image):
                opened.append(spec)
                continue
            image = open_image(
                spec,
                spec_format,
                image_opts=image_opts,
                events=events,
                cache=cache,
                force_share=force_share,
            )
            opened.append(stack.enter_context(image))
        return compare_open(opened[0], opened[1], strict=strict, progress=progress)


def compare_open(
    a: Image, b: Image, *, strict: bool, progress: Callable[[int, int], None] | None
) -> CompareResult:
    """:func:`compare` of two open images."""
    try:
        found = _core.compare_images(
            a._img, b._img, strict=strict, progress=with_events([a, b], progress)
        )
    finally:
        drain_events([a, b])
    return CompareResult(_outcome(found.kind), found.offset, a.size, b.size)


def _outcome(name: str) -> Outcome:
    if name == "identical":
        return "identical"
    if name == "size-mismatch":
        return "size-mismatch"
    if name == "status-mismatch":
        return "status-mismatch"
    return "content-mismatch"
