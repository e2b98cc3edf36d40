//! Changing the virtual size of a qcow2 image open for writing: growing the
//! L1 table (moved to a larger place when it must), preallocating the new
//! area, or dropping everything past a smaller size and cutting the file.

use super::entries::{L1Entry, L2Entry};
use super::format::{HEADER_L1_SIZE, HEADER_SIZE, MAX_L1_BYTES};
use super::reader::Qcow2Node;
use super::writer::{Release, WriteState};
use super::Compat;
use crate::block::BlockDev;
use crate::error::{Error, Result};
use crate::prealloc::Prealloc;
use std::sync::atomic::Ordering;
use std::sync::PoisonError;

impl Qcow2Node {
    /// Sets the virtual size to `new_size` (a multiple of 512). A larger size
    /// preallocates the new area as `prealloc` says; a smaller one discards
    /// everything past it (callers make sure the user asked for that).
    pub fn resize(&self, new_size: u64, prealloc: Prealloc) -> Result<()> {
        if new_size % 512 != 0 {
            return Err(Error::invalid(format!(
                "The new size must be a multiple of 512 (not {new_size})"
            )));
        }
        if self.header.compat == Compat::V2 && self.disk_header()?.snapshot_count > 0 {
            // v2 snapshot entries do not record their disk size.
            return Err(Error::Unsupported(
                "Can't resize a v2 image which has snapshots".into(),
            ));
        }
        let mut st = self.state()?;
        let old = self.size();
        if new_size < old && prealloc != Prealloc::Off {
            return Err(Error::invalid(
                "Preallocation can only be used when growing an image",
            ));
        }
        // A grown area must read as zeroes, not as what the backing file
        // holds there (QEMU's rule: when the backing file reaches past the
        // old end). That needs zero clusters, which v2 images do not have.
        let hide_backing = new_size > old && self.backing.as_ref().is_some_and(|b| b.size() > old);
        if hide_backing && self.header.compat == Compat::V2 {
            return Err(Error::Unsupported(
                "Failed to zero out new clusters: Operation not supported".into(),
            ));
        }
        self.begin_update(&mut st)?;
        // Persistent bitmaps follow the new size (their tables change length).
        let bitmaps = self.bitmaps_before_resize(&mut st)?;
        if new_size > old {
            self.grow_l1(&mut st, new_size)?;
            self.write_size(new_size)?;
            if prealloc != Prealloc::Off {
                self.preallocate(&mut st, old, new_size, prealloc)?;
            }
        } else if new_size < old {
            self.shrink(&mut st, new_size, old)?;
        }
        self.write_back(&mut st)?;
        self.file.sync()?;
        self.bitmaps_after_resize(&mut st, bitmaps)?;
        drop(st);
        if hide_backing {
            // Whole clusters get the zero flag; a partial one at the old end
            // is copied up with zeroes after the old end.
            super::writer::write_zeroes(self, old, new_size - old, false)?;
            let mut st = self.state()?;
            self.write_back(&mut st)?;
            self.file.sync()?;
        }
        Ok(())
    }

