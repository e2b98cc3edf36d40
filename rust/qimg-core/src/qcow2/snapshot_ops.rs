//! Creating, applying and deleting internal snapshots of a qcow2 image open
//! for writing.
//!
//! A snapshot is a copy of the active L1 table. Its L2 tables and data
//! clusters are shared with the active tables: each cluster's refcount counts
//! the L1 tables (active and snapshots) it can be reached from, and an entry
//! has the COPIED flag exactly when that count is 1, so the writer copies a
//! shared cluster or L2 table before changing it.
//!
//! Crash safety: a snapshot command changes refcounts and the COPIED flags
//! that mirror them, which no order of in-place writes keeps in agreement
//! (QEMU's own commands leave that window). Here each command is built
//! apart from the image on disk, in new clusters, and one header write of
//! 48 bytes switches to it: guest size, active L1 table, refcount table and
//! snapshot table together. A kill leaves the old image or the new one, with
//! at most unused clusters past the old one's end.

use super::allocator::Allocator;
use super::bytes::be64;
use super::entries::{L1Entry, L2Entry};
use super::format::{HEADER_SIZE, MAX_L1_BYTES, MAX_SNAPSHOTS};
use super::header::Header;
use super::reader::Qcow2Node;
use super::snapshot::{encode_table, read_valid_table, Snapshot};
use super::writer::WriteState;

