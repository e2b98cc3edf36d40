"""Type stubs for the native module built from rust/qimg-py."""

from collections.abc import Callable
from os import PathLike
from typing import Literal, TypeAlias, final

from qimg.errors import QimgError
from qimg.qjson import JsonValue

__all__ = [
    "CACHE_MODES",
    "REPAIR_MODES",
    "BackingDetails",
    "CheckCounts",
    "CompareOutcome",
    "ConvertOptions",
    "CreateRequest",
    "Event",
    "FileDetails",
    "FormatDriverInfo",
    "FormatOption",
    "Image",
    "ImageDetails",
    "MapExtent",
    "Measurement",
    "QuorumFailure",
    "QuorumReportBad",
    "RangeError",
    "RepairOutcome",
    "ScrubChild",
    "ScrubResult",
    "SnapshotDetails",
    "Storage",
    "__version__",
    "apply_snapshot",
    "cache_mode",
    "canonical_spec",
    "change_bitmap",
    "check_image",
    "commit_image",
    "compare_images",
    "convert",
    "create_snapshot",
    "delete_snapshot",
    "format_drivers",
    "local_path",
    "measure_image",
    "open_image",
    "open_snapshot",
    "open_spec",
    "qemu_only_formats",
    "rebase_copy",
    "repair_image",
    "repair_mode",
    "resolve_backing",
    "scrub",
]

__version__: str

_OptionValue: TypeAlias = bool | int | str

@final
class CreateRequest:
    """A creation request checked by its format's driver at construction."""

    def __new__(cls, format: str, options: list[tuple[str, _OptionValue]]) -> CreateRequest: ...
    @property
    def format(self) -> str: ...
    @property
    def virtual_size(self) -> int: ...
    @property
    def file_length(self) -> int: ...
    @property
    def metadata_length(self) -> int: ...
    def create(
        self,
        path: str | PathLike[str],
        *,
        nocow: bool = False,
        extent_size_hint: int | None = None,
    ) -> None: ...

def measure_image(
    format: str,
    options: list[tuple[str, _OptionValue]],
    virtual_size: int,
    *,
    source: Image | None = None,
) -> Measurement: ...
def resolve_backing(overlay: str, backing: str) -> str: ...

@final
class Measurement:
    """qemu-img measure's numbers (``bitmaps``: None when the target cannot carry any)."""

    @property
    def required(self) -> int: ...
    @property
    def fully_allocated(self) -> int: ...
    @property
    def bitmaps(self) -> int | None: ...

@final
class FormatOption:
    """One creation option of a format."""

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def help(self) -> str: ...
    @property
    def default(self) -> str | None: ...

@final
class FormatDriverInfo:
    """A format driver of the core's registry: its name and creation options."""

    @property
    def name(self) -> str: ...
    @property
    def format_options(self) -> list[FormatOption]: ...
    @property
    def protocol_options(self) -> list[FormatOption]: ...
    @property
    def echo_order(self) -> list[str]: ...
    @property
    def prealloc_modes(self) -> list[str]: ...
    @property
    def not_yet(self) -> list[str]: ...
    @property
    def amend_options(self) -> list[str]: ...
    @property
    def amend_not_yet(self) -> list[str]: ...
    def help_text(self, with_protocol: bool) -> str: ...
    def amend_help_text(self) -> str | None: ...

def format_drivers() -> list[FormatDriverInfo]: ...
def qemu_only_formats() -> list[tuple[str, bool]]: ...

@final
class CheckCounts:
    """The counts and lines of one check."""

    @property
    def corruptions(self) -> int: ...
    @property
    def leaks(self) -> int: ...
    @property
    def check_errors(self) -> int: ...
    @property
    def image_end_offset(self) -> int: ...
    @property
    def total_clusters(self) -> int: ...
    @property
    def allocated_clusters(self) -> int: ...
    @property
    def fragmented_clusters(self) -> int: ...
    @property
    def compressed_clusters(self) -> int: ...
    @property
    def messages(self) -> list[str]: ...

@final
class RepairOutcome:
    """What ``check -r`` did."""

    @property
    def repair(self) -> CheckCounts: ...
    @property
    def leaks_fixed(self) -> int: ...
    @property
    def corruptions_fixed(self) -> int: ...
    @property
    def failure(self) -> QimgError | None: ...
    @property
    def recheck(self) -> CheckCounts | None: ...
    @property
    def recheck_failure(self) -> QimgError | None: ...

