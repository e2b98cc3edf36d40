"""``check``: a full consistency check of a qcow2 image, and ``check -r`` repairs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from qimg import _core
from qimg.errors import QimgError, UsageError
from qimg.image import Image, open_image

# typing.TYPE_CHECKING without importing typing.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from qimg.spec import ImageSpec

__all__ = [
    "REPAIR_MODES",
    "CheckReport",
    "RepairMode",
    "RepairResult",
    "check",
    "check_image",
    "parse_repair_mode",
    "repair_image",
    "repair_summary",
]

RepairMode = Literal["leaks", "all"]
#: ``-r leaks``: leaked clusters (refcounts above their references), and COPIED flags when
#: nothing else is wrong. ``-r all``: also refcounts that are too low, COPIED flags, and broken
#: refcount structures (rebuilt).
REPAIR_MODES: tuple[RepairMode, ...] = _core.REPAIR_MODES


@dataclass(frozen=True)
class CheckReport:
    """What ``qemu-img check`` reports, as values."""

    filename: str
    format: str
    corruptions: int
    """References the refcounts do not account for, and other damage."""
    leaks: int
    """Clusters counted as used that nothing references (wasted space only)."""
    check_errors: int
    """Problems that kept the check from completing."""
    image_end_offset: int
    total_clusters: int
    allocated_clusters: int
    fragmented_clusters: int
    compressed_clusters: int
    messages: list[str] = field(default_factory=list)
    """One line per finding (``Leaked cluster 4 refcount=1 reference=0`` ...)."""
    leaks_fixed: int = 0
    """With repair: leaked clusters the repair freed."""
    corruptions_fixed: int = 0
    """With repair: corruptions the repair fixed."""
    repair_messages: list[str] = field(default_factory=list)
    """With repair, when anything was repaired: the lines of the repair
    (``Repairing cluster 4 refcount=1 reference=0`` ...); ``messages`` are then
    those of the check of the repaired image."""

    @property
    def exit_status(self) -> int:
        """qemu-img's: 1 check incomplete, 2 corruptions, 3 leaks only, 0 clean."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        return 3 if self.leaks else 0

    def as_json(self) -> dict[str, str | int]:
        """The ImageCheck object; optional members only when non-zero, as qemu-img prints."""
        out: dict[str, str | int] = {
            "filename": self.filename,
            "format": self.format,
            "check-errors": self.check_errors,
        }
        optional = (
            ("image-end-offset", self.image_end_offset),
            ("corruptions", self.corruptions),
            ("leaks", self.leaks),
            ("corruptions-fixed", self.corruptions_fixed),
            ("leaks-fixed", self.leaks_fixed),
            ("total-clusters", self.total_clusters),
            ("allocated-clusters", self.allocated_clusters),
            ("fragmented-clusters", self.fragmented_clusters),
            ("compressed-clusters", self.compressed_clusters),
        )
        out.update({key: value for key, value in optional if value})
        return out

    def human(self) -> str:
        lines: list[str] = []
        if not (self.corruptions or self.leaks or self.check_errors):
            lines.append("No errors were found on the image.")
        if self.corruptions:
            lines += [
                "",
                f"{self.corruptions} errors were found on the image.",
                "Data may be corrupted, or further writes to the image may corrupt it.",
            ]
        if self.leaks:
            lines += [
                "",
                f"{self.leaks} leaked clusters were found on the image.",
                "This means waste of disk space, but no harm to data.",
            ]
        if self.check_errors:
            lines += ["", f"{self.check_errors} internal errors have occurred during the check."]
        if self.total_clusters and self.allocated_clusters:
            allocated = self.allocated_clusters
            lines.append(
                f"{allocated}/{self.total_clusters} = "
                f"{allocated * 100.0 / self.total_clusters:0.2f}% allocated, "
                f"{self.fragmented_clusters * 100.0 / allocated:0.2f}% fragmented, "
                f"{self.compressed_clusters * 100.0 / allocated:0.2f}% compressed clusters"
            )
        if self.image_end_offset:
            lines.append(f"Image end offset: {self.image_end_offset}")
        return "\n".join(lines)


def repair_summary(leaks_fixed: int, corruptions_fixed: int) -> str:
    """What qemu-img prints on stdout after repairing, before checking again."""
    return "\n".join(
        [
            "The following inconsistencies were found and repaired:",
            "",
            f"    {leaks_fixed} leaked clusters",
            f"    {corruptions_fixed} corruptions",
            "",
            "Double checking the fixed image now...",
        ]
    )


