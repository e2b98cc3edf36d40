//! Writing to a qcow2 image: allocation on first write with copy-on-write of
//! partial clusters, zero clusters, discard, compressed clusters, and the
//! ordered write-back of metadata.
//!
//! Crash safety comes from the order in which metadata reaches the file
//! (each step synced before the next starts):
//! 1. refcount increments (new refcount blocks, a moved refcount table, then
//!    the header pointing at it);
//! 2. L2 tables;
//! 3. the L1 table;
//! 4. refcount decrements of clusters that no table references any more.
//!
//! A process killed between any two writes leaves clusters whose refcount is
//! too high (leaks), never a reference to a cluster whose refcount says it is
//! free. Freed clusters are only reused after step 4.

use super::allocator::Allocator;
use super::compress::compress;
use super::entries::{L1Entry, L2Entry, SubclusterBitmap};
use super::format::{
    HEADER_AUTOCLEAR, HEADER_INCOMPATIBLE, HEADER_REFTABLE_OFFSET, INCOMPAT_DIRTY,
};
use super::header::{kept_autoclear, Header};
use super::reader::Qcow2Node;
use super::types::Compat;
use crate::block::{check_request, BlockDev, FileNode};
use crate::error::{Error, Result};
use std::sync::{MutexGuard, PoisonError};

/// Dirty metadata beyond this is written back even without a flush.
const DIRTY_TABLES_LIMIT: usize = 256;
/// Zeroes written per request where a format cannot mark zeroes.
const ZERO_BUF: usize = 1 << 20;

/// The writer's state, behind the node's mutex: one metadata update at a time.
pub struct WriteState {
    pub(super) alloc: Allocator,
    /// Range of L1 entries changed in memory.
    pub(super) l1_dirty: Option<(usize, usize)>,
    /// Where the active L1 table is (a resize may move it).
    pub(super) l1_offset: u64,
    /// Host ranges to release once no table on disk refers to them, and
    /// whether to give their space back to the file system when they become
    /// free (for discards and unmapping zero writes, as QEMU does).
    pub(super) pending_free: Vec<(u64, u64, bool)>,
    /// Lazy refcounts: the dirty bit is set in the file.
    marked_dirty: bool,
    lazy: bool,
    /// The incompatible feature bits the header holds (without the dirty bit).
    incompatible: u64,
    /// The image was reopened as a new node (see [`Qcow2Node::reopen`]):
    /// this one writes nothing more.
    retired: bool,
    /// The enabled persistent bitmaps, following guest writes.
    pub(super) bitmaps: Vec<super::bitmap_ops::Tracked>,
    /// Their in-use flags are set on disk (since the first write).
    pub(super) bitmaps_in_use: bool,
}

impl WriteState {
    /// The header was rewritten clean with these lazy-refcount and feature settings.
    pub(super) fn set_clean_header(&mut self, lazy: bool, incompatible: u64) {
        self.marked_dirty = false;
        self.lazy = lazy;
        self.incompatible = incompatible & !INCOMPAT_DIRTY;
    }
}

impl WriteState {
    pub fn new(file: &std::sync::Arc<FileNode>, header: &Header) -> Result<WriteState> {
        let name = file.filename();
        let refuse = |why: &str| {
            Err(Error::InvalidImage(format!(
                "Could not open '{name}' for writing: {why}"
            )))
        };
        if header.corrupt() {
            return refuse("the image is marked corrupt; run 'qimg check -r all' on it first");
        }
        if header.dirty() {
            return refuse(
                "the image was not closed cleanly (lazy refcounts); run 'qimg check -r all' on it first",
            );
        }
        let kept = kept_autoclear(header.autoclear);
        if kept != header.autoclear {
            file.pwrite(&kept.to_be_bytes(), HEADER_AUTOCLEAR)?;
            file.sync()?;
        }
        Ok(WriteState {
            alloc: Allocator::new(std::sync::Arc::clone(file), header)?,
            l1_dirty: None,
            l1_offset: header.l1_table_offset,
            pending_free: Vec::new(),
            marked_dirty: false,
            lazy: header.lazy_refcounts(),
            incompatible: header.incompatible & !INCOMPAT_DIRTY,
            retired: false,
            bitmaps: super::bitmap_ops::start_tracking(file, header)?,
            bitmaps_in_use: false,
        })
    }
}

