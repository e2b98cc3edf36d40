//! Creating, applying and deleting internal snapshots of a qcow2 image open
//! for writing.
//!
//! A snapshot is a copy of the active L1 table. Its L2 tables and data
//! clusters are shared with the active tables: each cluster's refcount counts
//! the L1 tables (active and snapshots) it can be reached from, and an entry
//! has the COPIED flag exactly when that count is 1, so the writer copies a
//! shared cluster or L2 table before changing it.
//!
//! Crash safety, as in the writer: references are counted up before anything
//! refers to them, and counted down only after nothing on disk does, so a
//! crash leaves leaked clusters at worst. The switch itself is one small
//! header write (snapshot count and table offset, or size and active L1).
//! As in QEMU, a crash between the count-down and the COPIED fix-up that
//! follows it can leave clusters with one reference and no COPIED flag,
//! which `check` reports and repairs; they are safe, because the writer
//! then copies where it could have written in place.

use super::image_header::{be64, ImageHeader};
use super::reader::{Qcow2Node, L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED};
use super::snapshot::{encode_table, read_snapshots, Snapshot};
use super::writer::{compressed_range, WriteState};
use super::{MAX_L1_BYTES, OFLAG_COPIED};
use crate::block::BlockDev;
use crate::error::{Error, Result};
use std::sync::atomic::Ordering;
use std::sync::PoisonError;

/// Header offsets of the fields the snapshot commands change.
const HEADER_SIZE: u64 = 24;
const HEADER_SNAPSHOTS: u64 = 60;
/// QEMU's limit on the number of snapshots.
const MAX_SNAPSHOTS: usize = 65536;

/// Which snapshot to read (`convert -l`, `qimg.open(..., snapshot=)`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotRef {
    /// An ID, or else a name (the short form `-l NAME`).
    IdOrName(String),
    /// `snapshot.id=` and/or `snapshot.name=`: each one given must match.
    Fields {
        id: Option<String>,
        name: Option<String>,
    },
}

/// A cluster (range) a table refers to.
#[derive(Debug, Clone, Copy)]
enum Ref {
    L2Table(u64),
    Data { host: u64, len: u64 },
}

impl Qcow2Node {
    /// The snapshots as the header and table on disk list them now.
    pub fn snapshot_list(&self) -> Result<Vec<Snapshot>> {
        let header = self.disk_header()?;
        if header.snapshot_count == 0 {
            return Ok(Vec::new());
        }
        check_table_offset(&header, self.file.filename())?;
        read_snapshots(&self.file, &header)
    }

    /// Saves the current guest content as snapshot `name` (dated
    /// `date_sec`.`date_nsec`), as `qemu-img snapshot -c` does; names need
    /// not be unique, the new snapshot gets the next free numeric ID.
    pub fn create_snapshot(&self, name: &str, date_sec: u32, date_nsec: u32) -> Result<()> {
        let mut list = self.snapshot_list()?;
        if list.len() >= MAX_SNAPSHOTS {
            return Err(Error::invalid(format!(
                "Too many snapshots (QEMU's limit is {MAX_SNAPSHOTS})"
            )));
        }
        if name.len() > u16::MAX as usize {
            return Err(Error::invalid("The snapshot name is too long"));
        }
        let id = list
            .iter()
            .filter_map(|s| s.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let mut st = self.state()?;
        self.begin_update(&mut st)?;
        self.write_back(&mut st)?;
        let l1 = self.l1_read().clone();
        let cs = self.cs();
        // 1. Every cluster of the active tree gains a reference; the copy of
        //    the L1 table gets clusters of its own.
        self.count_up(&mut st, &self.tree(&l1)?)?;
        let copy_at = st.alloc.alloc_clusters(l1_clusters(l1.len(), cs))?;
        if st.alloc.write_back()? {
            self.file.sync()?;
        }
        // 2. The copy, with no COPIED flags (they describe the active table).
        let raw: Vec<u8> = l1
            .iter()
            .flat_map(|e| (e & !OFLAG_COPIED).to_be_bytes())
            .collect();
        self.file.pwrite(&raw, copy_at)?;
        self.file.sync()?;
        // 3. Nothing in the active tree is its own any more.
        self.fix_copied(&mut st)?;
        self.write_back(&mut st)?;
        // 4. The new table, then the header switches to it.
        list.push(Snapshot {
            id: id.to_string(),
            name: name.to_string(),
            l1_table_offset: copy_at,
            l1_entries: l1.len() as u64,
            date_sec,
            date_nsec,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            icount: Some(0),
            disk_size: Some(self.size()),
            extra_data_size: super::snapshot::NEW_EXTRA as u64,
            extra: Snapshot::new_extra(self.size()),
        });
        self.replace_table(&mut st, &list)
    }

    /// Deletes the first snapshot called `name`, as `qemu-img snapshot -d`
    /// does, and releases what only it held.
    pub fn delete_snapshot(&self, name: &str) -> Result<()> {
        let mut list = self.snapshot_list()?;
        let index = list
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| Error::invalid("snapshot not found"))?;
        let gone = list.remove(index);
        let sn_l1 = self.snapshot_l1(&gone)?;
        let mut st = self.state()?;
        self.begin_update(&mut st)?;
        self.write_back(&mut st)?;
        self.replace_table(&mut st, &list)?;
        // Nothing on disk refers to the snapshot's tree now: release it.
        self.count_down(&mut st, &sn_l1, gone.l1_table_offset, true)?;
        self.write_back(&mut st)?;
        self.l2_cache.clear_clean();
        self.fix_copied(&mut st)?;
        self.write_back(&mut st)?;
        self.file.sync()
    }

