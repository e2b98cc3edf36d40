"""Block devices as images: qemu-img writes them in place, never creates, truncates or
resizes them, and names the raw protocol on them ``host_device``."""

from __future__ import annotations

import os
import stat

from qimg.errors import UsageError

__all__ = ["is_block_device", "resolve_host_device"]


def is_block_device(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a block device (following symbolic links)."""
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def resolve_host_device(fmt: str, path: str) -> str:
    """The format qimg creates for ``-f``/``-O fmt`` on ``path``: ``host_device`` is raw
    bytes on a block device, and refused (in qemu-img's words) on anything else."""
    if fmt != "host_device":
        return fmt
    if is_block_device(path):
        return "raw"
    if os.path.exists(path):
        why = f"'host_device' driver requires '{path}' to be either a character or block device"
    else:
        why = f"Could not open '{path}': No such file or directory"
    raise UsageError(
        "Protocol driver 'host_device' does not support creating new images, so an existing "
        "image must be selected as the target; however, opening the given target as an "
        f"existing image failed: {why}"
    )
