//! Reading the header of an existing qcow2 image.
//!
//! The header comes from a file the user may have downloaded from anywhere,
//! so every field is checked against the format's limits and against the
//! file length before anything is sized or sought by it. The result is a
//! [`Header`] whose fields can be trusted by the reader.
//! Every field is read through [`Fields`], which bounds each read.
#![deny(clippy::indexing_slicing)]

use super::{BitmapsExtension, FeatureKind, FeatureName, Header};
use crate::qcow2::bytes::Fields;
use crate::qcow2::format::{
    EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_END, EXT_FEATURE_TABLE, INCOMPAT_COMPRESSION,
    INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, INCOMPAT_EXTL2, MAGIC, MAX_BACKING_NAME,
    MAX_L1_BYTES, MAX_REFTABLE_BYTES, MAX_SNAPSHOTS, V2_HEADER_LEN,
};
use crate::qcow2::types::{ClusterSize, Compat, CompressionType, RefcountOrder};

use crate::block::FileNode;
use crate::error::{Error, Result};

/// Incompatible feature bits qimg knows how to read.
const KNOWN_INCOMPAT: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

/// Header extension payloads larger than this are not plausible.
const MAX_EXTENSION_LEN: u64 = 1 << 20;

impl Header {
    /// Parses and validates the header in `head` (at least the first cluster,
    /// or the whole file if shorter) of a file of `file_len` bytes.
    pub fn parse(head: &[u8], file_len: u64) -> Result<Header> {
        let bad = |msg: String| Err(Error::InvalidImage(msg));
        let f = Fields::new(head, "the qcow2 header");
        if head.len() < V2_HEADER_LEN || f.slice(0, 4)? != MAGIC {
            return bad("Image is not in qcow2 format".into());
        }
        let version = f.u32(4)?;
        let compat = match version {
            2 => Compat::V2,
            3 => Compat::V3,
            v => return bad(format!("Unsupported qcow2 version {v}")),
        };
        let cluster_size = ClusterSize::from_bits(f.u32(20)?)?;
        let cs = cluster_size.bytes();
        if head.len() < V2_HEADER_LEN {
            return bad("qcow2 header is truncated".into());
        }

        let (incompatible, compatible, autoclear, refcount_order, header_length, compression_byte) =
            if compat == Compat::V3 {
                if head.len() < 104 {
                    return bad("qcow2 header is truncated".into());
                }
                let header_length = u64::from(f.u32(100)?);
                if header_length < 104 {
                    return bad(format!(
                        "qcow2 header too short: header_length is {header_length}, v3 needs at least 104"
                    ));
                }
                if header_length > cs || header_length % 8 != 0 {
                    return bad(format!(
                        "Invalid qcow2 header_length {header_length} (must be a multiple of 8 within the first cluster)"
                    ));
                }
                if header_length as usize > head.len() {
                    return bad("qcow2 header is truncated".into());
                }
                let order = f.u32(96)?;
                let order = RefcountOrder::from_order(order).map_err(|_| {
                    Error::InvalidImage(format!(
                        "Unsupported refcount order {order} (refcount_bits {}); qcow2 allows at most 64-bit refcounts",
                        if order < 64 { (1u128 << order).to_string() } else { "2^".to_string() + &order.to_string() }
                    ))
                })?;
                let compression_byte = if header_length > 104 { f.u8(104)? } else { 0 };
                (
                    f.u64(72)?,
                    f.u64(80)?,
                    f.u64(88)?,
                    order,
                    header_length,
                    compression_byte,
                )
            } else {
                (0, 0, 0, RefcountOrder::DEFAULT, V2_HEADER_LEN as u64, 0)
            };

        let crypt_method = f.u32(32)?;
        if crypt_method != 0 {
            return bad(format!(
                "Encrypted qcow2 images (crypt_method {crypt_method}) are not supported by qimg yet"
            ));
        }

        // Extensions first: the feature name table names unknown bits.
        let ext_end = if compat == Compat::V3 {
            header_length
        } else {
            V2_HEADER_LEN as u64
        };
        let backing_offset = f.u64(8)?;
        let backing_len = u64::from(f.u32(16)?);
        let mut ext = Extensions::default();
        let ext_limit = if backing_offset != 0 {
            backing_offset.min(cs)
        } else {
            cs
        };
        parse_extensions(f, ext_end, ext_limit.min(head.len() as u64), &mut ext)?;

        let unknown = incompatible & !KNOWN_INCOMPAT;
        if unknown != 0 {
            let mut names = Vec::new();
            for bit in 0..64u8 {
                if unknown & (1u64 << bit) == 0 {
                    continue;
                }
                match ext
                    .feature_names
                    .iter()
                    .find(|f| f.kind == FeatureKind::Incompatible && f.bit == bit)
                {
                    Some(f) => names.push(f.name.clone()),
                    None => names.push(format!("unknown incompatible feature bit {bit}")),
                }
            }
            return bad(format!(
                "Unsupported qcow2 feature(s): {}; this image needs a newer tool",
                names.join(", ")
            ));
        }
        if incompatible & INCOMPAT_DATA_FILE != 0 {
            return bad(
                "qcow2 images with an external data file are not supported by qimg yet".into(),
            );
        }
        let compression = match compression_byte {
            0 => CompressionType::Zlib,
            1 => CompressionType::Zstd,
            n => return bad(format!("Unknown compression type {n} in the qcow2 header")),
        };
        if (incompatible & INCOMPAT_COMPRESSION != 0) != (compression_byte != 0) {
            return bad(format!(
                "Invalid compression type setting: the compression type bit is {} but the type is {}",
                if incompatible & INCOMPAT_COMPRESSION != 0 { "set" } else { "clear" },
                compression.name()
            ));
        }
        if incompatible & INCOMPAT_EXTL2 != 0 && cs < 16384 {
            return bad(format!(
                "Extended L2 entries need clusters of at least 16384 bytes; this image has {cs}"
            ));
        }

        let backing_file = if backing_offset != 0 {
            if backing_len as usize > MAX_BACKING_NAME
                || backing_offset > cs
                || backing_offset + backing_len > cs
                || backing_offset + backing_len > head.len() as u64
            {
                return bad(format!(
                    "Invalid backing file name: {backing_len} bytes at offset {backing_offset} do not fit the header cluster"
                ));
            }
            let raw = f.slice(backing_offset, backing_len)?;
            // Like QEMU, the name ends at a NUL byte; an empty name means none.
            let raw = raw.split(|b| *b == 0).next().unwrap_or_default();
            (!raw.is_empty()).then(|| String::from_utf8_lossy(raw).into_owned())
        } else {
            None
        };

        let virtual_size = f.u64(24)?;
        if virtual_size > i64::MAX as u64 {
            return bad(format!("Image size {virtual_size} is too large"));
        }

        let l1_entries = u64::from(f.u32(36)?);
        let l1_table_offset = f.u64(40)?;
        check_table(
            "L1 table",
            l1_table_offset,
            l1_entries,
            8,
            MAX_L1_BYTES,
            cs,
            file_len,
        )?;

        let reftable_offset = f.u64(48)?;
        let reftable_clusters = u64::from(f.u32(56)?);
        if reftable_clusters == 0 {
            return bad("Image does not contain a reference count table".into());
        }
        check_table(
            "Reference count table",
            reftable_offset,
            reftable_clusters * (cs / 8),
            8,
            MAX_REFTABLE_BYTES,
            cs,
            file_len,
        )?;

        let snapshot_count = f.u32(60)?;
        let snapshots_offset = f.u64(64)?;
        if snapshot_count > MAX_SNAPSHOTS {
            return bad(format!(
                "Snapshot table has {snapshot_count} entries; qcow2 allows at most {MAX_SNAPSHOTS}"
            ));
        }
        if snapshot_count > 0 {
            // Each entry is at least 40 bytes. As in QEMU, a table that reaches
            // past the end of the file opens (the missing part reads as
            // zeroes): `check` reports its entries, `info` lists them.
            check_table(
                "Snapshot table",
                snapshots_offset,
                u64::from(snapshot_count),
                40,
                u64::from(MAX_SNAPSHOTS) * 1024,
                cs,
                i64::MAX as u64,
            )?;
        }

        let header = Header {
            compat,
            cluster_size,
            virtual_size,
            backing_file,
            backing_format: ext.backing_format,
            l1_entries,
            l1_table_offset,
            reftable_offset,
            reftable_clusters,
            snapshot_count,
            snapshots_offset,
            incompatible,
            compatible,
            autoclear,
            refcount_order,
            header_length,
            compression,
            feature_names: ext.feature_names,
            bitmaps: ext.bitmaps,
            unknown_extensions: ext.unknown,
        };
        if header.l1_entries < header.l1_entries_needed() {
            return bad(format!(
                "L1 table is too small: {} entries do not map the virtual size of {virtual_size} bytes (it needs {})",
                header.l1_entries,
                header.l1_entries_needed()
            ));
        }
        Ok(header)
    }
}

