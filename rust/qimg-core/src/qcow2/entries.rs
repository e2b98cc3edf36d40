//! The entries of qcow2's tables, typed: L1 entries, L2 entries (standard
//! and compressed), extended L2 subcluster bitmaps, refcount table entries
//! and bitmap table entries. Each wraps the raw 64-bit value as it sits in
//! a table (tables stay plain `u64`s) and is the only code that knows its
//! bits; the masks live in `format.rs`. Everything is `#[inline]` and
//! `#[repr(transparent)]`: wrapping an entry costs nothing.

use super::format::{
    BITMAP_ENTRY_ALL_ONES, BITMAP_ENTRY_OFFSET_MASK, BITMAP_ENTRY_RESERVED, L1E_OFFSET_MASK,
    L1E_RESERVED_MASK, L2E_OFFSET_MASK, L2E_STD_RESERVED_MASK, OFLAG_COMPRESSED, OFLAG_COPIED,
    OFLAG_ZERO, REFT_OFFSET_MASK, REFT_RESERVED_MASK, SUBCLUSTERS_ALLOCATED, SUBCLUSTERS_ZERO,
};

/// An L1 table entry: where an L2 table is, and whether it may be written
/// in place (COPIED: its refcount is 1).
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L1Entry(u64);

impl L1Entry {
    /// No L2 table: the range it covers reads from the backing file (or as zeroes).
    pub const UNALLOCATED: L1Entry = L1Entry(0);

    #[inline]
    pub const fn from_raw(raw: u64) -> L1Entry {
        L1Entry(raw)
    }

    /// An entry for the L2 table at `offset` (cluster aligned).
    #[inline]
    pub const fn new(offset: u64, copied: bool) -> L1Entry {
        L1Entry(offset).with_copied(copied)
    }

    #[inline]
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// Host offset of the L2 table; 0 when there is none.
    #[inline]
    pub const fn table_offset(self) -> u64 {
        self.0 & L1E_OFFSET_MASK
    }

    #[inline]
    pub const fn copied(self) -> bool {
        self.0 & OFLAG_COPIED != 0
    }

    #[inline]
    pub const fn with_copied(self, copied: bool) -> L1Entry {
        L1Entry(if copied {
            self.0 | OFLAG_COPIED
        } else {
            self.0 & !OFLAG_COPIED
        })
    }

    /// Bits set that must be zero (check reports them).
    #[inline]
    pub const fn reserved_bits(self) -> u64 {
        self.0 & L1E_RESERVED_MASK
    }
}

/// An L2 table entry (with extended L2, the first of its two words). A
/// standard entry maps a host cluster and may carry the zero flag; a
/// compressed one packs a byte offset and a sector count whose widths
/// depend on the cluster size.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L2Entry(u64);

impl L2Entry {
    /// No host cluster, no flags: reads from the backing file (or as zeroes).
    pub const UNALLOCATED: L2Entry = L2Entry(0);
    /// A standard zero cluster with no host cluster (not with extended L2,
    /// where the subcluster bitmap says what reads as zeroes).
    pub const ZERO: L2Entry = L2Entry(OFLAG_ZERO);

    #[inline]
    pub const fn from_raw(raw: u64) -> L2Entry {
        L2Entry(raw)
    }

    /// A standard entry for the data cluster at `host` (cluster aligned).
    #[inline]
    pub const fn new(host: u64, copied: bool) -> L2Entry {
        L2Entry(host).with_copied(copied)
    }

    /// A compressed entry: `len` bytes of compressed data at byte offset
    /// `host` (less than a cluster), in an image of `cluster_bits`.
    #[inline]
    pub const fn compressed(host: u64, len: u64, cluster_bits: u32) -> L2Entry {
        // The count field holds the sectors touched after the first one.
        let sectors = (host + len - 1) / 512 - host / 512;
        L2Entry(OFLAG_COMPRESSED | (sectors << compressed_shift(cluster_bits)) | host)
    }

    #[inline]
    pub const fn raw(self) -> u64 {
        self.0
    }

    #[inline]
    pub const fn is_compressed(self) -> bool {
        self.0 & OFLAG_COMPRESSED != 0
    }

    /// Host offset of a standard entry's cluster; 0 when it has none (a
    /// compressed entry's offset is [`L2Entry::compressed_data`]'s).
    #[inline]
    pub const fn host_offset(self) -> u64 {
        self.0 & L2E_OFFSET_MASK
    }

    /// A standard entry with neither a host cluster nor the compressed flag
    /// (with extended L2 its bitmap may still say zeroes).
    #[inline]
    pub const fn is_unallocated(self) -> bool {
        self.0 & (L2E_OFFSET_MASK | OFLAG_COMPRESSED) == 0
    }

