//! The internal snapshot table of a qcow2 image: one parser for `info`,
//! `check` and the snapshot commands, bounded as QEMU bounds the table, and
//! the encoder the snapshot commands write a new table with.

use super::image_header::{be16, be32, be64, ImageHeader};
use crate::block::{BlockDev, FileNode};
use crate::error::{Error, Result};

/// Fixed part of a snapshot table entry.
const ENTRY_FIXED: u64 = 40;
/// Largest extra-data area QEMU accepts per entry.
const MAX_EXTRA: u64 = 1024;
/// Largest whole snapshot table QEMU accepts (1 KiB for each of 65536 snapshots).
const MAX_TABLE_BYTES: u64 = 1024 * 65536;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub id: String,
    pub name: String,
    pub l1_table_offset: u64,
    pub l1_entries: u64,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    /// Guest instruction count at the snapshot, when recorded.
    pub icount: Option<u64>,
    /// Virtual disk size at the snapshot, when recorded.
    pub disk_size: Option<u64>,
    /// Bytes of extra data in the entry (v3 requires at least 16).
    pub extra_data_size: u64,
    /// The extra data as stored (rewritten unchanged when the table is).
    pub extra: Vec<u8>,
}

/// The table as read: its entries and the bytes it spans in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotTable {
    pub snapshots: Vec<Snapshot>,
    pub byte_len: u64,
}

/// Why the table could not be read.
#[derive(Debug)]
pub enum TableError {
    /// Entry `index` has more extra data than QEMU accepts.
    TooMuchExtra { index: u64 },
    /// The table outgrows QEMU's limit; `overhanging` entries do not fit.
    TooBig { overhanging: u64 },
    /// Reading the file failed.
    Read(Error),
}

/// A C string field: the bytes up to the first NUL.
fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Reads every entry as QEMU does: bytes past the end of the file read as
/// zeroes, and only the per-entry and whole-table limits end the read.
pub fn read_table(
    file: &FileNode,
    header: &ImageHeader,
) -> std::result::Result<SnapshotTable, TableError> {
    let count = u64::from(header.snapshot_count);
    let start = header.snapshots_offset;
    let mut snapshots = Vec::with_capacity(count.min(1024) as usize);
    let mut offset = start;
    let mut table_len = 0u64;
    for index in 0..count {
        table_len = table_len.next_multiple_of(8);
        offset = offset.next_multiple_of(8);
        let fixed = file
            .read_vec(offset, ENTRY_FIXED)
            .map_err(TableError::Read)?;
        offset += ENTRY_FIXED;
        let id_len = u64::from(be16(&fixed, 12));
        let name_len = u64::from(be16(&fixed, 14));
        let extra_len = u64::from(be32(&fixed, 36));
        if extra_len > MAX_EXTRA {
            return Err(TableError::TooMuchExtra { index });
        }
        let extra = file.read_vec(offset, extra_len).map_err(TableError::Read)?;
        offset += extra_len;
        let id = c_string(&file.read_vec(offset, id_len).map_err(TableError::Read)?);
        offset += id_len;
        let name = c_string(&file.read_vec(offset, name_len).map_err(TableError::Read)?);
        offset += name_len;
        table_len += ENTRY_FIXED + extra_len + id_len + name_len;
        if table_len > MAX_TABLE_BYTES || offset - start > i32::MAX as u64 {
            return Err(TableError::TooBig {
                overhanging: count - index,
            });
        }
        let field = |at: usize| (extra.len() >= at + 8).then(|| be64(&extra, at));
        snapshots.push(Snapshot {
            id,
            name,
            l1_table_offset: be64(&fixed, 0),
            l1_entries: u64::from(be32(&fixed, 8)),
            date_sec: be32(&fixed, 16),
            date_nsec: be32(&fixed, 20),
            vm_clock_nsec: be64(&fixed, 24),
            vm_state_size: field(0).unwrap_or(u64::from(be32(&fixed, 32))),
            disk_size: field(8),
            icount: field(16).filter(|v| *v != u64::MAX),
            extra_data_size: extra_len,
            extra,
        });
    }
    Ok(SnapshotTable {
        snapshots,
        byte_len: offset - start,
    })
}

/// The snapshot entries, for `info`; a table QEMU would refuse is an error.
pub fn read_snapshots(file: &FileNode, header: &ImageHeader) -> Result<Vec<Snapshot>> {
    let bad = |msg: String| {
        Error::InvalidImage(format!(
            "Corrupt qcow2 image '{}': snapshot table: {msg}",
            file.filename()
        ))
    };
    match read_table(file, header) {
        Ok(table) => Ok(table.snapshots),
        Err(TableError::TooMuchExtra { index }) => Err(bad(format!(
            "entry {index} has more than {MAX_EXTRA} bytes of extra data"
        ))),
        Err(TableError::TooBig { overhanging }) => Err(bad(format!(
            "the table is larger than {MAX_TABLE_BYTES} bytes ({overhanging} entries do not fit)"
        ))),
        Err(TableError::Read(e)) => Err(e),
    }
}

/// Bytes of extra data qimg writes in a new entry: the 64-bit VM state
/// size, the disk size and the instruction count, as QEMU writes them.
pub const NEW_EXTRA: usize = 24;

impl Snapshot {
    /// The extra data of a new entry for a disk of `disk_size` bytes.
    pub fn new_extra(disk_size: u64) -> Vec<u8> {
        let mut extra = Vec::with_capacity(NEW_EXTRA);
        extra.extend_from_slice(&0u64.to_be_bytes());
        extra.extend_from_slice(&disk_size.to_be_bytes());
        extra.extend_from_slice(&0u64.to_be_bytes());
        extra
    }
}

/// The table as stored: each entry 8-byte aligned, the fixed part, the extra
/// data, the ID and the name.
pub fn encode_table(snapshots: &[Snapshot]) -> Vec<u8> {
    let mut out = Vec::new();
    for sn in snapshots {
        out.resize(out.len().next_multiple_of(8), 0);
        out.extend_from_slice(&sn.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&(sn.l1_entries as u32).to_be_bytes());
        out.extend_from_slice(&(sn.id.len() as u16).to_be_bytes());
        out.extend_from_slice(&(sn.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&sn.date_sec.to_be_bytes());
        out.extend_from_slice(&sn.date_nsec.to_be_bytes());
        out.extend_from_slice(&sn.vm_clock_nsec.to_be_bytes());
        out.extend_from_slice(&(sn.vm_state_size as u32).to_be_bytes());
        out.extend_from_slice(&(sn.extra.len() as u32).to_be_bytes());
        out.extend_from_slice(&sn.extra);
        out.extend_from_slice(sn.id.as_bytes());
        out.extend_from_slice(sn.name.as_bytes());
    }
    out.resize(out.len().next_multiple_of(8), 0);
    out
}

#[cfg(test)]
mod tests {
    use super::c_string;

    #[test]
    fn c_strings_end_at_the_first_nul() {
        assert_eq!(c_string(b"ab\0cd"), "ab");
        assert_eq!(c_string(b"abc"), "abc");
    }
}