/// What [`Qcow2Node::zero_in_table`] does to each cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Release {
    /// Reads as zeroes afterwards; `unmap` lets the cluster go.
    Zero { unmap: bool },
    /// A discard request: the cluster goes, reading as zeroes where the
    /// format can say so (v3), else as the backing file.
    Discard,
    /// The cluster goes and the entry is cleared (shrinking).
    Remove,
}

/// What a write does to one guest cluster.
#[derive(Debug, Clone, Copy)]
enum Action {
    /// The cluster is ours alone: write into it.
    InPlace { host: u64 },
    /// A new cluster replaces the current mapping; `whole` when all of the
    /// old content must be copied (its subcluster states cannot be kept).
    New { whole: bool },
}

#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Slot in the L2 table.
    index: usize,
    /// Guest offset of the cluster.
    start: u64,
    /// Bytes of the cluster the caller's data covers.
    a: u64,
    b: u64,
    /// Bytes written to the host (the data plus copied old content).
    lo: u64,
    hi: u64,
    action: Action,
    /// A standard zero cluster that keeps its host cluster.
    zero_alloc: bool,
    /// Host range the old mapping held, released after the update.
    free: Option<(u64, u64)>,
}

impl Plan {
    /// Whether the L2 entry changes (a plain in-place data write changes nothing).
    fn changes_mapping(&self, ext: bool) -> bool {
        !matches!(self.action, Action::InPlace { .. }) || ext || self.zero_alloc
    }
}

