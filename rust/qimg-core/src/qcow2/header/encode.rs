//! Encoding a header cluster: fixed header fields, header extensions and
//! the backing file name, laid out exactly as QEMU writes them so that
//! images are interchangeable byte for byte.

use super::{FeatureKind, Header};
use crate::error::{Error, Result};
use crate::qcow2::format::{
    AUTOCLEAR_BITMAPS, COMPAT_LAZY_REFCOUNTS, EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_END,
    EXT_FEATURE_TABLE, INCOMPAT_COMPRESSION, INCOMPAT_EXTL2, MAGIC, MAX_BACKING_NAME,
    V2_HEADER_LEN, V3_HEADER_LEN,
};
use crate::qcow2::types::{Compat, CompressionType};

/// Names of the feature bits, published in the header so that tools that do
/// not know a bit can still name it.
const FEATURE_NAMES: [(FeatureKind, u8, &str); 8] = [
    (FeatureKind::Incompatible, 0, "dirty bit"),
    (FeatureKind::Incompatible, 1, "corrupt bit"),
    (FeatureKind::Incompatible, 2, "external data file"),
    (FeatureKind::Incompatible, 3, "compression type"),
    (FeatureKind::Incompatible, 4, "extended L2 entries"),
    (FeatureKind::Compatible, 0, "lazy refcounts"),
    (FeatureKind::Autoclear, 0, "bitmaps"),
    (FeatureKind::Autoclear, 1, "raw external data"),
];
const FEATURE_ENTRY_LEN: usize = 48;

impl Header {
    /// Sets the feature bits to those of a header qimg writes: the
    /// compression type bit for a type other than zlib, extended L2
    /// entries, lazy refcounts, and the autoclear bit that vouches for the
    /// bitmaps extension. Every other bit (dirty, corrupt, unknown ones) is
    /// cleared; a v2 header has no feature bits.
    pub fn declare_features(&mut self, lazy_refcounts: bool, extended_l2: bool) {
        let v3 = self.compat == Compat::V3;
        let bit = |on: bool, bit: u64| if v3 && on { bit } else { 0 };
        self.incompatible = bit(
            self.compression != CompressionType::Zlib,
            INCOMPAT_COMPRESSION,
        ) | bit(extended_l2, INCOMPAT_EXTL2);
        self.compatible = bit(lazy_refcounts, COMPAT_LAZY_REFCOUNTS);
        self.autoclear = bit(self.bitmaps.is_some(), AUTOCLEAR_BITMAPS);
    }

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
        out.extend_from_slice(&self.snapshot_count.to_be_bytes());
        out.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        debug_assert_eq!(out.len(), V2_HEADER_LEN);

        if v3 {
            out.extend_from_slice(&self.incompatible.to_be_bytes());
            out.extend_from_slice(&self.compatible.to_be_bytes());
            out.extend_from_slice(&self.autoclear.to_be_bytes());
            out.extend_from_slice(&self.refcount_order.order().to_be_bytes());
            out.extend_from_slice(&(V3_HEADER_LEN as u32).to_be_bytes());
            out.push(self.compression.code());
            out.resize(V3_HEADER_LEN, 0);
        }

        if let Some(format) = &self.backing_format {
            push_extension(&mut out, EXT_BACKING_FORMAT, format.as_bytes());
        }
        // QEMU publishes the feature names only where a cluster leaves room
        // for them comfortably (v3, clusters above 4 KiB); do the same so
        // headers match byte for byte.
        if v3 && self.cluster_size.bytes() > 4096 {
            let mut table = Vec::with_capacity(FEATURE_NAMES.len() * FEATURE_ENTRY_LEN);
            for (kind, bit, name) in FEATURE_NAMES {
                let mut entry = [0u8; FEATURE_ENTRY_LEN];
                entry[0] = kind.code();
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

        if let Some(name) = &self.backing_file {
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
    use crate::qcow2::types::ClusterSize;

    fn base() -> Header {
        Header {
            virtual_size: 64 << 20,
            l1_entries: 1,
            l1_table_offset: 0x30000,
            reftable_offset: 0x10000,
            reftable_clusters: 1,
            ..Header::default()
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
        hdr.backing_file = Some("t.qcow2".into());
        hdr.backing_format = Some("qcow2".into());
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
    fn a_parsed_header_encodes_to_the_same_bytes() {
        let mut hdr = base();
        hdr.backing_file = Some("base.img".into());
        hdr.backing_format = Some("raw".into());
        hdr.compression = CompressionType::Zstd;
        hdr.snapshot_count = 2;
        hdr.snapshots_offset = 0x40000;
        hdr.declare_features(true, true);
        let bytes = hdr.encode().expect("encode");
        let mut back = Header::parse(&bytes, 0x50000).expect("parse");
        assert!(back.lazy_refcounts() && back.extended_l2());
        assert_eq!(back.compression, CompressionType::Zstd);
        assert_eq!(
            back.feature_names
                .iter()
                .map(|f| (f.kind, f.bit, f.name.as_str()))
                .collect::<Vec<_>>(),
            FEATURE_NAMES.to_vec()
        );
        back.declare_features(back.lazy_refcounts(), back.extended_l2());
        assert_eq!(back.encode().expect("encode again"), bytes);
    }

    #[test]
    fn declared_features_drop_dirty_corrupt_and_unknown_bits() {
        let mut hdr = base();
        hdr.incompatible = u64::MAX;
        hdr.compatible = u64::MAX;
        hdr.autoclear = u64::MAX;
        hdr.declare_features(false, false);
        assert_eq!((hdr.incompatible, hdr.compatible, hdr.autoclear), (0, 0, 0));
        hdr.compat = Compat::V2;
        hdr.compression = CompressionType::Zstd;
        hdr.declare_features(true, true);
        assert_eq!((hdr.incompatible, hdr.compatible, hdr.autoclear), (0, 0, 0));
    }

    #[test]
    fn header_that_does_not_fit_the_cluster_is_refused() {
        let mut hdr = base();
        hdr.cluster_size = ClusterSize::new(512).expect("cs");
        let name = "x".repeat(500);
        hdr.backing_file = Some(name);
        assert!(hdr.encode().is_err());
    }
}