use crate::block::BlockDev;
use crate::error::{Error, Result};
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

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
        self.snapshot_table().map(|table| table.list)
    }

    /// The snapshots, and the bytes their table takes on disk now (which a
    /// command that writes a new table releases): one read of the table.
    fn snapshot_table(&self) -> Result<Listed> {
        let header = self.disk_header()?;
        if header.snapshot_count == 0 {
            return Ok(Listed {
                list: Vec::new(),
                on_disk: 0,
            });
        }
        check_table_offset(&header, self.file.filename())?;
        let table = read_valid_table(&self.file, &header)?;
        Ok(Listed {
            list: table.snapshots,
            on_disk: table.byte_len,
        })
    }

    /// Saves the current guest content as snapshot `name` (dated
    /// `date_sec`.`date_nsec`), as `qemu-img snapshot -c` does; names need
    /// not be unique, the new snapshot gets the next free numeric ID.
    pub fn create_snapshot(&self, name: &str, date_sec: u32, date_nsec: u32) -> Result<()> {
        let Listed { mut list, on_disk } = self.snapshot_table()?;
        if list.len() >= MAX_SNAPSHOTS as usize {
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
        let cs = self.cs();
        let size = self.size();
        self.in_one_switch(|st| {
            let l1 = self.l1_read().clone();
            // The snapshot's references to the data.
            for r in self.tree(&l1)? {
                if let Ref::Data { .. } = r {
                    count(st, r, cs)?;
                }
            }
            // Both L1 tables share every L2 table; one whose entries carry
            // COPIED flags is shared as a copy without them.
            let stride = if self.header.extended_l2() { 2 } else { 1 };
            let mut shared = l1.clone();
            for entry in &mut shared {
                let offset = L1Entry::from_raw(*entry).table_offset();
                *entry = offset;
                if offset == 0 {
                    continue;
                }
                let table = self.cached_l2(offset)?;
                // Entries only: with extended L2, bit 63 of the bitmap word
                // after each entry is subcluster 31's zero flag.
                let mut cleared = table.to_vec();
                for e in cleared.iter_mut().step_by(stride) {
                    *e = L2Entry::from_raw(*e).with_copied(false).raw();
                }
                if cleared[..] == table[..] {
                    st.alloc.incref(offset / cs)?;
                } else {
                    let copy = self.new_table(st, &cleared)?;
                    st.alloc.incref(copy / cs)?;
                    st.alloc.decref(offset / cs)?;
                    *entry = copy;
                }
            }
            let copy_at = self.new_table(st, &shared)?;
            let active = self.settle(st, &shared)?;
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
                disk_size: Some(size),
                extra_data_size: super::snapshot::NEW_EXTRA as u64,
                extra: Snapshot::new_extra(size),
            });
            self.switch(
                st,
                size,
                active,
                Some(NewTable {
                    list: &list,
                    on_disk,
                }),
            )
        })?;
        Ok(())
    }

    /// Deletes the first snapshot called `name`, as `qemu-img snapshot -d`
    /// does, and releases what only it held.
    pub fn delete_snapshot(&self, name: &str) -> Result<()> {
        let Listed { mut list, on_disk } = self.snapshot_table()?;
        let index = list
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| Error::invalid("snapshot not found"))?;
        let gone = list.remove(index);
        let sn_l1 = self.snapshot_l1(&gone)?;
        let cs = self.cs();
        let size = self.size();
        let (tree, freed) = self.in_one_switch(|st| {
            let tree = self.tree(&sn_l1)?;
            for &r in &tree {
                uncount(st, r, cs)?;
            }
            st.alloc
                .free_range(gone.l1_table_offset, l1_clusters(sn_l1.len(), cs) * cs)?;
            let l1 = self.l1_read().clone();
            let active = self.settle(st, &l1)?;
            let freed = self.switch(
                st,
                size,
                active,
                Some(NewTable {
                    list: &list,
                    on_disk,
                }),
            )?;
            Ok((tree, freed))
        })?;
        // What only the snapshot held goes back to the file system, as
        // QEMU discards it.
        let mine: HashSet<u64> = tree.iter().flat_map(|r| r.clusters(cs)).collect();
        let mut st = self.state()?;
        let mut holes = Vec::new();
        for c in freed.into_iter().filter(|c| mine.contains(c)) {
            if st.alloc.get(c)? == 0 {
                holes.push(c);
            }
        }
        drop(st);
        self.punch(holes);
        Ok(())
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
        let old_l1 = self.l1_read().clone();
        let entries = old_l1.len().max(sn_l1.len()).max(needed);
        if entries as u64 * 8 > MAX_L1_BYTES {
            return Err(self.corrupt(format!(
                "snapshot '{}' needs an L1 table of {entries} entries",
                sn.name
            )));
        }
        self.in_one_switch(|st| {
            // The new active table's references first, then the old one's
            // go: nothing both hold passes through a count of 0.
            for r in self.tree(&sn_l1)? {
                count(st, r, cs)?;
            }
            for r in self.tree(&old_l1)? {
                uncount(st, r, cs)?;
            }
            let mut new_l1 = vec![0u64; entries];
            for (slot, e) in new_l1.iter_mut().zip(&sn_l1) {
                *slot = L1Entry::from_raw(*e).table_offset();
            }
            let active = self.settle(st, &new_l1)?;
            self.switch(st, size, active, None)
        })?;
        Ok(())
    }

    /// Runs `change` as one switch: refcounts, tables and the snapshot table
    /// are built in clusters the image on disk does not use, and one header
    /// write ([`switch`](Self::switch)) makes them the image's. A kill
    /// before that write leaves the old image (with unused clusters, at
    /// worst); after it, the new one, with nothing for `check` to report.
    /// When `change` fails before the switch, nothing of it stays.
    fn in_one_switch<T>(&self, change: impl FnOnce(&mut WriteState) -> Result<T>) -> Result<T> {
        let mut st = self.state()?;
        self.begin_update(&mut st)?;
        self.write_back(&mut st)?;
        st.alloc.begin_shadow()?;
        let out = change(&mut st);
        if st.alloc.in_shadow() {
            // Forget the refcounts the change counted in memory.
            st.alloc = Allocator::new(Arc::clone(&self.file), &self.disk_header()?)?;
            self.l2_cache.clear_clean();
            out?;
            return Err(self.corrupt("a snapshot change ended before its switch".into()));
        }
        out
    }

    /// Writes the L1 table `active` (in new clusters, unless it is the
    /// current one unchanged) and the snapshot table `list` (`None`: the
    /// current one stays), then the shadow's refcounts, and switches the
    /// header to all of them (and guest size `size`) in one write. Returns
    /// the clusters the change freed.
    fn switch(
        &self,
        st: &mut WriteState,
        size: u64,
        active: Vec<u64>,
        table: Option<NewTable<'_>>,
    ) -> Result<Vec<u64>> {
        let cs = self.cs();
        let current = self.l1_read().clone();
        let l1_at = if active == current {
            st.l1_offset
        } else {
            let at = self.new_table(st, &active)?;
            st.alloc
                .free_range(st.l1_offset, l1_clusters(current.len(), cs) * cs)?;
            at
        };
        let header = self.disk_header()?;
        let snapshots = match table {
            None => (header.snapshot_count, header.snapshots_offset),
            Some(NewTable { list, on_disk }) => {
                self.release_table(st, &header, on_disk)?;
                if list.is_empty() {
                    (0, 0)
                } else {
                    let raw = encode_table(list);
                    let at = st.alloc.alloc_clusters((raw.len() as u64).div_ceil(cs))?;
                    self.file.pwrite(&raw, at)?;
                    (list.len() as u32, at)
                }
            }
        };
        let (reftable, reftable_clusters) = st.alloc.write_shadow()?;
        self.file.sync()?;
        let mut fields = size.to_be_bytes().to_vec();
        fields.extend_from_slice(&0u32.to_be_bytes()); // no encryption
        fields.extend_from_slice(&(active.len() as u32).to_be_bytes());
        fields.extend_from_slice(&l1_at.to_be_bytes());
        fields.extend_from_slice(&reftable.to_be_bytes());
        fields.extend_from_slice(&(reftable_clusters as u32).to_be_bytes());
        fields.extend_from_slice(&snapshots.0.to_be_bytes());
        fields.extend_from_slice(&snapshots.1.to_be_bytes());
        self.file.pwrite(&fields, HEADER_SIZE)?;
        // The image is the new one from here on.
        let freed = st.alloc.end_shadow();
        *self.l1.write().unwrap_or_else(PoisonError::into_inner) = active;
        st.l1_offset = l1_at;
        st.l1_dirty = None;
        self.size.store(size, Ordering::Release);
        self.l2_cache.clear_clean();
        self.file.sync()?;
        Ok(freed)
    }

    /// Frees the clusters of the snapshot table `header` points at, `len`
    /// bytes long.
    fn release_table(&self, st: &mut WriteState, header: &Header, len: u64) -> Result<()> {
        if header.snapshot_count == 0 {
            return Ok(());
        }
        let cs = self.cs();
        let offset = header.snapshots_offset;
        // Only clusters counted as the table's: a damaged table may lie
        // where no refcount reaches (check counted it as past the end).
        for c in offset / cs..(offset + len.max(1)).div_ceil(cs) {
            if st.alloc.get(c)? > 0 {
                st.alloc.decref(c)?;
            }
        }
        Ok(())
    }

    /// The active L1 entries `l1` with the COPIED flags the refcounts now
    /// call for. An L2 table whose entries' flags must change is copied
    /// (the one on disk may not change before the switch), and the copy,
    /// the active table's own, takes its place.
    fn settle(&self, st: &mut WriteState, l1: &[u64]) -> Result<Vec<u64>> {
        let cs = self.cs();
        let stride = if self.header.extended_l2() { 2 } else { 1 };
        let mut out = Vec::with_capacity(l1.len());
        for &entry in l1 {
            let offset = L1Entry::from_raw(entry).table_offset();
            if offset == 0 {
                out.push(0);
                continue;
            }
            let table = self.cached_l2(offset)?;
            let mut want = table.to_vec();
            for e in want.iter_mut().step_by(stride) {
                let entry = L2Entry::from_raw(*e);
                if entry.is_compressed() || entry.host_offset() == 0 {
                    continue;
                }
                let own = st.alloc.get(entry.host_offset() / cs)? == 1;
                *e = entry.with_copied(own).raw();
            }
            let target = if want[..] == table[..] {
                offset
            } else {
                let copy = self.new_table(st, &want)?;
                st.alloc.decref(offset / cs)?;
                copy
            };
            let own = st.alloc.get(target / cs)? == 1;
            out.push(L1Entry::new(target, own).raw());
        }
        Ok(out)
    }

    /// Writes `entries` as a table in new clusters; returns where.
    fn new_table(&self, st: &mut WriteState, entries: &[u64]) -> Result<u64> {
        let cs = self.cs();
        let at = st.alloc.alloc_clusters(l1_clusters(entries.len(), cs))?;
        let raw: Vec<u8> = entries.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.file.pwrite(&raw, at)?;
        Ok(at)
    }

    /// The L2 table at `offset` (bounded by [`tree`](Self::tree) before).
    fn cached_l2(&self, offset: u64) -> Result<Arc<[u64]>> {
        self.l2_cache
            .get_or_load(offset, |buf| self.file.pread(buf, offset))
    }

    /// Writes `list` as the snapshot table, with the extra data v3 requires
    /// in every entry (the 64-bit VM state size and the disk size), as
    /// `check -r all` writes the table it repaired.
    pub fn rewrite_snapshot_table(&self, mut list: Vec<Snapshot>) -> Result<()> {
        let size = self.size();
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
        // The table on disk may be one QEMU refuses: read as check reads it.
        let on_disk = super::snapshot::read_table(&self.file, &self.disk_header()?)?.byte_len;
        self.in_one_switch(|st| {
            let l1 = self.l1_read().clone();
            self.switch(
                st,
                size,
                l1,
                Some(NewTable {
                    list: &list,
                    on_disk,
                }),
            )
        })?;
        Ok(())
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
            Arc::clone(&self.file),
            header,
            self.backing.clone(),
            self.backing_path().map(str::to_string),
            false,
        )
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
        let bits = self.header.cluster_size.bits();
        let mut out = Vec::new();
        for (index, &entry) in l1.iter().enumerate() {
            let offset = L1Entry::from_raw(entry).table_offset();
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
            for &slot in table.iter().step_by(stride) {
                let slot = L2Entry::from_raw(slot);
                if slot.is_compressed() {
                    let (host, len) = slot.compressed_data(bits).sectors_range();
                    if host
                        .checked_add(len)
                        .is_none_or(|end| end > file_len.next_multiple_of(cs))
                    {
                        return Err(self.corrupt(format!(
                            "compressed cluster at {host:#x} lies past the end of the file"
                        )));
                    }
                    out.push(Ref::Data { host, len });
                } else if slot.host_offset() != 0 {
                    let host = slot.host_offset();
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
}

impl Ref {
    /// The clusters the reference counts against.
    fn clusters(self, cs: u64) -> std::ops::Range<u64> {
        match self {
            Ref::L2Table(offset) => offset / cs..offset / cs + 1,
            Ref::Data { host, len } => host / cs..(host + len - 1) / cs + 1,
        }
    }
}

/// One more reference to each cluster `r` names.
fn count(st: &mut WriteState, r: Ref, cs: u64) -> Result<()> {
    for c in r.clusters(cs) {
        st.alloc.incref(c)?;
    }
    Ok(())
}

/// One reference less to each cluster `r` names.
fn uncount(st: &mut WriteState, r: Ref, cs: u64) -> Result<()> {
    for c in r.clusters(cs) {
        st.alloc.decref(c)?;
    }
    Ok(())
}

/// Clusters an L1 table of `entries` entries occupies (at least one).
fn l1_clusters(entries: usize, cs: u64) -> u64 {
    (entries as u64 * 8).max(1).div_ceil(cs)
}

/// The snapshot table must start on a cluster, as QEMU requires on open.
/// The snapshots and the length of their table on disk.
struct Listed {
    list: Vec<Snapshot>,
    on_disk: u64,
}

/// A snapshot table to write in place of the one on disk, `on_disk` bytes
/// long.
struct NewTable<'a> {
    list: &'a [Snapshot],
    on_disk: u64,
}

fn check_table_offset(header: &Header, name: &str) -> Result<()> {
    let cs = header.cluster_size.bytes();
    if header.snapshots_offset % cs != 0 {
        return Err(Error::InvalidImage(format!(
            "Corrupt qcow2 image '{name}': snapshot table offset {:#x} is not cluster aligned",
            header.snapshots_offset
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::block::{open_image, OpenOptions};
    use crate::host_file::FileOptions;
    use crate::qcow2::create::{create, BackingSpec, CreateSpec};

    #[test]
    fn a_snapshot_keeps_the_zero_flag_of_the_last_subcluster() {
        let dir = tempfile::tempdir().expect("temp dir");
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0xaau8; 1 << 20]).expect("write base");
        let img = dir.path().join("t.qcow2");
        let mut spec = CreateSpec::new(1 << 20);
        spec.extended_l2 = true;
        spec.backing = Some(BackingSpec {
            file: "base.raw".into(),
            format: Some("raw".into()),
        });
        create(&img, &spec, FileOptions::default()).expect("create");
        let opts = OpenOptions {
            writable: true,
            ..OpenOptions::default()
        };
        let node = open_image(img.to_str().expect("utf-8 path"), &opts).expect("open");
        // Subcluster 31 of cluster 0 (2 KiB of a 64 KiB cluster) reads as
        // zeroes: bit 63 of the cluster's bitmap word.
        let (at, len) = (62 * 1024, 2048);
        node.write_zeroes(at, len, false).expect("write zeroes");
        let q = node.as_qcow2().expect("qcow2");
        q.create_snapshot("s1", 0, 0).expect("snapshot");
        let mut buf = vec![0xffu8; len as usize];
        node.read_at(&mut buf, at).expect("read");
        assert!(buf.iter().all(|&b| b == 0), "active image lost its zeroes");
        q.apply_snapshot("s1").expect("apply");
        drop(node);
        let node = open_image(img.to_str().expect("utf-8 path"), &opts).expect("reopen");
        buf.fill(0xff);
        node.read_at(&mut buf, at).expect("read");
        assert!(buf.iter().all(|&b| b == 0), "snapshot lost its zeroes");
    }
}
