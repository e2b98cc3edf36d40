#!/usr/bin/env bash
# Rebuilds the seed images of tests/mutation.rs with QEMU's qemu-img and qemu-io.
#
# Each seed is a small, valid qcow2 image stored gzipped (`NAME.qcow2.gz`): the images are
# mostly zero-filled clusters, so gzip keeps even the 64k-cluster one at a few KiB. The test
# inflates them in memory. Run from anywhere:
#
#   bash rust/qimg-core/tests/data/make-seeds.sh
#
# and commit the changed .gz files. The images depend on qemu-img's allocator, so a different
# QEMU version may produce different (equally valid) bytes.
set -euo pipefail

out=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

qio() { qemu-io -f qcow2 "$@" >/dev/null; }

# A raw source with compressible, incompressible and zero clusters, for the compressed seeds.
make_source()
{
    python3 - <<'PY'
import random
rng = random.Random(80)
with open("src.raw", "wb") as f:
    for i in range(4):
        # compressible: a repeating text pattern
        f.write((b"cluster %d of a compressible qcow2 seed\n" % i) * 400 + bytes(16384 - 400 * 39))
        # incompressible: stored as a plain data cluster by convert -c
        f.write(rng.randbytes(8192))
        # zero: left unallocated
        f.write(bytes(8192))
PY
}

# v3, 64k clusters: data, zero (plain and allocated), discarded clusters, data at the end.
qemu-img create -q -f qcow2 -o cluster_size=64k v3_64k.qcow2 4M
qio -c 'write -P 0x11 0 64k' -c 'write -P 0x22 128k 192k' -c 'write -z 192k 64k' \
    -c 'discard 256k 64k' -c 'write -z -u 1M 128k' -c 'write -P 0x33 4032k 64k' \
    -c 'write -P 0x44 2M 1k' v3_64k.qcow2

# compressed clusters (4k), zlib and zstd.
make_source
for t in zlib zstd; do
    qemu-img convert -q -c -O qcow2 -o cluster_size=4k,compression_type=$t src.raw "${t}_4k.qcow2"
done

# extended L2 (16k clusters, 512-byte subclusters): partial allocations and zeroed subclusters.
qemu-img create -q -f qcow2 -o cluster_size=16k,extended_l2=on extl2_16k.qcow2 1M
qio -c 'write -P 0x55 0 512' -c 'write -P 0x66 2k 3k' -c 'write -z 16k 4k' \
    -c 'write -P 0x77 32k 16k' -c 'write -z 36k 1k' -c 'discard 40k 2k' \
    -c 'write -P 0x88 1008k 8k' extl2_16k.qcow2

# v2 (compat 0.10), 512-byte clusters.
qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=512 v2_512.qcow2 256k
qio -c 'write -P 0x99 0 4k' -c 'write -P 0xaa 100k 1536' -c 'write -P 0xbb 255k 1k' v2_512.qcow2

# A backing chain: base.qcow2 under backed.qcow2 (backing name and backing format extension).
qemu-img create -q -f qcow2 -o cluster_size=4k base.qcow2 512k
qio -c 'write -P 0xcc 0 64k' -c 'write -P 0xdd 256k 8k' base.qcow2
qemu-img create -q -f qcow2 -o cluster_size=4k -b base.qcow2 -F qcow2 backed.qcow2 1M
qio -c 'write -P 0xee 4k 8k' -c 'write -z 32k 4k' -c 'write -P 0xef 600k 4k' backed.qcow2

# An internal snapshot (shared clusters, refcount 2) and writes after it; 16-bit refcounts.
qemu-img create -q -f qcow2 -o cluster_size=4k snapshot.qcow2 512k
qio -c 'write -P 0x12 0 32k' -c 'write -P 0x13 128k 4k' snapshot.qcow2
qemu-img snapshot -c snap1 snapshot.qcow2
qio -c 'write -P 0x14 8k 8k' -c 'write -z 128k 4k' snapshot.qcow2

# Metadata preallocation with 1-bit refcounts and lazy refcounts.
qemu-img create -q -f qcow2 -o cluster_size=4k,preallocation=metadata,refcount_bits=1,lazy_refcounts=on \
    prealloc.qcow2 256k
qio -c 'write -P 0x21 12k 4k' prealloc.qcow2

# Persistent bitmaps: one enabled, one disabled with another granularity, and writes after them.
qemu-img create -q -f qcow2 -o cluster_size=4k bitmaps.qcow2 512k
qemu-img bitmap --add bitmaps.qcow2 on
qemu-img bitmap --add -g 8k --disable bitmaps.qcow2 off
qio -c 'write -P 0x31 0 16k' -c 'write -P 0x32 300k 4k' bitmaps.qcow2

for f in *.qcow2; do
    qemu-img check -q "$f"
    gzip -9nc "$f" >"$out/$f.gz"
done
ls -l "$out"