    /// Makes the guest content and size those of the snapshot with ID or
    /// name `which`, as `qemu-img snapshot -a` does. The snapshot stays.
    pub fn apply_snapshot(&self, which: &str) -> Result<()> {
        let list = self.snapshot_list()?;
        let sn = list
            .iter()
            .find(|s| s.id == which)
            .or_else(|| list.iter().find(|s| s.name == which))
            .ok_or_else(|| Error::invalid("Failed to load snapshot: No such file or directory"))?;
        let sn_l1 = self.snapshot_l1(sn)?;
        let size = sn.disk_size.unwrap_or_else(|| self.size());
        let cs = self.cs();
        let needed = size.div_ceil(cs).div_ceil(self.header.l2_entries()) as usize;
        let mut st = self.state()?;
        self.begin_update(&mut st)?;
        self.write_back(&mut st)?;
        let old_l1 = self.l1_read().clone();
        let entries = old_l1.len().max(sn_l1.len()).max(needed);
        if entries as u64 * 8 > MAX_L1_BYTES {
            return Err(self.corrupt(format!(
                "snapshot '{}' needs an L1 table of {entries} entries",
                sn.name
            )));
        }
        // 1. The snapshot's tree gains the references of the new active
        //    table, which goes to clusters of its own.
        self.count_up(&mut st, &self.tree(&sn_l1)?)?;
        let l1_at = st.alloc.alloc_clusters(l1_clusters(entries, cs))?;
        if st.alloc.write_back()? {
            self.file.sync()?;
        }
        let mut new_l1 = vec![0u64; entries];
        for (slot, e) in new_l1.iter_mut().zip(&sn_l1) {
            *slot = e & !OFLAG_COPIED;
        }
        let raw: Vec<u8> = new_l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.file.pwrite(&raw, l1_at)?;
        self.file.sync()?;
        // 2. One header write switches size and active table.
        let mut fields = size.to_be_bytes().to_vec();
        fields.extend_from_slice(&0u32.to_be_bytes()); // no encryption
        fields.extend_from_slice(&(entries as u32).to_be_bytes());
        fields.extend_from_slice(&l1_at.to_be_bytes());
        self.file.pwrite(&fields, HEADER_SIZE)?;
        self.file.sync()?;
        // 3. The old active tree loses its references.
        let old_at = st.l1_offset;
        self.count_down(&mut st, &old_l1, old_at, false)?;
        *self.l1.write().unwrap_or_else(PoisonError::into_inner) = new_l1;
        st.l1_offset = l1_at;
        st.l1_dirty = None;
        self.size.store(size, Ordering::Release);
        self.write_back(&mut st)?;
        self.l2_cache.clear_clean();
        // 4. What the active table holds alone gets its COPIED flags back.
        self.fix_copied(&mut st)?;
        self.write_back(&mut st)?;
        self.file.sync()
    }

    /// Adds a reference to every cluster `refs` names; on failure (a
    /// refcount at its width's limit) the ones added are taken back, so
    /// nothing reaches the file.
    fn count_up(&self, st: &mut WriteState, refs: &[Ref]) -> Result<()> {
        let cs = self.cs();
        let clusters = refs.iter().flat_map(|r| match *r {
            Ref::L2Table(offset) => offset / cs..offset / cs + 1,
            Ref::Data { host, len } => host / cs..(host + len - 1) / cs + 1,
        });
        let mut done = Vec::new();
        for c in clusters {
            if let Err(e) = st.alloc.incref(c) {
                for &undo in done.iter().rev() {
                    st.alloc.decref(undo)?;
                }
                return Err(e);
            }
            done.push(c);
        }
        Ok(())
    }