#[derive(Default)]
struct Extensions {
    backing_format: Option<String>,
    feature_names: Vec<FeatureName>,
    bitmaps: Option<BitmapsExtension>,
    unknown: Vec<u32>,
}

/// The start of an image: its first cluster when it looks like qcow2 (the
/// header and its extensions live there), else its first 4 KiB, which is
/// enough to probe any format. Reading no more keeps a blkdebug rule on a
/// data sector away from the header's read, as in QEMU.
pub fn read_head(file: &FileNode) -> Result<Vec<u8>> {
    let mut head = file.probe_head()?;
    let fields = Fields::new(&head, "the image's first bytes");
    let bits = match (fields.slice(0, 4), fields.u32(20)) {
        (Ok(magic), Ok(bits)) if magic == MAGIC => bits,
        _ => return Ok(head),
    };
    // An invalid size is the header parser's to report; read what is there.
    let cluster = 1u64 << bits.clamp(ClusterSize::MIN_BITS, ClusterSize::MAX_BITS);
    let want = file.file_len().min(cluster.max(FileNode::PROBE_LEN));
    let have = head.len() as u64;
    if want > have {
        let mut more = vec![0u8; (want - have) as usize];
        file.pread(&mut more, have)?;
        head.extend_from_slice(&more);
    }
    Ok(head)
}