@dataclass(frozen=True)
class RepairResult:
    """What ``check -r`` did, in the order qemu-img prints it: the repair's lines, then (when
    anything was repaired) the repaired counts and the check of the repaired image."""

    messages: list[str]
    """The lines printed while repairing."""
    leaks_fixed: int
    corruptions_fixed: int
    failure: QimgError | None
    """The repair could not complete (``Check failed: ...``); nothing follows it."""
    recheck_failure: QimgError | None
    """The check of the repaired image could not complete."""
    report: CheckReport | None
    """The final report (of the repaired image when anything was repaired, else of the repair
    pass); None when a failure ended the run."""

    @property
    def repaired(self) -> bool:
        return bool(self.leaks_fixed or self.corruptions_fixed)


def parse_repair_mode(value: str) -> RepairMode:
    """``-r``'s argument: ``leaks`` or ``all`` (checked by the core)."""
    return _core.repair_mode(value)


def _report(filename: str, fmt: str, counts: _core.CheckCounts, **extra: Any) -> CheckReport:
    return CheckReport(
        filename=filename,
        format=fmt,
        corruptions=counts.corruptions,
        leaks=counts.leaks,
        check_errors=counts.check_errors,
        image_end_offset=counts.image_end_offset,
        total_clusters=counts.total_clusters,
        allocated_clusters=counts.allocated_clusters,
        fragmented_clusters=counts.fragmented_clusters,
        compressed_clusters=counts.compressed_clusters,
        messages=counts.messages,
        **extra,
    )


def _nothing_to_check(image: Image) -> UsageError:
    # qemu-img's words; the format is named for API callers who opened several.
    return UsageError(f"This image format does not support checks ({image.format})")


def check_image(image: Image) -> CheckReport:
    """Checks an open image. Raw images have nothing to check: ``UsageError``."""
    result = _core.check_image(image._img)
    if result is None:
        raise _nothing_to_check(image)
    return _report(image.filename, image.format, result)


def repair_image(image: Image, mode: str) -> RepairResult:
    """``check -r MODE`` of an open image: repairs its file in place, then checks it again.

    Only qcow2 images can be repaired (``UsageError`` otherwise). The repair opens the file
    for writing itself; ``image`` is only read from for its name and format, and its cached
    tables are stale afterwards. Failures of the check itself are returned in the result,
    after the lines printed until then."""
    checked_mode = parse_repair_mode(mode)
    if image.format != "qcow2":
        raise _nothing_to_check(image)
    filename, fmt = image.filename, image.format
    # (Not details(): a snapshot table qemu-img refuses to open is one check -r repairs.)
    storage = image._img.storage
    protocol, path = (storage.format, storage.filename) if storage else ("none", filename)
    if protocol != "file":
        raise UsageError(
            f"Cannot repair '{filename}': its bytes are not in a local file "
            f"({protocol}); run 'check -r' where the image is stored"
        )
    # The repair opens the file for writing itself and takes a writer's locks
    # there; this open (locked for the repair, so nobody got in) lets go first.
    image._img.release_locks()
    out = _core.repair_image(path, checked_mode)
    first, messages = out.repair, out.repair.messages
    failure, recheck, recheck_failure = out.failure, out.recheck, out.recheck_failure
    fixed = {"leaks_fixed": out.leaks_fixed, "corruptions_fixed": out.corruptions_fixed}
    report: CheckReport | None = None
    if failure is None and recheck is not None:
        report = _report(filename, fmt, recheck, repair_messages=messages, **fixed)
    elif failure is None and recheck_failure is None:
        report = _report(filename, fmt, first, **fixed)
    return RepairResult(
        messages=messages,
        failure=failure,
        recheck_failure=recheck_failure,
        report=report,
        **fixed,
    )


def check(
    path: ImageSpec,
    format: str | None = None,
    *,
    repair: RepairMode | None = None,
    image_opts: bool = False,
) -> CheckReport:
    """Python API for ``qemu-img check``: opens ``path`` (a file name or a node-tree
    spec whose top node is qcow2, see :func:`qimg.open`) read-only and checks it.

    With ``repair="leaks"`` or ``"all"`` (``qemu-img check -r``) the image is repaired in place
    first; the report is then that of the repaired image, with ``leaks_fixed`` and
    ``corruptions_fixed`` saying what was repaired. A check that cannot complete raises
    ``QimgError``."""
    if repair is None:
        with open_image(path, format, image_opts=image_opts) as image:
            return check_image(image)
    with open_image(path, format, image_opts=image_opts, purpose="repair") as image:
        result = repair_image(image, repair)
    problem = result.failure or result.recheck_failure
    if problem is not None:
        raise problem
    if result.report is None:  # pragma: no cover - a report exists whenever nothing failed
        raise QimgError("the repair produced no report")
    return result.report