impl Qcow2Node {
    pub(super) fn state(&self) -> Result<MutexGuard<'_, WriteState>> {
        let w = self.writer.as_ref().ok_or_else(|| {
            Error::InvalidArgument(format!("'{}' is open read-only", self.file.filename()))
        })?;
        let st = w.lock().unwrap_or_else(PoisonError::into_inner);
        if st.retired {
            return Err(Error::InvalidArgument(format!(
                "'{}' was reopened; use the new handle",
                self.file.filename()
            )));
        }
        Ok(st)
    }

    pub fn is_writable(&self) -> bool {
        self.writer.is_some()
    }

    pub(super) fn cs(&self) -> u64 {
        self.header.cluster_size.bytes()
    }

    /// Bytes of one allocation unit: a subcluster with extended L2, else a cluster.
    fn unit(&self) -> u64 {
        if self.header.extended_l2() {
            self.cs() / 32
        } else {
            self.cs()
        }
    }

    /// With lazy refcounts the file says "dirty" before any metadata changes.
    pub(super) fn begin_update(&self, st: &mut WriteState) -> Result<()> {
        if st.lazy && !st.marked_dirty {
            self.write_incompatible(st.incompatible | INCOMPAT_DIRTY)?;
            self.file.sync()?;
            st.marked_dirty = true;
        }
        Ok(())
    }

    fn write_incompatible(&self, bits: u64) -> Result<()> {
        self.file.pwrite(&bits.to_be_bytes(), HEADER_INCOMPATIBLE)
    }

    pub(super) fn set_l1(&self, st: &mut WriteState, index: usize, entry: L1Entry) {
        let mut l1 = self.l1.write().unwrap_or_else(PoisonError::into_inner);
        l1[index] = entry.raw();
        st.l1_dirty = Some(match st.l1_dirty {
            None => (index, index + 1),
            Some((a, b)) => (a.min(index), b.max(index + 1)),
        });
    }

    /// The offset of the L2 table for L1 slot `l1_index`, created if missing;
    /// the table is in the cache afterwards.
    pub(super) fn l2_for_write(&self, st: &mut WriteState, l1_index: u64) -> Result<u64> {
        let entry = self
            .l1_read()
            .get(l1_index as usize)
            .copied()
            .map(L1Entry::from_raw)
            .ok_or_else(|| self.corrupt(format!("L1 index {l1_index} is out of range")))?;
        if entry.table_offset() == 0 {
            let offset = st.alloc.alloc_clusters(1)?;
            let words = (self.cs() / 8) as usize;
            self.l2_cache.insert_new(offset, vec![0u64; words]);
            self.set_l1(st, l1_index as usize, L1Entry::new(offset, true));
            return Ok(offset);
        }
        let Some((table, old)) = self.l2_table(l1_index)? else {
            return Err(self.corrupt(format!("L1 index {l1_index} lost its L2 table")));
        };
        if entry.copied() {
            return Ok(old);
        }
        // Shared with a snapshot: this slot gets a copy of its own. The
        // clusters it maps keep their counts (the copy takes the place of
        // the active table's reference); the old table loses one reference
        // once the L1 table on disk points at the copy.
        self.begin_update(st)?;
        let offset = st.alloc.alloc_clusters(1)?;
        self.l2_cache.insert_new(offset, table.to_vec());
        self.set_l1(st, l1_index as usize, L1Entry::new(offset, true));
        st.pending_free.push((old, self.cs(), false));
        Ok(offset)
    }

    /// Applies `edit` to the cached L2 table at `offset` (reloading it if it
    /// was evicted meanwhile; only this writer changes tables).
    pub(super) fn edit_l2<T>(
        &self,
        offset: u64,
        l1_index: u64,
        mut edit: impl FnMut(&mut [u64]) -> T,
    ) -> Result<T> {
        for _ in 0..3 {
            if let Some(out) = self.l2_cache.update(offset, &mut edit) {
                return Ok(out);
            }
            self.l2_table(l1_index)?;
        }
        Err(self.corrupt(format!(
            "the L2 table at {offset:#x} cannot be kept in the cache"
        )))
    }

    /// Writes `data` at guest `offset`: the range lies inside one L2 table.
    fn write_in_table(&self, st: &mut WriteState, data: &[u8], offset: u64) -> Result<()> {
        let cs = self.cs();
        let unit = self.unit();
        let ext = self.header.extended_l2();
        let per_table = self.header.l2_entries();
        let end = offset + data.len() as u64;
        let l1_index = offset / cs / per_table;
        let table_off = self.l2_for_write(st, l1_index)?;
        let Some((table, _)) = self.l2_table(l1_index)? else {
            return Err(self.corrupt(format!("L1 index {l1_index} lost its L2 table")));
        };
        let mut plans = Vec::new();
        let file_end = self.file.file_len().next_multiple_of(cs);
        let bits = self.header.cluster_size.bits();
        for cluster in offset / cs..=(end - 1) / cs {
            let index = (cluster % per_table) as usize;
            let (entry, _) = entry_at(&table, index, ext);
            let start = cluster * cs;
            let a = offset.max(start) - start;
            let b = end.min(start + cs) - start;
            let host = entry.host_offset();
            let compressed = entry.is_compressed();
            if !compressed && host != 0 && entry.copied() && host + cs > file_end {
                // Writing there would stretch the file to wherever the entry points.
                return Err(self.corrupt(format!(
                    "data cluster offset {host:#x} (L2 index {index}) lies past the end of the file; run 'qimg check -r all' on it"
                )));
            }
            let (action, free) = if !compressed && host != 0 && entry.copied() {
                (Action::InPlace { host }, None)
            } else if compressed {
                (
                    Action::New { whole: true },
                    Some(entry.compressed_data(bits).sectors_range()),
                )
            } else if host != 0 {
                (Action::New { whole: true }, Some((host, cs)))
            } else {
                (Action::New { whole: false }, None)
            };
            // What must be written: the data, widened to whole units where the
            // old content has to be carried over.
            let zero_alloc = !ext && entry.zero_flag();
            let (lo, hi) = match action {
                Action::InPlace { .. } if !ext && !zero_alloc => (a, b),
                Action::New { whole: true } => (0, cs),
                _ if ext => (a / unit * unit, b.div_ceil(unit) * unit),
                _ => (0, cs),
            };
            plans.push(Plan {
                index,
                start,
                a,
                b,
                lo,
                hi,
                action,
                zero_alloc,
                free,
            });
        }
        drop(table);

        // Old content for the widened edges, read before anything changes.
        let mut edges: Vec<Option<Vec<u8>>> = Vec::with_capacity(plans.len());
        for p in &plans {
            if p.lo == p.a && p.hi == p.b {
                edges.push(None);
                continue;
            }
            let mut buf = vec![0u8; (p.hi - p.lo) as usize];
            let head = (p.a - p.lo) as usize;
            let tail = (p.b - p.lo) as usize;
            if head > 0 {
                self.read_serial(&mut buf[..head], p.start + p.lo)?;
            }
            if tail < buf.len() {
                self.read_serial(&mut buf[tail..], p.start + p.b)?;
            }
            let from = (p.start + p.a - offset) as usize;
            buf[head..tail].copy_from_slice(&data[from..from + (tail - head)]);
            edges.push(Some(buf));
        }

        let fresh = plans
            .iter()
            .filter(|p| matches!(p.action, Action::New { .. }))
            .count() as u64;
        let mut next_new = if fresh > 0 {
            self.begin_update(st)?;
            st.alloc.alloc_clusters(fresh)?
        } else {
            0
        };
        let mut hosts = Vec::with_capacity(plans.len());
        for p in &plans {
            hosts.push(match p.action {
                Action::InPlace { host } => host,
                Action::New { .. } => {
                    let h = next_new;
                    next_new += cs;
                    h
                }
            });
        }

        // Data first; runs of untouched caller data go out in one write.
        let mut run: Option<(u64, usize, usize)> = None; // (host, data from, data to)
        for ((p, host), edge) in plans.iter().zip(&hosts).zip(&edges) {
            match edge {
                Some(buf) => {
                    if let Some((h, f, t)) = run.take() {
                        self.file.pwrite(&data[f..t], h)?;
                    }
                    self.file.pwrite(buf, host + p.lo)?;
                }
                None => {
                    let from = (p.start + p.a - offset) as usize;
                    let to = from + (p.b - p.a) as usize;
                    let at = host + p.a;
                    run = match run {
                        Some((h, f, t)) if h + (t - f) as u64 == at && t == from => {
                            Some((h, f, to))
                        }
                        Some((h, f, t)) => {
                            self.file.pwrite(&data[f..t], h)?;
                            Some((at, from, to))
                        }
                        None => Some((at, from, to)),
                    };
                }
            }
        }
        if let Some((h, f, t)) = run {
            self.file.pwrite(&data[f..t], h)?;
        }

        // Then the mapping.
        if plans.iter().any(|p| p.changes_mapping(ext)) {
            self.begin_update(st)?;
            self.edit_l2(table_off, l1_index, |t| {
                for (p, &host) in plans.iter().zip(&hosts) {
                    let entry = L2Entry::new(host, true).raw();
                    if ext {
                        let bitmap = SubclusterBitmap::from_raw(t[p.index * 2 + 1]);
                        let mask = SubclusterBitmap::mask(p.lo / unit, (p.hi - p.lo) / unit);
                        let new_bitmap = match p.action {
                            Action::New { whole: true } => SubclusterBitmap::ALL_ALLOCATED,
                            _ => bitmap.with_allocated(mask),
                        };
                        t[p.index * 2] = entry;
                        t[p.index * 2 + 1] = new_bitmap.raw();
                    } else {
                        t[p.index] = entry;
                    }
                }
            })?;
        }
        st.pending_free.extend(
            plans
                .iter()
                .filter_map(|p| p.free.map(|(a, n)| (a, n, false))),
        );
        self.write_back_if_large(st)
    }

    /// Sets zero flags for whole units in `[offset, end)` of one L2 table,
    /// or releases the clusters, as `how` says.
    pub(super) fn zero_in_table(
        &self,
        st: &mut WriteState,
        offset: u64,
        end: u64,
        how: Release,
    ) -> Result<()> {
        let (unmap, discard) = match how {
            Release::Zero { unmap } => (unmap, false),
            Release::Discard | Release::Remove => (true, true),
        };
        let remove = how == Release::Remove;
        let cs = self.cs();
        let unit = self.unit();
        let ext = self.header.extended_l2();
        let v3 = self.header.compat != Compat::V2;
        let per_table = self.header.l2_entries();
        let l1_index = offset / cs / per_table;
        let has_backing = self.backing.is_some();
        let bits = self.header.cluster_size.bits();
        // Nothing to do for a discard of a range with no L2 table.
        if discard && self.l2_table(l1_index)?.is_none() && (!has_backing || remove) {
            return Ok(());
        }
        self.begin_update(st)?;
        let table_off = self.l2_for_write(st, l1_index)?;
        let mut frees = Vec::new();
        self.edit_l2(table_off, l1_index, |t| {
            frees.clear();
            for cluster in offset / cs..=(end - 1) / cs {
                let index = (cluster % per_table) as usize;
                let start = cluster * cs;
                let lo = offset.max(start) - start;
                let hi = end.min(start + cs) - start;
                let (entry, bitmap) = entry_at(t, index, ext);
                let host = entry.host_offset();
                let compressed = entry.is_compressed();
                let allocated = compressed || host != 0;
                let old_range = if compressed {
                    Some(entry.compressed_data(bits).sectors_range())
                } else if host != 0 {
                    Some((host, cs))
                } else {
                    None
                };
                let whole = lo == 0 && hi == cs;
                let (none, all_zero) = (SubclusterBitmap::NONE, SubclusterBitmap::ALL_ZERO);
                let (new_entry, new_bitmap, release) = if remove {
                    (L2Entry::UNALLOCATED, none, old_range)
                } else if discard {
                    if has_backing || allocated {
                        if ext {
                            (L2Entry::UNALLOCATED, all_zero, old_range)
                        } else if v3 {
                            (L2Entry::ZERO, none, old_range)
                        } else {
                            (L2Entry::UNALLOCATED, none, old_range)
                        }
                    } else {
                        (entry, bitmap, None)
                    }
                } else if ext && !whole {
                    // Callers never send partial units of compressed clusters here.
                    let mask = SubclusterBitmap::mask(lo / unit, (hi - lo) / unit);
                    (entry, bitmap.with_zero(mask), None)
                } else if unmap || compressed {
                    if ext {
                        (L2Entry::UNALLOCATED, all_zero, old_range)
                    } else {
                        (L2Entry::ZERO, none, old_range)
                    }
                } else if ext {
                    (entry, all_zero, None)
                } else {
                    (entry.with_zero_flag(), none, None)
                };
                if ext {
                    t[index * 2] = new_entry.raw();
                    t[index * 2 + 1] = new_bitmap.raw();
                } else {
                    t[index] = new_entry.raw();
                }
                if let Some(r) = release {
                    frees.push(r);
                }
            }
        })?;
        let punch = discard || unmap;
        st.pending_free
            .extend(frees.into_iter().map(|(a, n)| (a, n, punch)));
        self.write_back_if_large(st)
    }

    /// Whether the guest bytes of `[offset, offset + len)` all read as zeroes.
    fn reads_zero(&self, offset: u64, len: u64) -> Result<bool> {
        let mut buf = vec![0u8; len as usize];
        self.read_serial(&mut buf, offset)?;
        Ok(buf.iter().all(|&b| b == 0))
    }

    fn write_zero_bytes(&self, offset: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; ZERO_BUF.min(len as usize)];
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(zeros.len() as u64) as usize;
            self.write_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Splits `[offset, end)` at L2 table boundaries.
    pub(super) fn per_table(
        &self,
        offset: u64,
        end: u64,
        mut f: impl FnMut(u64, u64) -> Result<()>,
    ) -> Result<()> {
        let span = self.cs() * self.header.l2_entries();
        let mut pos = offset;
        while pos < end {
            let stop = ((pos / span + 1) * span).min(end);
            f(pos, stop)?;
            pos = stop;
        }
        Ok(())
    }

    /// Writes one compressed cluster at guest `offset` (cluster aligned; a
    /// shorter `data` is the last cluster of the image). The cluster must be
    /// unallocated, as in QEMU. Data that does not compress is written plainly.
    pub fn write_compressed(&self, data: &[u8], offset: u64) -> Result<()> {
        let cs = self.cs();
        self.check_compressed_request(offset, data.len() as u64)?;
        let mut cluster = data.to_vec();
        cluster.resize(cs as usize, 0);
        match compress(self.header.compression, &cluster, cs as usize) {
            Some(packed) => self.write_compressed_packed(&packed, offset),
            None => self.write_at(data, offset),
        }
    }

    fn check_compressed_request(&self, offset: u64, len: u64) -> Result<()> {
        let cs = self.cs();
        check_request(self, offset, len)?;
        if offset % cs != 0 || (len != cs && offset + len != self.size()) {
            return Err(Error::invalid(format!(
                "compressed writes must cover whole clusters ({cs} bytes at a multiple of {cs})"
            )));
        }
        Ok(())
    }

    /// Stores `packed` (one cluster compressed with the image's compression
    /// type, shorter than a cluster) as the cluster at guest `offset`.
    pub fn write_compressed_packed(&self, packed: &[u8], offset: u64) -> Result<()> {
        let cs = self.cs();
        self.check_compressed_request(offset, cs.min(self.size().saturating_sub(offset)))?;
        if packed.is_empty() || packed.len() as u64 >= cs {
            return Err(Error::invalid(format!(
                "a compressed cluster must be shorter than the cluster size ({} >= {cs})",
                packed.len()
            )));
        }
        let mut st = self.state()?;
        self.note_write(&mut st, offset, cs.min(self.size() - offset))?;
        let per_table = self.header.l2_entries();
        let l1_index = offset / cs / per_table;
        let index = ((offset / cs) % per_table) as usize;
        let ext = self.header.extended_l2();
        self.begin_update(&mut st)?;
        let table_off = self.l2_for_write(&mut st, l1_index)?;
        let Some((table, _)) = self.l2_table(l1_index)? else {
            return Err(self.corrupt(format!("L1 index {l1_index} lost its L2 table")));
        };
        let (entry, _) = entry_at(&table, index, ext);
        drop(table);
        if !entry.is_unallocated() {
            return Err(Error::invalid(format!(
                "cannot write a compressed cluster over allocated data at offset {offset} of '{}'",
                self.file.filename()
            )));
        }
        let host = st.alloc.alloc_bytes(packed.len() as u64)?;
        self.file.pwrite(packed, host)?;
        let new_entry =
            L2Entry::compressed(host, packed.len() as u64, self.header.cluster_size.bits()).raw();
        self.edit_l2(table_off, l1_index, |t| {
            if ext {
                t[index * 2] = new_entry;
                t[index * 2 + 1] = SubclusterBitmap::NONE.raw();
            } else {
                t[index] = new_entry;
            }
        })?;
        self.write_back_if_large(&mut st)
    }

    fn write_back_if_large(&self, st: &mut WriteState) -> Result<()> {
        if self.l2_cache.dirty_count() >= DIRTY_TABLES_LIMIT.min(self.l2_cache.capacity() / 2) {
            self.write_back(st)?;
        }
        Ok(())
    }

    /// Writes every metadata change to the file in crash-safe order.
    pub(super) fn write_back(&self, st: &mut WriteState) -> Result<()> {
        // 1. Refcounts of everything newly referenced.
        if st.alloc.write_back()? {
            self.file.sync()?;
        }
        if let Some((offset, clusters)) = st.alloc.header_update() {
            let mut raw = offset.to_be_bytes().to_vec();
            raw.extend_from_slice(&(clusters as u32).to_be_bytes());
            self.file.pwrite(&raw, HEADER_REFTABLE_OFFSET)?;
            self.file.sync()?;
        }
        // 2. L2 tables.
        let tables = self.l2_cache.dirty_tables();
        if !tables.is_empty() {
            for (offset, raw) in &tables {
                self.file.pwrite(raw, *offset)?;
            }
            self.file.sync()?;
            self.l2_cache.mark_clean(tables.iter().map(|(o, _)| *o));
        }
        // 3. L1 entries.
        if let Some((a, b)) = st.l1_dirty.take() {
            let raw: Vec<u8> = self.l1_read()[a..b]
                .iter()
                .flat_map(|e| e.to_be_bytes())
                .collect();
            self.file.pwrite(&raw, st.l1_offset + a as u64 * 8)?;
            self.file.sync()?;
        }
        // 4. Releases.
        let mut frees = std::mem::take(&mut st.pending_free);
        if let Some((offset, len)) = st.alloc.take_retired_table() {
            frees.push((offset, len, false));
        }
        if !frees.is_empty() {
            let mut holes = Vec::new();
            for (offset, len, punch) in frees {
                let freed = st.alloc.free_range(offset, len)?;
                if punch {
                    holes.extend(freed);
                }
            }
            if st.alloc.write_back()? {
                self.file.sync()?;
            }
            self.punch(holes);
        }
        Ok(())
    }

    /// Gives the space of free `clusters` back to the file system or the
    /// server (a failure loses nothing), a run of neighbours in one request.
    pub(super) fn punch(&self, mut clusters: Vec<u64>) {
        let cs = self.cs();
        clusters.sort_unstable();
        let mut run: Option<(u64, u64)> = None;
        for cluster in clusters {
            run = match run {
                Some((first, n)) if first + n == cluster => Some((first, n + 1)),
                Some((first, n)) => {
                    let _ = self.file.discard(first * cs, n * cs);
                    Some((cluster, 1))
                }
                None => Some((cluster, 1)),
            };
        }
        if let Some((first, n)) = run {
            let _ = self.file.discard(first * cs, n * cs);
        }
    }

    /// Flushes everything and, with lazy refcounts, marks the image clean.
    pub fn close_writer(&self) -> Result<()> {
        let Some(w) = &self.writer else {
            return Ok(());
        };
        if w.lock().unwrap_or_else(PoisonError::into_inner).retired {
            return Ok(());
        }
        let mut st = self.state()?;
        self.write_back(&mut st)?;
        self.store_tracked(&mut st)?;
        self.file.sync()?;
        if st.marked_dirty {
            self.write_incompatible(st.incompatible)?;
            self.file.sync()?;
            st.marked_dirty = false;
        }
        Ok(())
    }
}

