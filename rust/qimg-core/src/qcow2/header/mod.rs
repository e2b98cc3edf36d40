//! The qcow2 header: one value, [`Header`], parsed from an image's first
//! bytes (`parse.rs`, which trusts nothing it reads) and encoded into a new
//! header cluster (`encode.rs`, byte for byte as QEMU lays it out).

mod encode;
mod parse;

pub use parse::read_head;

use super::format::{
    AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY, INCOMPAT_EXTL2, V3_HEADER_LEN,
};
use super::types::{ClusterSize, Compat, CompressionType, RefcountOrder};

/// The autoclear bits a writer may leave set: the ones QEMU knows. The spec
/// makes a writer clear every other one before it modifies the image (their
/// meaning may depend on data it would not keep consistent), and QEMU does
/// so whenever it opens an image for writing.
pub fn kept_autoclear(bits: u64) -> u64 {
    bits & (AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW)
}

/// Which of the three feature bit fields a bit (or its name) belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureKind {
    Incompatible,
    Compatible,
    Autoclear,
}

impl FeatureKind {
    /// The kind's number in the feature name table.
    pub fn code(self) -> u8 {
        match self {
            FeatureKind::Incompatible => 0,
            FeatureKind::Compatible => 1,
            FeatureKind::Autoclear => 2,
        }
    }

    /// The kind a feature name table entry names (None: a kind qcow2 does not define).
    pub fn from_code(code: u8) -> Option<FeatureKind> {
        match code {
            0 => Some(FeatureKind::Incompatible),
            1 => Some(FeatureKind::Compatible),
            2 => Some(FeatureKind::Autoclear),
            _ => None,
        }
    }
}

/// One entry of the feature name table extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    pub kind: FeatureKind,
    pub bit: u8,
    pub name: String,
}

/// The bitmaps header extension (persistent dirty bitmaps directory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExtension {
    pub count: u32,
    pub directory_size: u64,
    pub directory_offset: u64,
}

/// A qcow2 header. [`Header::parse`] yields one whose fields were checked
/// against the format's limits and the file; [`Header::encode`] writes one.
#[derive(Debug, Clone)]
pub struct Header {
    pub compat: Compat,
    pub cluster_size: ClusterSize,
    pub virtual_size: u64,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub l1_entries: u64,
    pub l1_table_offset: u64,
    pub reftable_offset: u64,
    pub reftable_clusters: u64,
    pub snapshot_count: u32,
    pub snapshots_offset: u64,
    /// The feature bits (v3; a v2 header has none). [`Header::declare_features`]
    /// sets them for a header qimg writes.
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: RefcountOrder,
    /// As read; the encoder always writes QEMU's v3 length.
    pub header_length: u64,
    pub compression: CompressionType,
    /// As read; the encoder writes qimg's own table.
    pub feature_names: Vec<FeatureName>,
    pub bitmaps: Option<BitmapsExtension>,
    /// Types of header extensions qimg does not interpret (read, never written).
    pub unknown_extensions: Vec<u32>,
}

impl Default for Header {
    /// A v3 header with QEMU's default options that places nothing: callers
    /// fill in the layout.
    fn default() -> Header {
        Header {
            compat: Compat::V3,
            cluster_size: ClusterSize::DEFAULT,
            virtual_size: 0,
            backing_file: None,
            backing_format: None,
            l1_entries: 0,
            l1_table_offset: 0,
            reftable_offset: 0,
            reftable_clusters: 0,
            snapshot_count: 0,
            snapshots_offset: 0,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: RefcountOrder::DEFAULT,
            header_length: V3_HEADER_LEN as u64,
            compression: CompressionType::Zlib,
            feature_names: Vec::new(),
            bitmaps: None,
            unknown_extensions: Vec::new(),
        }
    }
}

impl Header {
    /// The bitmaps extension when the autoclear bit vouches for it (a
    /// program that does not know bitmaps clears the bit, and then QEMU
    /// treats the extension as absent).
    pub fn live_bitmaps(&self) -> Option<&BitmapsExtension> {
        self.bitmaps
            .as_ref()
            .filter(|_| self.autoclear & AUTOCLEAR_BITMAPS != 0)
    }

    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }

    pub fn dirty(&self) -> bool {
        self.incompatible & INCOMPAT_DIRTY != 0
    }

    pub fn corrupt(&self) -> bool {
        self.incompatible & INCOMPAT_CORRUPT != 0
    }

    pub fn lazy_refcounts(&self) -> bool {
        self.compatible & COMPAT_LAZY_REFCOUNTS != 0
    }

    /// Size of one L2 entry in bytes: 16 with extended L2 (entry + subcluster bitmap).
    pub fn l2_entry_bytes(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    /// Guest clusters mapped by one L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size.bytes() / self.l2_entry_bytes()
    }

    /// L1 entries needed to map the whole virtual disk.
    pub fn l1_entries_needed(&self) -> u64 {
        let clusters = self.virtual_size.div_ceil(self.cluster_size.bytes());
        clusters.div_ceil(self.l2_entries())
    }
}
