"""Type stubs for the native module built from rust/qimg-py."""

from os import PathLike

__version__: str

class Qcow2Spec:
    def __init__(
        self,
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
    ) -> None: ...
    @property
    def virtual_size(self) -> int: ...
    @property
    def cluster_size(self) -> int: ...
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
def summarize(path: str | PathLike[str], format: str | None = None) -> tuple[str, int]: ...
def raw_data_bytes(path: str | PathLike[str], cluster_size: int) -> tuple[int, int]: ...
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