fn parse_extensions(f: Fields<'_>, start: u64, limit: u64, out: &mut Extensions) -> Result<()> {
    let bad = |msg: &str| {
        Err(Error::InvalidImage(format!(
            "Invalid header extension: {msg}"
        )))
    };
    let mut at = start;
    loop {
        if at + 8 > limit {
            // No room for another extension header: treat as the end marker,
            // as QEMU does when the extensions run into the backing name.
            return Ok(());
        }
        let kind = f.u32(at)?;
        let len = u64::from(f.u32(at + 4)?);
        at += 8;
        if kind == EXT_END {
            return Ok(());
        }
        if len > MAX_EXTENSION_LEN || at + len > limit {
            return bad(&format!(
                "extension {kind:#010x} of {len} bytes runs past the end of the header cluster"
            ));
        }
        let data = f.slice(at, len)?;
        match kind {
            EXT_BACKING_FORMAT => {
                out.backing_format = Some(String::from_utf8_lossy(data).into_owned());
            }
            EXT_FEATURE_TABLE => {
                for entry in data.chunks_exact(48) {
                    let entry = Fields::new(entry, "a feature name table entry");
                    let Some(kind) = FeatureKind::from_code(entry.u8(0)?) else {
                        continue;
                    };
                    // The name ends at its first NUL byte.
                    let name = entry.rest(2)?.split(|b| *b == 0).next().unwrap_or_default();
                    out.feature_names.push(FeatureName {
                        kind,
                        bit: entry.u8(1)?,
                        name: String::from_utf8_lossy(name).into_owned(),
                    });
                }
            }
            EXT_BITMAPS => {
                if data.len() < 24 {
                    return bad("bitmaps extension is shorter than 24 bytes");
                }
                let data = Fields::new(data, "the bitmaps extension");
                out.bitmaps = Some(BitmapsExtension {
                    count: data.u32(0)?,
                    directory_size: data.u64(8)?,
                    directory_offset: data.u64(16)?,
                });
            }
            other => out.unknown.push(other),
        }
        at += len.next_multiple_of(8);
    }
}