    #[inline]
    pub const fn copied(self) -> bool {
        self.0 & OFLAG_COPIED != 0
    }

    /// The zero flag of a standard entry (meaningless with extended L2).
    #[inline]
    pub const fn zero_flag(self) -> bool {
        self.0 & OFLAG_ZERO != 0
    }

    #[inline]
    pub const fn with_copied(self, copied: bool) -> L2Entry {
        L2Entry(if copied {
            self.0 | OFLAG_COPIED
        } else {
            self.0 & !OFLAG_COPIED
        })
    }

    #[inline]
    pub const fn with_zero_flag(self) -> L2Entry {
        L2Entry(self.0 | OFLAG_ZERO)
    }

    /// Bits of a standard entry set that must be zero.
    #[inline]
    pub const fn reserved_bits(self) -> u64 {
        self.0 & L2E_STD_RESERVED_MASK
    }

    /// Where a compressed entry's data is, in an image of `cluster_bits`.
    #[inline]
    pub const fn compressed_data(self, cluster_bits: u32) -> CompressedData {
        let shift = compressed_shift(cluster_bits);
        CompressedData {
            host: self.0 & ((1u64 << shift) - 1),
            sectors: ((self.0 >> shift) & ((1u64 << (cluster_bits - 8)) - 1)) + 1,
        }
    }
}

/// The lowest bit of a compressed entry's sector count: the offset takes
/// the bits below it (62 - (cluster_bits - 8) of them).
#[inline]
const fn compressed_shift(cluster_bits: u32) -> u32 {
    62 - (cluster_bits - 8)
}

/// A compressed cluster's data: it starts at byte `host` and ends in the
/// `sectors`-th 512-byte sector counted from the one holding `host`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedData {
    pub host: u64,
    pub sectors: u64,
}

impl CompressedData {
    /// Bytes from `host` to the end of its last sector: what a reader reads.
    #[inline]
    pub const fn read_len(self) -> u64 {
        self.sectors * 512 - (self.host & 511)
    }

    /// The whole sectors it occupies (start, bytes): what its refcounts cover.
    #[inline]
    pub const fn sectors_range(self) -> (u64, u64) {
        (self.host & !511, self.sectors * 512)
    }
}

/// The second word of an extended L2 entry: for each of the 32
/// subclusters, an allocated bit (low half) and a zero bit (high half).
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubclusterBitmap(u64);

impl SubclusterBitmap {
    pub const NONE: SubclusterBitmap = SubclusterBitmap(0);
    pub const ALL_ALLOCATED: SubclusterBitmap = SubclusterBitmap(SUBCLUSTERS_ALLOCATED);
    pub const ALL_ZERO: SubclusterBitmap = SubclusterBitmap(SUBCLUSTERS_ZERO);

    #[inline]
    pub const fn from_raw(raw: u64) -> SubclusterBitmap {
        SubclusterBitmap(raw)
    }

    #[inline]
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// The bit of subclusters `first..first + n` in either half's numbering.
    #[inline]
    pub const fn mask(first: u64, n: u64) -> u64 {
        if n >= 32 {
            SUBCLUSTERS_ALLOCATED
        } else {
            ((1u64 << n) - 1) << first
        }
    }

    #[inline]
    pub const fn allocated(self, sc: u64) -> bool {
        self.0 & (1 << sc) != 0
    }

    #[inline]
    pub const fn zero(self, sc: u64) -> bool {
        self.0 & (1 << (32 + sc)) != 0
    }

    #[inline]
    pub const fn any_allocated(self) -> bool {
        self.0 & SUBCLUSTERS_ALLOCATED != 0
    }

    /// Some subcluster is marked both allocated and zero.
    #[inline]
    pub const fn conflicts(self) -> bool {
        (self.0 >> 32) & self.0 != 0
    }

    /// The subclusters of `mask` (see [`SubclusterBitmap::mask`]) made allocated.
    #[inline]
    pub const fn with_allocated(self, mask: u64) -> SubclusterBitmap {
        SubclusterBitmap((self.0 | mask) & !(mask << 32))
    }

    /// The subclusters of `mask` made zero (no longer allocated).
    #[inline]
    pub const fn with_zero(self, mask: u64) -> SubclusterBitmap {
        SubclusterBitmap((self.0 & !mask) | (mask << 32))
    }

    /// Every subcluster that is allocated or zero becomes zero; the others
    /// stay unallocated.
    #[inline]
    pub const fn allocated_as_zero(self) -> SubclusterBitmap {
        SubclusterBitmap((self.0 | (self.0 << 32)) & SUBCLUSTERS_ZERO)
    }
}

/// A refcount table entry: where a refcount block is.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RefTableEntry(u64);

