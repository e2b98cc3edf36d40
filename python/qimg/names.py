"""What kind of image name a string is: a plain file name, a ``json:`` spec or an NBD URL.

Kept apart from :mod:`qimg.spec` (the node-tree parser) because every command asks it
first, and a plain file name needs nothing more.
"""

from __future__ import annotations

import os
import re

__all__ = ["NBD_PREFIX_RE", "is_nbd_url", "is_plain_filename"]

#: ``nbd:``, or ``nbd+SOMETHING:`` (qemu-img takes such a prefix for a protocol name).
NBD_PREFIX_RE = re.compile(r"nbd(\+[^:/]*)?:")


def is_nbd_url(text: str) -> bool:
    """Whether the file name ``text`` names an NBD export (``nbd://...``,
    ``nbd+unix://...``; other ``nbd...:`` prefixes too, to be refused by name)."""
    return NBD_PREFIX_RE.match(text) is not None


def is_plain_filename(spec: object) -> bool:
    """Whether ``spec`` is a plain file name (not ``json:``, an ``nbd:`` URL, a
    mapping or a NodeSpec)."""
    if isinstance(spec, os.PathLike):
        return True
    return isinstance(spec, str) and not spec.startswith("json:") and not is_nbd_url(spec)