    fn write_size(&self, new_size: u64) -> Result<()> {
        self.file.pwrite(&new_size.to_be_bytes(), HEADER_SIZE)?;
        self.file.sync()?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    /// Makes the L1 table long enough for `new_size`; a longer table goes to
    /// new clusters and the header switches to it once it is on disk.
    fn grow_l1(&self, st: &mut WriteState, new_size: u64) -> Result<()> {
        let cs = self.cs();
        let needed = new_size.div_ceil(cs).div_ceil(self.header.l2_entries());
        let current = self.l1_read().len() as u64;
        if needed <= current {
            return Ok(());
        }
        if needed * 8 > MAX_L1_BYTES {
            return Err(Error::TooLarge(format!(
                "The image size is too large for file format 'qcow2' (an L1 table of {needed} entries exceeds QEMU's {} MiB limit; a larger cluster size helps)",
                MAX_L1_BYTES >> 20
            )));
        }
        let clusters = (needed * 8).div_ceil(cs);
        let offset = st.alloc.alloc_clusters(clusters)?;
        // Everything pending reaches the old table first.
        self.write_back(st)?;
        let mut table = self.l1_read().clone();
        table.resize(needed as usize, 0);
        // Just the entries, not whole clusters, as QEMU writes it: at the
        // end of the file the image then ends where qemu-img's does.
        let raw: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.file.pwrite(&raw, offset)?;
        self.file.sync()?;
        let mut fields = (needed as u32).to_be_bytes().to_vec();
        fields.extend_from_slice(&offset.to_be_bytes());
        self.file.pwrite(&fields, HEADER_L1_SIZE)?;
        self.file.sync()?;
        let old_bytes = current * 8;
        let old_offset = st.l1_offset;
        *self.l1.write().unwrap_or_else(PoisonError::into_inner) = table;
        st.l1_offset = offset;
        if old_bytes > 0 {
            st.pending_free
                .push((old_offset, old_bytes.div_ceil(cs) * cs, false));
        }
        Ok(())
    }

    /// Gives every unallocated cluster of `[from, to)` a host cluster, as
    /// preallocation `mode` asks (metadata, falloc or full).
    fn preallocate(&self, st: &mut WriteState, from: u64, to: u64, mode: Prealloc) -> Result<()> {
        let cs = self.cs();
        let ext = self.header.extended_l2();
        let per_table = self.header.l2_entries();
        let start = from / cs * cs;
        let end = to.next_multiple_of(cs);
        self.per_table(start, end, |a, b| {
            let l1_index = a / cs / per_table;
            let table_off = self.l2_for_write(st, l1_index)?;
            let Some((table, _)) = self.l2_table(l1_index)? else {
                return Err(self.corrupt(format!("L1 index {l1_index} lost its L2 table")));
            };
            let stride = if ext { 2 } else { 1 };
            let slots: Vec<usize> = (a / cs..b / cs)
                .map(|c| (c % per_table) as usize)
                .filter(|&i| table[i * stride] == 0)
                .collect();
            drop(table);
            if slots.is_empty() {
                return Ok(());
            }
            let host = st.alloc.alloc_clusters(slots.len() as u64)?;
            let bytes = slots.len() as u64 * cs;
            match mode {
                Prealloc::Off => {}
                Prealloc::Metadata => {
                    if self.file.file_len() < host + bytes {
                        self.file.truncate(host + bytes)?;
                    }
                }
                Prealloc::Falloc => self.file.preallocate(host, bytes, mode)?,
                Prealloc::Full => {
                    if self.file.file_len() < host + bytes {
                        self.file.truncate(host + bytes)?;
                    }
                    self.file.preallocate(host, bytes, mode)?;
                }
            }
            self.edit_l2(table_off, l1_index, |t| {
                for (k, &i) in slots.iter().enumerate() {
                    t[i * stride] = L2Entry::new(host + k as u64 * cs, true).raw();
                }
            })
        })
    }

    /// Drops everything past `new_size`: clusters, then L2 tables no longer
    /// needed, then the size; finally the file is cut after its last cluster in use.
    fn shrink(&self, st: &mut WriteState, new_size: u64, old: u64) -> Result<()> {
        self.drop_from(st, new_size, old)?;
        // The size shrinks once no table maps anything past it.
        self.write_back(st)?;
        self.write_size(new_size)?;
        self.cut_file(st)
    }

    /// Makes the image empty: every cluster and L2 table goes, so all of it
    /// reads from the backing file again (what `commit` leaves behind). The
    /// file is cut after its last cluster in use.
    pub fn make_empty(&self) -> Result<()> {
        let mut st = self.state()?;
        self.begin_update(&mut st)?;
        self.drop_from(&mut st, 0, self.size())?;
        self.write_back(&mut st)?;
        self.file.sync()?;
        self.cut_file(&mut st)
    }

    /// Releases the clusters mapping `[from, end)` (`from` rounded up to a
    /// cluster), and the L2 tables that then map nothing before `from`.
    fn drop_from(&self, st: &mut WriteState, from: u64, end: u64) -> Result<()> {
        let cs = self.cs();
        let keep = from.next_multiple_of(cs);
        if keep < end {
            self.per_table(keep, end.next_multiple_of(cs), |a, b| {
                self.zero_in_table(st, a, b, Release::Remove)
            })?;
        }
        let needed = keep.div_ceil(cs).div_ceil(self.header.l2_entries()) as usize;
        let l1_len = self.l1_read().len();
        for index in needed..l1_len {
            let offset = L1Entry::from_raw(self.l1_read()[index]).table_offset();
            if offset != 0 {
                self.set_l1(st, index, L1Entry::UNALLOCATED);
                self.l2_cache.remove(offset);
                st.pending_free.push((offset, cs, true));
            }
        }
        Ok(())
    }

    /// Cuts the file after its last cluster in use.
    fn cut_file(&self, st: &mut WriteState) -> Result<()> {
        let cs = self.cs();
        let last = st.alloc.trim_end()?;
        if last * cs < self.file.file_len() {
            self.file.truncate(last * cs)?;
        }
        Ok(())
    }
}
