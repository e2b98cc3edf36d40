"""Committing an image into its backing file, as ``qemu-img commit`` does."""

from __future__ import annotations

import os
from collections.abc import Callable

from qimg import _core
from qimg.errors import InvalidOptionError, UnsupportedError
from qimg.image import check_cache_mode, open_image

# typing.TYPE_CHECKING without importing typing.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from qimg.spec import ImageSpec

__all__ = ["commit"]


def commit(
    image: ImageSpec,
    base: str | None = None,
    *,
    keep: bool = False,
    format: str | None = None,
    cache: str = "writeback",
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Writes what ``image`` holds into its backing file, like ``qemu-img commit``.

    ``base`` names a backing file further down the chain to commit into (``-b``);
    the layers between then hold stale data, so the image is kept as it is, as
    with ``keep=True`` (``-d``). Otherwise the image is emptied afterwards and
    reads everything from its backing file. A base smaller than the image grows
    to its size. ``progress(done, total)`` is called as the copy goes."""
    cache = check_cache_mode(cache)
    if not isinstance(image, str | os.PathLike):
        raise UnsupportedError("commit takes the image by its file name")
    path = os.fspath(image)
    depth = _base_depth(path, format, base)
    empty = base is None and not keep
    with open_image(
        path,
        format,
        writable=empty,
        writable_backing=depth,
        cache=cache,
    ) as opened:
        _core.commit_image(opened._img, base_depth=depth, empty_top=empty, progress=progress)


def _base_depth(path: str, format: str | None, base: str | None) -> int:
    """How many layers below the image the base is (1: its backing file)."""
    with open_image(path, format) as top:
        chain = top.chain()
        if len(chain) < 2:
            raise InvalidOptionError("Image does not have a backing file")
        if base is None:
            return 1
        # A relative name is taken from the image's directory, as qemu-img takes it.
        wanted = os.path.realpath(_core.resolve_backing(path, base))
        for depth, layer in enumerate(chain[1:], start=1):
            above = chain[depth - 1]
            if base == above.backing_file or os.path.realpath(layer.filename) == wanted:
                return depth
    raise InvalidOptionError(f"Did not find '{base}' in the backing chain of '{path}'")
