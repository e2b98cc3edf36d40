//! The directory of persistent dirty bitmaps (the read side): the bitmaps
//! `info` lists. Every field comes from the file and is bounded before use.

use super::image_header::BitmapsExtension;
use crate::block::{BlockDev, FileNode};
use crate::error::{Error, Result};

/// Most bitmaps an image may hold, and so most directory bytes (QEMU's limits).
pub const MAX_BITMAPS: u32 = 65535;
pub const MAX_DIRECTORY_BYTES: u64 = 1024 * MAX_BITMAPS as u64;
/// Longest bitmap name, in bytes.
pub const MAX_NAME_BYTES: usize = 1023;
/// Granularities run from 512 bytes to 2 GiB.
const GRANULARITY_BITS: std::ops::RangeInclusive<u8> = 9..=31;
/// Bytes of a directory entry before its extra data and name.
const ENTRY_HEAD: usize = 24;
const FLAG_IN_USE: u32 = 1;
const FLAG_AUTO: u32 = 2;

/// One bitmap as the directory describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    pub name: String,
    pub granularity: u64,
    /// Left in use by a writer that did not close the image: its bits are stale.
    pub in_use: bool,
    /// Follows guest writes while enabled.
    pub auto: bool,
}

/// The bitmaps the directory of `ext` lists, in directory order.
pub fn read_bitmap_directory(file: &FileNode, ext: &BitmapsExtension) -> Result<Vec<BitmapInfo>> {
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
    let mut out = Vec::with_capacity(ext.count as usize);
    let mut at = 0usize;
    for index in 0..ext.count {
        let head = raw
            .get(at..at + ENTRY_HEAD)
            .ok_or_else(|| bad(format!("entry {index} lies past the directory's end")))?;
        let be32 = |i: usize| u32::from_be_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
        let flags = be32(12);
        let granularity_bits = head[17];
        let name_len = usize::from(u16::from_be_bytes([head[18], head[19]]));
        let extra_len = be32(20) as usize;
        if !GRANULARITY_BITS.contains(&granularity_bits) {
            return Err(bad(format!(
                "entry {index} has granularity 2^{granularity_bits} (2^9 to 2^31 are valid)"
            )));
        }
        if name_len > MAX_NAME_BYTES {
            return Err(bad(format!(
                "entry {index} has a {name_len}-byte name (at most {MAX_NAME_BYTES})"
            )));
        }
        let name_at = at.saturating_add(ENTRY_HEAD).saturating_add(extra_len);
        let name = raw
            .get(name_at..name_at.saturating_add(name_len))
            .ok_or_else(|| bad(format!("entry {index} lies past the directory's end")))?;
        out.push(BitmapInfo {
            name: String::from_utf8_lossy(name).into_owned(),
            granularity: 1u64 << granularity_bits,
            in_use: flags & FLAG_IN_USE != 0,
            auto: flags & FLAG_AUTO != 0,
        });
        at = (name_at + name_len).next_multiple_of(8);
    }
    Ok(out)
}
