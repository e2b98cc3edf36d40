"""QMP-style events: what the node graph reports while it works (a quorum child
that returned bad data, a read no quorum agreed on), and where they go.

An event has QEMU's QMP shape, so tools that read QEMU's events read qimg's::

    {"event": "QUORUM_REPORT_BAD", "data": {"type": "read", "node-name": "children.1",
     "sector-num": 0, "sectors-count": 128}, "timestamp": {"seconds": 1700000000,
     "microseconds": 123456}}

The Rust core records events as they happen (with the time they happened) and
Python drains them after each operation, and from progress callbacks during long
ones, and hands each to every sink: a JSON-lines file, standard error, a callback,
or an :class:`EventStream` to iterate over. Every event is delivered, in the order
it was recorded; nothing is rate-limited or dropped (QEMU's monitor rate-limits
these events; qimg does not).

docs/events.md documents every event and its fields.
"""

from __future__ import annotations

import json
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, Protocol, TypeAlias

from qimg import _core
from qimg.errors import UsageError

__all__ = [
    "EVENT_MEMBERS",
    "Event",
    "EventCallback",
    "EventHub",
    "EventStream",
    "JsonLinesSink",
    "open_sink",
]

#: The data members of each event qimg emits, in QAPI's order (the order they are
#: written in). Members of other events keep the order they were recorded in.
EVENT_MEMBERS: dict[str, tuple[str, ...]] = {
    "QUORUM_REPORT_BAD": ("type", "error", "node-name", "sector-num", "sectors-count"),
    "QUORUM_FAILURE": ("reference", "sector-num", "sectors-count"),
}

JsonData: TypeAlias = Mapping[str, Any]


@dataclass(frozen=True)
class Event:
    """One event: its name, its data, and when it happened (seconds and
    microseconds since the Unix epoch, as QMP gives them)."""

    name: str
    data: JsonData
    seconds: int
    microseconds: int

    @classmethod
    def from_core(cls, record: _core.Event) -> Event:
        """An event as the Rust core records it, in its QMP shape."""
        detail = record.detail
        data: dict[str, Any]
        if isinstance(detail, _core.QuorumReportBad):
            data = {"type": detail.op}
            if detail.error is not None:
                # As QEMU: only a child whose I/O failed has an error.
                data["error"] = detail.error
            data["node-name"] = detail.node_name
        else:
            data = {"reference": detail.reference}
        data["sector-num"] = record.sector_num
        data["sectors-count"] = record.sectors_count
        return cls(record.kind, _ordered(record.kind, data), record.seconds, record.microseconds)

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Event:
        """An event from its QMP form (a parsed JSON line)."""
        try:
            stamp = obj["timestamp"]
            return cls(
                str(obj["event"]),
                _ordered(str(obj["event"]), obj.get("data", {})),
                int(stamp["seconds"]),
                int(stamp["microseconds"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"not a QMP event: {obj!r} ({err})") from None

    @property
    def time(self) -> float:
        """The timestamp as seconds since the epoch."""
        return self.seconds + self.microseconds / 1_000_000

    def as_dict(self) -> dict[str, Any]:
        """The QMP form: ``{"event": ..., "data": {...}, "timestamp": {...}}``."""
        return {
            "event": self.name,
            "data": dict(self.data),
            "timestamp": {"seconds": self.seconds, "microseconds": self.microseconds},
        }

    def to_json(self) -> str:
        """The QMP form on one line."""
        return json.dumps(self.as_dict())


def _ordered(name: str, data: Mapping[str, Any]) -> dict[str, Any]:
    order = EVENT_MEMBERS.get(name, ())
    out = {key: data[key] for key in order if key in data}
    out.update({key: value for key, value in data.items() if key not in out})
    return out


class EventCallback(Protocol):
    def __call__(self, event: Event, /) -> None: ...


class JsonLinesSink:
    """Writes each event as one JSON line and flushes it at once (so a reader
    following the file sees it, and a crash loses nothing already reported).
    For standard error, standard output is flushed first so that a merged
    transcript keeps the order things happened in."""

    def __init__(self, stream: IO[str], *, owned: bool = False) -> None:
        self.stream = stream
        self.owned = owned

    def __call__(self, event: Event) -> None:
        if self.stream is sys.stderr:
            sys.stdout.flush()
        self.stream.write(event.to_json() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.owned:
            self.stream.close()


def open_sink(target: str) -> JsonLinesSink:
    """The sink ``--events TARGET`` names: ``-`` for standard error, else a file
    (created, or truncated when it exists)."""
    if target == "-":
        return JsonLinesSink(sys.stderr)
    try:
        stream = open(target, "w", encoding="utf-8")  # noqa: SIM115 - closed by the sink
    except OSError as err:
        raise UsageError(
            f"Could not open the events file '{target}': {err.strerror or err}"
        ) from None
    return JsonLinesSink(stream, owned=True)


class EventStream:
    """Collects events for iteration: pass it where a callback is taken
    (``qimg.open(spec, events=stream)``), then iterate over it to take the events
    delivered so far, oldest first. Iterating drains them: each event is yielded once."""

    def __init__(self) -> None:
        self._pending: deque[Event] = deque()

    def __call__(self, event: Event) -> None:
        self._pending.append(event)

    def __iter__(self) -> Iterator[Event]:
        while True:
            try:
                yield self._pending.popleft()
            except IndexError:
                return

    def __len__(self) -> int:
        return len(self._pending)

    def drain(self) -> list[Event]:
        """Every pending event, oldest first; none remain pending."""
        return list(self)


@dataclass
class EventHub:
    """Hands each event to every sink, in order. Sinks are callables taking an
    :class:`Event`; :meth:`close` closes those that have a ``close``."""

    sinks: list[Callable[[Event], None]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __call__(self, event: Event) -> None:
        with self._lock:
            for sink in self.sinks:
                sink(event)

    def deliver(self, events: Iterable[Event]) -> None:
        for event in events:
            self(event)

    def close(self) -> None:
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if close is not None:
                close()
