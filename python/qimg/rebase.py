"""Changing the backing file an image names, as ``qemu-img rebase -u`` does."""

from __future__ import annotations

from qimg.errors import InvalidOptionError, QimgError, UnsupportedError
from qimg.image import check_cache_mode, open_image

# typing.TYPE_CHECKING without importing typing.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from qimg.spec import ImageSpec

__all__ = ["rebase"]


def rebase(
    image: ImageSpec,
    backing_file: str | None,
    *,
    backing_format: str | None = None,
    unsafe: bool = False,
    format: str | None = None,
    image_opts: bool = False,
    cache: str = "writeback",
) -> None:
    """Makes the qcow2 ``image`` name ``backing_file`` (of ``backing_format``) as its
    backing file, or no backing file when it is None or empty, like ``qemu-img rebase``.

    Only ``unsafe=True`` (``-u``) is built: it rewrites the header alone, so the
    guest content changes unless the new backing file holds what the old one held.
    The safe mode, which copies into the image what would change, raises
    :class:`~qimg.errors.UnsupportedError` until qimg has it."""
    if not unsafe:
        raise UnsupportedError(
            "rebase without -u (safe mode) is not supported by qimg yet; "
            "-u changes only the backing file name"
        )
    cache = check_cache_mode(cache)
    if backing_format is not None:
        from qimg.spec import is_qemu_driver

        if not is_qemu_driver(backing_format):
            raise InvalidOptionError(f"Invalid format name: '{backing_format}'")
    name = backing_file or None
    if name is not None and backing_format is None:
        raise InvalidOptionError(
            f"Could not change the backing file to '{name}': backing format must be specified"
        )
    with open_image(
        image, format, backing=False, writable=True, cache=cache, image_opts=image_opts
    ) as opened:
        if opened.format != "qcow2":
            raise UnsupportedError(
                f"Could not change the backing file to '{name or ''}': Operation not supported"
            )
        try:
            opened._img.set_backing_name(name, backing_format if name else None)
        except QimgError as err:
            raise type(err)(f"Could not change the backing file to '{name or ''}': {err}") from None
