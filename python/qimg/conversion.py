"""Converting images: the sources, concatenated, copied into a new or existing
target of any supported format, as ``qemu-img convert`` does."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

from qimg import _core, _log
from qimg.creation import OptionValue, option_items, plan_create
from qimg.deprecated import renamed
from qimg.devices import is_block_device, resolve_host_device
from qimg.errors import InvalidImageError, InvalidOptionError, UnsupportedError, UsageError
from qimg.events import EventCallback
from qimg.image import Image, drain_events, open_image, with_events
from qimg.names import is_plain_filename
from qimg.options import OptionItem, parse_size
from qimg.prealloc import PreallocMode
from qimg.snapshot_ref import SnapshotRef

# typing.TYPE_CHECKING without importing typing.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from qimg.image import BitmapChange
    from qimg.spec import ImageSpec

__all__ = ["ConvertRequest", "convert"]


@dataclass
class ConvertRequest:
    """Everything ``convert`` needs; the CLI and the API both build one."""

    sources: list[ImageSpec]
    target: ImageSpec
    """A file name; with ``existing`` also a node-tree spec (``json:``, mapping, ...)."""
    fmt: str | None = None
    out_fmt: str = "raw"
    options: list[OptionItem] = field(default_factory=list)
    compress: bool = False
    backing_file: str | None = None
    backing_fmt: str | None = None
    existing: bool = False
    target_is_zero: bool = False
    sparse_size: int | None = None
    """``-S``: zero blocks of this many bytes become holes (0: none); None: not given,
    qemu-img's default (4 KiB), which ``copy_offload`` needs."""
    workers: int | None = None
    in_order: bool = True
    copy_offload: bool = False
    """``-C``: data lying plainly in local files goes into a raw local target by an
    in-kernel copy (copy_file_range), without ``-S`` zero detection."""
    cache: str = "unsafe"
    """Cache mode of the target (``-t``); like qemu-img convert, flushes are skipped by default."""
    source_cache: str = "writeback"
    """Cache mode of the sources (``-T``)."""
    image_opts: bool = False
    """The sources are ``--image-opts`` option strings."""
    target_image_opts: bool = False
    """The target is an ``--image-opts`` option string (needs ``existing``)."""
    events: EventCallback | None = None
    """Receives the events of the sources and the target as the copy goes."""
    force_share: bool = False
    """``-U``: read the sources even while another process writes them."""
    bitmaps: bool = False
    """``--bitmaps``: copy the source's persistent bitmaps into the (qcow2) target."""
    skip_broken_bitmaps: bool = False
    """``--skip-broken-bitmaps``: leave out bitmaps a writer left inconsistent."""
    snapshot: SnapshotRef | None = None
    """``-l``: copy this internal snapshot of the (single) source."""

    @property
    def target_is_spec(self) -> bool:
        """Whether the target is a node tree rather than a file name."""
        return self.target_image_opts or not is_plain_filename(self.target)

    def validate(self) -> _core.ConvertOptions:
        """Refuses what cannot be done, before anything is opened; returns the copy
        options, checked by the core."""
        if not self.sources:
            raise UsageError("Expecting at least one source image")
        if self.skip_broken_bitmaps and not self.bitmaps:
            raise UsageError("Use of --skip-broken-bitmaps requires --bitmaps")
        if self.snapshot is not None and len(self.sources) > 1:
            raise UsageError("No support for concatenating multiple snapshot")
        if self.bitmaps and len(self.sources) > 1:
            raise UsageError("Copying bitmaps only possible with single source")
        if self.bitmaps and self.out_fmt != "qcow2":
            raise UnsupportedError(f"Format driver '{self.out_fmt}' does not support bitmaps")
        options = _core.ConvertOptions(
            sparse_size=self.sparse_size,
            compress=self.compress,
            workers=self.workers,
            in_order=self.in_order,
            copy_offload=self.copy_offload,
            # A node tree names its own format, known once it is open.
            target_format=None if self.target_is_spec else self.out_fmt,
            cache=self.cache,
            source_cache=self.source_cache,
        )
        if self.target_is_zero and not self.existing:
            raise UsageError("--target-is-zero requires use of -n flag")
        if self.target_is_zero and self.backing_file is not None:
            raise UsageError(
                "Cannot use --target-is-zero when the destination image has a backing file"
            )
        if len(self.sources) > 1 and _backing_of(self) is not None:
            raise UsageError(
                "Having a backing file for the target makes no sense when concatenating "
                "multiple input images"
            )
        if self.out_fmt == "host_device" and isinstance(self.target, str):
            # A block device, or refused.
            resolve_host_device(self.out_fmt, _core.local_path(self.target))
        if self.backing_file is not None and self.out_fmt in ("raw", "host_device"):
            raise InvalidOptionError(f"Backing file not supported for file format '{self.out_fmt}'")
        if self.existing and self.options:
            raise UsageError(
                "-o options create the output image; with -n the existing image is used as it is"
            )
        if self.target_is_spec and not self.existing:
            raise UsageError(
                "A target given as an NBD URL, as json: or with --target-image-opts must "
                "exist: use -n (qimg creates targets only from file names)"
            )
        if self.target_is_spec and (self.compress or self.backing_file is not None):
            flag = "-c" if self.compress else "-B"
            raise UsageError(
                f"{flag} describes a new qcow2 target; it cannot be used with an NBD URL, "
                "json: or --target-image-opts target"
            )
        return options


