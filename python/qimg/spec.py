"""Image specifications: plain file names, ``json:{...}`` strings, ``--image-opts``
option strings and Python dicts, parsed into one typed tree of block nodes.

QEMU describes an image as a tree of nodes: a *format* node (``raw``, ``qcow2``)
over a *protocol* node (``file``), a ``quorum`` over its ``children``, a ``blkdebug``
filter over its ``image``. The same tree has three spellings, and this module reads
all of them the way qemu-img 10 does:

- an ``nbd://host[:port]/export`` or ``nbd+unix:///export?socket=/path`` URL
  given as a file name: an export of an NBD server (``qemu-nbd``), the
  ``nbd`` protocol node, under a probed format (``raw`` or ``qcow2``, or the
  one ``-f`` names);

- ``json:{"driver": "quorum", "vote-threshold": 2, "children": [{...}, {...}]}``;
  keys with dots inside it are expanded (``{"file.filename": "a.raw"}`` is
  ``{"file": {"filename": "a.raw"}}``), and JSON strings are accepted where
  numbers and booleans are expected (``"vote-threshold": "2"``, ``"blkverify": "on"``),
  as QEMU accepts them;
- ``driver=quorum,vote-threshold=2,children.0.driver=raw,children.0.file.filename=a.raw``
  (``--image-opts``): dotted keys, list items by index, ``,,`` for a literal comma
  in a value, a later duplicate key wins;
- a Python mapping, nested or dotted, with real types.

The result is a :class:`NodeSpec`: the root :data:`Node` plus what qemu-img would
print as its file name (:meth:`NodeSpec.display_name`). :meth:`NodeSpec.to_core_json`
is the canonical document the Rust core opens; every node in it has a ``node-name``
(the user's, else its dotted path from the root, ``root`` for the root itself).

Everything qimg does not implement is refused by name: other drivers (``ssh``,
``null-co``, ``vvfat``, ...), and options such as qcow2's ``data-file`` and
``encrypt``, raw's ``offset``, blkdebug's ``config`` and ``set-state``, nbd's
``tls-creds``. Errors are one line and name the option and the node they are about.
"""

from __future__ import annotations

import enum
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from qimg.deprecated import renamed
from qimg.errors import InvalidOptionError, UsageError
from qimg.names import NBD_PREFIX_RE, is_nbd_url, is_plain_filename
from qimg.options import split_items
from qimg.qjson import bucket, json_string

__all__ = [
    "BACKING_DEFAULT",
    "BlkdebugEvent",
    "BlkdebugNode",
    "BlkdebugRule",
    "FileNode",
    "ImageSpec",
    "InetAddress",
    "IoType",
    "NbdNode",
    "Node",
    "NodeSpec",
    "ProbeNode",
    "Qcow2Node",
    "QuorumNode",
    "RawNode",
    "ReadPattern",
    "UnixAddress",
    "is_qemu_driver",
    "parse_image_opts",
    "parse_spec",
]

#: Longest node name QEMU accepts (its limit is 32 bytes with the terminating NUL).
MAX_NODE_NAME = 31

_NODE_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]*")


class ReadPattern(enum.Enum):
    """How a quorum reads: ``quorum`` reads every child and votes; ``fifo`` reads
    the first child and falls back to the next one only when a read fails."""

    QUORUM = "quorum"
    FIFO = "fifo"


class BlkdebugEvent(enum.Enum):
    """The blkdebug events qimg's blkdebug node fires."""

    READ_AIO = "read_aio"
    """Every read the node receives."""
    WRITE_AIO = "write_aio"
    """Every write, write-zeroes and discard the node receives."""
    FLUSH_TO_DISK = "flush_to_disk"
    """Every flush the node receives."""


class IoType(enum.Enum):
    """The kind of request a blkdebug rule is limited to."""

    READ = "read"
    WRITE = "write"
    WRITE_ZEROES = "write-zeroes"
    DISCARD = "discard"
    FLUSH = "flush"


class _BackingDefault(enum.Enum):
    DEFAULT = "default"


#: ``Qcow2Node.backing`` when the spec says nothing about it: the backing chain the
#: image's header names is opened, as for a plain file name.
BACKING_DEFAULT = _BackingDefault.DEFAULT


@dataclass(frozen=True)
class FileNode:
    """A file in the host file system (QEMU's ``file`` protocol driver)."""

    node_name: str
    filename: str


#: The port an NBD server listens on when none is given (IANA's port for NBD).
NBD_DEFAULT_PORT = 10809

#: Seconds an NBD request (or the connection) may take before it fails: qimg's own
#: ``timeout`` option of the ``nbd`` node; QEMU's nbd driver has no such option.
NBD_DEFAULT_TIMEOUT = 30

#: Longest export name the NBD protocol allows, in bytes.
NBD_MAX_EXPORT_NAME = 4096

#: Most connections qimg opens to one export (its ``connections`` option).
NBD_MAX_CONNECTIONS = 16


@dataclass(frozen=True)
class InetAddress:
    """A TCP server: host name or address, and port."""

    host: str
    port: int = NBD_DEFAULT_PORT


@dataclass(frozen=True)
class UnixAddress:
    """A server listening on a unix domain socket."""

    path: str


@dataclass(frozen=True)
class NbdNode:
    """An export of an NBD server (QEMU's ``nbd`` protocol driver): its bytes, as a
    ``file`` node gives a file's."""

    node_name: str
    server: InetAddress | UnixAddress
    export: str | None = None
    """The export's name; None asks for the server's default export (as "" does)."""
    timeout: int = NBD_DEFAULT_TIMEOUT
    """Seconds before a connection attempt or a request fails (qimg's own option)."""
    connections: int | None = None
    """Connections to open when the server allows several (multi-conn); None: one per
    two cores, at most four (qimg's own option)."""


@dataclass(frozen=True)
class RawNode:
    """The ``raw`` format: guest bytes are the file's (or the export's) bytes."""

    node_name: str
    file: FileNode | NbdNode


@dataclass(frozen=True)
class Qcow2Node:
    """The ``qcow2`` format over a file (or an export, or a blkdebug node over one of
    them, whose rules then meet qcow2's own requests), with its backing node."""

    node_name: str
    file: FileNode | NbdNode | BlkdebugNode
    backing: Node | _BackingDefault | None = BACKING_DEFAULT
    """:data:`BACKING_DEFAULT` (the header's chain), None (no backing file), or a node."""


@dataclass(frozen=True)
class ProbeNode:
    """A format node without a ``driver``: the format is probed from the file."""

    node_name: str
    file: FileNode | NbdNode | BlkdebugNode
    open_backing: bool = True
    """False leaves the backing file of a probed qcow2 image closed (``info`` names it
    without opening it); not an option of the spellings."""


@dataclass(frozen=True)
class QuorumNode:
    """N replicas voted on: reads succeed when ``vote_threshold`` children agree."""

    node_name: str
    children: tuple[Node, ...]
    vote_threshold: int
    blkverify: bool = False
    rewrite_corrupted: bool = False
    read_pattern: ReadPattern = ReadPattern.QUORUM


@dataclass(frozen=True)
class BlkdebugRule:
    """One ``inject-error`` rule: when ``event`` fires for a request that matches
    ``iotype`` (None: any) and covers ``sector`` (-1: any), the request fails with
    ``errno``; a ``once`` rule is removed after it fired."""

    event: BlkdebugEvent
    iotype: IoType | None = None
    errno: int = 5
    sector: int = -1
    once: bool = False


