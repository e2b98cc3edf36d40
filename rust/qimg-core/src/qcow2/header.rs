//! The qcow2 header cluster: fixed header fields, header extensions and the
//! backing file name, encoded exactly as QEMU lays them out so that images
//! are interchangeable byte for byte.

use super::format::{
    AUTOCLEAR_BITMAPS, COMPAT_LAZY_REFCOUNTS, EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_END,
    EXT_FEATURE_TABLE, INCOMPAT_COMPRESSION, INCOMPAT_EXTL2, MAGIC, MAX_BACKING_NAME,
    V2_HEADER_LEN, V3_HEADER_LEN,
};
use super::image_header::BitmapsExtension;
use super::types::{ClusterSize, Compat, CompressionType, RefcountOrder};
use crate::error::{Error, Result};

/// Names of the feature bits, published in the header so that tools that do
/// not know a bit can still name it. (kind, bit, name); kind 0 incompatible,
/// 1 compatible, 2 autoclear.
const FEATURE_NAMES: [(u8, u8, &str); 8] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];
const FEATURE_ENTRY_LEN: usize = 48;

/// Everything that goes into the header cluster of a new image.
#[derive(Debug, Clone)]
pub struct Header<'a> {
    pub compat: Compat,
    pub cluster_size: ClusterSize,
    pub virtual_size: u64,
    pub l1_entries: u64,
    pub l1_table_offset: u64,
    pub reftable_offset: u64,
    pub reftable_clusters: u64,
    pub refcount_order: RefcountOrder,
    pub lazy_refcounts: bool,
    pub extended_l2: bool,
    pub compression: CompressionType,
    pub backing_file: Option<&'a str>,
    pub backing_format: Option<&'a str>,
    /// The internal snapshots: how many, and where their table is.
    pub snapshots: SnapshotsField,
    /// The persistent dirty bitmaps' directory, if any (v3 only): written as
    /// the bitmaps extension, with the autoclear bit that vouches for it.
    pub bitmaps: Option<BitmapsExtension>,
}

/// The header's snapshot count and table offset (none for a new image).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotsField {
    pub count: u32,
    pub offset: u64,
}

impl Header<'_> {
    /// Encodes the whole first cluster (header, extensions, backing name, zero fill).
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(1024);
        let v3 = self.compat == Compat::V3;
        let l1_entries = u32::try_from(self.l1_entries)
            .map_err(|_| Error::TooLarge("L1 table too large".into()))?;
        let reftable_clusters = u32::try_from(self.reftable_clusters)
            .map_err(|_| Error::TooLarge("Refcount table too large".into()))?;

        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.compat.version().to_be_bytes());
        out.extend_from_slice(&0u64.to_be_bytes()); // backing_file_offset, patched below
        out.extend_from_slice(&0u32.to_be_bytes()); // backing_file_size, patched below
        out.extend_from_slice(&self.cluster_size.bits().to_be_bytes());
        out.extend_from_slice(&self.virtual_size.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes()); // crypt_method: none
        out.extend_from_slice(&l1_entries.to_be_bytes());
        out.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&self.reftable_offset.to_be_bytes());
        out.extend_from_slice(&reftable_clusters.to_be_bytes());
        out.extend_from_slice(&self.snapshots.count.to_be_bytes());
        out.extend_from_slice(&self.snapshots.offset.to_be_bytes());
        debug_assert_eq!(out.len(), V2_HEADER_LEN);

        if v3 {
            let mut incompatible = 0u64;
            if self.compression != CompressionType::Zlib {
                incompatible |= INCOMPAT_COMPRESSION;
            }
            if self.extended_l2 {
                incompatible |= INCOMPAT_EXTL2;
            }
            let compatible = if self.lazy_refcounts {
                COMPAT_LAZY_REFCOUNTS
            } else {
                0
            };
            out.extend_from_slice(&incompatible.to_be_bytes());
            out.extend_from_slice(&compatible.to_be_bytes());
            let autoclear = if self.bitmaps.is_some() {
                AUTOCLEAR_BITMAPS
            } else {
                0
            };
            out.extend_from_slice(&autoclear.to_be_bytes());
            out.extend_from_slice(&self.refcount_order.order().to_be_bytes());
            out.extend_from_slice(&(V3_HEADER_LEN as u32).to_be_bytes());
            out.push(self.compression.code());
            out.resize(V3_HEADER_LEN, 0);
        }

        if let Some(format) = self.backing_format {
            push_extension(&mut out, EXT_BACKING_FORMAT, format.as_bytes());
        }
        // QEMU publishes the feature names only where a cluster leaves room
        // for them comfortably (v3, clusters above 4 KiB); do the same so
        // headers match byte for byte.
        if v3 && self.cluster_size.bytes() > 4096 {
            let mut table = Vec::with_capacity(FEATURE_NAMES.len() * FEATURE_ENTRY_LEN);
            for (kind, bit, name) in FEATURE_NAMES {
                let mut entry = [0u8; FEATURE_ENTRY_LEN];
                entry[0] = kind;
                entry[1] = bit;
                entry[2..2 + name.len()].copy_from_slice(name.as_bytes());
                table.extend_from_slice(&entry);
            }
            push_extension(&mut out, EXT_FEATURE_TABLE, &table);
        }
        if let (true, Some(b)) = (v3, &self.bitmaps) {
            let mut data = b.count.to_be_bytes().to_vec();
            data.extend_from_slice(&0u32.to_be_bytes());
            data.extend_from_slice(&b.directory_size.to_be_bytes());
            data.extend_from_slice(&b.directory_offset.to_be_bytes());
            push_extension(&mut out, EXT_BITMAPS, &data);
        }
        push_extension(&mut out, EXT_END, &[]);

        if let Some(name) = self.backing_file {
            if name.len() > MAX_BACKING_NAME {
                return Err(Error::invalid(format!(
                    "Backing file name too long: {} bytes (qcow2 allows at most {MAX_BACKING_NAME})",
                    name.len()
                )));
            }
            let offset = out.len() as u64;
            out[8..16].copy_from_slice(&offset.to_be_bytes());
            out[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            out.extend_from_slice(name.as_bytes());
        }

        let cs = self.cluster_size.bytes() as usize;
        if out.len() > cs {
            return Err(Error::invalid(format!(
                "The header, its extensions and the backing file name need {} bytes, \
                 more than one {cs}-byte cluster; use a larger cluster size or a shorter name",
                out.len()
            )));
        }
        out.resize(cs, 0);
        Ok(out)
    }
}

