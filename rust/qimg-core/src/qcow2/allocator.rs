//! Refcounts of an image open for writing: the refcount table and blocks
//! held in memory, allocation of clusters (and of bytes, for compressed
//! clusters), and writing the changes back.
//!
//! Changes stay in memory until [`Allocator::write_back`]; the writer decides
//! when, so that refcounts always reach the file before the L2 entries that
//! use the clusters they count.
//!
//! A change that must reach the file all at once (a snapshot's refcounts and
//! the COPIED flags that mirror them) is made in a *shadow*: no refcount
//! block nor the table is written in place; changed blocks and the table go
//! to clusters the image on disk does not use, and clusters the change frees
//! are held back from reuse until one header write switches to the new table.

use super::entries::RefTableEntry;
use super::format::MAX_HOST_OFFSET;
use super::header::Header;
use super::refcount::{get_entry, set_entry};
use super::types::{ClusterSize, RefcountOrder};
use crate::block::{BlockDev, FileNode};
use crate::error::{Error, Result};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Clean refcount blocks kept in memory at most (dirty ones are always kept).
const MAX_CLEAN_BLOCKS: usize = 1024;

struct Block {
    offset: u64,
    data: Vec<u8>,
    dirty: bool,
}

/// A change being built away from the refcount structures on disk.
#[derive(Default)]
struct Shadow {
    /// Reftable slots whose block now lives in a cluster the disk's table
    /// does not use (copied or new in this change): written freely.
    moved: HashSet<u64>,
    /// The table itself lives in such clusters already.
    table_moved: bool,
    /// Clusters the image on disk still uses and the change frees: not
    /// reused before the switch.
    held: HashSet<u64>,
    /// Clusters free on disk that the change counted (a cluster it frees
    /// again is free at once: nothing on disk uses it).
    fresh: HashSet<u64>,
}

pub struct Allocator {
    file: Arc<FileNode>,
    cs: u64,
    order: RefcountOrder,
    per_block: u64,
    max_refcount: u64,
    reftable: Vec<u64>,
    reftable_offset: u64,
    reftable_clusters: u64,
    reftable_dirty: bool,
    /// The reftable moved: the header must point at the new one, and the old
    /// one's clusters are freed once it does.
    moved_from: Option<(u64, u64)>,
    header_dirty: bool,
    blocks: HashMap<u64, Block>,
    /// No cluster below this one is free.
    free_hint: u64,
    /// Every cluster from this one on is unused (past the file and every allocation).
    end: u64,
    /// Where the next compressed cluster may go inside a partly used host
    /// cluster (0: start a new cluster).
    byte_cursor: u64,
    shadow: Option<Shadow>,
}

impl Allocator {
    pub fn new(file: Arc<FileNode>, header: &Header) -> Result<Allocator> {
        Self::with_layout(
            file,
            header.cluster_size,
            header.refcount_order,
            header.reftable_offset,
            header.reftable_clusters,
        )
    }

    /// An allocator over the refcount table at `reftable_offset`
    /// (`reftable_clusters` long, already bounded by the caller).
    pub fn with_layout(
        file: Arc<FileNode>,
        cluster_size: ClusterSize,
        order: RefcountOrder,
        reftable_offset: u64,
        reftable_clusters: u64,
    ) -> Result<Allocator> {
        let cs = cluster_size.bytes();
        let raw = file.read_vec(reftable_offset, reftable_clusters * cs)?;
        let reftable = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        let width = order.width_bits();
        Ok(Allocator {
            cs,
            order,
            per_block: order.entries_per_block(cluster_size),
            max_refcount: if width >= 64 {
                u64::MAX
            } else {
                (1 << width) - 1
            },
            reftable,
            reftable_offset,
            reftable_clusters,
            reftable_dirty: false,
            moved_from: None,
            header_dirty: false,
            blocks: HashMap::new(),
            free_hint: 0,
            end: file.file_len().div_ceil(cs),
            byte_cursor: 0,
            shadow: None,
            file,
        })
    }

    fn corrupt(&self, msg: String) -> Error {
        Error::InvalidImage(format!(
            "Corrupt qcow2 image '{}': {msg}; run 'qimg check -r all' on it",
            self.file.filename()
        ))
    }

