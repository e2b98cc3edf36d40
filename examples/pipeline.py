"""An image pipeline with qimg's Python API: build a qcow2 image, check it, convert
it to raw, compare the two, and hash the guest contents.

Run it in an empty directory: ``python examples/pipeline.py``. It is type-checked
with ``mypy --strict`` and run by the test suite, so it stays correct.
"""

from __future__ import annotations

import hashlib
import sys

import qimg


def build(path: str) -> None:
    qimg.create(path, 64 << 20, format="qcow2", options={"cluster_size": "64k"})
    with qimg.open(path, writable=True) as image:
        image.write(0, b"boot sector".ljust(512, b"\0"))
        image.write(32 << 20, b"data" * 1024)


def digest(path: str) -> str:
    sha = hashlib.sha256()
    with qimg.open(path) as image, image.open_stream() as stream:
        while chunk := stream.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def main() -> int:
    build("disk.qcow2")
    report = qimg.check("disk.qcow2")
    if report.corruptions or report.leaks:
        print(f"disk.qcow2 is damaged: {report}", file=sys.stderr)
        return 1
    done: list[int] = []
    qimg.convert("disk.qcow2", "disk.raw", out_format="raw", progress=lambda d, t: done.append(d))
    result = qimg.compare("disk.qcow2", "disk.raw")
    if not result.identical:
        print(result.message(), file=sys.stderr)
        return 1
    info = qimg.info("disk.qcow2")
    specific = info.get("format-specific")
    compat = specific["data"].get("compat") if specific and specific["type"] == "qcow2" else None
    print(f"{info['filename']}: {info['format']} (compat {compat}), {info['virtual-size']} bytes")
    print(f"sha256 {digest('disk.qcow2')} == {digest('disk.raw')}")
    return 0 if digest("disk.qcow2") == digest("disk.raw") else 1


if __name__ == "__main__":
    sys.exit(main())