@dataclass(frozen=True)
class BlkdebugNode:
    """A filter that makes requests to ``image`` fail as its rules say (for tests)."""

    node_name: str
    image: Node
    inject_error: tuple[BlkdebugRule, ...] = ()


Node: TypeAlias = FileNode | NbdNode | RawNode | Qcow2Node | ProbeNode | QuorumNode | BlkdebugNode


# --- what qemu-img prints as the image's name -------------------------------------------

Scalar: TypeAlias = str | int | float | bool | None


@dataclass
class _Shown:
    """A node as ``bdrv_refresh_filename`` describes it: a plain name when the node
    has one, else its options as a JSON object."""

    exact: str | None
    members: list[tuple[str, _ShownValue, tuple[int, int]]] = field(default_factory=list)
    probed: str | None = None
    """For a node without a driver: its node name, to look up the probed format."""


_ShownValue: TypeAlias = Scalar | _Shown | list[_Shown]


def _json_scalar(value: Scalar) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json_string(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value)


def _render(value: _ShownValue, formats: Mapping[str, str]) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_render(v, formats) for v in value) + "]"
    if not isinstance(value, _Shown):
        return _json_scalar(value)
    members = sorted(value.members, key=lambda m: m[2])
    parts = []
    for key, member, _ in members:
        if key == "driver" and value.probed is not None:
            # The format found when the image was opened; "probe" before that.
            member = formats.get(value.probed, "probe")
        parts.append(f"{json_string(key)}: {_render(member, formats)}")
    return "{" + ", ".join(parts) + "}"


# --- the spec --------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeSpec:
    """A parsed image specification."""

    root: Node
    plain_filename: str | None = None
    """The file name, when the spec was a plain file name (opened as qemu-img opens
    file names: format probed or given with ``-f``, backing chain from the header)."""
    plain_format: str | None = None
    """``-f`` given with a plain file name."""
    _shown: Mapping[str, _Shown] | None = field(default=None, compare=False, repr=False)
    """How each node (by node name) is shown, as the user gave it."""

    @property
    def is_plain(self) -> bool:
        return self.plain_filename is not None

    def nodes(self) -> Iterator[Node]:
        """Every node of the tree, parents before their children."""
        return _walk(self.root)

    def node(self, name: str) -> Node:
        """The node called ``name``."""
        for node in self.nodes():
            if node.node_name == name:
                return node
        raise KeyError(name)

    def core_dict(self) -> dict[str, Any]:
        """The canonical tree as plain values (see :meth:`to_core_json`)."""
        return _core_node(self.root)

    def to_core_json(self) -> str:
        """The canonical JSON document ``qimg._core.open_spec`` opens: every node
        with ``driver`` and ``node-name``, every default spelled out."""
        return json.dumps(self.core_dict(), separators=(",", ":"))

    def probe_nodes(self) -> list[ProbeNode]:
        """The nodes whose format is probed when the image is opened."""
        return [n for n in self.nodes() if isinstance(n, ProbeNode)]

    def display_name(self, probed: Mapping[str, str] | None = None) -> str:
        """What qemu-img prints as this image's file name: the file name when the
        spec adds nothing a file name cannot say, else ``json:{...}`` with the options
        as given (members in qemu-img's order, node names left out).

        ``probed`` maps the node names of :meth:`probe_nodes` to the formats found
        when the image was opened (qemu-img prints the probed driver)."""
        if self.plain_filename is not None:
            return self.plain_filename
        return self.display_name_of(self.root.node_name, probed)

    def display_name_of(self, node_name: str, probed: Mapping[str, str] | None = None) -> str:
        """:meth:`display_name` of the subtree under the node called ``node_name``."""
        shown = self._shown.get(node_name) if self._shown is not None else None
        if shown is None:
            shown = _shown_node(self.node(node_name))
        if shown.exact is not None:
            return shown.exact
        return "json:" + _render(shown, probed or {})

    @property
    def driver(self) -> str:
        """The root node's driver (``probe`` when its format is probed)."""
        return _driver_of(self.root)


def _driver_of(node: Node) -> str:
    return {
        FileNode: "file",
        NbdNode: "nbd",
        RawNode: "raw",
        Qcow2Node: "qcow2",
        ProbeNode: "probe",
        QuorumNode: "quorum",
        BlkdebugNode: "blkdebug",
    }[type(node)]


def _walk(node: Node) -> Iterator[Node]:
    yield node
    if isinstance(node, RawNode | ProbeNode):
        yield node.file
    elif isinstance(node, Qcow2Node):
        yield node.file
        if not (node.backing is None or isinstance(node.backing, _BackingDefault)):
            yield from _walk(node.backing)
    elif isinstance(node, QuorumNode):
        for child in node.children:
            yield from _walk(child)
    elif isinstance(node, BlkdebugNode):
        yield from _walk(node.image)


def _core_node(node: Node) -> dict[str, Any]:
    head: dict[str, Any] = {"driver": _driver_of(node), "node-name": node.node_name}
    if isinstance(node, FileNode):
        return {**head, "filename": node.filename}
    if isinstance(node, NbdNode):
        server: dict[str, str]
        if isinstance(node.server, InetAddress):
            server = {"type": "inet", "host": node.server.host, "port": str(node.server.port)}
        else:
            server = {"type": "unix", "path": node.server.path}
        return {
            **head,
            "server": server,
            "export": node.export,
            "timeout": node.timeout,
            "connections": node.connections,
        }
    if isinstance(node, ProbeNode) and not node.open_backing:
        return {**head, "file": _core_node(node.file), "backing": None}
    if isinstance(node, RawNode | ProbeNode):
        return {**head, "file": _core_node(node.file)}
    if isinstance(node, Qcow2Node):
        backing: Any
        if node.backing is BACKING_DEFAULT:
            backing = "default"
        elif node.backing is None:
            backing = None
        else:
            assert not isinstance(node.backing, _BackingDefault)
            backing = _core_node(node.backing)
        return {**head, "file": _core_node(node.file), "backing": backing}
    if isinstance(node, QuorumNode):
        return {
            **head,
            "children": [_core_node(c) for c in node.children],
            "vote-threshold": node.vote_threshold,
            "blkverify": node.blkverify,
            "rewrite-corrupted": node.rewrite_corrupted,
            "read-pattern": node.read_pattern.value,
        }
    return {
        **head,
        "image": _core_node(node.image),
        "inject-error": [
            {
                "event": r.event.value,
                "iotype": None if r.iotype is None else r.iotype.value,
                "errno": r.errno,
                "sector": r.sector,
                "once": r.once,
            }
            for r in node.inject_error
        ],
    }


def _shown_node(node: Node) -> _Shown:
    """The display of a tree built in Python (not parsed): every option spelled out."""
    parser = _Parser()
    parser.parse_root(_Opts.from_flat(_flatten(_node_as_dict(node))), None)
    return parser.shown[node.node_name]