impl RefTableEntry {
    #[inline]
    pub const fn from_raw(raw: u64) -> RefTableEntry {
        RefTableEntry(raw)
    }

    #[inline]
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// Host offset of the refcount block; 0 when there is none.
    #[inline]
    pub const fn block_offset(self) -> u64 {
        self.0 & REFT_OFFSET_MASK
    }

    #[inline]
    pub const fn reserved_bits(self) -> u64 {
        self.0 & REFT_RESERVED_MASK
    }
}

/// An entry of a persistent bitmap's table: a cluster of bitmap data, or
/// none (all bits clear, or all set).
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BitmapTableEntry(u64);

impl BitmapTableEntry {
    #[inline]
    pub const fn from_raw(raw: u64) -> BitmapTableEntry {
        BitmapTableEntry(raw)
    }

    #[inline]
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// Host offset of the data cluster; 0 when there is none.
    #[inline]
    pub const fn data_offset(self) -> u64 {
        self.0 & BITMAP_ENTRY_OFFSET_MASK
    }

    /// With no data cluster: every bit of the range is set (else clear).
    #[inline]
    pub const fn all_ones(self) -> bool {
        self.0 & BITMAP_ENTRY_ALL_ONES != 0
    }

    #[inline]
    pub const fn reserved_bits(self) -> u64 {
        self.0 & BITMAP_ENTRY_RESERVED
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l1_entries_split_offset_and_copied() {
        let e = L1Entry::new(0x5_0000, true);
        assert_eq!(e.raw(), 0x8000_0000_0005_0000);
        assert_eq!(e.table_offset(), 0x5_0000);
        assert!(e.copied());
        assert!(!e.with_copied(false).copied());
        assert_eq!(
            L1Entry::from_raw(0x7f00_0000_0000_0001).reserved_bits(),
            0x7f00_0000_0000_0001
        );
    }

    #[test]
    fn compressed_entries_round_trip_for_every_cluster_size() {
        for bits in 9..=21u32 {
            let cs = 1u64 << bits;
            // Data starting mid-sector and spanning a few sectors.
            let (host, len) = (0x12_3456_7a00 + 37, cs / 2 + 1);
            let e = L2Entry::compressed(host, len, bits);
            assert!(e.is_compressed() && !e.copied());
            let d = e.compressed_data(bits);
            assert_eq!(d.host, host);
            assert_eq!(d.sectors, (host + len - 1) / 512 - host / 512 + 1);
            assert!(d.read_len() >= len && d.read_len() < len + 512);
            assert_eq!(d.sectors_range(), (host & !511, d.sectors * 512));
        }
    }

    #[test]
    fn standard_l2_entries() {
        let e = L2Entry::new(0x1_0000, true);
        assert_eq!(e.host_offset(), 0x1_0000);
        assert!(e.copied() && !e.is_compressed() && !e.zero_flag() && !e.is_unallocated());
        assert!(e.with_zero_flag().zero_flag());
        assert!(L2Entry::ZERO.is_unallocated() && L2Entry::ZERO.zero_flag());
        assert!(!L2Entry::from_raw(OFLAG_COMPRESSED).is_unallocated());
        assert_eq!(
            L2Entry::from_raw(0x3f00_0000_0000_01fe).reserved_bits(),
            0x3f00_0000_0000_01fe
        );
    }

    #[test]
    fn subcluster_bitmaps() {
        let mask = SubclusterBitmap::mask(2, 3);
        assert_eq!(mask, 0b11100);
        assert_eq!(SubclusterBitmap::mask(0, 32), 0xffff_ffff);
        let b = SubclusterBitmap::ALL_ZERO.with_allocated(mask);
        assert!(b.allocated(3) && !b.zero(3) && b.zero(5) && !b.conflicts());
        let z = b.with_zero(mask);
        assert_eq!(z, SubclusterBitmap::ALL_ZERO);
        assert!(SubclusterBitmap::from_raw(1 | 1 << 32).conflicts());
        assert_eq!(
            SubclusterBitmap::from_raw(0b01 | 0b10 << 32).allocated_as_zero(),
            SubclusterBitmap::from_raw(0b11 << 32)
        );
    }

    #[test]
    fn refcount_and_bitmap_table_entries() {
        let r = RefTableEntry::from_raw(0xffff_ffff_ffff_fe01);
        assert_eq!(r.block_offset(), 0xffff_ffff_ffff_fe00);
        assert_eq!(r.reserved_bits(), 1);
        let b = BitmapTableEntry::from_raw(0x8000_0000_0001_0001);
        assert_eq!(b.data_offset(), 0x1_0000);
        assert!(b.all_ones());
        assert_eq!(b.reserved_bits(), 0x8000_0000_0000_0000);
    }
}
