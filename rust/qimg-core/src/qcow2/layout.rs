//! Pure layout math for qcow2: how many clusters of each kind an image needs
//! and where they go. No I/O here; everything is unit-tested directly.

use super::format::{MAX_L1_BYTES, MAX_REFTABLE_BYTES};
use super::types::{ClusterSize, RefcountOrder};

use crate::error::{Error, Result};
use crate::prealloc::Prealloc;

/// Bytes per entry in the refcount table and the L1 table.
const TABLE_ENTRY: u64 = 8;

/// Refcount structures sized to cover a set of clusters, themselves included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefcountMeta {
    pub blocks: u64,
    pub table_clusters: u64,
}

impl RefcountMeta {
    pub fn clusters(self) -> u64 {
        self.blocks + self.table_clusters
    }
}

/// Smallest refcount table + blocks that can count `clusters` other clusters
/// plus themselves. Growing the structures can make them need more room, so
/// iterate to a fixed point, as QEMU's own measure does; the result must agree
/// with QEMU to the cluster for `measure` to print the same numbers.
pub fn refcount_metadata(clusters: u64, cs: ClusterSize, order: RefcountOrder) -> RefcountMeta {
    let per_block = order.entries_per_block(cs);
    let per_table_cluster = cs.bytes() / TABLE_ENTRY;
    let mut meta = RefcountMeta {
        blocks: 0,
        table_clusters: 0,
    };
    loop {
        let blocks = (clusters + meta.clusters()).div_ceil(per_block);
        let next = RefcountMeta {
            blocks,
            table_clusters: blocks.div_ceil(per_table_cluster),
        };
        if next.clusters() == meta.clusters() {
            return next;
        }
        meta = next;
    }
}

/// Width of one L2 entry: 8 bytes, or 16 with extended L2 (subcluster bitmaps).
pub fn l2_entry_bytes(extended_l2: bool) -> u64 {
    if extended_l2 {
        16
    } else {
        8
    }
}

/// Guest clusters mapped by one L2 table.
pub fn l2_entries_per_table(cs: ClusterSize, extended_l2: bool) -> u64 {
    cs.bytes() / l2_entry_bytes(extended_l2)
}

/// Number of L1 entries (= L2 tables) needed to map `virtual_size` bytes.
pub fn l1_entries(virtual_size: u64, cs: ClusterSize, extended_l2: bool) -> u64 {
    cs.clusters_for(virtual_size)
        .div_ceil(l2_entries_per_table(cs, extended_l2))
}

/// Refuses sizes whose L1 table would exceed what qcow2 readers accept.
pub fn check_l1_fits(virtual_size: u64, cs: ClusterSize, extended_l2: bool) -> Result<()> {
    if l1_entries(virtual_size, cs, extended_l2) * TABLE_ENTRY > MAX_L1_BYTES {
        return Err(Error::TooLarge(
            "The image size is too large (try using a larger cluster size)".into(),
        ));
    }
    Ok(())
}

/// Size of a file holding every cluster of a `virtual_size` image plus all
/// metadata: header, L2 tables (whole tables), L1 (whole clusters) and the
/// refcount structures covering all of them. This is qemu-img measure's
/// "fully allocated size", and the length of a preallocated image.
pub fn fully_allocated_size(
    virtual_size: u64,
    cs: ClusterSize,
    order: RefcountOrder,
    extended_l2: bool,
) -> u64 {
    let plan = MetaPlan::new(virtual_size, cs, order, extended_l2, true);
    plan.total_clusters() * cs.bytes()
}

/// Cluster counts of the metadata regions, before placing them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MetaPlan {
    l1_entries: u64,
    l1_clusters: u64,
    l2_tables: u64,
    data_clusters: u64,
    refcount: RefcountMeta,
}

