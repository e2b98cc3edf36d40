"""Which internal snapshot to read: ``convert -l``, ``measure -l`` and
``qimg.open(..., snapshot=...)``."""

from __future__ import annotations

from dataclasses import dataclass

from qimg.errors import InvalidOptionError

__all__ = ["SnapshotRef"]

_PREFIX = "snapshot."


@dataclass(frozen=True)
class SnapshotRef:
    """A snapshot named by ``id`` and/or ``name`` (each one given must match), or by
    ``id_or_name``: an ID, else a name (qemu-img's short form ``-l NAME``)."""

    id: str | None = None
    name: str | None = None
    id_or_name: str | None = None

    def __post_init__(self) -> None:
        given = (self.id is not None or self.name is not None, self.id_or_name is not None)
        if given != (True, False) and given != (False, True):
            raise InvalidOptionError("Name a snapshot by id and/or name, or by id_or_name alone")

    @classmethod
    def parse(cls, text: str) -> SnapshotRef:
        """qemu-img's ``-l`` syntax: ``snapshot.id=ID,snapshot.name=NAME`` (either or
        both), or a bare ID or name."""
        if not text.startswith(_PREFIX):
            return cls(id_or_name=text)
        fields: dict[str, str] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            if key not in ("snapshot.id", "snapshot.name") or not sep:
                raise InvalidOptionError(f"Invalid parameter '{key}'")
            fields[key.removeprefix(_PREFIX)] = value
        return cls(id=fields.get("id"), name=fields.get("name"))
