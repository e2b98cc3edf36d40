"""Type stubs for the native module built from rust/qimg-py."""

from collections.abc import Callable
from os import PathLike
from typing import Any, TypeAlias, final

from qimg.errors import QimgError

__all__ = [
    "CheckCounts",
    "Image",
    "Qcow2Spec",
    "RepairOutcome",
    "__version__",
    "apply_snapshot",
    "canonical_spec",
    "change_bitmap",
    "check_image",
    "commit_image",
    "compare_images",
    "convert",
    "create_raw",
    "create_snapshot",
    "delete_snapshot",
    "local_path",
    "measure_qcow2",
    "measure_raw",
    "open_image",
    "open_snapshot",
    "open_spec",
    "rebase_copy",
    "repair_image",
    "resolve_backing",
    "scrub",
]

__version__: str

@final
class Qcow2Spec:
    def __new__(
        cls,
        *,
        size: int,
        cluster_size: int,
        compat: str,
        refcount_bits: int,
        lazy_refcounts: bool,
        extended_l2: bool,
        compression_type: str,
        preallocation: str,
        backing_file: str | None = None,
        backing_fmt: str | None = None,
    ) -> Qcow2Spec: ...
    @property
    def virtual_size(self) -> int: ...
    @property
    def cluster_size(self) -> int: ...
    @property
    def version(self) -> int: ...
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

def create_raw(
    path: str | PathLike[str],
    size: int,
    preallocation: str,
    *,
    nocow: bool = False,
    extent_size_hint: int | None = None,
) -> None: ...
def resolve_backing(overlay: str, backing: str) -> str: ...
def measure_qcow2(
    spec: Qcow2Spec,
    *,
    virtual_size: int,
    data: int,
    has_source: bool,
    preallocation: str,
    has_backing: bool,
) -> tuple[int, int, int | None]: ...
def measure_raw(virtual_size: int) -> tuple[int, int, int | None]: ...

_MapTuple: TypeAlias = tuple[int, int, int, bool, bool, bool, bool, int | None, str | None]

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
class Image:
    @property
    def size(self) -> int: ...
    @property
    def format(self) -> str: ...
    @property
    def filename(self) -> str: ...
    @property
    def storage(self) -> tuple[str, str] | None: ...
    def read(self, offset: int, length: int) -> bytes: ...
    def readinto(self, offset: int, buffer: bytearray) -> int: ...
    def map(self, start: int = 0, length: int | None = None) -> list[_MapTuple]: ...
    def backing(self) -> Image | None: ...
    def take_events(self) -> list[tuple[str, int, int, dict[str, Any]]]: ...
    def data_bytes(self, cluster_size: int) -> int: ...
    def details(self) -> dict[str, Any]: ...
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
) -> dict[str, Any]: ...
def compare_images(
    a: Image,
    b: Image,
    *,
    strict: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[str, int | None, bool]: ...
def convert(
    sources: list[Image],
    target: Image,
    *,
    sparse_size: int = 4096,
    compress: bool = False,
    zero_init: bool = True,
    top_only: bool = False,
    in_order: bool = True,
    workers: int | None = None,
    copy_offload: bool = False,
    progress: Callable[[int, int], None] | None = None,
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
