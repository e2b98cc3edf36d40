"""Open images: the Python API for reading and writing, and the facts ``info`` prints.

An image is opened from a plain file name (format probed or given, backing chain
from the header) or from a node-tree specification (``json:{...}``, an
``--image-opts`` string, a mapping, or a :class:`~qimg.spec.NodeSpec`; see
:mod:`qimg.spec`). Events the node graph records (a quorum child that returned
bad data, ...) are drained after every operation and handed to the image's
``events`` callback, or kept for :meth:`Image.events`.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import TYPE_CHECKING, Literal, cast

from qimg import _core
from qimg.errors import InvalidOptionError, QimgError, UnsupportedError, UsageError
from qimg.events import Event, EventCallback
from qimg.imageinfo import core_info, file_child, info_of, nbd_info
from qimg.names import is_plain_filename
from qimg.prealloc import PreallocMode
from qimg.qjson import JsonValue

if TYPE_CHECKING:
    # Python 3.12 has it as collections.abc.Buffer; only the type checker needs it.
    from typing_extensions import Buffer

    from qimg.info_report import BitmapInfo, ImageInfo, SnapshotInfo
    from qimg.snapshot_ref import SnapshotRef
    from qimg.spec import ImageSpec, Node, NodeSpec
    from qimg.stream import ImageStream

__all__ = [
    "Image",
    "MapExtent",
    "drain_events",
    "open_image",
    "parse_image_spec",
    "with_events",
]


@dataclass(frozen=True)
class MapExtent:
    """A run of guest bytes with one allocation status, as ``map`` prints it."""

    start: int
    length: int
    depth: int
    """How far down the backing chain the bytes come from (0: the image itself)."""
    present: bool
    zero: bool
    data: bool
    compressed: bool
    offset: int | None
    """Host offset in ``filename`` when the bytes are stored there plainly."""
    filename: str | None


class Image:
    """An open image (with its backing chain). Use as a context manager or
    call :meth:`close`; I/O after closing raises ``ValueError``.

    Images opened with ``writable=True`` also take writes; closing one
    writes back everything (an image that is never closed is written back
    when it is garbage collected, but errors then go unreported)."""

    def __init__(
        self,
        core: _core.Image,
        *,
        spec: NodeSpec | None = None,
        events: EventCallback | None = None,
    ) -> None:
        self._core: _core.Image | None = core
        self.spec = spec
        """The specification the image was opened from (None: a plain file name)."""
        self._events = events
        self._pending: deque[Event] = deque()
        self._display: str | None = None

    @property
    def _img(self) -> _core.Image:
        if self._core is None:
            raise ValueError("I/O operation on a closed image")
        return self._core

    def close(self) -> None:
        core = self._core
        if core is None:
            return
        try:
            if core.writable:
                core.close()
        finally:
            # The core object may outlive this call (an exception's traceback keeps it
            # until Python collects it): its locks go now, so others can open the image.
            core.release_locks()
            self._drain(core)
            self._core = None

    def _drain(self, core: _core.Image | None = None) -> None:
        """Hands the events recorded since the last call to the callback (or keeps
        them for :meth:`events`)."""
        core = core if core is not None else self._core
        if core is None:
            return
        for record in core.take_events():
            event = Event.from_core(record)
            if self._events is not None:
                self._events(event)
            else:
                self._pending.append(event)

    def events(self) -> Iterator[Event]:
        """The events recorded since the last call and not given to an ``events``
        callback, oldest first (each is yielded once)::

            with qimg.open(spec) as img:
                img.read(0, 65536)
                for event in img.events():
                    print(event.name, event.data)
        """
        self._drain()
        while self._pending:
            yield self._pending.popleft()

    def __enter__(self) -> Image:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def size(self) -> int:
        """Virtual size in bytes."""
        return self._img.size

    @property
    def format(self) -> str:
        return self._img.format

    @property
    def filename(self) -> str:
        """The image's name as qemu-img prints it: the file name, or for a node
        tree that a file name cannot describe, ``json:{...}``."""
        if self.spec is None or self.spec.is_plain:
            return self._img.filename
        if self._display is None:
            self._display = self.spec.display_name(probed_formats(self.spec))
        return self._display

    def read(self, offset: int, length: int) -> bytes:
        """``length`` guest bytes at ``offset`` (the range must lie inside the image)."""
        check_span(offset, length)
        try:
            return self._img.read(offset, length)
        finally:
            self._drain()

    @property
    def writable(self) -> bool:
        return self._img.writable

    def write(self, offset: int, data: Buffer) -> None:
        """Writes ``data`` (bytes, bytearray, memoryview, ...) at guest ``offset``."""
        check_span(offset, 0)
        try:
            self._img.write(offset, _as_bytes(data))
        finally:
            self._drain()

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Makes ``length`` bytes at ``offset`` read as zeroes; ``unmap`` lets
        the image release their space."""
        check_span(offset, length)
        try:
            self._img.write_zeroes(offset, length, unmap=unmap)
        finally:
            self._drain()

    def discard(self, offset: int, length: int) -> None:
        """Releases the whole clusters of the range. Afterwards they read as
        zeroes (qcow2 v3, raw) or from the backing file (qcow2 v2)."""
        check_span(offset, length)
        try:
            self._img.discard(offset, length)
        finally:
            self._drain()

    def write_compressed(self, offset: int, data: Buffer) -> None:
        """Stores one whole, unallocated qcow2 cluster compressed."""
        check_span(offset, 0)
        try:
            self._img.write_compressed(offset, _as_bytes(data))
        finally:
            self._drain()

    def flush(self) -> None:
        """Makes every write so far durable."""
        try:
            self._img.flush()
        finally:
            self._drain()

    @property
    def backing_file(self) -> str | None:
        """The backing file name as the image records it (None without one)."""
        backing = self._img.details().backing
        return None if backing is None else backing.filename

    @property
    def backing_format(self) -> str | None:
        """The backing file format the image records, if any."""
        backing = self._img.details().backing
        return None if backing is None else backing.format

    def amend(
        self,
        *,
        compat: str | None = None,
        lazy_refcounts: bool | None = None,
        refcount_bits: int | None = None,
        size: int | None = None,
    ) -> None:
        """Changes qcow2 options in place, as ``qemu-img amend`` does; None
        keeps an option. The image stays open (with its locks) and reads, writes
        and :meth:`info` follow the new settings."""
        self._core = self._img.amend(
            compat=compat, lazy_refcounts=lazy_refcounts, refcount_bits=refcount_bits, size=size
        )

    def resize(self, size: int, *, preallocation: PreallocMode = PreallocMode.OFF) -> None:
        """Sets the virtual size (a multiple of 512). Growing preallocates the
        new area as ``preallocation`` says; shrinking discards everything past
        the new end."""
        check_span(0, size)
        self._img.resize(size, preallocation=preallocation.value)

    def readinto(self, offset: int, buffer: bytearray | memoryview) -> int:
        """Fills ``buffer`` with guest bytes at ``offset``; returns the count."""
        check_span(offset, 0)
        try:
            if isinstance(buffer, bytearray):
                return self._img.readinto(offset, buffer)
            view = memoryview(buffer).cast("B")
            view[:] = self._img.read(offset, view.nbytes)
            return view.nbytes
        finally:
            self._drain()

    def map(self, start: int = 0, length: int | None = None) -> list[MapExtent]:
        """Allocation extents of ``[start, start + length)``, merged as ``qemu-img map`` does."""
        check_span(start, 0 if length is None else length)
        try:
            return [
                MapExtent(
                    e.start,
                    e.length,
                    e.depth,
                    e.present,
                    e.zero,
                    e.data,
                    e.compressed,
                    e.offset,
                    e.filename,
                )
                for e in self._img.map(start, length)
            ]
        finally:
            self._drain()

    def open_stream(self) -> ImageStream:
        """A file object over the image's guest bytes (an :class:`io.RawIOBase` that
        reads, seeks, and writes when the image is writable), for code that takes
        files: ``shutil.copyfileobj``, ``hashlib.file_digest``, ``tarfile``, ...
        Closing the stream leaves the image open::

            with qimg.open("disk.qcow2") as img, img.open_stream() as f:
                digest = hashlib.file_digest(f, "sha256")
        """
        from qimg.stream import ImageStream

        return ImageStream(self)

    def __repr__(self) -> str:
        core = self._core
        if core is None:
            return "<qimg.Image (closed)>"
        mode = "writable" if core.writable else "read-only"
        return f"<qimg.Image {self.filename!r} format={core.format} size={core.size} {mode}>"

    def backing(self) -> Image | None:
        core = self._img.backing()
        return Image(core, events=self._events) if core is not None else None

    def info(self) -> ImageInfo:
        """The ImageInfo object ``qemu-img info --output=json`` prints for this image,
        as it stands now (after :meth:`amend` or :meth:`resize` too)."""
        if self.spec is None or self.spec.is_plain:
            found = core_info(self._img)
        else:
            found = _tree_info(self.spec, self.spec.root, self._img, probed_formats(self.spec))
        return cast("ImageInfo", found)

    def snapshots(self) -> list[SnapshotInfo]:
        """The image's internal snapshots (qcow2), oldest first, as ``qemu-img snapshot
        -l`` lists them; an image without any (raw included) has none."""
        return list(self.info().get("snapshots", []))

    def create_snapshot(self, name: str) -> None:
        """Saves the guest content as internal snapshot ``name`` (qcow2, open for
        writing), as ``qemu-img snapshot -c`` does: names need not be unique, the
        snapshot gets the next free numeric ID. Clusters stay shared with the image
        until either side changes them."""
        now = time.time_ns()
        self._change_snapshots(
            "create", name, lambda c: _core.create_snapshot(c, name, now // 10**9, now % 10**9)
        )

    def apply_snapshot(self, which: str) -> None:
        """Reverts the guest content and size to the snapshot with ID or name
        ``which`` (``qemu-img snapshot -a``); the snapshot stays."""
        self._change_snapshots("apply", which, lambda c: _core.apply_snapshot(c, which))

    def delete_snapshot(self, name: str) -> None:
        """Deletes the first snapshot called ``name`` (``qemu-img snapshot -d``) and
        releases the clusters only it held."""
        self._change_snapshots("delete", name, lambda c: _core.delete_snapshot(c, name))

    def bitmaps(self) -> list[BitmapInfo]:
        """The image's persistent dirty bitmaps (qcow2), as ``qemu-img info`` lists
        them: name, granularity and flags (``auto``: enabled; ``in-use``: a writer
        did not close the image, so the bits missed writes)."""
        specific = self.info().get("format-specific")
        if specific is None or specific["type"] != "qcow2":
            return []
        return list(specific["data"].get("bitmaps", []))

    def rebase(
        self,
        backing_file: str | None,
        *,
        backing_format: str | None = None,
        unsafe: bool = False,
        compress: bool = False,
        source_cache: str = "writeback",
        force_share: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """:func:`qimg.rebase` of this image (open for writing; the safe mode needs it
        opened with its backing chain). Close it afterwards: its open backing chain
        is the old one."""
        from qimg.rebasing import rebase_open

        try:
            rebase_open(
                self,
                backing_file,
                backing_format=backing_format,
                unsafe=unsafe,
                compress=compress,
                source_cache=source_cache,
                force_share=force_share,
                progress=progress,
            )
        finally:
            self._drain()

    def add_bitmap(
        self, name: str, *, granularity: int | None = None, disabled: bool = False
    ) -> None:
        """Adds persistent bitmap ``name`` (``qemu-img bitmap --add``), recording writes
        unless ``disabled``."""
        ops: list[BitmapChange] = [("add", granularity)]
        if disabled:
            ops.append("disable")
        self.change_bitmap(name, *ops)

    def remove_bitmap(self, name: str) -> None:
        """Removes persistent bitmap ``name`` (``--remove``)."""
        self.change_bitmap(name, "remove")

    def clear_bitmap(self, name: str) -> None:
        """Clears every bit of bitmap ``name`` (``--clear``)."""
        self.change_bitmap(name, "clear")

    def enable_bitmap(self, name: str) -> None:
        """Makes bitmap ``name`` record writes (``--enable``)."""
        self.change_bitmap(name, "enable")

    def disable_bitmap(self, name: str) -> None:
        """Stops bitmap ``name`` recording writes (``--disable``)."""
        self.change_bitmap(name, "disable")

    def merge_bitmap(self, name: str, source: str, source_image: Image | None = None) -> None:
        """Sets in bitmap ``name`` every bit set in bitmap ``source`` of
        ``source_image`` (default: this image), as ``--merge`` does."""
        self.change_bitmap(name, ("merge", source, source_image))

    def change_bitmap(self, name: str, *ops: BitmapChange) -> None:
        """Applies ``ops`` to bitmap ``name`` in order, as one ``qemu-img bitmap``
        call does (the image must be open for writing)::

            image.change_bitmap("b1", ("add", 65536), "disable")
            image.change_bitmap("b1", ("merge", "other"), ("merge", "b2", other_image))

        An op is ``"remove"``, ``"clear"``, ``"enable"``, ``"disable"``, ``"add"`` or
        ``("add", granularity)``, or ``("merge", source)`` / ``("merge", source,
        source_image)`` (another open :class:`Image`; default: this one). Nothing is
        written unless every op succeeds. While the image is open, writes mark their
        ranges dirty in every enabled bitmap."""
        core_ops: list[tuple[str, int | None, str | None, _core.Image | None]] = []
        for op in ops:
            if isinstance(op, str):
                core_ops.append((op, None, None, None))
            elif op[0] == "add":
                core_ops.append(("add", op[1], None, None))
            elif op[0] == "merge":
                source_image = op[2]._img if len(op) > 2 and op[2] is not None else None
                core_ops.append(("merge", None, op[1], source_image))
            else:
                raise InvalidOptionError(f"Unknown bitmap operation {op!r}")
        try:
            # The header changed: the core hands back the handle that follows it.
            self._core = _core.change_bitmap(self._img, name, core_ops)
        finally:
            self._drain()

    def _view_snapshot(self, snapshot: str | SnapshotRef) -> Image:
        """This (read-only) image turned into a view of one of its snapshots."""
        from qimg.snapshot_ref import SnapshotRef

        ref = SnapshotRef(id_or_name=snapshot) if isinstance(snapshot, str) else snapshot
        try:
            self._core = _core.open_snapshot(
                self._img, id_or_name=ref.id_or_name, id=ref.id, name=ref.name
            )
        except QimgError:
            self.close()
            raise
        return self

    def _change_snapshots(
        self, verb: str, name: str, change: Callable[[_core.Image], _core.Image]
    ) -> None:
        try:
            # The header changed: the core hands back the handle that follows it.
            self._core = change(self._img)
        except QimgError as err:
            raise type(err)(f"Could not {verb} snapshot '{name}': {err}") from None
        finally:
            self._drain()

    def chain(self) -> list[Image]:
        """This image and every image below it in the backing chain."""
        out: list[Image] = [self]
        while (below := out[-1].backing()) is not None:
            out.append(below)
        return out


def check_span(offset: int, length: int) -> None:
    """Refuses a negative offset or length with ``ValueError`` (an image range
    past the end is the core's to refuse, with the image's size in the message)."""
    if offset < 0:
        raise InvalidOptionError(f"offset must not be negative (not {offset})")
    if length < 0:
        raise InvalidOptionError(f"length must not be negative (not {length})")


def _as_bytes(data: Buffer) -> bytes | bytearray:
    # The core takes bytes and bytearray; other buffers are copied once here.
    return data if isinstance(data, bytes | bytearray) else bytes(data)


def open_image(
    spec: ImageSpec,
    format: str | None = None,
    *,
    backing: bool = True,
    writable: bool = False,
    cache: str = "writeback",
    image_opts: bool = False,
    events: EventCallback | None = None,
    force_share: bool = False,
    purpose: Purpose = "read",
    writable_backing: int | None = None,
    snapshot: str | SnapshotRef | None = None,
) -> Image:
    """Opens an image (read-only unless ``writable``; its backing chain is
    read-only but for the layer ``writable_backing`` layers below the image, if
    given, which ``commit`` writes into); ``format`` None probes it as qemu-img does.

    The open takes QEMU's image locks, so that qimg, qemu-img, qemu-io,
    qemu-nbd and running VMs exclude each other: an image another process
    writes cannot be opened (:class:`~qimg.errors.ImageLockedError`), and while
    this one is open for writing nobody else reads or writes it. ``force_share``
    (qemu-img's ``-U``) opens read-only images anyway, sharing everything.
    ``purpose`` picks the permissions qemu-img takes for the same job:
    ``"inspect"`` (info), ``"read"``, ``"copy-source"`` (convert: nobody may
    write the source meanwhile), ``"resize"`` or ``"repair"`` (check -r).

    ``spec`` is a file name, a ``json:{...}`` string, an ``--image-opts`` string
    (with ``image_opts=True``), a mapping such as ``{"driver": "quorum",
    "vote-threshold": 2, "children": [...]}``, or a :class:`~qimg.spec.NodeSpec`.
    ``format`` is qemu-img's ``-f``: with a ``json:`` spec it replaces the root's driver.
    ``backing=False`` leaves the backing file of the top image closed.

    ``cache`` is one of QEMU's cache modes: ``"writeback"`` (the page cache;
    flushes reach the disk), ``"unsafe"`` (flushes are skipped: faster, but a
    power failure may lose or reorder writes; what qemu-img convert uses for its
    output by default), ``"none"`` (O_DIRECT: around the page cache),
    ``"directsync"`` (O_DIRECT, and every write waits for the disk) or
    ``"writethrough"`` (every write waits for the disk).

    ``snapshot`` opens an internal snapshot of a qcow2 image instead of its current
    content, read-only: a :class:`~qimg.snapshot_ref.SnapshotRef`, or a string that
    is a snapshot ID or else a name (``qemu-img convert -l``).

    ``events`` is called with every :class:`~qimg.events.Event` the image's nodes
    record, after the operation that caused it (an :class:`~qimg.events.EventStream`
    collects them for iteration); without it, :meth:`Image.events` returns them."""
    cache = check_cache_mode(cache)
    if force_share and writable:
        raise UsageError("force-share=on can only be used with read-only images")
    if snapshot is not None:
        if writable:
            raise UsageError("A snapshot is opened read-only")
        opened = open_image(
            spec,
            format,
            backing=backing,
            cache=cache,
            image_opts=image_opts,
            events=events,
            force_share=force_share,
            purpose=purpose,
        )
        return opened._view_snapshot(snapshot)
    locks = _Locks(cache=cache, force_share=force_share, purpose=purpose)
    if not image_opts and is_plain_filename(spec):
        assert isinstance(spec, str | os.PathLike)
        return _open_plain(
            os.fspath(spec), format, backing, writable, writable_backing, locks, events
        )
    from qimg.spec import BACKING_DEFAULT, ProbeNode, Qcow2Node

    node_spec = parse_image_spec(spec, image_opts=image_opts, fmt=format)
    if node_spec.plain_filename is not None:
        return _open_plain(
            node_spec.plain_filename,
            node_spec.plain_format,
            backing,
            writable,
            writable_backing,
            locks,
            events,
        )
    if writable_backing is not None:
        raise UnsupportedError(
            "writing into a backing file of a node tree is not supported by qimg; "
            "give the image by its file name"
        )
    root = node_spec.root
    if not backing and isinstance(root, Qcow2Node) and root.backing is BACKING_DEFAULT:
        node_spec = replace(node_spec, root=replace(root, backing=None))
    if not backing and isinstance(root, ProbeNode):
        node_spec = replace(node_spec, root=replace(root, open_backing=False))
    core = _core.open_spec(
        node_spec.to_core_json(),
        writable=writable,
        cache=locks.cache,
        force_share=locks.force_share,
        purpose=locks.purpose,
    )
    return Image(core, spec=node_spec, events=events)


#: One operation of :meth:`Image.change_bitmap`.
BitmapChange = (
    Literal["add", "remove", "clear", "enable", "disable"]
    | tuple[Literal["add"], int | None]
    | tuple[Literal["merge"], str]
    | tuple[Literal["merge"], str, "Image | None"]
)

#: Why an image is opened; it decides QEMU's image locks (see :func:`open_image`).
Purpose = Literal["inspect", "read", "copy-source", "resize", "repair"]


@dataclass(frozen=True)
class _Locks:
    cache: str
    force_share: bool
    purpose: Purpose


def _open_plain(
    path: str,
    format: str | None,
    backing: bool,
    writable: bool,
    writable_backing: int | None,
    locks: _Locks,
    events: EventCallback | None,
) -> Image:
    core = _core.open_image(
        path,
        format,
        no_backing=not backing,
        writable=writable,
        writable_backing=writable_backing,
        cache=locks.cache,
        force_share=locks.force_share,
        purpose=locks.purpose,
    )
    return Image(core, events=events)


def parse_image_spec(
    spec: ImageSpec, *, image_opts: bool = False, fmt: str | None = None
) -> NodeSpec:
    """:func:`qimg.spec.parse_spec`, with errors that name the spec as qemu-img does
    (``Could not open 'SPEC': ...``)."""
    from qimg.spec import parse_spec

    try:
        return parse_spec(spec, image_opts=image_opts, format=fmt)
    except UsageError:
        raise
    except QimgError as err:
        if isinstance(spec, str):
            raise type(err)(f"Could not open '{spec}': {err}") from None
        raise


def drain_events(images: Sequence[Image]) -> None:
    """Delivers the events every image in ``images`` recorded so far."""
    for image in images:
        image._drain()


def with_events(
    images: Sequence[Image], progress: Callable[[int, int], None] | None
) -> Callable[[int, int], None]:
    """A progress callback for a long operation on ``images`` that also delivers
    their events as the operation goes."""

    def report(done: int, total: int) -> None:
        if progress is not None:
            progress(done, total)
        drain_events(images)

    return report


def probed_formats(spec: NodeSpec) -> dict[str, str]:
    """The format of every node of ``spec`` whose format is probed, by node name
    (for printing the tree as qemu-img does, with the formats it found)."""
    from qimg.spec import FileNode, NodeSpec

    found: dict[str, str] = {}
    for node in spec.probe_nodes():
        if isinstance(node.file, FileNode):
            core = _core.open_image(node.file.filename, None, no_backing=True)
        else:  # an NBD export: probe it over the network, as opening it did
            core = _core.open_spec(NodeSpec(node).to_core_json())
        found[node.node_name] = core.format
    return found


def check_cache_mode(mode: str, *, source: bool = False) -> str:
    """QEMU's name of cache mode ``mode`` (``writeback``: the page cache, flushed when
    asked; ``unsafe``: never flushed; ``none``/``off``: O_DIRECT; ``directsync``: O_DIRECT
    and O_DSYNC; ``writethrough``: O_DSYNC), else qemu-img's refusal (``source``: of a
    ``-T`` value). The core holds the names (``_core.CACHE_MODES``)."""
    return _core.cache_mode(mode, source=source)


def _open_node(node: Node) -> _core.Image:
    """Opens one node of a tree (read-only) to describe it by itself."""
    from qimg.spec import NodeSpec

    return _core.open_spec(NodeSpec(node).to_core_json())


def _protocol_info(core: _core.Image, filename: str) -> dict[str, JsonValue]:
    info = file_child(core.details())["info"]
    assert isinstance(info, dict)
    return {**info, "filename": filename}


def _tree_info(
    spec: NodeSpec, node: Node, core: _core.Image, probed: Mapping[str, str]
) -> dict[str, JsonValue]:
    """ImageInfo of ``node`` (opened as ``core``) and the nodes under it, as qemu-img
    shows a node tree: children last-attached first, each named by its path."""
    from qimg.spec import (
        BACKING_DEFAULT,
        BlkdebugNode,
        FileNode,
        NbdNode,
        Node,
        ProbeNode,
        Qcow2Node,
        QuorumNode,
        RawNode,
    )

    filename = spec.display_name_of(node.node_name, probed)
    if isinstance(node, FileNode):
        return _protocol_info(core, filename)
    if isinstance(node, NbdNode):
        return nbd_info(filename, core.size)
    if isinstance(node, RawNode | Qcow2Node | ProbeNode):
        details = core.details()
        info = info_of(details)
        info["filename"] = filename
        children: list[JsonValue] = []
        below = core.backing()
        backing_node = node.backing if isinstance(node, Qcow2Node) else None
        # The image named at the top takes its backing file from its header only
        # with --backing-chain, which lists that file by itself, not as a child.
        from_header = backing_node is None or backing_node is BACKING_DEFAULT
        if from_header and node is spec.root:
            below = None
        if isinstance(node, Qcow2Node | ProbeNode) and below is not None:
            if from_header:
                backing_info = core_info(below)
            else:
                assert isinstance(backing_node, Node)
                backing_info = _tree_info(spec, backing_node, below, probed)
            children.append({"name": "backing", "info": backing_info})
        if isinstance(node.file, NbdNode):
            if info["format"] == "raw":
                # qemu-img shows no dirty flag for a raw image over an export.
                info.pop("dirty-flag", None)
            export = spec.display_name_of(node.file.node_name, probed)
            assert details.file is not None, "a format node has a file below it"
            info["children"] = [{"name": "file", "info": nbd_info(export, details.file.length)}]
        children.extend(info.get("children", []))  # type: ignore[arg-type]
        info["children"] = children
        return info
    details = core.details()
    kids: list[tuple[str, Node]]
    if isinstance(node, QuorumNode):
        kids = [(f"children.{i}", c) for i, c in enumerate(node.children)]
    else:
        assert isinstance(node, BlkdebugNode)
        kids = [("image", node.image)]
    child_infos = [
        (name, _tree_info(spec, child, _open_node(child), probed)) for name, child in reversed(kids)
    ]
    out: dict[str, JsonValue] = {"filename": filename, "format": _driver_name(node)}
    if isinstance(node, QuorumNode):
        # qemu-img shows a quorum's disk size as its children's, and no dirty flag.
        known = [i["actual-size"] for _, i in child_infos if isinstance(i.get("actual-size"), int)]
        if known:
            out["actual-size"] = sum(known)  # type: ignore[arg-type]
    else:
        out["dirty-flag"] = False
    out["virtual-size"] = details.virtual_size
    out["children"] = [{"name": name, "info": i} for name, i in child_infos]
    return out


def _driver_name(node: Node) -> str:
    from qimg.spec import QuorumNode

    return "quorum" if isinstance(node, QuorumNode) else "blkdebug"