def run(request: ConvertRequest, progress: Callable[[int, int], None] | None = None) -> None:
    """Carries out ``request``; a target created here is removed again if
    the conversion fails."""
    options = request.validate()
    if request.out_fmt == "host_device":
        request = replace(request, out_fmt="raw")
    with contextlib.ExitStack() as stack:
        sources = [
            stack.enter_context(
                open_image(
                    s,
                    request.fmt,
                    image_opts=request.image_opts,
                    events=request.events,
                    cache=options.source_cache,
                    force_share=request.force_share,
                    purpose="copy-source",
                    snapshot=request.snapshot,
                )
            )
            for s in request.sources
        ]
        for name, source in zip(request.sources, sources, strict=True):
            _log.opened("source", name, source)
        total = sum(s.size for s in sources)
        if request.existing:
            target = stack.enter_context(
                open_image(
                    request.target,
                    # A node tree names its own driver.
                    None if request.target_is_spec else request.out_fmt,
                    writable=True,
                    cache=options.cache,
                    image_opts=request.target_image_opts,
                    events=request.events,
                )
            )
            _log.opened("existing target", request.target, target)
            top_only = request.backing_file is not None
            _copy(
                sources,
                target,
                options,
                zero_init=request.target_is_zero,
                top_only=top_only,
                progress=progress,
            )
            if request.bitmaps:
                copy_bitmaps(sources[0], target, skip_broken=request.skip_broken_bitmaps)
            target.close()
            return
        backing = _backing_of(request)
        if backing is not None and _backing_fmt_of(request) is None:
            raise InvalidOptionError("Use of backing file requires explicit backing format")
        assert isinstance(request.target, str)
        plan = plan_create(
            request.target,
            request.out_fmt,
            _without_size(request.options),
            size=total,
            backing_file=request.backing_file,
            backing_fmt=request.backing_fmt,
        )
        if request.compress and plan.prealloc is not PreallocMode.OFF:
            raise InvalidOptionError("Compression and preallocation not supported at the same time")
        local = _core.local_path(request.target)
        with _removed_on_failure(local):
            _log.info("creating %s: format %s, %d bytes", request.target, request.out_fmt, total)
            plan.run()
            with open_image(
                request.target, request.out_fmt, writable=True, cache=options.cache
            ) as target:
                _log.opened("new target", request.target, target)
                _copy(
                    sources,
                    target,
                    options,
                    # A new image reads as zeroes wherever it is not written
                    # and its backing file (if any) does not reach; raw bytes
                    # on a block device are whatever the device held.
                    zero_init=not (request.out_fmt == "raw" and is_block_device(local)),
                    top_only=backing is not None,
                    progress=progress,
                )
                if request.bitmaps:
                    copy_bitmaps(sources[0], target, skip_broken=request.skip_broken_bitmaps)