/// Checks that a table of `entries` x `entry_len` bytes at `offset` is
/// cluster aligned, within `max_bytes`, and inside the file.
fn check_table(
    name: &str,
    offset: u64,
    entries: u64,
    entry_len: u64,
    max_bytes: u64,
    cs: u64,
    file_len: u64,
) -> Result<()> {
    if entries > max_bytes / entry_len {
        return Err(Error::InvalidImage(format!(
            "{name} too large: {entries} entries (at most {} allowed)",
            max_bytes / entry_len
        )));
    }
    if entries == 0 {
        return Ok(());
    }
    if offset % cs != 0 {
        return Err(Error::InvalidImage(format!(
            "{name} offset {offset:#x} is not cluster aligned"
        )));
    }
    let bytes = entries * entry_len;
    if offset.checked_add(bytes).is_none_or(|end| end > file_len) {
        return Err(Error::InvalidImage(format!(
            "{name} at offset {offset:#x} ({bytes} bytes) lies beyond the end of the file ({file_len} bytes)"
        )));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // Tests build images by hand.
mod tests {
    use super::*;

    fn image() -> Vec<u8> {
        let mut hdr = Header {
            virtual_size: 64 << 20,
            l1_entries: 1,
            l1_table_offset: 0x30000,
            reftable_offset: 0x10000,
            reftable_clusters: 1,
            backing_file: Some("base.img".into()),
            backing_format: Some("raw".into()),
            ..Header::default()
        };
        hdr.declare_features(true, false);
        hdr.encode().expect("encode")
    }

    const LEN: u64 = 0x40000;

    #[test]
    fn reads_back_what_the_encoder_wrote() {
        let h = Header::parse(&image(), LEN).expect("parse");
        assert_eq!(h.compat, Compat::V3);
        assert_eq!(h.virtual_size, 64 << 20);
        assert_eq!(h.backing_file.as_deref(), Some("base.img"));
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
        assert!(h.lazy_refcounts());
        assert_eq!(h.feature_names.len(), 8);
        assert_eq!(h.l1_entries_needed(), 1);
    }

    #[test]
    fn unknown_incompatible_bits_are_refused_by_name() {
        let mut img = image();
        img[72..80].copy_from_slice(&((1u64 << 40) | (1 << 20)).to_be_bytes());
        let err = Header::parse(&img, LEN).expect_err("refused");
        assert!(err.to_string().contains("bit 20"), "{err}");
        assert!(err.to_string().contains("bit 40"), "{err}");
    }

    #[test]
    fn tables_beyond_the_file_are_refused() {
        let img = image();
        assert!(Header::parse(&img, 0x30004).is_err());
        let mut huge = image();
        huge[36..40].copy_from_slice(&u32::MAX.to_be_bytes());
        let err = Header::parse(&huge, LEN).expect_err("refused");
        assert!(err.to_string().contains("L1 table too large"), "{err}");
    }

    #[test]
    fn refcount_order_above_six_is_refused() {
        let mut img = image();
        img[96..100].copy_from_slice(&7u32.to_be_bytes());
        assert!(Header::parse(&img, LEN).is_err());
    }

    #[test]
    fn every_truncation_of_a_header_is_an_error_not_a_panic() {
        let img = image();
        for cut in 0..1024 {
            let _ = Header::parse(&img[..cut], LEN);
        }
    }
}
