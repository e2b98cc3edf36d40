//! The internal snapshot table of a qcow2 image: one parser for `info`,
//! `check` and the snapshot commands, bounded as QEMU bounds the table, and
//! the encoder the snapshot commands write a new table with.
#![deny(clippy::indexing_slicing)]

use super::bytes::Fields;
use super::format::{MAX_SNAPSHOT_EXTRA, MAX_SNAPSHOT_TABLE_BYTES};
use super::header::Header;
use crate::block::{BlockDev, FileNode};
use crate::error::{Error, Result};

/// Fixed part of a snapshot table entry.
const ENTRY_FIXED: u64 = 40;

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

/// The table as read: its entries (as `check -r all` keeps them), the bytes
/// they span in the file, and what QEMU refuses to open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotTable {
    pub snapshots: Vec<Snapshot>,
    pub byte_len: u64,
    pub problems: Vec<TableProblem>,
}

/// What makes QEMU refuse a snapshot table, and what its repair drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableProblem {
    /// Entry `index` has `bytes` of extra data, more than QEMU accepts; the
    /// entry keeps the first 1 KiB.
    TooMuchExtra { index: u64, bytes: u64 },
    /// The table outgrows QEMU's limit; the last `overhanging` entries are
    /// left out.
    TooBig { overhanging: u64 },
}

impl TableProblem {
    /// QEMU's reason for refusing the table, with its advice.
    pub fn refusal(self) -> String {
        match self {
            TableProblem::TooMuchExtra { index, .. } => format!(
                "Too much extra metadata in snapshot table entry {index}\nYou can force-remove this extra metadata with qemu-img check -r all"
            ),
            TableProblem::TooBig { overhanging } => format!(
                "Snapshot table is too big\nYou can force-remove all {overhanging} overhanging snapshots with qemu-img check -r all"
            ),
        }
    }

    /// The line `check -r all` prints as it drops what QEMU refuses.
    pub fn repair_line(self) -> String {
        match self {
            TableProblem::TooMuchExtra { index, bytes } => format!(
                "Discarding too much extra metadata in snapshot table entry {index} ({bytes} > {MAX_SNAPSHOT_EXTRA})"
            ),
            TableProblem::TooBig { overhanging } => format!(
                "Discarding {overhanging} overhanging snapshots (snapshot table is too big)"
            ),
        }
    }

    /// How many corruptions the repair counts for it.
    pub fn corruptions(self) -> u64 {
        match self {
            TableProblem::TooMuchExtra { .. } => 1,
            TableProblem::TooBig { overhanging } => overhanging,
        }
    }
}

/// A C string field: the bytes up to the first NUL.
fn c_string(bytes: &[u8]) -> String {
    let text = bytes.split(|b| *b == 0).next().unwrap_or_default();
    String::from_utf8_lossy(text).into_owned()
}

/// Reads every entry as QEMU does: bytes past the end of the file read as
/// zeroes. What QEMU refuses is listed in the table's `problems` and left
/// out as its repair leaves it out: extra data past 1 KiB, entries past the
/// table's size limit.
pub fn read_table(file: &FileNode, header: &Header) -> Result<SnapshotTable> {
    let count = u64::from(header.snapshot_count);
    let start = header.snapshots_offset;
    let mut snapshots = Vec::with_capacity(count.min(1024) as usize);
    let mut problems = Vec::new();
    let mut offset = start;
    let mut table_len = 0u64;
    for index in 0..count {
        let entry_start = offset;
        table_len = table_len.next_multiple_of(8);
        offset = offset.next_multiple_of(8);
        let raw = file.read_vec(offset, ENTRY_FIXED)?;
        let fixed = Fields::new(&raw, "a snapshot table entry");
        offset += ENTRY_FIXED;
        let id_len = u64::from(fixed.u16(12)?);
        let name_len = u64::from(fixed.u16(14)?);
        let extra_len = u64::from(fixed.u32(36)?);
        let kept_extra = if extra_len > MAX_SNAPSHOT_EXTRA {
            problems.push(TableProblem::TooMuchExtra {
                index,
                bytes: extra_len,
            });
            MAX_SNAPSHOT_EXTRA
        } else {
            extra_len
        };
        let extra = file.read_vec(offset, kept_extra)?;
        offset += extra_len;
        let id = c_string(&file.read_vec(offset, id_len)?);
        offset += id_len;
        let name = c_string(&file.read_vec(offset, name_len)?);
        offset += name_len;
        table_len += ENTRY_FIXED + kept_extra + id_len + name_len;
        if table_len > MAX_SNAPSHOT_TABLE_BYTES || offset - start > i32::MAX as u64 {
            problems.push(TableProblem::TooBig {
                overhanging: count - index,
            });
            offset = entry_start;
            break;
        }
        // Fields of the extra data that this entry's extra data holds.
        let extra_fields = Fields::new(&extra, "a snapshot's extra data");
        let field = |at: u64| extra_fields.u64(at).ok();
        snapshots.push(Snapshot {
            id,
            name,
            l1_table_offset: fixed.u64(0)?,
            l1_entries: u64::from(fixed.u32(8)?),
            date_sec: fixed.u32(16)?,
            date_nsec: fixed.u32(20)?,
            vm_clock_nsec: fixed.u64(24)?,
            vm_state_size: field(0).unwrap_or(u64::from(fixed.u32(32)?)),
            disk_size: field(8),
            icount: field(16).filter(|v| *v != u64::MAX),
            extra_data_size: kept_extra,
            extra,
        });
    }
    Ok(SnapshotTable {
        snapshots,
        byte_len: offset - start,
        problems,
    })
}

/// The snapshot entries, for `info`; a table QEMU would refuse is an error.
pub fn read_snapshots(file: &FileNode, header: &Header) -> Result<Vec<Snapshot>> {
    read_valid_table(file, header).map(|table| table.snapshots)
}

/// The snapshot table, with its length on disk; a table QEMU would refuse
/// is an error.
pub fn read_valid_table(file: &FileNode, header: &Header) -> Result<SnapshotTable> {
    let table = read_table(file, header)?;
    match table.problems.first() {
        None => Ok(table),
        Some(problem) => Err(Error::InvalidImage(format!(
            "Could not open '{}': {}; 'qimg check -r all' removes what QEMU refuses",
            file.filename(),
            problem.refusal().lines().next().unwrap_or_default()
        ))),
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