impl MetaPlan {
    fn new(
        virtual_size: u64,
        cs: ClusterSize,
        order: RefcountOrder,
        extended_l2: bool,
        preallocated: bool,
    ) -> Self {
        let l1_entries = l1_entries(virtual_size, cs, extended_l2);
        let (l1_clusters, l2_tables, data_clusters) = if preallocated {
            // The L1 is reserved in whole clusters of entries, as QEMU's
            // preallocation sizing does, so file lengths agree.
            let per_cluster = cs.bytes() / TABLE_ENTRY;
            let l1_slots = l1_entries.div_ceil(per_cluster) * per_cluster;
            (
                l1_slots * TABLE_ENTRY / cs.bytes(),
                l1_entries,
                cs.clusters_for(virtual_size),
            )
        } else {
            (cs.clusters_for(l1_entries * TABLE_ENTRY), 0, 0)
        };
        let others = 1 + l1_clusters + l2_tables + data_clusters;
        MetaPlan {
            l1_entries,
            l1_clusters,
            l2_tables,
            data_clusters,
            refcount: refcount_metadata(others, cs, order),
        }
    }

    fn total_clusters(&self) -> u64 {
        1 + self.refcount.clusters() + self.l1_clusters + self.l2_tables + self.data_clusters
    }
}

/// A run of whole clusters in the image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub offset: u64,
    pub clusters: u64,
}

impl Region {
    pub fn bytes(&self, cs: ClusterSize) -> u64 {
        self.clusters * cs.bytes()
    }

    pub fn end(&self, cs: ClusterSize) -> u64 {
        self.offset + self.bytes(cs)
    }
}

/// Where everything of a new image goes. All metadata sits in one contiguous
/// run at the front, in this order: header, refcount table, refcount blocks,
/// L1, L2 tables; preallocated data follows in guest order, so guest offset
/// `g` lives at host offset `data.offset + g` and the guest disk stays
/// physically contiguous. Every cluster from 0 to the end has refcount 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateLayout {
    pub cluster_size: ClusterSize,
    pub extended_l2: bool,
    pub virtual_size: u64,
    /// The header's l1_size: entries actually in use.
    pub l1_entries: u64,
    pub reftable: Region,
    pub refblocks: Region,
    pub l1: Region,
    pub l2: Region,
    pub data: Region,
    /// Clusters with refcount 1, counted from cluster 0.
    pub used_clusters: u64,
    pub file_len: u64,
}

impl CreateLayout {
    pub fn plan(
        virtual_size: u64,
        cs: ClusterSize,
        order: RefcountOrder,
        extended_l2: bool,
        prealloc: Prealloc,
    ) -> Result<Self> {
        check_l1_fits(virtual_size, cs, extended_l2)?;
        let plan = MetaPlan::new(
            virtual_size,
            cs,
            order,
            extended_l2,
            prealloc != Prealloc::Off,
        );
        if plan.refcount.table_clusters * cs.bytes() > MAX_REFTABLE_BYTES {
            return Err(Error::TooLarge(
                "The image size is too large (try using a larger cluster size)".into(),
            ));
        }
        let reftable = Region {
            offset: cs.bytes(),
            clusters: plan.refcount.table_clusters,
        };
        let refblocks = Region {
            offset: reftable.end(cs),
            clusters: plan.refcount.blocks,
        };
        let l1 = Region {
            offset: refblocks.end(cs),
            clusters: plan.l1_clusters,
        };
        let l2 = Region {
            offset: l1.end(cs),
            clusters: plan.l2_tables,
        };
        let data = Region {
            offset: l2.end(cs),
            clusters: plan.data_clusters,
        };
        let used_clusters = plan.total_clusters();
        let file_len = if prealloc == Prealloc::Off && plan.l1_entries > 0 {
            // Like qemu-img: the L1 is written only as far as its used entries.
            l1.offset + plan.l1_entries * TABLE_ENTRY
        } else {
            used_clusters * cs.bytes()
        };
        Ok(CreateLayout {
            cluster_size: cs,
            extended_l2,
            virtual_size,
            l1_entries: plan.l1_entries,
            reftable,
            refblocks,
            l1,
            l2,
            data,
            used_clusters,
            file_len,
        })
    }

    /// The header's l1_table_offset (0 when the image has no L1 entries).
    pub fn l1_table_offset(&self) -> u64 {
        if self.l1_entries == 0 {
            0
        } else {
            self.l1.offset
        }
    }