def copy_bitmaps(source: Image, target: Image, *, skip_broken: bool) -> None:
    """Gives ``target`` every persistent bitmap of ``source``: name, granularity,
    enabled or not, and bits. An inconsistent one (in use) is refused, or with
    ``skip_broken`` left out with a warning, as qemu-img does."""
    for bitmap in source.bitmaps():
        name = bitmap["name"]
        if "in-use" in bitmap["flags"]:
            if not skip_broken:
                raise InvalidImageError(
                    f"Cannot copy inconsistent bitmap '{name}'\nTry --skip-broken-bitmaps, "
                    "or use 'qimg bitmap --remove' to delete it"
                )
            print(f"qimg: warning: Skipping inconsistent bitmap '{name}'", file=sys.stderr)
            continue
        changes: list[BitmapChange] = [("add", bitmap["granularity"]), ("merge", name, source)]
        if "auto" not in bitmap["flags"]:
            changes.append("disable")
        target.change_bitmap(name, *changes)


def _without_size(options: list[OptionItem]) -> list[OptionItem]:
    """The sources decide the output's size: a ``-o size=`` is checked, then
    overridden, as qemu-img does."""
    for item in options:
        if item.key == "size" and item.value is not None:
            parse_size(item.value, "size")
    return [item for item in options if item.key != "size"]


def _backing_of(request: ConvertRequest) -> str | None:
    return _given(request.backing_file, request.options, "backing_file")


def _backing_fmt_of(request: ConvertRequest) -> str | None:
    return _given(request.backing_fmt, request.options, "backing_fmt")


def _given(flag: str | None, options: list[OptionItem], key: str) -> str | None:
    """The value of a flag, else of the last ``-o key=`` (later duplicates win)."""
    if flag is not None:
        return flag
    values = [item.value for item in options if item.key == key]
    return values[-1] if values else None


def _copy(
    sources: list[Image],
    target: Image,
    options: _core.ConvertOptions,
    *,
    zero_init: bool,
    top_only: bool,
    progress: Callable[[int, int], None] | None,
) -> None:
    images = [*sources, target]
    _log.info("copy: %s", "; ".join(_copy_paths(options, zero_init=zero_init, top_only=top_only)))
    started = time.monotonic()
    try:
        _core.convert(
            [s._img for s in sources],
            target._img,
            options,
            zero_init=zero_init,
            top_only=top_only,
            progress=with_events(images, progress),
        )
    finally:
        drain_events(images)
    _log.debug("copied %d bytes in %.3f s", target.size, time.monotonic() - started)


def _copy_paths(request: _core.ConvertOptions, *, zero_init: bool, top_only: bool) -> list[str]:
    """Which ways the copy takes, in words, for ``-v``."""
    if request.copy_offload:
        paths = [
            "copy offload: data stored plainly in local files is copied inside the kernel "
            "(copy_file_range), the rest goes through the copy engine"
        ]
    else:
        paths = ["copy engine"]
    workers = "one per core" if request.workers is None else str(request.workers)
    order = "in order" if request.in_order else "out of order (-W)"
    paths.append(f"workers: {workers}, writes {order}")
    paths.append("compressed clusters (-c)" if request.compress else "no compression")
    if request.copy_offload:
        paths.append("no zero detection (-C)")
    elif request.sparse_size == 0:
        paths.append("no zero detection (-S 0): every byte is written")
    else:
        paths.append(f"zero detection: zero runs of {request.sparse_size} bytes or more are holes")
    paths.append(
        "target reads as zeroes: zero ranges are skipped"
        if zero_init
        else "target may hold data: zero ranges are written"
    )
    if top_only:
        paths.append("only data above the backing file is copied")
    return paths