@final
class MapExtent:
    """A run of guest bytes with one allocation status, as ``map`` prints it."""

    @property
    def start(self) -> int: ...
    @property
    def length(self) -> int: ...
    @property
    def depth(self) -> int: ...
    @property
    def present(self) -> bool: ...
    @property
    def zero(self) -> bool: ...
    @property
    def data(self) -> bool: ...
    @property
    def compressed(self) -> bool: ...
    @property
    def offset(self) -> int | None: ...
    @property
    def filename(self) -> str | None: ...

@final
class Storage:
    """The protocol node below an image: its driver and name."""

    @property
    def format(self) -> str: ...
    @property
    def filename(self) -> str: ...

@final
class QuorumReportBad:
    """A child failed a request (``error`` set) or lost the vote (``error`` None)."""

    @property
    def op(self) -> Literal["read", "write", "flush"]: ...
    @property
    def error(self) -> str | None: ...
    @property
    def node_name(self) -> str: ...

@final
class QuorumFailure:
    """No version of a range reached the vote threshold."""

    @property
    def reference(self) -> str: ...

@final
class Event:
    """One recorded event; the range in 512-byte sectors, as QMP reports it."""

    @property
    def kind(self) -> Literal["QUORUM_REPORT_BAD", "QUORUM_FAILURE"]: ...
    @property
    def seconds(self) -> int: ...
    @property
    def microseconds(self) -> int: ...
    @property
    def sector_num(self) -> int: ...
    @property
    def sectors_count(self) -> int: ...
    @property
    def detail(self) -> QuorumReportBad | QuorumFailure: ...

@final
class CompareOutcome:
    """How a compare ended; ``offset`` is where it found the difference."""

    @property
    def kind(self) -> Literal["identical", "mismatch", "size-mismatch", "status-mismatch"]: ...
    @property
    def offset(self) -> int | None: ...
    @property
    def size_mismatch(self) -> bool: ...

@final
class RangeError:
    """A range of a quorum child that could not be read or rewritten."""

    @property
    def offset(self) -> int: ...
    @property
    def length(self) -> int: ...
    @property
    def error(self) -> str: ...

@final
class ScrubChild:
    """What a scrub found in one child; ranges are ``(offset, length)``."""

    @property
    def node_name(self) -> str: ...
    @property
    def bad_ranges(self) -> list[tuple[int, int]]: ...
    @property
    def read_errors(self) -> list[RangeError]: ...
    @property
    def repaired_bytes(self) -> int: ...
    @property
    def repair_errors(self) -> list[RangeError]: ...

@final
class ScrubResult:
    """What a scrub found; ``unvoted_ranges`` had no winning version."""

    @property
    def size(self) -> int: ...
    @property
    def bytes_compared(self) -> int: ...
    @property
    def bytes_skipped_zero(self) -> int: ...
    @property
    def children(self) -> list[ScrubChild]: ...
    @property
    def unvoted_ranges(self) -> list[tuple[int, int]]: ...

@final
class FileDetails:
    """The protocol node below a format node (``actual_size`` None for an export)."""

    @property
    def filename(self) -> str: ...
    @property
    def format(self) -> str: ...
    @property
    def length(self) -> int: ...
    @property
    def actual_size(self) -> int | None: ...

@final
class BackingDetails:
    """The backing file a header names, where it points, and its recorded format."""

    @property
    def filename(self) -> str: ...
    @property
    def full_filename(self) -> str | None: ...
    @property
    def format(self) -> str | None: ...

@final
class SnapshotDetails:
    """An internal snapshot of a qcow2 image."""

    @property
    def id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def vm_state_size(self) -> int: ...
    @property
    def date_sec(self) -> int: ...
    @property
    def date_nsec(self) -> int: ...
    @property
    def vm_clock_nsec(self) -> int: ...
    @property
    def icount(self) -> int | None: ...

@final
class ImageDetails:
    """The facts ``info`` shows of one image."""

    @property
    def filename(self) -> str: ...
    @property
    def format(self) -> str: ...
    @property
    def virtual_size(self) -> int: ...
    @property
    def file(self) -> FileDetails | None: ...
    @property
    def cluster_size(self) -> int | None: ...
    @property
    def dirty(self) -> bool: ...
    @property
    def backing(self) -> BackingDetails | None: ...
    @property
    def snapshots(self) -> list[SnapshotDetails]: ...
    @property
    def format_specific(self) -> dict[str, JsonValue] | None: ...