fn push_extension(out: &mut Vec<u8>, kind: u32, data: &[u8]) {
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(8), 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Header<'static> {
        Header {
            compat: Compat::V3,
            cluster_size: ClusterSize::DEFAULT,
            virtual_size: 64 << 20,
            l1_entries: 1,
            l1_table_offset: 0x30000,
            reftable_offset: 0x10000,
            reftable_clusters: 1,
            refcount_order: RefcountOrder::DEFAULT,
            lazy_refcounts: false,
            extended_l2: false,
            compression: CompressionType::Zlib,
            backing_file: None,
            backing_format: None,
            snapshots: SnapshotsField::default(),
            bitmaps: None,
        }
    }

    fn be32(b: &[u8], at: usize) -> u32 {
        u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    #[test]
    fn v3_header_has_feature_table_then_end_marker() {
        let h = base().encode().expect("encode");
        assert_eq!(h.len(), 65536);
        assert_eq!(&h[0..4], b"QFI\xfb");
        assert_eq!(be32(&h, 100), 112);
        assert_eq!(be32(&h, 112), EXT_FEATURE_TABLE);
        assert_eq!(be32(&h, 116), 384);
        assert_eq!(&h[122..131], b"dirty bit");
        assert_eq!(be32(&h, 112 + 8 + 384), EXT_END);
    }

    #[test]
    fn backing_name_follows_the_end_marker() {
        let mut hdr = base();
        hdr.backing_file = Some("t.qcow2");
        hdr.backing_format = Some("qcow2");
        let h = hdr.encode().expect("encode");
        // Backing format extension (16 bytes), feature table (392), end (8) -> 0x210.
        assert_eq!(be32(&h, 112), EXT_BACKING_FORMAT);
        assert_eq!(
            u64::from_be_bytes(h[8..16].try_into().expect("8 bytes")),
            0x210
        );
        assert_eq!(be32(&h, 16), 7);
        assert_eq!(&h[0x210..0x217], b"t.qcow2");
    }

    #[test]
    fn v2_header_is_72_bytes_without_feature_table() {
        let mut hdr = base();
        hdr.compat = Compat::V2;
        let h = hdr.encode().expect("encode");
        assert_eq!(be32(&h, 4), 2);
        assert!(h[72..].iter().all(|b| *b == 0));
    }

    #[test]
    fn header_that_does_not_fit_the_cluster_is_refused() {
        let mut hdr = base();
        hdr.cluster_size = ClusterSize::new(512).expect("cs");
        let name = "x".repeat(500);
        hdr.backing_file = Some(&name);
        assert!(hdr.encode().is_err());
    }
}