/// The L2 entry (and bitmap, with extended L2) of slot `index`.
#[inline]
fn entry_at(table: &[u64], index: usize, ext: bool) -> (L2Entry, SubclusterBitmap) {
    if ext {
        (
            L2Entry::from_raw(table[index * 2]),
            SubclusterBitmap::from_raw(table[index * 2 + 1]),
        )
    } else {
        (L2Entry::from_raw(table[index]), SubclusterBitmap::NONE)
    }
}

impl Qcow2Node {
    /// The image as it now stands on disk, opened anew on the same file (so
    /// with the same locks) and backing chain. A node's header is fixed when
    /// it is opened; after `amend` rewrote the header, the reopened node is
    /// the one that reads and writes by the new rules. This node is flushed
    /// and retired: it writes nothing more, not even when dropped.
    pub fn reopen(&self) -> Result<Qcow2Node> {
        self.close_writer()?;
        let header = self.disk_header()?;
        if let Some(w) = &self.writer {
            w.lock().unwrap_or_else(PoisonError::into_inner).retired = true;
        }
        Qcow2Node::open(
            std::sync::Arc::clone(&self.file),
            header,
            self.backing.clone(),
            self.backing_path().map(str::to_string),
        )
    }
}

impl Drop for Qcow2Node {
    fn drop(&mut self) {
        // Nothing may be lost when a writer forgets to close; errors have no
        // one to go to here (close explicitly to see them).
        let _ = self.close_writer();
    }
}

