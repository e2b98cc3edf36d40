"""Creation streams its metadata: memory stays bounded whatever the image size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

LIMIT = 64 << 20

# Runs `create` in a grandchild and prints that grandchild's peak RSS in bytes,
# so nothing else this test session ran is counted.
MEASURE = """
import resource, subprocess, sys
code = "import qimg, sys; qimg.create(sys.argv[1], 1 << 40, format='qcow2', " \\
       "options={'preallocation': 'metadata'})"
subprocess.run([sys.executable, "-c", code, sys.argv[1]], check=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def test_metadata_prealloc_of_1_tib_stays_under_64_mib_of_memory(tmp_path: Path) -> None:
    # 1 TiB with 64k clusters carries 168 MB of metadata: building it in
    # memory would blow the limit, streaming it does not.
    image = tmp_path / "big.qcow2"
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(image)], check=True, capture_output=True, text=True
    )
    peak = int(out.stdout.strip())
    assert image.stat().st_size == 1_099_679_662_080
    assert peak < LIMIT, f"peak RSS {peak >> 20} MiB"
