//! The directory of persistent dirty bitmaps: its entries, read from the file
//! with every count, size, offset and length bounded before use. `info` lists
//! the bitmaps from it; `check` counts their tables and data.
#![deny(clippy::indexing_slicing)]

use super::bytes::Fields;
use super::format::{BITMAP_FLAG_AUTO, BITMAP_FLAG_IN_USE};
use super::header::BitmapsExtension;
use crate::block::{BlockDev, FileNode};
use crate::error::{Error, Result};

/// Most bitmaps an image may hold, and so most directory bytes (QEMU's limits).
pub const MAX_BITMAPS: u32 = 65535;
pub const MAX_DIRECTORY_BYTES: u64 = 1024 * MAX_BITMAPS as u64;
/// Longest bitmap name, in bytes.
pub const MAX_NAME_BYTES: usize = 1023;
/// Granularities run from 512 bytes to 2 GiB.
pub const GRANULARITY_BITS: std::ops::RangeInclusive<u8> = 9..=31;
/// Bytes of a directory entry before its extra data and name.
const ENTRY_HEAD: usize = 24;

/// One entry of the bitmap directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub table_offset: u64,
    pub table_entries: u64,
    pub flags: u32,
    pub kind: u8,
    pub granularity_bits: u8,
    pub extra_len: u64,
    pub name: String,
    /// The extra data as stored (written back unchanged).
    pub extra: Vec<u8>,
}

/// One bitmap as `info` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    pub name: String,
    pub granularity: u64,
    /// Left in use by a writer that did not close the image: its bits are stale.
    pub in_use: bool,
    /// Follows guest writes while enabled.
    pub auto: bool,
}

/// The `count` entries of the directory bytes `dir`, or what is malformed:
/// an entry that does not fit, a name or granularity out of range, or a
/// count that does not match the entries the directory holds.
pub fn parse_directory(dir: &[u8], count: u32) -> std::result::Result<Vec<DirEntry>, String> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < dir.len() {
        let index = out.len();
        if index >= count as usize {
            return Err(format!(
                "it holds more than the {count} entries the header says"
            ));
        }
        let past = || format!("entry {index} lies past the directory's end");
        let head = dir.get(at..at + ENTRY_HEAD).ok_or_else(past)?;
        // Every field lies inside the ENTRY_HEAD bytes just taken.
        let head = Fields::new(head, "a bitmap directory entry");
        let field = |e: Error| e.to_string();
        let name_len = usize::from(head.u16(18).map_err(field)?);
        let granularity_bits = head.u8(17).map_err(field)?;
        if name_len > MAX_NAME_BYTES {
            return Err(format!(
                "entry {index} has a {name_len}-byte name (at most {MAX_NAME_BYTES})"
            ));
        }
        if !GRANULARITY_BITS.contains(&granularity_bits) {
            return Err(format!(
                "entry {index} has granularity 2^{granularity_bits} (2^9 to 2^31 are valid)"
            ));
        }
        let extra_len = head.u32(20).map_err(field)? as usize;
        let name_at = at.saturating_add(ENTRY_HEAD).saturating_add(extra_len);
        let name = dir
            .get(name_at..name_at.saturating_add(name_len))
            .ok_or_else(past)?;
        let extra = dir.get(at + ENTRY_HEAD..name_at).ok_or_else(past)?.to_vec();
        let end = (name_at + name_len).next_multiple_of(8);
        if end > dir.len() {
            return Err(past());
        }
        out.push(DirEntry {
            table_offset: head.u64(0).map_err(field)?,
            table_entries: u64::from(head.u32(8).map_err(field)?),
            flags: head.u32(12).map_err(field)?,
            kind: head.u8(16).map_err(field)?,
            granularity_bits,
            extra_len: extra_len as u64,
            name: String::from_utf8_lossy(name).into_owned(),
            extra,
        });
        at = end;
    }
    if out.len() != count as usize {
        return Err(format!(
            "it holds {} entries, the header says {count}",
            out.len()
        ));
    }
    Ok(out)
}

/// The directory as stored: each entry's fixed part, extra data and name,
/// padded to 8 bytes.
pub fn encode_directory(entries: &[DirEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        out.extend_from_slice(&e.table_offset.to_be_bytes());
        out.extend_from_slice(&(e.table_entries as u32).to_be_bytes());
        out.extend_from_slice(&e.flags.to_be_bytes());
        out.push(e.kind);
        out.push(e.granularity_bits);
        out.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&(e.extra.len() as u32).to_be_bytes());
        out.extend_from_slice(&e.extra);
        out.extend_from_slice(e.name.as_bytes());
        out.resize(out.len().next_multiple_of(8), 0);
    }
    out
}

/// Bits a bitmap of granularity 2^`granularity_bits` has for a disk of
/// `size` bytes, and the bitmap table entries (clusters of bits) they take.
pub fn bitmap_shape(size: u64, granularity_bits: u8, cluster: u64) -> (u64, u64) {
    let bits = size.div_ceil(1u64 << granularity_bits);
    (bits, bits.div_ceil(cluster * 8))
}

/// The directory of `ext`, read from `file` once its place is checked.
pub fn read_directory(file: &FileNode, ext: &BitmapsExtension) -> Result<Vec<DirEntry>> {
    let bad = |msg: String| {
        Error::InvalidImage(format!(
            "Corrupt qcow2 image '{}': bitmap directory: {msg}",
            file.filename()
        ))
    };
    if ext.count > MAX_BITMAPS {
        return Err(bad(format!(
            "{} bitmaps (at most {MAX_BITMAPS})",
            ext.count
        )));
    }
    if ext.directory_size > MAX_DIRECTORY_BYTES {
        return Err(bad(format!(
            "{} bytes (at most {MAX_DIRECTORY_BYTES})",
            ext.directory_size
        )));
    }
    let end = ext.directory_offset.checked_add(ext.directory_size);
    if end.is_none_or(|e| e > file.file_len()) {
        return Err(bad(format!(
            "{} bytes at offset {} lie past the end of the file",
            ext.directory_size, ext.directory_offset
        )));
    }
    let mut raw = vec![0u8; ext.directory_size as usize];
    file.pread(&mut raw, ext.directory_offset)?;
    parse_directory(&raw, ext.count).map_err(bad)
}

/// The bitmaps `info` lists for `ext`, in directory order.
pub fn read_bitmap_directory(file: &FileNode, ext: &BitmapsExtension) -> Result<Vec<BitmapInfo>> {
    Ok(read_directory(file, ext)?
        .into_iter()
        .map(|e| BitmapInfo {
            granularity: 1u64 << e.granularity_bits,
            in_use: e.flags & BITMAP_FLAG_IN_USE != 0,
            auto: e.flags & BITMAP_FLAG_AUTO != 0,
            name: e.name,
        })
        .collect())
}