/// Guest writes, zeroes, discards and flushes of an image open for writing.
pub(super) fn write_at(node: &Qcow2Node, buf: &[u8], offset: u64) -> Result<()> {
    check_request(node, offset, buf.len() as u64)?;
    if buf.is_empty() {
        return Ok(());
    }
    let mut st = node.state()?;
    node.note_write(&mut st, offset, buf.len() as u64)?;
    let end = offset + buf.len() as u64;
    node.per_table(offset, end, |a, b| {
        let from = (a - offset) as usize;
        node.write_in_table(&mut st, &buf[from..from + (b - a) as usize], a)
    })
}

pub(super) fn write_zeroes(node: &Qcow2Node, offset: u64, len: u64, unmap: bool) -> Result<()> {
    check_request(node, offset, len)?;
    node.note_write(&mut *node.state()?, offset, len)?;
    if len == 0 {
        return Ok(());
    }
    // Without a zero flag (v2), whole clusters can still be made to read as
    // zeroes by unallocating them, as long as no backing file shows through.
    let v2 = node.header.compat == Compat::V2;
    if v2 && node.backing.is_some() {
        return node.write_zero_bytes(offset, len);
    }
    let unit = node.unit();
    let size = node.size();
    let end = offset + len;
    // The aligned span [lo, hi); a request reaching the end of the image
    // covers its last partial unit.
    let mut lo = offset.next_multiple_of(unit);
    let mut hi = if end == size {
        end.next_multiple_of(unit)
    } else {
        end / unit * unit
    };
    // Partial units at the edges become zero units when the rest of them
    // already reads as zeroes (as in QEMU); otherwise zeroes are written.
    let head_unit = offset / unit * unit;
    let head_end = end.min(head_unit + unit);
    let mut tail_done = false;
    if offset % unit != 0 {
        tail_done = head_end == end;
        if node.unit_rest_is_zero(head_unit, (head_unit + unit).min(size), offset, head_end)? {
            lo = head_unit;
            hi = hi.max(head_unit + unit);
        } else {
            node.write_zero_bytes(offset, head_end - offset)?;
            lo = lo.max(head_end.next_multiple_of(unit)).min(hi.max(lo));
        }
    }
    if !tail_done && end > hi {
        let tail_unit = hi.max(lo);
        if node.unit_rest_is_zero(tail_unit, (tail_unit + unit).min(size), tail_unit, end)? {
            hi = tail_unit + unit;
        } else {
            node.write_zero_bytes(tail_unit, end - tail_unit)?;
        }
    }
    if lo >= hi {
        return Ok(());
    }
    let mut st = node.state()?;
    let ext = node.header.extended_l2();
    let cs = node.cs();
    node.per_table(lo, hi, |a, b| {
        if !ext {
            return node.zero_in_table(
                &mut st,
                a,
                b,
                if v2 {
                    Release::Discard
                } else {
                    Release::Zero { unmap }
                },
            );
        }
        // Compressed clusters have no subcluster bits: their partial zeroes are data.
        let mut pos = a;
        while pos < b {
            let stop = ((pos / cs + 1) * cs).min(b);
            let partial = pos % cs != 0 || (stop % cs != 0 && stop < size);
            if partial && node.is_compressed_at(pos)? {
                drop_and_write_zeroes(node, &mut st, pos, stop.min(size))?;
            } else {
                node.zero_in_table(&mut st, pos, stop, Release::Zero { unmap })?;
            }
            pos = stop;
        }
        Ok(())
    })
}

