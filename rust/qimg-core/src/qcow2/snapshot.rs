//! The internal snapshot table of a qcow2 image (read only).

use super::image_header::{be32, be64, ImageHeader};
use crate::block::{BlockDev, FileNode};
use crate::error::{Error, Result};

/// Fixed part of a snapshot table entry.
const ENTRY_FIXED: usize = 40;
/// Largest extra-data area QEMU accepts per entry.
const MAX_EXTRA: u32 = 1024;
/// Largest whole snapshot table QEMU accepts.
const MAX_TABLE_BYTES: u64 = 64 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub id: String,
    pub name: String,
    pub l1_table_offset: u64,
    pub l1_entries: u32,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    /// Guest instruction count at the snapshot, when recorded.
    pub icount: Option<u64>,
    /// Virtual disk size at the snapshot, when recorded.
    pub disk_size: Option<u64>,
}

/// Reads every snapshot entry; the table is bounded as QEMU bounds it.
pub fn read_snapshots(file: &FileNode, header: &ImageHeader) -> Result<Vec<Snapshot>> {
    let mut out = Vec::with_capacity(header.snapshot_count.min(1024) as usize);
    let mut at = header.snapshots_offset;
    let bad = |msg: String| {
        Error::InvalidImage(format!(
            "Corrupt qcow2 image '{}': snapshot table: {msg}",
            file.filename()
        ))
    };
    for index in 0..header.snapshot_count {
        if at - header.snapshots_offset > MAX_TABLE_BYTES || at >= file.file_len() {
            return Err(bad(format!(
                "entry {index} at {at:#x} lies beyond the end of the file or the table limit"
            )));
        }
        let mut fixed = [0u8; ENTRY_FIXED];
        file.pread(&mut fixed, at)?;
        let l1_table_offset = be64(&fixed, 0);
        let l1_entries = be32(&fixed, 8);
        let id_len = u16::from_be_bytes([fixed[12], fixed[13]]) as usize;
        let name_len = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
        let extra_len = be32(&fixed, 36);
        if extra_len > MAX_EXTRA {
            return Err(bad(format!(
                "entry {index} has {extra_len} bytes of extra data (at most {MAX_EXTRA})"
            )));
        }
        let mut rest = vec![0u8; extra_len as usize + id_len + name_len];
        file.pread(&mut rest, at + ENTRY_FIXED as u64)?;
        let extra = &rest[..extra_len as usize];
        let field = |o: usize| (extra.len() >= o + 8).then(|| be64(extra, o));
        let id = String::from_utf8_lossy(&rest[extra_len as usize..][..id_len]).into_owned();
        let name = String::from_utf8_lossy(&rest[extra_len as usize + id_len..]).into_owned();
        out.push(Snapshot {
            id,
            name,
            l1_table_offset,
            l1_entries,
            date_sec: be32(&fixed, 16),
            date_nsec: be32(&fixed, 20),
            vm_clock_nsec: be64(&fixed, 24),
            vm_state_size: field(0).unwrap_or(u64::from(be32(&fixed, 32))),
            disk_size: field(8),
            icount: field(16).filter(|v| *v != u64::MAX),
        });
        let len = (ENTRY_FIXED + rest.len()) as u64;
        at += len.next_multiple_of(8);
    }
    Ok(out)
}
