"""``check``: a full consistency check of a qcow2 image, read only."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from qimg import _core
from qimg.errors import UsageError
from qimg.image import Image, open_image

__all__ = ["CheckReport", "check", "check_image"]


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


def check_image(image: Image) -> CheckReport:
    """Checks an open image. Raw images have nothing to check: ``UsageError``."""
    result = _core.check_image(image._img)
    if result is None:
        raise UsageError(f"{image.format} images have no metadata to check").about(image.filename)
    return CheckReport(filename=image.filename, format=image.format, **result)


def check(path: str | os.PathLike[str], format: str | None = None) -> CheckReport:
    """Python API for ``qemu-img check`` (no repair): opens ``path`` read-only."""
    with open_image(path, format) as image:
        return check_image(image)