    /// Writes the snapshot table anew with the extra data v3 requires in
    /// every entry (the 64-bit VM state size and the disk size), as
    /// `check -r all` completes it.
    pub fn complete_snapshot_table(&self) -> Result<()> {
        let size = self.size();
        let mut list = self.snapshot_list()?;
        for sn in &mut list {
            if sn.extra.len() < 16 {
                let mut extra = sn.vm_state_size.to_be_bytes().to_vec();
                extra.extend_from_slice(&size.to_be_bytes());
                extra.extend_from_slice(sn.extra.get(16..).unwrap_or_default());
                sn.extra_data_size = extra.len() as u64;
                sn.extra = extra;
                sn.disk_size = Some(size);
            }
        }
        let mut st = self.state()?;
        self.begin_update(&mut st)?;
        self.write_back(&mut st)?;
        self.replace_table(&mut st, &list)?;
        self.file.sync()
    }

    /// A read-only node showing the guest content of a snapshot (at the
    /// image's current size, as QEMU's temporary snapshot load has it):
    /// the one with ID `id` and/or name `name` (both given: both must match),
    /// or with `id_or_name` as its ID, else as its name (`convert -l`).
    pub fn snapshot_view(&self, which: &SnapshotRef) -> Result<Qcow2Node> {
        let list = self.snapshot_list()?;
        let found = match which {
            SnapshotRef::IdOrName(key) => list
                .iter()
                .find(|s| &s.id == key)
                .or_else(|| list.iter().find(|s| &s.name == key)),
            SnapshotRef::Fields { id, name } => list.iter().find(|s| {
                id.as_ref().is_none_or(|i| &s.id == i) && name.as_ref().is_none_or(|n| &s.name == n)
            }),
        };
        let sn =
            found.ok_or_else(|| Error::invalid("Failed to load snapshot: Can't find snapshot"))?;
        // The view's node reads the table itself.
        self.check_snapshot_l1(sn)?;
        let mut header = self.header.clone();
        header.l1_table_offset = sn.l1_table_offset;
        header.l1_entries = sn.l1_entries;
        // The image's current size, as qemu-img's `convert -l` reads a snapshot.
        header.virtual_size = self.size();
        Qcow2Node::open_as(
            std::sync::Arc::clone(&self.file),
            header,
            self.backing.clone(),
            self.backing_path().map(str::to_string),
            false,
        )
    }

    /// Takes back the references of the tree of `l1` and of the L1 table
    /// itself (at `l1_at`; `punch_l1`: its space goes back to the file
    /// system), once nothing on disk refers to them.
    fn count_down(
        &self,
        st: &mut WriteState,
        l1: &[u64],
        l1_at: u64,
        punch_l1: bool,
    ) -> Result<()> {
        let cs = self.cs();
        for r in self.tree(l1)? {
            match r {
                Ref::L2Table(offset) => st.pending_free.push((offset, cs, true)),
                Ref::Data { host, len } => st.pending_free.push((host, len, true)),
            }
        }
        st.pending_free
            .push((l1_at, l1_clusters(l1.len(), cs) * cs, punch_l1));
        Ok(())
    }

    /// The L1 table of snapshot `sn`, bounded before it is read.
    fn snapshot_l1(&self, sn: &Snapshot) -> Result<Vec<u64>> {
        let bytes = self.check_snapshot_l1(sn)?;
        let raw = self.file.read_vec(sn.l1_table_offset, bytes)?;
        Ok(raw.chunks_exact(8).map(|c| be64(c, 0)).collect())
    }

    /// The bytes of the L1 table of snapshot `sn`, once its size and place
    /// are checked against QEMU's limit and the file.
    fn check_snapshot_l1(&self, sn: &Snapshot) -> Result<u64> {
        let cs = self.cs();
        let bytes = sn.l1_entries * 8;
        if bytes > MAX_L1_BYTES {
            return Err(self.corrupt(format!(
                "snapshot '{}' has an L1 table of {} entries",
                sn.name, sn.l1_entries
            )));
        }
        if sn.l1_table_offset % cs != 0
            || sn
                .l1_table_offset
                .checked_add(bytes)
                .is_none_or(|end| end > self.file.file_len())
        {
            return Err(self.corrupt(format!(
                "the L1 table of snapshot '{}' at {:#x} is unaligned or past the end of the file",
                sn.name, sn.l1_table_offset
            )));
        }
        Ok(bytes)
    }