    /// Makes sure the block for reftable slot `index` is in memory.
    /// Returns false when the slot has no block.
    fn load(&mut self, index: u64) -> Result<bool> {
        if self.blocks.contains_key(&index) {
            return Ok(true);
        }
        let Some(&entry) = self.reftable.get(index as usize) else {
            return Ok(false);
        };
        let offset = RefTableEntry::from_raw(entry).block_offset();
        if offset == 0 {
            return Ok(false);
        }
        if offset % self.cs != 0 || offset >= MAX_HOST_OFFSET {
            return Err(self.corrupt(format!(
                "refcount block offset {offset:#x} (reftable index {index}) is invalid"
            )));
        }
        if self.blocks.len() >= MAX_CLEAN_BLOCKS {
            self.blocks.retain(|_, b| b.dirty);
        }
        let data = self.file.read_vec(offset, self.cs)?;
        self.blocks.insert(
            index,
            Block {
                offset,
                data,
                dirty: false,
            },
        );
        Ok(true)
    }

    /// The refcount of `cluster` (a cluster index).
    pub fn get(&mut self, cluster: u64) -> Result<u64> {
        let index = cluster / self.per_block;
        if !self.load(index)? {
            return Ok(0);
        }
        Ok(self.blocks.get(&index).map_or(0, |b| {
            get_entry(&b.data, self.order, (cluster % self.per_block) as usize)
        }))
    }

    fn set(&mut self, cluster: u64, value: u64) -> Result<()> {
        let index = cluster / self.per_block;
        if !self.load(index)? {
            self.create_block(index)?;
        }
        let order = self.order;
        let slot = (cluster % self.per_block) as usize;
        let block = self
            .blocks
            .get_mut(&index)
            .ok_or_else(|| Error::InvalidImage("refcount block vanished from the cache".into()))?;
        if let Some(shadow) = &mut self.shadow {
            // Only a shadow needs to know which clusters it counted from 0.
            let was = get_entry(&block.data, order, slot);
            if was == 0 && value > 0 && !shadow.held.contains(&cluster) {
                shadow.fresh.insert(cluster);
            }
        }
        set_entry(&mut block.data, order, slot, value);
        block.dirty = true;
        Ok(())
    }

    pub fn incref(&mut self, cluster: u64) -> Result<()> {
        let v = self.get(cluster)?;
        if v >= self.max_refcount {
            return Err(Error::InvalidImage(format!(
                "Refcount of cluster {cluster} of '{}' would exceed the {}-bit limit",
                self.file.filename(),
                self.order.width_bits()
            )));
        }
        self.set(cluster, v + 1)
    }

    /// Drops one reference; returns whether the cluster became free.
    pub fn decref(&mut self, cluster: u64) -> Result<bool> {
        let v = self.get(cluster)?;
        if v == 0 {
            return Err(self.corrupt(format!(
                "cluster {cluster} is freed but its refcount is already 0"
            )));
        }
        self.set(cluster, v - 1)?;
        if v == 1 {
            if let Some(shadow) = &mut self.shadow {
                if !shadow.fresh.contains(&cluster) {
                    shadow.held.insert(cluster);
                }
            }
            self.free_hint = self.free_hint.min(cluster);
            if self.byte_cursor != 0 && self.byte_cursor / self.cs == cluster {
                self.byte_cursor = 0;
            }
        }
        Ok(v == 1)
    }

    /// Drops one reference to every cluster overlapping `[offset, offset + len)`;
    /// returns the clusters that became free.
    pub fn free_range(&mut self, offset: u64, len: u64) -> Result<Vec<u64>> {
        let mut freed = Vec::new();
        if len == 0 {
            return Ok(freed);
        }
        for cluster in offset / self.cs..=(offset + len - 1) / self.cs {
            if self.decref(cluster)? {
                freed.push(cluster);
            }
        }
        Ok(freed)
    }