@final
class Image:
    @property
    def size(self) -> int: ...
    @property
    def format(self) -> str: ...
    @property
    def filename(self) -> str: ...
    @property
    def storage(self) -> Storage | None: ...
    def read(self, offset: int, length: int) -> bytes: ...
    def readinto(self, offset: int, buffer: bytearray) -> int: ...
    def map(self, start: int = 0, length: int | None = None) -> list[MapExtent]: ...
    def backing(self) -> Image | None: ...
    def take_events(self) -> list[Event]: ...
    def data_bytes(self, cluster_size: int) -> int: ...
    def details(self) -> ImageDetails: ...
    @property
    def writable(self) -> bool: ...
    def write(self, offset: int, data: bytes | bytearray) -> None: ...
    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None: ...
    def discard(self, offset: int, length: int) -> None: ...
    def write_compressed(self, offset: int, data: bytes | bytearray) -> None: ...
    def flush(self) -> None: ...
    def resize(self, size: int, *, preallocation: str = "off") -> None: ...
    def amend(
        self,
        *,
        compat: str | None = None,
        lazy_refcounts: bool | None = None,
        refcount_bits: int | None = None,
        size: int | None = None,
    ) -> Image: ...
    def set_backing_name(self, backing_file: str | None, backing_fmt: str | None) -> None: ...
    def close(self) -> None: ...
    def release_locks(self) -> None: ...

def local_path(name: str) -> str: ...
def open_image(
    path: str,
    format: str | None = None,
    *,
    no_backing: bool = False,
    writable: bool = False,
    cache: str = "writeback",
    force_share: bool = False,
    purpose: str = "read",
    writable_backing: int | None = None,
) -> Image: ...
def open_spec(
    spec_json: str,
    *,
    writable: bool = False,
    cache: str = "writeback",
    force_share: bool = False,
    purpose: str = "read",
) -> Image: ...
def canonical_spec(json: str) -> str: ...
def scrub(
    image: Image,
    *,
    repair: bool = False,
    workers: int | None = None,
    progress: Callable[[int, int], object] | None = None,
) -> ScrubResult: ...
def compare_images(
    a: Image,
    b: Image,
    *,
    strict: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> CompareOutcome: ...
def convert(
    sources: list[Image],
    target: Image,
    options: ConvertOptions,
    *,
    zero_init: bool = True,
    top_only: bool = False,
    progress: Callable[[int, int], object] | None = None,
) -> None: ...
def check_image(image: Image) -> CheckCounts | None: ...
def commit_image(
    image: Image,
    *,
    base_depth: int = 1,
    empty_top: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> None: ...
def change_bitmap(
    image: Image,
    name: str,
    ops: list[tuple[str, int | None, str | None, Image | None]],
) -> Image: ...
def create_snapshot(image: Image, name: str, date_sec: int, date_nsec: int) -> Image: ...
def apply_snapshot(image: Image, which: str) -> Image: ...
def delete_snapshot(image: Image, name: str) -> Image: ...
def open_snapshot(
    image: Image,
    *,
    id_or_name: str | None = None,
    id: str | None = None,
    name: str | None = None,
) -> Image: ...
def rebase_copy(
    image: Image,
    new_backing: Image | None,
    *,
    compress: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> int: ...
def repair_image(path: str | PathLike[str], mode: str) -> RepairOutcome: ...

#: QEMU's cache mode names (``off`` is also taken, as ``none``).
CACHE_MODES: tuple[str, ...]
#: ``check -r``'s modes.
REPAIR_MODES: tuple[Literal["leaks", "all"], ...]

def cache_mode(name: str, *, source: bool = False) -> str: ...
def repair_mode(name: str) -> Literal["leaks", "all"]: ...

@final
class ConvertOptions:
    """``convert``'s copy options, checked as a whole when built."""

    def __new__(
        cls,
        *,
        sparse_size: int | None = None,
        compress: bool = False,
        workers: int | None = None,
        in_order: bool = True,
        copy_offload: bool = False,
        target_format: str | None = None,
        cache: str = "unsafe",
        source_cache: str = "writeback",
    ) -> ConvertOptions: ...
    @property
    def sparse_size(self) -> int: ...
    @property
    def compress(self) -> bool: ...
    @property
    def workers(self) -> int | None: ...
    @property
    def in_order(self) -> bool: ...
    @property
    def copy_offload(self) -> bool: ...
    @property
    def cache(self) -> str: ...
    @property
    def source_cache(self) -> str: ...
