"""Changing the backing file an image names, as ``qemu-img rebase`` does."""

from __future__ import annotations

from collections.abc import Callable

from qimg import _core
from qimg.errors import InvalidOptionError, QimgError, UnsupportedError, UsageError
from qimg.image import Image, check_cache_mode, open_image

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
    compress: bool = False,
    format: str | None = None,
    image_opts: bool = False,
    cache: str = "writeback",
    source_cache: str = "writeback",
    force_share: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Makes the qcow2 ``image`` name ``backing_file`` (of ``backing_format``) as its
    backing file, or no backing file when it is None or empty, like ``qemu-img rebase``.

    The safe mode (the default) first writes into the image every range it leaves
    to its backing chain where the old chain and the new backing file differ, so
    the guest content stays the same (``compress``: as compressed clusters).
    ``unsafe=True`` (``-u``) rewrites the header alone, so the guest content changes
    unless the new backing file holds what the old one held. A relative
    ``backing_file`` is found from the image's directory. ``source_cache`` and
    ``force_share`` apply to the backing files (``-T``, ``-U``)."""
    cache = check_cache_mode(cache)
    _check_names(backing_file, backing_format)
    with open_image(
        image,
        format,
        backing=not unsafe,
        writable=True,
        cache=cache,
        image_opts=image_opts,
    ) as opened:
        opened.rebase(
            backing_file,
            backing_format=backing_format,
            unsafe=unsafe,
            compress=compress,
            source_cache=source_cache,
            force_share=force_share,
            progress=progress,
        )


def rebase_open(
    opened: Image,
    backing_file: str | None,
    *,
    backing_format: str | None = None,
    unsafe: bool = False,
    compress: bool = False,
    source_cache: str = "writeback",
    force_share: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """:func:`rebase` of an image already open for writing; :meth:`Image.rebase` is its
    public face. The safe mode needs the image opened with its backing chain."""
    source_cache = check_cache_mode(source_cache, source=True)
    _check_names(backing_file, backing_format)
    name = backing_file or None
    if opened.format != "qcow2":
        raise UnsupportedError(
            f"Could not change the backing file to '{name or ''}': Operation not supported"
        )
    if not unsafe:
        if opened.backing_file is not None and opened._img.backing() is None:
            raise UsageError(
                "A safe rebase reads the old backing chain: open the image with it "
                "(backing=True), or rebase with unsafe=True"
            )
        _copy_differences(
            opened, name, backing_format, source_cache, force_share, compress, progress
        )
    try:
        opened._img.set_backing_name(name, backing_format if name else None)
    except QimgError as err:
        raise type(err)(f"Could not change the backing file to '{name or ''}': {err}") from None


def _check_names(backing_file: str | None, backing_format: str | None) -> None:
    """qemu-img's refusals of -F and -b, before anything is opened."""
    if backing_format is not None:
        from qimg.spec import is_qemu_driver

        if not is_qemu_driver(backing_format):
            raise InvalidOptionError(f"Invalid format name: '{backing_format}'")
    name = backing_file or None
    if name is not None and backing_format is None:
        raise InvalidOptionError(
            f"Could not change the backing file to '{name}': backing format must be specified"
        )


def _copy_differences(
    opened: Image,
    name: str | None,
    backing_format: str | None,
    source_cache: str,
    force_share: bool,
    compress: bool,
    progress: Callable[[int, int], None] | None,
) -> None:
    """The safe mode's copy: ``opened`` reads the same over ``name`` afterwards."""
    if name is None:
        _core.rebase_copy(opened._img, None, compress=compress, progress=progress)
        return
    path = _core.resolve_backing(opened._img.filename, name)
    try:
        new = open_image(path, backing_format, cache=source_cache, force_share=force_share)
    except QimgError as err:
        raise type(err)(f"Could not open new backing file '{name}': {err}") from None
    with new:
        _core.rebase_copy(opened._img, new._img, compress=compress, progress=progress)
