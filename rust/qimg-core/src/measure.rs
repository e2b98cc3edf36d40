//! `measure`: how large a new image would be, in qemu-img's terms.

use crate::block::{status_above, BlockDev};
use crate::error::Result;
use crate::prealloc::Prealloc;
use crate::qcow2::layout::{check_l1_fits, fully_allocated_size};
use crate::qcow2::{ClusterSize, RefcountOrder};

/// qemu-img measure's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    /// File size needed for the image with the source's data.
    pub required: u64,
    /// File size with every cluster allocated.
    pub fully_allocated: u64,
    /// Space for persistent bitmaps, where the source can carry them.
    pub bitmaps: Option<u64>,
}

/// The qcow2 parameters that change the numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Qcow2Target {
    pub cluster_size: ClusterSize,
    pub refcount_order: RefcountOrder,
    pub extended_l2: bool,
    pub prealloc: Prealloc,
    /// A backing file is named for the new image.
    pub has_backing: bool,
}

/// Bytes the persistent bitmaps `(granularity, name length)` of a
/// `virtual_size` image take in a qcow2 image with `cs` clusters: each
/// bitmap's data clusters and its table, and the directory that lists them
/// (qemu-img measure's "bitmaps size").
pub fn bitmaps_bytes(virtual_size: u64, bitmaps: &[(u64, usize)], cs: ClusterSize) -> u64 {
    let cluster = cs.bytes();
    let clusters = |n: u64| n.div_ceil(cluster);
    let mut total = 0u64;
    let mut directory = 0u64;
    for &(granularity, name_len) in bitmaps {
        let bits = virtual_size.div_ceil(granularity.max(1));
        let data_clusters = clusters(bits.div_ceil(8));
        // The data clusters, and the table of 8-byte entries that lists them.
        total += (data_clusters + clusters(data_clusters * 8)) * cluster;
        // A directory entry: 24 bytes, then the name, padded to 8 bytes.
        directory += (24 + name_len as u64).div_ceil(8) * 8;
    }
    if !bitmaps.is_empty() {
        total += clusters(directory) * cluster;
    }
    total
}

/// Bytes of an image's data as `measure` counts them: every range that
/// holds data (not zeroes) anywhere in the chain, extended to the end of its
/// target cluster, plus the part of the cluster in front of it.
pub fn image_data_bytes(node: &dyn BlockDev, cs: ClusterSize) -> Result<u64> {
    let size = node.size();
    let mut required = 0u64;
    let mut offset = 0u64;
    while offset < size {
        let e = status_above(node, offset, size - offset)?;
        let mut n = e.length.max(1);
        if !e.zero && e.data && e.present {
            n = cs.round_up(offset + n) - offset;
            required += offset % cs.bytes() + n;
        }
        offset += n;
    }
    Ok(required)
}

/// Measures a qcow2 target. `data` is the source's data in bytes, counted in
/// whole target clusters (0 for `--size`).
pub fn qcow2(
    virtual_size: u64,
    data: u64,
    has_source: bool,
    t: Qcow2Target,
) -> Result<Measurement> {
    let cs = t.cluster_size;
    let vs = cs.round_up(virtual_size);
    check_l1_fits(vs, cs, t.extended_l2)?;
    let data = if matches!(t.prealloc, Prealloc::Falloc | Prealloc::Full)
        || (has_source && t.has_backing)
    {
        // Preallocation writes everything; with a backing file nobody can
        // tell what will be shared, so plan for all of it.
        vs
    } else {
        data
    };
    let fully = fully_allocated_size(vs, cs, t.refcount_order, t.extended_l2);
    Ok(Measurement {
        required: fully - vs + data,
        fully_allocated: fully,
        bitmaps: None,
    })
}

/// Measures a raw target: always the whole virtual size.
pub fn raw(virtual_size: u64) -> Measurement {
    let size = virtual_size.div_ceil(512) * 512;
    Measurement {
        required: size,
        fully_allocated: size,
        bitmaps: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    fn target() -> Qcow2Target {
        Qcow2Target {
            cluster_size: ClusterSize::DEFAULT,
            refcount_order: RefcountOrder::DEFAULT,
            extended_l2: false,
            prealloc: Prealloc::Off,
            has_backing: false,
        }
    }

    #[test]
    fn measure_size_matches_qemu_reference() -> Result<()> {
        let m = qcow2(2 << 30, 0, false, target())?;
        assert_eq!((m.required, m.fully_allocated), (589_824, 2_148_073_472));
        let m = qcow2(1 << 40, 0, false, target())?;
        assert_eq!(
            (m.required, m.fully_allocated),
            (168_034_304, 1_099_679_662_080)
        );
        let m = qcow2(2 << 50, 0, false, target())?;
        assert_eq!(
            (m.required, m.fully_allocated),
            (343_650_009_088, 2_252_143_463_694_336)
        );
        assert!(matches!(
            qcow2(7 << 60, 0, false, target()),
            Err(Error::TooLarge(_))
        ));
        Ok(())
    }
}