@contextlib.contextmanager
def _removed_on_failure(path: str) -> Iterator[None]:
    existed = os.path.lexists(path)
    try:
        yield
    except BaseException:
        # A half-written new image is worse than none. A file or device that
        # was there before is the user's: it stays (as qemu-img leaves it).
        if not existed:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise


def convert(
    source: ImageSpec | Sequence[ImageSpec],
    target: ImageSpec,
    *,
    format: str | None = None,
    out_format: str | None = None,
    options: Mapping[str, OptionValue] | str | None = None,
    compress: bool = False,
    backing_file: str | None = None,
    backing_fmt: str | None = None,
    existing: bool = False,
    target_is_zero: bool = False,
    sparse_size: int | None = None,
    workers: int | None = None,
    in_order: bool = True,
    copy_offload: bool = False,
    cache: str = "unsafe",
    source_cache: str = "writeback",
    progress: Callable[[int, int], None] | None = None,
    image_opts: bool = False,
    target_image_opts: bool = False,
    events: EventCallback | None = None,
    force_share: bool = False,
    fmt: str | None = None,
    out_fmt: str | None = None,
    snapshot: str | SnapshotRef | None = None,
    bitmaps: bool = False,
    skip_broken_bitmaps: bool = False,
) -> None:
    """Copies the guest contents of ``source`` (or several sources, one after
    the other) into ``target``, like ``qemu-img convert``.

    Sources are file names or node-tree specs (``json:{...}``, mappings, or
    ``--image-opts`` strings with ``image_opts=True``); an ``existing`` target
    may be one too. ``progress(done, total)`` is called with byte counts as the
    copy advances; ``events`` with every event the sources and the target record.
    ``force_share`` (``-U``) reads sources that another process has open for writing.
    ``cache`` and ``source_cache`` are qemu-img's ``-t`` and ``-T`` (see :func:`qimg.open`).
    ``format`` is the sources' format (``-f``; probed when None) and ``out_format`` the
    target's (``-O``; raw unless given); ``fmt`` and ``out_fmt`` are their deprecated old
    names. ``progress`` and ``events`` are called on the calling thread.
    ``snapshot`` copies an internal snapshot of the source instead (``-l``: an ID or
    name, or a :class:`~qimg.snapshot_ref.SnapshotRef`); ``bitmaps`` copies the
    persistent bitmaps into a qcow2 target (``--bitmaps``), ``skip_broken_bitmaps``
    leaving out inconsistent ones.
    """
    sources: list[ImageSpec]
    from qimg.spec import NodeSpec

    if isinstance(source, str | os.PathLike | Mapping | NodeSpec):
        sources = [source]
    else:
        sources = list(source)
    request = ConvertRequest(
        sources=[os.fspath(s) if isinstance(s, os.PathLike) else s for s in sources],
        target=os.fspath(target) if isinstance(target, os.PathLike) else target,
        fmt=renamed(format, fmt, new="format", old="fmt"),
        out_fmt=renamed(out_format, out_fmt, new="out_format", old="out_fmt") or "raw",
        options=option_items(options),
        compress=compress,
        backing_file=backing_file,
        backing_fmt=backing_fmt,
        existing=existing,
        target_is_zero=target_is_zero,
        sparse_size=sparse_size,
        workers=workers,
        in_order=in_order,
        copy_offload=copy_offload,
        cache=cache,
        source_cache=source_cache,
        image_opts=image_opts,
        target_image_opts=target_image_opts,
        events=events,
        force_share=force_share,
        snapshot=SnapshotRef(id_or_name=snapshot) if isinstance(snapshot, str) else snapshot,
        bitmaps=bitmaps,
        skip_broken_bitmaps=skip_broken_bitmaps,
    )
    run(request, progress)
