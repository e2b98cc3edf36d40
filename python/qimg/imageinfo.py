"""What ``qemu-img info`` shows of an image: the ImageInfo object built from the facts
the core reports (``details()``), and its text form.

Kept free of heavy imports (no ``typing``, ``dataclasses`` or :mod:`qimg.spec` at run
time) because ``qimg info FILE`` must start quickly: the command line reads a plain file
with the core and this module alone. Node trees (quorum, blkdebug, NBD) go through
:mod:`qimg.image`, which builds their ImageInfo the same way.
"""

from __future__ import annotations

import time

from qimg.qjson import human_lines
from qimg.sizes import size_to_str

# typing.TYPE_CHECKING without importing typing (mypy and ruff know the name).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from qimg import _core
    from qimg.qjson import JsonValue

__all__ = ["core_info", "file_child", "info_human", "info_of", "nbd_info", "snapshot_lines"]


def nbd_info(filename: str, size: int) -> dict[str, JsonValue]:
    """An NBD export's ImageInfo: qemu-img knows no disk size nor dirty flag of one."""
    return {"filename": filename, "format": "nbd", "virtual-size": size, "children": []}


def file_child(d: _core.ImageDetails) -> dict[str, JsonValue]:
    """The ``file`` child of a format node (its protocol node), from its ``details()``."""
    file = d.file
    assert file is not None, "a format node has a file below it"
    if file.format == "nbd":
        return {"name": "file", "info": nbd_info(file.filename, file.length)}
    # QAPI's member order; qjson reorders members the way qemu-img prints them.
    protocol: dict[str, JsonValue] = {
        "filename": file.filename,
        "format": "file",
        "dirty-flag": False,
        "actual-size": file.actual_size,
        "virtual-size": file.length,
        "format-specific": {"type": "file", "data": {}},
        "children": [],
    }
    return {"name": "file", "info": protocol}


def _snapshot(s: _core.SnapshotDetails) -> dict[str, JsonValue]:
    clock = s.vm_clock_nsec
    out: dict[str, JsonValue] = {
        "id": s.id,
        "name": s.name,
        "vm-state-size": s.vm_state_size,
        "date-sec": s.date_sec,
        "date-nsec": s.date_nsec,
        "vm-clock-sec": clock // 1_000_000_000,
        "vm-clock-nsec": clock % 1_000_000_000,
    }
    if s.icount is not None:
        # As qemu-img: left out when the entry does not record it.
        out["icount"] = s.icount
    return out


def info_of(d: _core.ImageDetails) -> dict[str, JsonValue]:
    """The ImageInfo object of one node, in QAPI member order, from its ``details()``."""
    info: dict[str, JsonValue] = {
        "filename": d.filename,
        "format": d.format,
        "dirty-flag": d.dirty,
    }
    if d.file is not None and d.file.actual_size is not None:
        info["actual-size"] = d.file.actual_size
    info["virtual-size"] = d.virtual_size
    if d.cluster_size is not None:
        info["cluster-size"] = d.cluster_size
    if d.backing is not None:
        info["backing-filename"] = d.backing.filename
        if d.backing.full_filename is not None:
            info["full-backing-filename"] = d.backing.full_filename
        if d.backing.format is not None:
            info["backing-filename-format"] = d.backing.format
    if d.snapshots:
        info["snapshots"] = [_snapshot(s) for s in d.snapshots]
    if d.format_specific is not None:
        info["format-specific"] = {"type": d.format, "data": d.format_specific}
    if d.file is not None:
        info["children"] = [file_child(d)]
    return info


def core_info(core: _core.Image) -> dict[str, JsonValue]:
    """The ImageInfo of an image the core opened from a plain file name."""
    return info_of(core.details())


def _clock(seconds: int, nanoseconds: int) -> str:
    millis = seconds * 1000 + nanoseconds // 1_000_000
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:04d}:{minutes:02d}:{secs:02d}.{millis:03d}"


def snapshot_lines(snapshots: list[Any]) -> list[str]:
    lines = [
        "Snapshot list:",
        f"{'ID':<7} {'TAG':<16} {'VM_SIZE':>8} {'DATE':>19} {'VM_CLOCK':>15} {'ICOUNT':>10}",
    ]
    for s in snapshots:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["date-sec"]))
        clock = _clock(s["vm-clock-sec"], s["vm-clock-nsec"])
        icount = s.get("icount", "--")
        lines.append(
            f"{s['id']:<7} {s['name']:<16} {size_to_str(s['vm-state-size']):>8} "
            f"{date:>19} {clock:>15} {icount:>10}"
        )
    return lines


def _disk_size(info: dict[str, Any]) -> str:
    actual = info.get("actual-size")
    return "unavailable" if actual is None else size_to_str(actual)


def _lines(info: dict[str, Any], pad: str, path: str) -> list[str]:
    size = info["virtual-size"]
    own = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {size_to_str(size)} ({size} bytes)",
        f"disk size: {_disk_size(info)}",
    ]
    if "cluster-size" in info:
        own.append(f"cluster_size: {info['cluster-size']}")
    if "backing-filename" in info:
        name, full = info["backing-filename"], info.get("full-backing-filename")
        if full is None:
            own.append(f"backing file: {name} (cannot determine actual path)")
        elif full == name:
            own.append(f"backing file: {name}")
        else:
            own.append(f"backing file: {name} (actual path: {full})")
        if "backing-filename-format" in info:
            own.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("dirty-flag"):
        own.append("cleanly shut down: no")
    if info.get("snapshots"):
        own.extend(snapshot_lines(info["snapshots"]))
    specific = info.get("format-specific", {}).get("data")
    if specific:
        own.append("Format specific information:")
        own.extend(human_lines(specific, 4))
    lines = [pad + line for line in own]
    for child in info.get("children", []):
        c = child["info"]
        child_path = f"{path}/{child['name']}"
        lines.append(f"{pad}Child node '{child_path}':")
        if c["format"] in ("file", "nbd"):
            length = c["virtual-size"]
            lines.append(f"{pad}    filename: {c['filename']}")
            lines.append(f"{pad}    protocol type: {c['format']}")
            lines.append(f"{pad}    file length: {size_to_str(length)} ({length} bytes)")
            lines.append(f"{pad}    disk size: {_disk_size(c)}")
        else:
            lines.extend(_lines(c, pad + "    ", child_path))
    return lines


def info_human(info: dict[str, Any]) -> str:
    """The text ``qemu-img info`` prints for one ImageInfo (and the nodes under it)."""
    return "\n".join(_lines(info, "", ""))