    /// Host offset of guest cluster `index` in a preallocated image.
    pub fn data_cluster_offset(&self, index: u64) -> u64 {
        self.data.offset + index * self.cluster_size.bytes()
    }

    /// Bytes of metadata, i.e. where the data region starts.
    pub fn metadata_bytes(&self) -> u64 {
        self.data.offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cs(bytes: u64) -> ClusterSize {
        ClusterSize::new(bytes).expect("valid cluster size")
    }

    const K64: u64 = 65536;
    const GIB: u64 = 1 << 30;

    #[test]
    fn fully_allocated_matches_qemu_reference_numbers() {
        // Figures printed by `qemu-img measure -O qcow2 --size N` (64k clusters, 16-bit refcounts).
        let cases = [
            (0u64, 196_608u64),
            (GIB, 1_074_135_040),
            (2 * GIB, 2_148_073_472),
            (64 * GIB, 68_730_224_640),
            (256 * GIB, 274_920_112_128),
            (1024 * GIB, 1_099_679_662_080),
            (2 << 50, 2_252_143_463_694_336),
        ];
        for (size, want) in cases {
            let got = fully_allocated_size(size, cs(K64), RefcountOrder::DEFAULT, false);
            assert_eq!(got, want, "size {size}");
        }
    }

    #[test]
    fn small_4k_metadata_prealloc_matches_qemu_file_length() {
        // qemu-img create -o preallocation=metadata,cluster_size=4k 64M -> 67289088 bytes.
        let layout = CreateLayout::plan(
            64 << 20,
            cs(4096),
            RefcountOrder::DEFAULT,
            false,
            Prealloc::Metadata,
        )
        .expect("plan");
        assert_eq!(layout.file_len, 67_289_088);
    }

    #[test]
    fn off_layout_matches_qemu_for_small_images() {
        // qemu-img create 64M: header, reftable, refblock, L1 at cluster 3; 196616 bytes.
        let layout = CreateLayout::plan(
            64 << 20,
            cs(K64),
            RefcountOrder::DEFAULT,
            false,
            Prealloc::Off,
        )
        .expect("plan");
        assert_eq!(
            layout.reftable,
            Region {
                offset: K64,
                clusters: 1
            }
        );
        assert_eq!(
            layout.refblocks,
            Region {
                offset: 2 * K64,
                clusters: 1
            }
        );
        assert_eq!(layout.l1_table_offset(), 3 * K64);
        assert_eq!(layout.l1_entries, 1);
        assert_eq!(layout.file_len, 196_616);
        assert_eq!(layout.used_clusters, 4);
        let empty = CreateLayout::plan(0, cs(K64), RefcountOrder::DEFAULT, false, Prealloc::Off)
            .expect("plan");
        assert_eq!((empty.l1_table_offset(), empty.file_len), (0, 196_608));
    }

    #[test]
    fn too_large_images_are_refused() {
        let err = CreateLayout::plan(
            1 << 60,
            cs(512),
            RefcountOrder::DEFAULT,
            false,
            Prealloc::Off,
        );
        assert!(matches!(err, Err(Error::TooLarge(_))));
        assert!(check_l1_fits(7 << 60, cs(K64), false).is_err());
        assert!(check_l1_fits(2 << 50, cs(K64), false).is_ok());
    }

    /// The same quantity computed the slow, obvious way: try every table size
    /// until the refcount blocks cover everything, themselves included.
    fn refcount_meta_by_search(others: u64, cs: ClusterSize, order: RefcountOrder) -> u64 {
        let per_block = order.entries_per_block(cs);
        let per_table = cs.bytes() / 8;
        let mut blocks = 0u64;
        loop {
            let table = blocks.div_ceil(per_table);
            if blocks * per_block >= others + blocks + table {
                return blocks + table;
            }
            blocks += 1;
        }
    }

    proptest! {
        #[test]
        fn refcount_metadata_is_the_smallest_that_covers_itself(
            others in 1u64..3_000_000,
            bits in 9u32..=21,
            order in 0u32..=6,
        ) {
            let cs = ClusterSize::from_bits(bits).expect("bits in range");
            let order = RefcountOrder::from_order(order).expect("order in range");
            let meta = refcount_metadata(others, cs, order);
            let total = others + meta.clusters();
            prop_assert!(meta.blocks * order.entries_per_block(cs) >= total);
            prop_assert!(meta.table_clusters * (cs.bytes() / 8) >= meta.blocks);
            prop_assert_eq!(meta.clusters(), refcount_meta_by_search(others, cs, order));
        }

        #[test]
        fn layout_regions_are_contiguous_and_covered(
            size in 0u64..(1u64 << 44),
            bits in 9u32..=21,
            order in 0u32..=6,
            extended_l2 in any::<bool>(),
            mode in 0usize..4,
        ) {
            let cs = ClusterSize::from_bits(bits).expect("bits in range");
            let order = RefcountOrder::from_order(order).expect("order in range");
            prop_assume!(!extended_l2 || bits >= 14);
            let prealloc = Prealloc::ALL[mode];
            let Ok(layout) = CreateLayout::plan(size, cs, order, extended_l2, prealloc) else {
                return Ok(());
            };
            prop_assert_eq!(layout.reftable.offset, cs.bytes());
            prop_assert_eq!(layout.refblocks.offset, layout.reftable.end(cs));
            prop_assert_eq!(layout.l1.offset, layout.refblocks.end(cs));
            prop_assert_eq!(layout.l2.offset, layout.l1.end(cs));
            prop_assert_eq!(layout.data.offset, layout.l2.end(cs));
            prop_assert_eq!(layout.used_clusters * cs.bytes(), layout.data.end(cs));
            prop_assert!(layout.l1.clusters * cs.bytes() >= layout.l1_entries * 8);
            prop_assert!(
                layout.refblocks.clusters * order.entries_per_block(cs) >= layout.used_clusters
            );
            if prealloc != Prealloc::Off {
                let full = fully_allocated_size(size, cs, order, extended_l2);
                prop_assert_eq!(layout.file_len, full);
                prop_assert_eq!(layout.l2.clusters, layout.l1_entries);
                prop_assert_eq!(layout.data.clusters * cs.bytes(), cs.round_up(size));
            }
        }
    }
}

#[cfg(test)]
mod independent_formula {
    use super::*;
    use proptest::prelude::*;