fn drop_and_write_zeroes(node: &Qcow2Node, st: &mut WriteState, a: u64, b: u64) -> Result<()> {
    let zeros = vec![0u8; (b - a) as usize];
    node.per_table(a, b, |x, y| {
        node.write_in_table(st, &zeros[(x - a) as usize..(y - a) as usize], x)
    })
}

pub(super) fn discard(node: &Qcow2Node, offset: u64, len: u64) -> Result<()> {
    check_request(node, offset, len)?;
    let mut st = node.state()?;
    node.note_write(&mut st, offset, len)?;
    let cs = node.cs();
    let end = offset + len;
    // Only whole clusters are discarded; the image's last cluster counts as
    // whole when the request reaches the end.
    let lo = offset.next_multiple_of(cs);
    let hi = if end == node.size() {
        end.next_multiple_of(cs)
    } else {
        end / cs * cs
    };
    if lo >= hi {
        return Ok(());
    }
    node.per_table(lo, hi, |a, b| {
        node.zero_in_table(&mut st, a, b, Release::Discard)
    })
}

pub(super) fn flush(node: &Qcow2Node) -> Result<()> {
    let Some(w) = node.writer.as_ref() else {
        return Ok(());
    };
    let mut st = w.lock().unwrap_or_else(PoisonError::into_inner);
    node.write_back(&mut st)?;
    node.file.sync()
}

impl Qcow2Node {
    /// Whether the guest bytes of unit `[u, u_end)` outside `[a, b)` read as zeroes.
    fn unit_rest_is_zero(&self, u: u64, u_end: u64, a: u64, b: u64) -> Result<bool> {
        Ok((a <= u || self.reads_zero(u, a - u)?)
            && (b >= u_end || self.reads_zero(b, u_end - b)?))
    }

    fn is_compressed_at(&self, offset: u64) -> Result<bool> {
        Ok(matches!(
            self.lookup(offset, 1)?.0,
            super::reader::Mapping::Compressed { .. }
        ))
    }
}
