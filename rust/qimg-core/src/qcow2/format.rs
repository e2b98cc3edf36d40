//! The qcow2 on-disk format's numbers, in one place: where the header keeps
//! the fields qimg rewrites in place, the bits of table entries, feature
//! bits, and the limits QEMU sets. Readers, writers, check, repair and amend
//! all take them from here (see QEMU's docs/interop/qcow2.rst).

// ---- The header ----

/// The first four bytes of every qcow2 file.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Length of the fixed v2 header; v2 extensions start right after it.
pub const V2_HEADER_LEN: usize = 72;
/// Length of the v3 header as QEMU writes it (with the compression type byte, padded).
pub const V3_HEADER_LEN: usize = 112;
/// Longest backing file name QEMU accepts.
pub const MAX_BACKING_NAME: usize = 1023;
/// Header extension types.
pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub const EXT_BITMAPS: u32 = 0x2385_2875;
pub const EXT_CRYPTO: u32 = 0x0537_be77;
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

// ---- Header fields rewritten in place (byte offsets) ----

/// Guest size (u64).
pub const HEADER_SIZE: u64 = 24;
/// Number of active L1 entries (u32); the L1 table offset (u64) follows.
pub const HEADER_L1_SIZE: u64 = 36;
/// Refcount table offset (u64); its length in clusters (u32) follows.
pub const HEADER_REFTABLE_OFFSET: u64 = 48;
/// Number of snapshots (u32); the snapshot table offset (u64) follows.
pub const HEADER_SNAPSHOTS: u64 = 60;
/// Incompatible feature bits (u64, v3).
pub const HEADER_INCOMPATIBLE: u64 = 72;
/// Autoclear feature bits (u64, v3).
pub const HEADER_AUTOCLEAR: u64 = 88;

// ---- Feature bits ----

/// The image was not closed cleanly with lazy refcounts.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// The image is marked corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// The compression type field is valid.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// L2 entries carry a subcluster bitmap.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Refcounts may lag behind until the image is closed.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// The persistent bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// The external data file is a valid raw image on its own.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

// ---- Table entries ----

/// Host offset bits of an L1 entry.
pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits of an L1 entry that must be zero.
pub const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Host offset bits of a standard L2 entry.
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits of a standard L2 entry that must be zero.
pub const L2E_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Host offset bits of a refcount table entry.
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Bits of a refcount table entry that must be zero.
pub const REFT_RESERVED_MASK: u64 = 0x1ff;
/// L1/L2 entry: the cluster has refcount 1 and may be written in place.
pub const OFLAG_COPIED: u64 = 1 << 63;
/// L2 entry: the cluster is compressed.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// Standard L2 entry: the cluster reads as zeroes.
pub const OFLAG_ZERO: u64 = 1;
/// Extended L2 bitmap: every subcluster allocated.
pub const SUBCLUSTERS_ALLOCATED: u64 = 0xffff_ffff;
/// Extended L2 bitmap: every subcluster reads as zeroes.
pub const SUBCLUSTERS_ZERO: u64 = 0xffff_ffff << 32;

// ---- Limits (QEMU's) ----

/// Largest L1 table QEMU opens.
pub const MAX_L1_BYTES: u64 = 32 * 1024 * 1024;
/// Largest refcount table QEMU opens.
pub const MAX_REFTABLE_BYTES: u64 = 8 * 1024 * 1024;
/// Host offsets must fit the 56-bit offset fields of L1/L2 entries.
pub const MAX_HOST_OFFSET: u64 = 1 << 56;
/// Most snapshots an image may have.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Largest extra-data area of a snapshot table entry.
pub const MAX_SNAPSHOT_EXTRA: u64 = 1024;
/// Largest snapshot table (1 KiB for each of the snapshots).
pub const MAX_SNAPSHOT_TABLE_BYTES: u64 = 1024 * MAX_SNAPSHOTS as u64;
/// Extra data v3 requires in every snapshot entry: the 64-bit VM state
/// size and the disk size.
pub const SNAPSHOT_REQUIRED_EXTRA: u64 = 16;

// ---- Persistent bitmaps ----

/// Bitmap table entry: host offset bits.
pub const BITMAP_ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bitmap table entry: bits that must be zero.
pub const BITMAP_ENTRY_RESERVED: u64 = 0xff00_0000_0000_01fe;
/// Bitmap table entry with no cluster: every bit of its range is set.
pub const BITMAP_ENTRY_ALL_ONES: u64 = 1;
/// Bitmap type: dirty tracking (the only one defined).
pub const BITMAP_TYPE_DIRTY_TRACKING: u8 = 1;
/// Bitmap flags: in use (its writer did not close it), auto (enabled).
pub const BITMAP_FLAG_IN_USE: u32 = 1;
pub const BITMAP_FLAG_AUTO: u32 = 2;
/// Largest bitmap (its bits) QEMU loads.
pub const MAX_BITMAP_BYTES: u64 = 512 << 20;