    /// qemu-img's preallocation size recipe written out in bytes, as the qcow2
    /// docs describe it: header + whole L2 tables + L1 rounded to a cluster +
    /// refcount metadata for all of that plus the data.
    fn prealloc_size_by_bytes(size: u64, cs: ClusterSize, order: RefcountOrder, ext: bool) -> u64 {
        let c = cs.bytes();
        let entry = if ext { 16 } else { 8 };
        let data = size.div_ceil(c) * c;
        let mut meta = c;
        let l2_entries = (data / c).div_ceil(c / entry) * (c / entry);
        meta += l2_entries * entry;
        let l1_entries = (l2_entries * entry / c).div_ceil(c / 8) * (c / 8);
        meta += l1_entries * 8;
        let clusters = (meta + data) / c;
        // Refcount metadata by brute force: smallest blocks covering everything.
        let per_block = c * 8 / (1 << order.order());
        let mut blocks = 0u64;
        let refmeta = loop {
            let table = blocks.div_ceil(c / 8);
            if blocks * per_block >= clusters + blocks + table {
                break blocks + table;
            }
            blocks += 1;
        };
        meta + refmeta * c + data
    }

    proptest! {
        #[test]
        fn fully_allocated_size_agrees_with_byte_formula(
            size in 0u64..(1u64 << 40),
            bits in 12u32..=21,
            order in 0u32..=6,
            ext in any::<bool>(),
        ) {
            let cs = ClusterSize::from_bits(bits).expect("bits in range");
            let order = RefcountOrder::from_order(order).expect("order in range");
            prop_assume!(!ext || bits >= 14);
            prop_assert_eq!(
                fully_allocated_size(size, cs, order, ext),
                prealloc_size_by_bytes(size, cs, order, ext)
            );
        }
    }
}