    /// Every L2 table and data cluster reachable from the L1 table `l1`,
    /// each bounded by the file before it is used.
    fn tree(&self, l1: &[u64]) -> Result<Vec<Ref>> {
        let cs = self.cs();
        let ext = self.header.extended_l2();
        let stride = if ext { 2 } else { 1 };
        let file_len = self.file.file_len();
        let mut out = Vec::new();
        for (index, entry) in l1.iter().enumerate() {
            let offset = entry & L1E_OFFSET_MASK;
            if offset == 0 {
                continue;
            }
            if offset % cs != 0 || offset + cs > file_len {
                return Err(self.corrupt(format!(
                    "L2 table offset {offset:#x} (L1 index {index}) is unaligned or past the end of the file"
                )));
            }
            out.push(Ref::L2Table(offset));
            let table = self
                .l2_cache
                .get_or_load(offset, |buf| self.file.pread(buf, offset))?;
            for slot in table.iter().step_by(stride) {
                if slot & OFLAG_COMPRESSED != 0 {
                    let (host, len) = compressed_range(*slot, cs);
                    if host
                        .checked_add(len)
                        .is_none_or(|end| end > file_len.next_multiple_of(cs))
                    {
                        return Err(self.corrupt(format!(
                            "compressed cluster at {host:#x} lies past the end of the file"
                        )));
                    }
                    out.push(Ref::Data { host, len });
                } else if slot & L2E_OFFSET_MASK != 0 {
                    let host = slot & L2E_OFFSET_MASK;
                    if host % cs != 0 || host + cs > file_len.next_multiple_of(cs) {
                        return Err(self.corrupt(format!(
                            "data cluster offset {host:#x} is unaligned or past the end of the file"
                        )));
                    }
                    out.push(Ref::Data { host, len: cs });
                }
            }
        }
        Ok(out)
    }

    /// Sets the COPIED flag of every active L1 and L2 entry exactly where
    /// the cluster it refers to has one reference.
    fn fix_copied(&self, st: &mut WriteState) -> Result<()> {
        let cs = self.cs();
        let ext = self.header.extended_l2();
        let stride = if ext { 2 } else { 1 };
        let l1 = self.l1_read().clone();
        for (index, entry) in l1.iter().enumerate() {
            let offset = entry & L1E_OFFSET_MASK;
            if offset == 0 {
                continue;
            }
            let own = st.alloc.get(offset / cs)? == 1;
            let want = if own { offset | OFLAG_COPIED } else { offset };
            if want != *entry {
                self.set_l1(st, index, want);
            }
            let Some((table, _)) = self.l2_table(index as u64)? else {
                continue;
            };
            let mut changes = Vec::new();
            for (slot, e) in table.iter().enumerate().step_by(stride) {
                if e & OFLAG_COMPRESSED != 0 || e & L2E_OFFSET_MASK == 0 {
                    continue;
                }
                let own = st.alloc.get((e & L2E_OFFSET_MASK) / cs)? == 1;
                let want = if own {
                    e | OFLAG_COPIED
                } else {
                    e & !OFLAG_COPIED
                };
                if want != *e {
                    changes.push((slot, want));
                }
            }
            drop(table);
            if !changes.is_empty() {
                self.edit_l2(offset, index as u64, |t| {
                    for &(slot, value) in &changes {
                        t[slot] = value;
                    }
                })?;
            }
        }
        Ok(())
    }

    /// Writes `list` as the snapshot table in new clusters, switches the
    /// header to it, and releases the old table.
    fn replace_table(&self, st: &mut WriteState, list: &[Snapshot]) -> Result<()> {
        let cs = self.cs();
        let header = self.disk_header()?;
        let old = (header.snapshot_count > 0).then(|| {
            let len = super::snapshot::read_table(&self.file, &header)
                .map(|t| t.byte_len)
                .unwrap_or(0);
            (header.snapshots_offset, len.max(1).next_multiple_of(cs))
        });
        let raw = encode_table(list);
        let at = if list.is_empty() {
            0
        } else {
            let at = st.alloc.alloc_clusters((raw.len() as u64).div_ceil(cs))?;
            if st.alloc.write_back()? {
                self.file.sync()?;
            }
            self.file.pwrite(&raw, at)?;
            self.file.sync()?;
            at
        };
        let mut fields = (list.len() as u32).to_be_bytes().to_vec();
        fields.extend_from_slice(&at.to_be_bytes());
        self.file.pwrite(&fields, HEADER_SNAPSHOTS)?;
        self.file.sync()?;
        if let Some((offset, len)) = old {
            // Only clusters counted as the table's: a damaged table may lie
            // where no refcount reaches (check counted it as past the end).
            for c in offset / cs..(offset + len).div_ceil(cs) {
                if st.alloc.get(c)? > 0 {
                    st.pending_free.push((c * cs, cs, false));
                }
            }
        }
        self.write_back(st)
    }
}

/// Clusters an L1 table of `entries` entries occupies (at least one).
fn l1_clusters(entries: usize, cs: u64) -> u64 {
    (entries as u64 * 8).max(1).div_ceil(cs)
}

/// The snapshot table must start on a cluster, as QEMU requires on open.
fn check_table_offset(header: &ImageHeader, name: &str) -> Result<()> {
    let cs = header.cluster_size.bytes();
    if header.snapshots_offset % cs != 0 {
        return Err(Error::InvalidImage(format!(
            "Corrupt qcow2 image '{name}': snapshot table offset {:#x} is not cluster aligned",
            header.snapshots_offset
        )));
    }
    Ok(())
}