def _node_as_dict(node: Node) -> dict[str, Any]:
    d = _core_node(node)

    def strip(obj: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in obj.items():
            if key == "driver" and value == "probe":
                continue
            if key == "backing" and (
                value == "default" or (value is None and obj.get("driver") == "probe")
            ):
                continue
            if obj.get("driver") == "nbd" and (
                key == "timeout" or (key in ("export", "connections") and value is None)
            ):
                continue
            if isinstance(value, dict):
                out[key] = strip(value)
            elif key == "children":
                out[key] = [strip(c) for c in value]
            elif key == "inject-error":
                if value:  # an empty list is no rules, and not an option at all
                    out[key] = [{k: v for k, v in r.items() if v is not None} for r in value]
            else:
                out[key] = value
        return out

    return strip(d)


# --- reading the three spellings into flat options ---------------------------------------


class _Empty(enum.Enum):
    """An empty JSON list or object given as a value."""

    LIST = "[]"
    OBJECT = "{}"


_Leaf: TypeAlias = Scalar | _Empty


@dataclass
class _Item:
    value: _Leaf
    order: int
    """Tie-break among the members of one bucket when qemu-img prints them."""


#: The URL schemes qimg reads, and the kind of server address each one names.
_NBD_SCHEMES = {"nbd": "inet", "nbd+tcp": "inet", "nbd+unix": "unix"}


def _url_host_port(authority: str) -> tuple[str, str]:
    """``HOST[:PORT]`` or ``[IPV6][:PORT]`` -> (host, port text, maybe empty)."""
    if authority.startswith("["):
        host, close, after = authority[1:].partition("]")
        port_text = after[1:]
        ok = bool(close) and (not after or after.startswith(":"))
    else:
        host, _, port_text = authority.partition(":")
        ok = ":" not in port_text
    if not ok or not host or "%" in host:
        raise InvalidOptionError(
            f"No valid host in NBD URL (given '{authority}'): write nbd://HOST[:PORT]/EXPORT, "
            "with an IPv6 address in brackets"
        )
    return host, port_text


def _nbd_url_options(url: str) -> dict[str, Any]:
    """The ``nbd`` node options an NBD URL stands for: ``nbd://HOST[:PORT][/EXPORT]``
    (also ``nbd+tcp://``; IPv6 hosts in brackets) or
    ``nbd+unix://[/EXPORT]?socket=PATH``. The export and the socket path are
    percent-decoded; a user name and a ``#fragment`` are ignored, as qemu-img does."""
    m = NBD_PREFIX_RE.match(url)
    assert m is not None
    scheme = m.group(0)[:-1]
    rest = url[m.end() :]
    kind = _NBD_SCHEMES.get(scheme)
    if kind is None:
        why = " (TLS is not supported)" if scheme == "nbd+tls" else ""
        raise InvalidOptionError(
            f"Unknown protocol '{scheme}'{why}: qimg reads nbd://HOST[:PORT]/EXPORT, "
            "nbd+tcp://... and nbd+unix:///EXPORT?socket=PATH"
        )
    if not rest.startswith("//"):
        raise InvalidOptionError(
            f"The {scheme}:HOST:PORT form is not supported by qimg: write "
            "nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH"
        )
    rest = rest[2:].split("#", 1)[0]
    rest, _, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    authority = authority.rpartition("@")[2]
    from urllib.parse import unquote  # only NBD URLs need it: spared on every other run

    export = unquote(path, errors="strict") if slash and path else None
    socket: str | None = None
    for pair in query.split("&"):
        if not pair:
            continue
        key, eq, value = pair.partition("=")
        if key != "socket" or not eq:
            raise InvalidOptionError(
                f"Unknown query parameter '{key}' in NBD URL (only socket=PATH, with nbd+unix://)"
            )
        if kind != "unix":
            raise InvalidOptionError(f"socket= needs an nbd+unix:// URL, not {scheme}://")
        socket = unquote(value, errors="strict")
    options: dict[str, Any] = {"driver": "nbd"}
    if kind == "unix":
        if authority:
            raise InvalidOptionError(
                f"An nbd+unix:// URL has no host (given '{authority}'): write "
                "nbd+unix:///EXPORT?socket=PATH"
            )
        if not socket:
            raise InvalidOptionError(
                "An nbd+unix:// URL needs the socket's path: nbd+unix:///EXPORT?socket=PATH"
            )
        options["server"] = {"type": "unix", "path": socket}
    else:
        host, port_text = _url_host_port(authority)
        port = NBD_DEFAULT_PORT
        if port_text:
            if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
                raise InvalidOptionError(
                    f"Invalid port '{port_text}' in NBD URL (a number from 1 to 65535)"
                )
            port = int(port_text)
        options["server"] = {"type": "inet", "host": host, "port": str(port)}
    if export is not None:
        options["export"] = export
    return options


def parse_image_opts(text: str) -> dict[str, str]:
    """The ``key=value`` items of an ``--image-opts`` string (``,,`` is a literal comma,
    a later duplicate key wins), in the order they were given."""
    if not text:
        raise InvalidOptionError("Must specify either driver or file")
    items: dict[str, str] = {}
    for item in split_items(text):
        if item.value is None:
            if not item.key:
                raise InvalidOptionError(f"Invalid --image-opts string '{text}': empty item")
            raise InvalidOptionError(
                f"Option '{item.key}' of --image-opts has no value "
                f"(write {item.key}=on or {item.key}=VALUE)"
            )
        if not item.key:
            raise InvalidOptionError(f"Invalid --image-opts string '{text}': empty option name")
        items.pop(item.key, None)
        items[item.key] = item.value
    return items


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidOptionError(f"JSON parse error, duplicate key '{key}'")
        out[key] = value
    return out


def _single_quotes_to_json(text: str) -> str:
    """QEMU's JSON parser also takes strings in single quotes (``{'driver': 'raw'}``, with
    ``\\'`` for a quote inside): those become ordinary JSON strings here. Double-quoted
    strings and everything outside strings pass unchanged."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':  # copy a double-quoted string whole
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
        elif c == "'":
            chars: list[str] = []
            j = i + 1
            while j < n and text[j] != "'":
                if text[j] == "\\" and j + 1 < n:
                    escaped = text[j + 1]
                    # \' is a quote; other escapes mean what they mean in JSON.
                    chars.append("'" if escaped == "'" else "\\" + escaped)
                    j += 2
                    continue
                chars.append('\\"' if text[j] == '"' else text[j])
                j += 1
            out.append('"' + "".join(chars) + '"')
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _load_json(text: str) -> dict[str, Any]:
    try:
        value = json.loads(
            _single_quotes_to_json(text),
            object_pairs_hook=_no_duplicates,
            parse_constant=lambda c: _reject_constant(c),
        )
    except json.JSONDecodeError as err:
        raise InvalidOptionError(f"Could not parse the json: specification: {err}") from None
    if not isinstance(value, dict):
        raise InvalidOptionError("A json: specification must be a JSON object ({...})")
    return value


def _reject_constant(name: str) -> None:
    raise InvalidOptionError(f"Could not parse the json: specification: {name} is not JSON")


def _flatten(tree: Mapping[str, Any]) -> list[tuple[str, _Leaf, int]]:
    """``tree`` as dotted keys with leaf values, each with its qemu-img print
    tie-break: QEMU flattens nested objects member by member in its own order and
    inserts each key at the head of its bucket."""
    out: list[tuple[str, _Leaf, int]] = []

    def visit(value: Any, key: str) -> None:
        if isinstance(value, Mapping):
            if not value:
                out.append((key, _Empty.OBJECT, 0))
                return
            names = list(value)
            for name in names:
                if not isinstance(name, str):
                    raise InvalidOptionError(f"Option names must be strings, not {name!r}")
            for name in sorted(names, key=lambda k: (bucket(k), -names.index(k))):
                visit(value[name], f"{key}.{name}" if key else name)
        elif isinstance(value, list | tuple):
            if not value:
                out.append((key, _Empty.LIST, 0))
                return
            for index, item in enumerate(value):
                visit(item, f"{key}.{index}" if key else str(index))
        elif isinstance(value, os.PathLike):
            out.append((key, os.fspath(value), 0))
        elif value is None or isinstance(value, str | int | float | bool):
            out.append((key, value, 0))
        else:
            raise InvalidOptionError(
                f"Option '{key}' has a value of type {type(value).__name__}; "
                "expected a string, number, boolean, list or mapping"
            )

    visit(tree, "")
    # The last key QEMU inserts is printed first within its bucket.
    return [(k, v, -i) for i, (k, v, _) in enumerate(out)]


@dataclass
class _Opts:
    """The options of one node: dotted keys relative to the node, and the node's
    dotted path from the root (for messages and generated node names)."""

    items: dict[str, _Item]
    path: str

    @classmethod
    def from_flat(cls, flat: list[tuple[str, _Leaf, int]], path: str = "") -> _Opts:
        items: dict[str, _Item] = {}
        for key, value, order in flat:
            if key in items:
                raise InvalidOptionError(f"Option '{key}' is given twice")
            items[key] = _Item(value, order)
        return cls(items, path)

    def where(self, key: str = "") -> str:
        full = f"{self.path}.{key}" if self.path and key else self.path or key
        return full

    def take(self, key: str) -> _Item | None:
        return self.items.pop(key, None)

    def has_sub(self, key: str) -> bool:
        return key in self.items or any(k.startswith(key + ".") for k in self.items)

    def sub(self, key: str) -> _Opts:
        """Removes and returns the options under ``key.`` (a child node's)."""
        prefix = key + "."
        inner = {k[len(prefix) :]: v for k, v in self.items.items() if k.startswith(prefix)}
        for k in list(self.items):
            if k.startswith(prefix):
                del self.items[k]
        return _Opts(inner, self.where(key))

    def indices(self, key: str) -> list[int]:
        """The list items given under ``key`` (``key.0``, ``key.1``, ...)."""
        prefix = key + "."
        found: set[str] = set()
        for k in self.items:
            if k.startswith(prefix):
                found.add(k[len(prefix) :].split(".", 1)[0])
        numbers: list[int] = []
        for text in found:
            if not re.fullmatch(r"0|[1-9][0-9]*", text):
                raise InvalidOptionError(f"Option {self.where(key)} is not a valid array")
            numbers.append(int(text))
        numbers.sort()
        if numbers != list(range(len(numbers))):
            raise InvalidOptionError(f"Option {self.where(key)} is not a valid array")
        return numbers


# --- QEMU's drivers and options, and what qimg does with them ------------------------------

_SUPPORTED_DRIVERS = ("file", "nbd", "raw", "qcow2", "quorum", "blkdebug")

#: Drivers qemu-img 10 knows that qimg does not implement.
_QEMU_DRIVERS = frozenset(
    (
        "blklogwrites",
        "blkverify",
        "bochs",
        "cloop",
        "compress",
        "copy-before-write",
        "copy-on-read",
        "dmg",
        "ftp",
        "ftps",
        "gluster",
        "host_cdrom",
        "host_device",
        "http",
        "https",
        "io_uring",
        "iscsi",
        "iser",
        "luks",
        "nfs",
        "null-aio",
        "null-co",
        "nvme",
        "nvme-io_uring",
        "parallels",
        "preallocate",
        "qcow",
        "qed",
        "rbd",
        "replication",
        "snapshot-access",
        "ssh",
        "throttle",
        "vdi",
        "vhdx",
        "virtio-blk-vfio-pci",
        "virtio-blk-vhost-user",
        "virtio-blk-vhost-vdpa",
        "vmdk",
        "vpc",
        "vvfat",
    )
)


#: Options every QEMU node takes that qimg does not implement.
def is_qemu_driver(name: str) -> bool:
    """Whether QEMU has a block driver (a format or protocol) called ``name``."""
    return name in _QEMU_DRIVERS or name in _SUPPORTED_DRIVERS


_GENERIC_UNSUPPORTED = frozenset(
    {"read-only", "auto-read-only", "force-share", "discard", "detect-zeroes", "cache"}
)

_UNSUPPORTED_OPTIONS: dict[str, frozenset[str]] = {
    "file": frozenset(
        {"aio", "aio-max-batch", "locking", "pr-manager", "drop-cache", "x-check-cache-dropped"}
    ),
    "raw": frozenset({"offset", "size"}),
    "qcow2": frozenset(
        {
            "data-file",
            "encrypt",
            "lazy-refcounts",
            "pass-discard-request",
            "pass-discard-snapshot",
            "pass-discard-other",
            "discard-no-unref",
            "overlap-check",
            "cache-size",
            "l2-cache-size",
            "l2-cache-entry-size",
            "refcount-cache-size",
            "cache-clean-interval",
        }
    ),
    "quorum": frozenset(),
    "nbd": frozenset(
        {"tls-creds", "tls-hostname", "x-dirty-bitmap", "reconnect-delay", "open-timeout"}
    ),
    "blkdebug": frozenset(
        {
            "config",
            "set-state",
            "align",
            "max-transfer",
            "opt-write-zero",
            "max-write-zero",
            "opt-discard",
            "max-discard",
            "take-child-perms",
            "unshare-child-perms",
        }
    ),
}

_WHY_UNSUPPORTED = {
    "data-file": "external data files",
    "encrypt": "encrypted images",
    "config": "blkdebug configuration files",
    "set-state": "blkdebug states",
    "tls-creds": "TLS connections",
    "tls-hostname": "TLS connections",
    "x-dirty-bitmap": "dirty bitmap exports",
    "reconnect-delay": "reconnections",
}

_PROTOCOLS = frozenset({"file", "blkdebug", "nbd"})

#: The server options of QEMU's socket addresses qimg does not implement, by type.
_NBD_SERVER_UNSUPPORTED = {
    "inet": frozenset(
        {
            "numeric",
            "to",
            "ipv4",
            "ipv6",
            "keep-alive",
            "keep-alive-count",
            "keep-alive-idle",
            "keep-alive-interval",
            "mptcp",
        }
    ),
    "unix": frozenset({"abstract", "tight"}),
}
_NBD_SERVER_KEYS = {"inet": ("type", "host", "port"), "unix": ("type", "path")}
_NBD_LEGACY_KEYS = ("host", "port", "path")

#: Every blkdebug event QEMU 10 defines; qimg fires the ones in :class:`BlkdebugEvent`.
_QEMU_BLKDEBUG_EVENTS = frozenset(
    (
        "l1_update",
        "l1_grow_alloc_table",
        "l1_grow_write_table",
        "l1_grow_activate_table",
        "l2_load",
        "l2_update",
        "l2_update_compressed",
        "l2_alloc_cow_read",
        "l2_alloc_write",
        "read_aio",
        "read_backing_aio",
        "read_compressed",
        "write_aio",
        "write_compressed",
        "vmstate_load",
        "vmstate_save",
        "cow_read",
        "cow_write",
        "reftable_load",
        "reftable_grow",
        "reftable_update",
        "refblock_load",
        "refblock_update",
        "refblock_update_part",
        "refblock_alloc",
        "refblock_alloc_hookup",
        "refblock_alloc_write",
        "refblock_alloc_write_blocks",
        "refblock_alloc_write_table",
        "refblock_alloc_switch_table",
        "cluster_alloc",
        "cluster_alloc_bytes",
        "cluster_free",
        "flush_to_os",
        "flush_to_disk",
        "pwritev_rmw_head",
        "pwritev_rmw_after_head",
        "pwritev_rmw_tail",
        "pwritev_rmw_after_tail",
        "pwritev",
        "pwritev_zero",
        "pwritev_done",
        "empty_image_prepare",
        "l1_shrink_write_table",
        "l1_shrink_free_l2_clusters",
        "cor_write",
        "cluster_alloc_space",
        "none",
    )
)

_RULE_KEYS = frozenset({"event", "iotype", "errno", "sector", "once", "immediately"})
_TRUE = frozenset({"on", "yes", "true", "y"})
_FALSE = frozenset({"off", "no", "false", "n"})
_NUMBER_RE = re.compile(r"\s*(?P<sign>[+-]?)(?P<digits>0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")

_QUORUM_OPTIONS = ("vote-threshold", "blkverify", "rewrite-corrupted", "read-pattern")


def _at(opts: _Opts) -> str:
    return f" (at {opts.path})" if opts.path else ""


def _number(item: _Item | None, name: str, where: str) -> int | None:
    """An integer option: JSON numbers (integral ones), or strings as QEMU reads them
    (decimal, 0x hex, leading-0 octal). None and null mean "not given"."""
    if item is None or item.value is None:
        return None
    value = item.value
    bad = InvalidOptionError(f"Parameter '{name}' expects a number{where}")
    if isinstance(value, bool | _Empty):
        raise bad
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not value.is_integer():
            raise bad
        return int(value)
    m = _NUMBER_RE.fullmatch(value)
    if m is None:
        raise bad
    digits = m["digits"]
    if digits.lower().startswith("0x"):
        number = int(digits, 16)
    elif digits.startswith("0"):
        number = int(digits, 8)
    else:
        number = int(digits)
    return -number if m["sign"] == "-" else number


def _boolean(item: _Item | None, name: str, where: str) -> bool | None:
    if item is None or item.value is None:
        return None
    value = item.value
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
    raise InvalidOptionError(f"Parameter '{name}' expects 'on' or 'off'{where}")


_NBD_SERVER_HINT = (
    'give "server": {"type": "inet", "host": HOST, "port": PORT} or {"type": "unix", "path": PATH}'
)

#: Largest ``timeout`` of an nbd node, in seconds.
_MAX_TIMEOUT = 0xFFFF_FFFF


def _port(item: _Item, name: str, where: str) -> tuple[int, str]:
    """A TCP port: a JSON number, a string of decimal digits, or a service name the
    system knows (``"nbd"``, from /etc/services), as QEMU looks ports up. Returns the
    number and the text qemu-img prints for it."""
    value = item.value
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float | str) and _is_whole(value):
        number = int(value)
    elif isinstance(value, str) and value.strip() == value and value:
        import socket  # a service name is rare: spared on every other run

        try:
            number = socket.getservbyname(value, "tcp")
        except OSError:
            number = None
    if number is None or not 1 <= number <= 65535:
        given = value.value if isinstance(value, _Empty) else _json_scalar(value)
        raise InvalidOptionError(
            f"Parameter '{name}' expects a port number from 1 to 65535 or a known TCP "
            f"service name, not {given}{where}"
        )
    return number, value if isinstance(value, str) else str(number)


def _is_whole(value: float | str) -> bool:
    """An integral float, or a string of ASCII decimal digits."""
    if isinstance(value, float):
        return value.is_integer()
    return value.isascii() and value.isdigit()


def _nonempty(item: _Item, name: str, where: str) -> str:
    text = _text(item, name, where)
    if not text:
        raise InvalidOptionError(f"Parameter '{name}' must not be empty{where}")
    return text


def _text(item: _Item | None, name: str, where: str) -> str | None:
    if item is None or item.value is None:
        return None
    if not isinstance(item.value, str):
        raise InvalidOptionError(f"Parameter '{name}' expects a string{where}")
    return item.value


class _Parser:
    """Builds the node tree from flat options, checking every option of every node."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}
        """Node names given by the user -> the path of the node that has it."""
        self.shown: dict[str, _Shown] = {}
        """How each node is shown, by node name."""

    def parse_root(self, opts: _Opts, fmt: str | None) -> tuple[Node, _Shown]:
        node, shown = self.node(opts, "root", fmt)
        self._check_generated_names(node)
        return node, shown

    def _check_generated_names(self, root: Node) -> None:
        seen: dict[str, int] = {}
        for node in _walk(root):
            seen[node.node_name] = seen.get(node.node_name, 0) + 1
        for name, count in seen.items():
            if count > 1:
                raise InvalidOptionError(
                    f"Duplicate nodes with node-name='{name}' (a node name given in the spec "
                    "is also the generated name of another node; choose another name)"
                )

    # -- one node --

    def node(
        self, opts: _Opts, default_name: str, fmt: str | None = None, *, under_format: bool = False
    ) -> tuple[Node, _Shown]:
        where = _at(opts)
        driver_item = opts.take("driver")
        driver = _text(driver_item, "driver", where)
        if fmt is not None:
            driver = fmt
            driver_item = _Item(fmt, 0)
        node_name = self._node_name(opts, default_name)
        if driver is None:
            if not opts.has_sub("file"):
                raise InvalidOptionError(f"Must specify either driver or file{where}")
            return self._probe(opts, node_name)
        if driver not in _SUPPORTED_DRIVERS:
            if driver in _QEMU_DRIVERS:
                raise InvalidOptionError(
                    f"Driver '{driver}' is not supported by qimg{where} "
                    f"(it implements {', '.join(_SUPPORTED_DRIVERS)})"
                )
            raise InvalidOptionError(f"Unknown driver '{driver}'{where}")
        assert driver_item is not None
        driver_member = ("driver", driver, (bucket("driver"), driver_item.order))
        node: Node
        if driver == "file":
            node, shown = self._file(opts, node_name)
        elif driver == "nbd":
            node, shown = self._nbd(opts, node_name, under_format)
        elif driver in ("raw", "qcow2"):
            node, shown = self._format(opts, node_name, driver)
        elif driver == "quorum":
            node, shown = self._quorum(opts, node_name)
        else:
            node, shown = self._blkdebug(opts, node_name)
        shown.members.append(driver_member)
        self.shown.setdefault(node_name, shown)
        return node, shown

    def _node_name(self, opts: _Opts, default: str) -> str:
        item = opts.take("node-name")
        if item is None:
            return opts.path or default
        value = item.value
        if isinstance(value, str):
            text = value
        elif value is None or isinstance(value, _Empty):
            text = ""
        else:
            text = _json_scalar(value)
        if not isinstance(value, str) or not _NODE_NAME_RE.fullmatch(text):
            raise InvalidOptionError(
                f"Invalid node-name: '{text}'{_at(opts)} (a node name starts with a letter "
                "and has only letters, digits, '-', '.' and '_')"
            )
        if len(text) > MAX_NODE_NAME:
            raise InvalidOptionError(
                f"Node name too long: '{text}'{_at(opts)} (at most {MAX_NODE_NAME} characters)"
            )
        if text in self.names:
            raise InvalidOptionError(f"Duplicate nodes with node-name='{text}'")
        self.names[text] = opts.path
        return text

    def _leftovers(self, opts: _Opts, driver: str) -> None:
        if not opts.items:
            return
        key = next(iter(opts.items))
        top = key.split(".", 1)[0]
        where = _at(opts)
        if driver == "probe":
            unsupported = _UNSUPPORTED_OPTIONS["raw"] | _UNSUPPORTED_OPTIONS["qcow2"]
        else:
            unsupported = _UNSUPPORTED_OPTIONS[driver]
        unsupported |= _GENERIC_UNSUPPORTED
        if top in unsupported or key in unsupported:
            name = top if top in unsupported else key
            what = _WHY_UNSUPPORTED.get(name)
            reason = f" ({what} are not supported)" if what else ""
            raise InvalidOptionError(
                f"Option '{name}' of driver '{driver}' is not supported by qimg{where}{reason}"
            )
        if driver == "probe":
            raise InvalidOptionError(
                f"A node without a driver does not support the option '{key}'{where} "
                "(give its driver)"
            )
        if driver in _PROTOCOLS:
            raise InvalidOptionError(
                f"Block protocol '{driver}' doesn't support the option '{key}'{where}"
            )
        raise InvalidOptionError(
            f"Block format '{driver}' does not support the option '{key}'{where}"
        )

    def _child(self, opts: _Opts, key: str) -> _Opts | None:
        """The options of child ``key``, or None when none were given. A string in
        its place names an existing node, which qimg has none of."""
        item = opts.items.get(key)
        if item is not None:
            if any(k.startswith(key + ".") for k in opts.items):
                raise InvalidOptionError(
                    "Cannot reference an existing block device with additional options "
                    f"or a new filename{_at(opts.sub(key))}"
                )
            opts.take(key)
            value = item.value
            if isinstance(value, str):
                raise InvalidOptionError(
                    f"Cannot find device='{value}' nor node-name='{value}' "
                    f"(a string at {opts.where(key)} names an existing node, and qimg has "
                    'none: describe the node instead, e.g. {"driver": "file", '
                    f'"filename": "{value}"}})'
                )
            raise InvalidOptionError(
                f"Option '{opts.where(key)}' must be a node (an object with a driver), "
                f"not {_json_scalar(value) if not isinstance(value, _Empty) else value.value}"
            )
        if not opts.has_sub(key):
            return None
        return opts.sub(key)

    def _file_child(
        self, opts: _Opts, driver: str
    ) -> tuple[FileNode | NbdNode | BlkdebugNode, _Shown]:
        """The ``file`` child of a format node: a file node, an nbd node, or a blkdebug
        node over one of them."""
        sub = self._child(opts, "file")
        if sub is None:
            raise InvalidOptionError(f'A block device must be specified for "file"{_at(opts)}')
        if "driver" not in sub.items:
            # A protocol node without a driver is a file, as QEMU takes it.
            sub.items["driver"] = _Item("file", 0)
        node, shown = self.node(sub, sub.path, under_format=True)
        if isinstance(node, FileNode | NbdNode):
            return node, shown
        what = "a node without a driver" if driver == "probe" else f"a {driver} node"
        if isinstance(node, BlkdebugNode):
            if not isinstance(node.image, FileNode | NbdNode):
                raise InvalidOptionError(
                    f"The image of a blkdebug node under {what} must be a 'file' or "
                    f"'nbd' node, not '{_driver_of(node.image)}'{_at(sub)}"
                )
            return node, shown
        raise InvalidOptionError(
            f"The file of {what} must be a 'file' or 'nbd' node, not '{_driver_of(node)}'{_at(sub)}"
        )

    def _file(self, opts: _Opts, node_name: str) -> tuple[FileNode, _Shown]:
        item = opts.take("filename")
        filename = item.value if item is not None else None
        if not isinstance(filename, str) or not filename:
            raise InvalidOptionError(f"The 'file' block driver requires a file name{_at(opts)}")
        self._leftovers(opts, "file")
        assert item is not None
        shown = _Shown(filename, [("filename", filename, (bucket("filename"), item.order))])
        return FileNode(node_name, filename), shown

    def _nbd(self, opts: _Opts, node_name: str, under_format: bool) -> tuple[NbdNode, _Shown]:
        """An NBD export: ``server`` (``{"type": "inet", "host", "port"}`` or
        ``{"type": "unix", "path"}``) or QEMU's older flat ``host``/``port``/``path``,
        and ``export``."""
        where = _at(opts)
        members: list[tuple[str, _ShownValue, tuple[int, int]]] = []

        def show(key: str, item: _Item, order: int | None = None) -> None:
            value = None if isinstance(item.value, _Empty) else item.value
            members.append((key, value, (bucket(key), item.order if order is None else order)))

        legacy = {k: item for k in _NBD_LEGACY_KEYS if (item := opts.take(k)) is not None}
        server_item = opts.items.get("server")
        if server_item is not None or any(k.startswith("server.") for k in opts.items):
            if legacy:
                raise InvalidOptionError(
                    f"Cannot use 'server' and path/host/port at the same time{where}"
                )
            if server_item is not None and server_item.value is not _Empty.OBJECT:
                raise InvalidOptionError(
                    f"Parameter 'server' expects an object{where}: {_NBD_SERVER_HINT}"
                )
            opts.take("server")
            server, port_text = self._nbd_server(opts.sub("server"), where, under_format, show)
        else:
            if "filename" in opts.items:
                raise InvalidOptionError(
                    f"NBD server address missing{where}: a json: or --image-opts 'filename' is "
                    f"not read as an nbd:// URL (give the URL as the file name itself, or "
                    f"{_NBD_SERVER_HINT})"
                )
            server, port_text = self._nbd_legacy(legacy, where, show)
        export_item = opts.take("export")
        export = None
        if export_item is not None:
            export = _text(export_item, "export", where)
            if export is not None and len(export.encode()) > NBD_MAX_EXPORT_NAME:
                raise InvalidOptionError(
                    f"Export name too long{where} (at most {NBD_MAX_EXPORT_NAME} bytes)"
                )
            show("export", export_item)
        # qimg's own option (QEMU's nbd driver has none like it): seconds before a
        # connection attempt or a request fails. Not shown, like a node name.
        timeout = _number(opts.take("timeout"), "timeout", where)
        if timeout is not None and not 1 <= timeout <= _MAX_TIMEOUT:
            raise InvalidOptionError(
                f"Parameter 'timeout' expects a number of seconds from 1 to {_MAX_TIMEOUT}, "
                f"not {timeout}{where}"
            )
        # qimg's own too: how many connections to open to a multi-conn export.
        connections = _number(opts.take("connections"), "connections", where)
        if connections is not None and not 1 <= connections <= NBD_MAX_CONNECTIONS:
            raise InvalidOptionError(
                f"Parameter 'connections' expects a number from 1 to {NBD_MAX_CONNECTIONS}, "
                f"not {connections}{where}"
            )
        self._leftovers(opts, "nbd")
        tail = "" if export is None else f"/{export}"
        if isinstance(server, InetAddress):
            exact = f"nbd://{server.host}:{port_text}{tail}"
        else:
            exact = f"nbd+unix://{tail}?socket={server.path}"
        node = NbdNode(
            node_name,
            server,
            export,
            NBD_DEFAULT_TIMEOUT if timeout is None else timeout,
            connections,
        )
        return node, _Shown(exact, members)

    def _nbd_server(
        self,
        sub: _Opts,
        where: str,
        under_format: bool,
        show: Callable[[str, _Item, int | None], None],
    ) -> tuple[InetAddress | UnixAddress, str]:
        type_item = sub.take("type")
        kind = _text(type_item, "server.type", where)
        if kind is None:
            raise InvalidOptionError(f"Parameter 'server.type' is missing{where}")
        if kind in ("fd", "vsock"):
            raise InvalidOptionError(
                f"NBD server type '{kind}' is not supported by qimg{where} (use inet or unix)"
            )
        if kind not in _NBD_SERVER_KEYS:
            raise InvalidOptionError(
                f"Parameter 'server.type' does not accept value '{kind}'{where} (inet or unix)"
            )
        assert type_item is not None
        show("server.type", type_item, None)
        given = {k: sub.take(k) for k in _NBD_SERVER_KEYS[kind][1:]}
        for key in sub.items:
            top = key.split(".", 1)[0]
            if top in _NBD_SERVER_UNSUPPORTED[kind]:
                raise InvalidOptionError(
                    f"Option 'server.{top}' of driver 'nbd' is not supported by qimg{where}"
                )
            raise InvalidOptionError(f"Parameter 'server.{key}' is unexpected{where}")
        for key, item in given.items():
            if item is None or item.value is None:
                raise InvalidOptionError(f"Parameter 'server.{key}' is missing{where}")
        if kind == "unix":
            path_item = given["path"]
            assert path_item is not None
            show("server.path", path_item, None)
            return UnixAddress(_nonempty(path_item, "server.path", where)), ""
        host_item, port_item = given["host"], given["port"]
        assert host_item is not None and port_item is not None
        # qemu-img prints server.host and server.port (which share a bucket) in one
        # order under a format node and in the other elsewhere, whatever the input's.
        show("server.host", host_item, 0 if under_format else 1)
        show("server.port", port_item, 1 if under_format else 0)
        port, port_text = _port(port_item, "server.port", where)
        return InetAddress(_nonempty(host_item, "server.host", where), port), port_text

    def _nbd_legacy(
        self,
        legacy: dict[str, _Item],
        where: str,
        show: Callable[[str, _Item, int | None], None],
    ) -> tuple[InetAddress | UnixAddress, str]:
        """QEMU's older spelling: ``host`` (and ``port``, default 10809) or ``path``."""
        for key, item in legacy.items():
            show(key, item, None)
        if "path" in legacy and "host" in legacy:
            raise InvalidOptionError(f"path and host may not be used at the same time{where}")
        if "path" in legacy:
            if "port" in legacy:
                raise InvalidOptionError(f"port may not be used without host{where}")
            return UnixAddress(_nonempty(legacy["path"], "path", where)), ""
        if "host" not in legacy:
            raise InvalidOptionError(f"NBD server address missing{where}: {_NBD_SERVER_HINT}")
        host = _nonempty(legacy["host"], "host", where)
        if "port" not in legacy:
            return InetAddress(host), str(NBD_DEFAULT_PORT)
        port, port_text = _port(legacy["port"], "port", where)
        return InetAddress(host, port), port_text

    def _probe(self, opts: _Opts, node_name: str) -> tuple[ProbeNode, _Shown]:
        file, file_shown = self._file_child(opts, "probe")
        if opts.has_sub("backing"):
            raise InvalidOptionError(
                f'Option \'backing\' needs the node\'s format: give "driver": "qcow2"{_at(opts)}'
            )
        self._leftovers(opts, "probe")
        shown = _Shown(file_shown.exact, [("file", file_shown, (bucket("file"), 0))])
        shown.probed = node_name
        shown.members.append(("driver", "probe", (bucket("driver"), 0)))
        self.shown[node_name] = shown
        return ProbeNode(node_name, file), shown

    def _format(self, opts: _Opts, node_name: str, driver: str) -> tuple[Node, _Shown]:
        file, file_shown = self._file_child(opts, driver)
        backing: Node | _BackingDefault | None = BACKING_DEFAULT
        if driver == "qcow2":
            backing = self._backing(opts)
        self._leftovers(opts, driver)
        shown = _Shown(file_shown.exact, [("file", file_shown, (bucket("file"), 0))])
        if isinstance(file, BlkdebugNode) and driver == "raw":
            # QEMU's raw -> blkdebug -> file is blkdebug -> raw -> file: raw passes
            # offsets through unchanged. The node at this place keeps this place's name.
            assert isinstance(file.image, FileNode | NbdNode)
            inner = RawNode(file.node_name, file.image)
            return BlkdebugNode(node_name, inner, file.inject_error), shown
        if driver == "raw":
            assert not isinstance(file, BlkdebugNode)
            return RawNode(node_name, file), shown
        return Qcow2Node(node_name, file, backing), shown

    def _backing(self, opts: _Opts) -> Node | _BackingDefault | None:
        item = opts.items.get("backing")
        subkeys = any(k.startswith("backing.") for k in opts.items)
        if item is not None and not subkeys and (item.value is None or item.value == ""):
            # null, or "" (QEMU's older spelling, and the only one --image-opts has).
            opts.take("backing")
            return None
        sub = self._child(opts, "backing")
        if sub is None:
            return BACKING_DEFAULT
        return self.node(sub, sub.path)[0]

    def _quorum(self, opts: _Opts, node_name: str) -> tuple[QuorumNode, _Shown]:
        # In QEMU's order: the quorum's own options, then the children, then whatever
        # option is left over.
        where = _at(opts)
        given = {key: opts.take(key) for key in _QUORUM_OPTIONS}
        children_item = opts.take("children")
        if children_item is not None and not isinstance(children_item.value, _Empty):
            raise InvalidOptionError(f"Parameter 'children' expects a list of nodes{where}")
        indices = opts.indices("children")
        if not indices:
            raise InvalidOptionError(f"Number of provided children must be 1 or more{where}")
        threshold = _number(given["vote-threshold"], "vote-threshold", where)
        if threshold is None or threshold < 1:
            raise InvalidOptionError(f"Parameter 'vote-threshold' expects a value >= 1{where}")
        if threshold > len(indices):
            raise InvalidOptionError(
                f"threshold may not exceed children count{where} "
                f"(vote-threshold={threshold}, {len(indices)} children)"
            )
        blkverify = bool(_boolean(given["blkverify"], "blkverify", where))
        rewrite = bool(_boolean(given["rewrite-corrupted"], "rewrite-corrupted", where))
        pattern = ReadPattern.QUORUM
        pattern_item = given["read-pattern"]
        if pattern_item is not None and pattern_item.value is not None:
            if not isinstance(pattern_item.value, str):
                raise InvalidOptionError(f"Please set read-pattern as fifo or quorum{where}")
            try:
                pattern = ReadPattern(pattern_item.value)
            except ValueError:
                raise InvalidOptionError(
                    f"Please set read-pattern as fifo or quorum{where}"
                ) from None
        if blkverify and (len(indices) != 2 or threshold != 2):
            raise InvalidOptionError(
                "blkverify=on can only be set if there are exactly two files and "
                f"vote-threshold is 2{where}"
            )
        if rewrite and blkverify:
            raise InvalidOptionError(
                f"rewrite-corrupted=on cannot be used with blkverify=on{where}"
            )
        if pattern is ReadPattern.FIFO and (rewrite or blkverify):
            flag = "rewrite-corrupted" if rewrite else "blkverify"
            raise InvalidOptionError(
                f"{flag}=on needs read-pattern=quorum{where}: with fifo nothing is compared"
            )
        children: list[Node] = []
        shown_children: list[_Shown] = []
        for index in indices:
            sub = self._child(opts, f"children.{index}")
            assert sub is not None
            child, shown = self.node(sub, sub.path)
            children.append(child)
            shown_children.append(shown)
        self._leftovers(opts, "quorum")
        shown = _Shown(None, [("children", shown_children, (bucket("children"), 0))])
        for key, item in given.items():
            if item is not None:
                value = None if isinstance(item.value, _Empty) else item.value
                shown.members.append((key, value, (bucket(key), item.order)))
        quorum = QuorumNode(node_name, tuple(children), threshold, blkverify, rewrite, pattern)
        return quorum, shown

    def _blkdebug(self, opts: _Opts, node_name: str) -> tuple[BlkdebugNode, _Shown]:
        where = _at(opts)
        rules_given = {k: v for k, v in opts.items.items() if k.startswith("inject-error.")}
        rules: list[BlkdebugRule] = []
        if "inject-error" not in opts.items:
            for index in opts.indices("inject-error"):
                rules.append(self._rule(opts.sub(f"inject-error.{index}")))
        sub = self._child(opts, "image")
        if sub is None:
            raise InvalidOptionError(f'A block device must be specified for "image"{where}')
        if "driver" not in sub.items and "filename" in sub.items:
            # blkdebug is a protocol driver: a file name alone under it is a file.
            sub.items["driver"] = _Item("file", 0)
        image, image_shown = self.node(sub, sub.path)
        self._leftovers(opts, "blkdebug")
        exact = None
        if not rules_given and image_shown.exact is not None:
            exact = f"blkdebug::{image_shown.exact}"
        shown = _Shown(exact, [("image", image_shown, (bucket("image"), 0))])
        for key, item in rules_given.items():
            value = None if isinstance(item.value, _Empty) else item.value
            shown.members.append((key, value, (bucket(key), item.order)))
        return BlkdebugNode(node_name, image, tuple(rules)), shown

    def _rule(self, opts: _Opts) -> BlkdebugRule:
        where = _at(opts)
        for key in opts.items:
            top = key.split(".", 1)[0]
            if top == "state":
                raise InvalidOptionError(
                    f"Option 'state' of inject-error rules is not supported by qimg{where} "
                    "(blkdebug states are not implemented)"
                )
            if key not in _RULE_KEYS:
                raise InvalidOptionError(
                    f"[inject-error] section doesn't support the option '{key}'{where}"
                )
        event_text = _text(opts.take("event"), "event", where)
        if event_text is None:
            raise InvalidOptionError(f"Missing event name for rule{where}")
        try:
            event = BlkdebugEvent(event_text)
        except ValueError:
            if event_text in _QEMU_BLKDEBUG_EVENTS:
                supported = ", ".join(e.value for e in BlkdebugEvent)
                raise InvalidOptionError(
                    f"blkdebug event '{event_text}' is not supported by qimg{where} "
                    f"(it fires {supported})"
                ) from None
            raise InvalidOptionError(f"invalid parameter value: {event_text}{where}") from None
        iotype_text = _text(opts.take("iotype"), "iotype", where)
        iotype = None
        if iotype_text is not None:
            try:
                iotype = IoType(iotype_text)
            except ValueError:
                if iotype_text == "block-status":
                    raise InvalidOptionError(
                        f"blkdebug iotype 'block-status' is not supported by qimg{where}"
                    ) from None
                raise InvalidOptionError(f"invalid parameter value: {iotype_text}{where}") from None
        errno = _number(opts.take("errno"), "errno", where)
        if errno is not None and errno <= 0:
            raise InvalidOptionError(
                f"Parameter 'errno' expects a positive error number, not {errno}{where}"
            )
        sector = _number(opts.take("sector"), "sector", where)
        if sector is not None and sector < -1:
            raise InvalidOptionError(
                f"Parameter 'sector' expects a sector number or -1 (any), not {sector}{where}"
            )
        once = _boolean(opts.take("once"), "once", where)
        # ``immediately`` only changes when QEMU completes the failed request; qimg's
        # requests complete synchronously either way.
        _boolean(opts.take("immediately"), "immediately", where)
        return BlkdebugRule(
            event,
            iotype,
            5 if errno is None else errno,
            -1 if sector is None else sector,
            bool(once),
        )


# --- the entry point -----------------------------------------------------------------------

#: What :func:`qimg.open` (and every call that opens an image) takes: a file name, a
#: ``json:{...}`` string, an ``--image-opts`` string (with ``image_opts=True``), a
#: mapping, or a parsed :class:`NodeSpec`.
ImageSpec: TypeAlias = str | os.PathLike[str] | Mapping[str, Any] | NodeSpec


def parse_spec(
    spec: ImageSpec,
    *,
    image_opts: bool = False,
    format: str | None = None,
    fmt: str | None = None,
) -> NodeSpec:
    """Parses an image specification.

    ``spec`` is a file name, a ``json:{...}`` string, an ``--image-opts`` string (with
    ``image_opts=True``), a mapping (nested or with dotted keys), or an already parsed
    :class:`NodeSpec` (returned as it is). ``format`` is ``-f``: the root's driver,
    overriding the one a ``json:`` spec gives (as qemu-img does); it cannot be
    combined with ``image_opts``. ``fmt`` is its deprecated old name."""
    fmt = renamed(format, fmt, new="format", old="fmt")
    if isinstance(spec, NodeSpec):
        if fmt is not None:
            raise UsageError("A parsed NodeSpec already names its format; do not give format")
        return spec
    if image_opts:
        if fmt is not None:
            raise UsageError("--image-opts and --format are mutually exclusive")
        if not isinstance(spec, str):
            raise UsageError("image_opts=True needs the option string itself")
        flat: list[tuple[str, _Leaf, int]] = [
            (k, v, i) for i, (k, v) in enumerate(parse_image_opts(spec).items())
        ]
    elif isinstance(spec, Mapping):
        flat = _flatten(spec)
    elif is_plain_filename(spec):
        return _plain(os.fspath(spec), fmt)
    elif isinstance(spec, str) and is_nbd_url(spec):
        return _nbd_url(spec, fmt)
    else:
        assert isinstance(spec, str)
        flat = _flatten(_load_json(spec.removeprefix("json:")))
    parser = _Parser()
    root, _ = parser.parse_root(_Opts.from_flat(flat), fmt)
    return NodeSpec(root, _shown=parser.shown)


def _nbd_url(url: str, fmt: str | None) -> NodeSpec:
    """An NBD URL given as a file name: the export under a probed format, or under
    ``-f raw``; ``-f nbd`` opens the export itself."""
    if fmt == "file":
        # As qemu-img -f file does: the name is a path, whatever it looks like.
        return _plain(url, fmt)
    if fmt not in (None, "raw", "qcow2", "nbd"):
        return _plain(url, fmt)  # refuses the format by name
    nbd = _nbd_url_options(url)
    tree: dict[str, Any] = nbd if fmt == "nbd" else {"file": nbd}
    parser = _Parser()
    try:
        root, _ = parser.parse_root(_Opts.from_flat(_flatten(tree)), fmt if fmt != "nbd" else None)
    except UnicodeDecodeError:
        raise InvalidOptionError("NBD URL has percent-escapes that are not UTF-8") from None
    return NodeSpec(root, _shown=parser.shown)


def _plain(filename: str, fmt: str | None) -> NodeSpec:
    file = FileNode("file", filename)
    root: Node
    if fmt is None:
        root = ProbeNode("root", file)
    elif fmt == "raw":
        root = RawNode("root", file)
    elif fmt == "qcow2":
        root = Qcow2Node("root", file)
    elif fmt == "file":
        root = FileNode("root", filename)
    elif fmt in ("quorum", "blkdebug"):
        raise InvalidOptionError(
            f"A {fmt} node needs a json: or --image-opts specification, not a file name"
        )
    elif fmt == "nbd":
        raise InvalidOptionError(
            "An nbd node needs an nbd:// or nbd+unix:// URL, or a json: or --image-opts "
            "specification, not a file name"
        )
    elif fmt in _QEMU_DRIVERS:
        raise InvalidOptionError(f"Driver '{fmt}' is not supported by qimg")
    else:
        raise InvalidOptionError(f"Unknown driver '{fmt}'")
    return NodeSpec(root, plain_filename=filename, plain_format=fmt)
