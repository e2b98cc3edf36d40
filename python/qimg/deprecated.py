"""Old parameter names that still work, with a DeprecationWarning."""

from __future__ import annotations

import warnings
from typing import TypeVar

__all__ = ["renamed"]

T = TypeVar("T")


def renamed(value: T | None, old_value: T | None, *, new: str, old: str) -> T | None:
    """The value of parameter ``new``, also accepted under its old name ``old``
    (which warns). Giving both is a ``TypeError``, as for any repeated argument."""
    if old_value is None:
        return value
    if value is not None:
        raise TypeError(f"got both {new}= and {old}= (the old name of {new}=); give {new}= only")
    warnings.warn(
        f"the {old}= parameter is deprecated; use {new}= instead",
        DeprecationWarning,
        stacklevel=3,
    )
    return old_value
