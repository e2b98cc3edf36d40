"""Copying a byte range of an image into a new image, as ``qemu-img dd`` does."""

from __future__ import annotations

from collections.abc import Callable

from qimg.creation import plan_create
from qimg.errors import InvalidOptionError
from qimg.image import open_image

# typing.TYPE_CHECKING without importing typing.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from qimg.spec import ImageSpec

__all__ = ["MAX_BLOCKS", "MAX_BLOCK_SIZE", "check_block_size", "check_blocks", "dd", "output_size"]

#: qemu-img takes block sizes up to INT_MAX.
MAX_BLOCK_SIZE = (1 << 31) - 1
#: and block counts up to INT64_MAX.
MAX_BLOCKS = (1 << 63) - 1
# Bytes copied per read and write: the block size does not change the output, so the
# copy goes in large pieces whatever it is.
_CHUNK = 4 << 20


def check_block_size(bs: int) -> int:
    """``bs`` if qemu-img takes it as a block size, else its refusal."""
    if not 1 <= bs <= MAX_BLOCK_SIZE:
        raise InvalidOptionError(f"Invalid bs specified. Must be between 1 and {MAX_BLOCK_SIZE}.")
    return bs


def check_blocks(name: str, value: int) -> int:
    """``value`` if qemu-img takes it as ``count=`` or ``skip=`` (``name``), else its
    refusal."""
    if not 0 <= value <= MAX_BLOCKS:
        raise InvalidOptionError(f"Invalid {name} specified. Must be between 0 and {MAX_BLOCKS}.")
    return value


def output_size(input_size: int, bs: int, count: int | None, skip: int) -> int:
    """How large ``qemu-img dd`` makes the output: ``count`` blocks (at most the input),
    less the ``skip`` blocks it starts after; 0 when the skip lies past that end."""
    size = input_size if count is None else min(input_size, count * bs)
    return max(0, size - skip * bs)


def dd(
    input: ImageSpec,
    output: str,
    *,
    bs: int = 512,
    count: int | None = None,
    skip: int = 0,
    format: str | None = None,
    out_format: str = "raw",
    image_opts: bool = False,
    force_share: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Creates ``output`` (an image of ``out_format``) holding the first ``count`` blocks
    of ``bs`` bytes of ``input`` (all of it without ``count``) but the first ``skip``,
    like ``qemu-img dd``, which counts the skipped blocks in ``count``: ``skip=1
    count=3`` copies blocks 1 and 2. ``progress(done, total)`` is called on the calling
    thread as bytes are copied.

    As in qemu-img, the output is created before the copy, so a ``skip`` past the end
    of the input leaves an empty output (and raises ``InvalidOptionError``)."""
    check_block_size(bs)
    check_blocks("skip", skip)
    if count is not None:
        check_blocks("count", count)
    with open_image(
        input, format, image_opts=image_opts, force_share=force_share, purpose="copy-source"
    ) as source:
        start = skip * bs
        size = output_size(source.size, bs, count, skip)
        plan_create(output, out_format, [], size=size).run()
        if start > source.size:
            raise InvalidOptionError(f"{source.filename}: cannot skip to specified offset")
        with open_image(output, out_format, writable=True, cache="unsafe") as target:
            done = 0
            while done < size:
                n = min(_CHUNK, size - done)
                target.write(done, source.read(start + done, n))
                done += n
                if progress is not None:
                    progress(done, size)