    /// The first of `n` contiguous clusters whose refcount is 0, searched
    /// from the hint on; the hint ends up just past them. (QEMU searches the
    /// same way, so images come out laid out as qemu-img lays them out.)
    fn find_free(&mut self, n: u64) -> Result<u64> {
        'retry: loop {
            for _ in 0..n {
                let c = self.free_hint;
                self.free_hint += 1;
                // Past `end` everything is free.
                if c < self.end && (self.get(c)? != 0 || self.is_held(c)) {
                    continue 'retry;
                }
            }
            let start = self.free_hint - n;
            if self.free_hint.saturating_mul(self.cs) > MAX_HOST_OFFSET {
                return Err(Error::InvalidImage(format!(
                    "'{}' is full: no room for {n} more clusters below the 64 PiB host offset limit",
                    self.file.filename()
                )));
            }
            return Ok(start);
        }
    }

    /// Allocates `n` contiguous clusters (refcount 1 each); returns the host offset.
    pub fn alloc_clusters(&mut self, n: u64) -> Result<u64> {
        'retry: loop {
            let start = self.find_free(n)?;
            for c in start..start + n {
                let index = c / self.per_block;
                if !self.load(index)? {
                    // The new block may take a cluster the run wanted: undo
                    // what the run counted so far and search again.
                    self.create_block(index)?;
                    for done in start..c {
                        self.decref(done)?;
                    }
                    continue 'retry;
                }
                self.set(c, 1)?;
            }
            self.end = self.end.max(start + n);
            return Ok(start * self.cs);
        }
    }

    /// Allocates `len` (< cluster size) bytes for a compressed cluster,
    /// packing them after the previous one as QEMU does.
    pub fn alloc_bytes(&mut self, len: u64) -> Result<u64> {
        let mut cursor = self.byte_cursor;
        if cursor != 0 && self.get(cursor / self.cs)? >= self.max_refcount {
            // That cluster cannot count one more user.
            cursor = 0;
        }
        let off = if cursor != 0 && cursor % self.cs + len <= self.cs {
            self.incref(cursor / self.cs)?;
            cursor
        } else {
            let fresh = self.alloc_clusters(1)?;
            if cursor != 0 && fresh == (cursor / self.cs + 1) * self.cs {
                // Spills over into the next cluster, which happens to be free.
                self.incref(cursor / self.cs)?;
                cursor
            } else {
                fresh
            }
        };
        self.byte_cursor = if (off + len) % self.cs == 0 {
            0
        } else {
            off + len
        };
        Ok(off)
    }

    /// Creates the (missing) refcount block for reftable slot `index`.
    fn create_block(&mut self, index: u64) -> Result<()> {
        if index as usize >= self.reftable.len() {
            self.grow_reftable(index + 1)?;
            if self.load(index)? {
                return Ok(());
            }
        }
        loop {
            let c = self.find_free(1)?;
            let covering = c / self.per_block;
            if covering == index {
                // The block counts itself.
                let mut data = vec![0u8; self.cs as usize];
                set_entry(&mut data, self.order, (c % self.per_block) as usize, 1);
                self.install_block(index, c, data);
                return Ok(());
            }
            if self.load(covering)? {
                self.install_block(index, c, vec![0u8; self.cs as usize]);
                self.set(c, 1)?;
                return Ok(());
            }
            // The new block's own cluster needs a block first.
            self.create_block(covering)?;
        }
    }

    fn install_block(&mut self, index: u64, cluster: u64, data: Vec<u8>) {
        if let Some(shadow) = &mut self.shadow {
            shadow.moved.insert(index);
            shadow.fresh.insert(cluster);
        }
        let offset = cluster * self.cs;
        self.blocks.insert(
            index,
            Block {
                offset,
                data,
                dirty: true,
            },
        );
        self.reftable[index as usize] = offset;
        self.reftable_dirty = true;
        self.end = self.end.max(cluster + 1);
    }

    /// Moves the reftable to a larger place at the end of the file, with
    /// new blocks there counting it (and themselves) where none exist.
    fn grow_reftable(&mut self, min_entries: u64) -> Result<()> {
        let per_cluster = self.cs / 8;
        let mut entries = min_entries.max(self.reftable.len() as u64 * 2);
        loop {
            let table_clusters = entries.div_ceil(per_cluster);
            // Past everything in use and past any run being counted right now.
            let start = self.end.max(self.free_hint);
            let mut blocks = 0u64;
            let missing = loop {
                let span_end = start + table_clusters + blocks;
                let mut missing = Vec::new();
                for i in start / self.per_block..=(span_end - 1) / self.per_block {
                    if !self.load(i)? {
                        missing.push(i);
                    }
                }
                if missing.len() as u64 <= blocks {
                    break missing;
                }
                blocks = missing.len() as u64;
            };
            let span_end = start + table_clusters + blocks;
            if let Some(&last) = missing.last() {
                if last >= table_clusters * per_cluster {
                    entries = last + 1;
                    continue;
                }
            }
            if span_end.saturating_mul(self.cs) > MAX_HOST_OFFSET {
                return Err(Error::InvalidImage(format!(
                    "'{}' is full: the refcount table cannot grow",
                    self.file.filename()
                )));
            }
            let old = (self.reftable_offset, self.reftable_clusters);
            self.reftable
                .resize((table_clusters * per_cluster) as usize, 0);
            for (k, &index) in missing.iter().enumerate() {
                let cluster = start + table_clusters + k as u64;
                self.blocks.insert(
                    index,
                    Block {
                        offset: cluster * self.cs,
                        data: vec![0u8; self.cs as usize],
                        dirty: true,
                    },
                );
                self.reftable[index as usize] = cluster * self.cs;
                if let Some(shadow) = &mut self.shadow {
                    shadow.moved.insert(index);
                }
            }
            if let Some(shadow) = &mut self.shadow {
                shadow.table_moved = true;
            }
            self.end = span_end;
            for c in start..span_end {
                self.set(c, 1)?;
            }
            self.reftable_offset = start * self.cs;
            self.reftable_clusters = table_clusters;
            self.reftable_dirty = true;
            self.header_dirty = true;
            // Freed only after the header points at the new table.
            if self.moved_from.is_none() {
                self.moved_from = Some(old);
            } else {
                // Moved twice before a write-back: the intermediate table was
                // never referenced by the header; free it right away.
                self.free_range(old.0, old.1 * self.cs)?;
            }
            return Ok(());
        }
    }

    /// Forgets everything at and past cluster `end` (the file was cut there):
    /// the last cluster in use ends before it. Returns that end.
    pub fn trim_end(&mut self) -> Result<u64> {
        let mut last = self.end;
        while last > 0 && self.get(last - 1)? == 0 {
            last -= 1;
        }
        self.end = last;
        self.free_hint = self.free_hint.min(last);
        if self.byte_cursor / self.cs >= last {
            self.byte_cursor = 0;
        }
        Ok(last)
    }

    /// Where the refcount table is: (offset, clusters).
    pub fn reftable(&self) -> (u64, u64) {
        (self.reftable_offset, self.reftable_clusters)
    }

    /// Host offsets of every refcount block the table points to.
    pub fn block_offsets(&self) -> Vec<u64> {
        self.reftable
            .iter()
            .map(|&e| RefTableEntry::from_raw(e).block_offset())
            .filter(|&o| o != 0)
            .collect()
    }

    /// Every cluster from the returned index on is unused.
    pub fn end(&self) -> u64 {
        self.end
    }

    pub fn order(&self) -> RefcountOrder {
        self.order
    }

    /// Whether refcount changes are waiting to be written.
    pub fn is_dirty(&self) -> bool {
        self.reftable_dirty || self.blocks.values().any(|b| b.dirty)
    }

    fn is_held(&self, cluster: u64) -> bool {
        self.shadow
            .as_ref()
            .is_some_and(|s| s.held.contains(&cluster))
    }

    /// Starts a change that reaches the file in one switch (see the module
    /// comment); everything before it must have been written back.
    pub fn begin_shadow(&mut self) -> Result<()> {
        if self.is_dirty() || self.moved_from.is_some() || self.shadow.is_some() {
            return Err(Error::InvalidImage(
                "refcount changes are pending where none may be".into(),
            ));
        }
        self.shadow = Some(Shadow::default());
        Ok(())
    }

    /// Writes the shadow's refcount blocks and table, all in clusters the
    /// image on disk does not use, and returns where the table is
    /// (offset, clusters): the header switches to it, after a sync. The
    /// clusters of the disk's blocks and table are freed in the new table.
    pub fn write_shadow(&mut self) -> Result<(u64, u64)> {
        loop {
            let Some(shadow) = &self.shadow else {
                return Err(Error::InvalidImage("no shadow refcount change".into()));
            };
            let unmoved: Vec<u64> = self
                .blocks
                .iter()
                .filter(|(i, b)| b.dirty && !shadow.moved.contains(i))
                .map(|(&i, _)| i)
                .collect();
            let table_moved = shadow.table_moved;
            if !unmoved.is_empty() {
                // Each move allocates, which may dirty blocks not moved yet:
                // the loop comes back for those.
                for index in unmoved {
                    let old = self.blocks.get(&index).map_or(0, |b| b.offset);
                    let new = self.alloc_clusters(1)?;
                    if let Some(b) = self.blocks.get_mut(&index) {
                        b.offset = new;
                    }
                    self.reftable[index as usize] = new;
                    self.reftable_dirty = true;
                    if let Some(shadow) = &mut self.shadow {
                        shadow.moved.insert(index);
                    }
                    self.decref(old / self.cs)?;
                }
                continue;
            }
            if !table_moved {
                let (old, n) = (self.reftable_offset, self.reftable_clusters);
                let new = self.alloc_clusters(n)?;
                if let Some(shadow) = &mut self.shadow {
                    shadow.table_moved = true;
                }
                // A table that grew meanwhile was moved already.
                if self.reftable_offset == old {
                    self.reftable_offset = new;
                    self.reftable_dirty = true;
                    self.free_range(old, n * self.cs)?;
                } else {
                    self.free_range(new, n * self.cs)?;
                }
                continue;
            }
            break;
        }
        // A table that grew in the shadow replaces the disk's at the switch.
        if let Some((old, n)) = self.moved_from.take() {
            self.free_range(old, n * self.cs)?;
        }
        self.reftable_dirty = true;
        self.write_out()?;
        self.header_dirty = false;
        Ok((self.reftable_offset, self.reftable_clusters))
    }

    pub fn in_shadow(&self) -> bool {
        self.shadow.is_some()
    }

    /// Ends the shadow once the header points at its table; returns the
    /// clusters it freed (reusable from now on).
    pub fn end_shadow(&mut self) -> Vec<u64> {
        let mut held: Vec<u64> = self
            .shadow
            .take()
            .map(|s| s.held.into_iter().collect())
            .unwrap_or_default();
        held.sort_unstable();
        held
    }

    /// Writes the changed blocks, then the reftable if it changed. The caller
    /// syncs, then writes the header fields from [`header_update`](Self::header_update).
    pub fn write_back(&mut self) -> Result<bool> {
        if self.shadow.is_some() {
            // In place would break the old state before the switch.
            return Err(Error::InvalidImage(
                "refcounts of a shadow change written in place".into(),
            ));
        }
        self.write_out()
    }

    fn write_out(&mut self) -> Result<bool> {
        let mut dirty: Vec<(u64, u64)> = self
            .blocks
            .iter()
            .filter(|(_, b)| b.dirty)
            .map(|(&i, b)| (b.offset, i))
            .collect();
        dirty.sort_unstable();
        let wrote = !dirty.is_empty() || self.reftable_dirty;
        for (offset, index) in dirty {
            if let Some(b) = self.blocks.get_mut(&index) {
                self.file.pwrite(&b.data, offset)?;
                b.dirty = false;
            }
        }
        if self.reftable_dirty {
            let raw: Vec<u8> = self.reftable.iter().flat_map(|e| e.to_be_bytes()).collect();
            self.file.pwrite(&raw, self.reftable_offset)?;
            self.reftable_dirty = false;
        }
        Ok(wrote)
    }

    /// The new reftable location for the header, once per move.
    pub fn header_update(&mut self) -> Option<(u64, u64)> {
        if !self.header_dirty {
            return None;
        }
        self.header_dirty = false;
        Some((self.reftable_offset, self.reftable_clusters))
    }

    /// The old reftable, to be freed after the header stopped pointing at it.
    pub fn take_retired_table(&mut self) -> Option<(u64, u64)> {
        self.moved_from.take().map(|(off, n)| (off, n * self.cs))
    }
}
