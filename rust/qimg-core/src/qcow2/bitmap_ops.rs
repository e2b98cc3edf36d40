//! Persistent dirty bitmaps of a qcow2 image open for writing: the changes
//! `qimg bitmap` makes (add, remove, clear, enable, disable, merge), and the
//! tracking of guest writes in every enabled bitmap while the image is open.
//!
//! A bitmap's bits live in clusters its bitmap table points at (an entry of
//! zero: a cluster's worth of clear bits). Changed bits always go to new
//! clusters with a new table and a new directory; the header's bitmaps
//! extension then switches to that directory in one header write, and only
//! then is what the old directory referred to released. A crash leaves the
//! old bitmaps, or the new ones, and at worst leaked clusters.
//!
//! While an image is open for writing, its enabled bitmaps carry the in-use
//! flag on disk, as QEMU sets it: if the writer dies, the bitmaps are known
//! to have missed writes. Closing stores the tracked bits and clears the flag.

use super::bitmaps::{
    bitmap_shape, encode_directory, read_directory, DirEntry, GRANULARITY_BITS, MAX_BITMAPS,
    MAX_NAME_BYTES,
};
use super::bytes::be64;
use super::entries::BitmapTableEntry;
use super::format::{
    BITMAP_FLAG_AUTO, BITMAP_FLAG_IN_USE, BITMAP_TYPE_DIRTY_TRACKING, MAX_BITMAP_BYTES,
};
use super::header::{BitmapsExtension, Header};
use super::reader::Qcow2Node;
use super::types::Compat;
use super::writer::WriteState;
use crate::block::{BlockDev, FileNode};
use crate::error::{Error, Result};

/// One change `qimg bitmap` makes to a bitmap; several apply in order.
#[derive(Debug, Clone)]
pub enum BitmapOp {
    /// A new, empty bitmap; `granularity` in bytes (None: QEMU's default).
    Add {
        granularity: Option<u64>,
    },
    Remove,
    Clear,
    Enable,
    Disable,
    /// Sets every bit the source bitmap has set.
    Merge(SourceBits),
}

impl BitmapOp {
    /// The operation's name as qemu-img's messages give it.
    pub fn name(&self) -> &'static str {
        match self {
            BitmapOp::Add { .. } => "add",
            BitmapOp::Remove => "remove",
            BitmapOp::Clear => "clear",
            BitmapOp::Enable => "enable",
            BitmapOp::Disable => "disable",
            BitmapOp::Merge(_) => "merge",
        }
    }
}

/// The bits of a bitmap, taken to be merged into another one.
#[derive(Debug, Clone)]
pub struct SourceBits {
    pub name: String,
    pub granularity_bits: u8,
    /// Bit i (least significant first in each byte) covers guest bytes
    /// `[i << granularity_bits, (i + 1) << granularity_bits)`.
    pub bits: Vec<u8>,
}

/// An enabled bitmap whose bits follow guest writes while the image is open.
#[derive(Debug)]
pub(super) struct Tracked {
    name: String,
    granularity_bits: u8,
    bits: Vec<u8>,
}

impl Tracked {
    fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let g = self.granularity_bits;
        let last_bit = (self.bits.len() as u64 * 8).saturating_sub(1);
        let first = (offset >> g).min(last_bit);
        let last = ((offset + len - 1) >> g).min(last_bit);
        set_bits(&mut self.bits, first, last);
    }
}

/// Sets bits `first..=last`.
fn set_bits(bits: &mut [u8], first: u64, last: u64) {
    let mut i = first;
    while i <= last {
        if i % 8 == 0 && i + 7 <= last {
            let byte = (i / 8) as usize;
            let whole = ((last + 1 - i) / 8) as usize;
            bits[byte..byte + whole].fill(0xff);
            i += whole as u64 * 8;
        } else {
            bits[(i / 8) as usize] |= 1 << (i % 8);
            i += 1;
        }
    }
}

fn bit(bits: &[u8], i: u64) -> bool {
    bits.get((i / 8) as usize)
        .is_some_and(|b| b & (1 << (i % 8)) != 0)
}

/// QEMU's default granularity: the cluster size, within 4 KiB..64 KiB.
pub fn default_granularity(cluster: u64) -> u64 {
    cluster.clamp(4096, 65536)
}

/// Reads the bits of bitmap `e` of an image of `size` bytes, with every table
/// entry bounded by the file before it is followed.
fn load_bits(file: &FileNode, cluster: u64, size: u64, e: &DirEntry) -> Result<Vec<u8>> {
    let corrupt = |msg: String| {
        Error::InvalidImage(format!(
            "Corrupt qcow2 image '{}': bitmap '{}': {msg}",
            file.filename(),
            e.name
        ))
    };
    let (bits, entries) = bitmap_shape(size, e.granularity_bits, cluster);
    if bits.div_ceil(8) > MAX_BITMAP_BYTES {
        return Err(corrupt(format!(
            "{} bytes of bits exceed QEMU's limit of {MAX_BITMAP_BYTES}",
            bits.div_ceil(8)
        )));
    }
    if e.table_entries != entries {
        return Err(corrupt(format!(
            "its table has {} entries, a disk of {size} bytes needs {entries}",
            e.table_entries
        )));
    }
    let file_len = file.file_len();
    let table_bytes = entries * 8;
    if e.table_offset % cluster != 0
        || e.table_offset
            .checked_add(table_bytes)
            .is_none_or(|end| end > file_len)
    {
        return Err(corrupt(format!(
            "its table at {:#x} is unaligned or past the end of the file",
            e.table_offset
        )));
    }
    let table = file.read_vec(e.table_offset, table_bytes)?;
    let mut out = vec![0u8; bits.div_ceil(8) as usize];
    for (i, raw) in table.chunks_exact(8).enumerate() {
        let entry = BitmapTableEntry::from_raw(be64(raw, 0));
        let from = i * cluster as usize;
        let to = (from + cluster as usize).min(out.len());
        let host = entry.data_offset();
        if host == 0 {
            if entry.all_ones() {
                out[from..to].fill(0xff);
            }
            continue;
        }
        if host % cluster != 0 || host + cluster > file_len.next_multiple_of(cluster) {
            return Err(corrupt(format!(
                "table entry {i} points at {host:#x}, unaligned or past the end of the file"
            )));
        }
        file.pread(&mut out[from..to], host)?;
    }
    Ok(out)
}

/// The clusters bitmap `e` occupies (its table and its bits), to release.
fn clusters_of(file: &FileNode, cluster: u64, e: &DirEntry) -> Result<Vec<(u64, u64)>> {
    let table_bytes = e.table_entries * 8;
    if e.table_offset == 0 || e.table_offset % cluster != 0 {
        return Ok(Vec::new());
    }
    let table = file.read_vec(e.table_offset, table_bytes)?;
    let mut out = vec![(e.table_offset, table_bytes.max(1).next_multiple_of(cluster))];
    for raw in table.chunks_exact(8) {
        let host = BitmapTableEntry::from_raw(be64(raw, 0)).data_offset();
        if host != 0 && host % cluster == 0 {
            out.push((host, cluster));
        }
    }
    Ok(out)
}

/// The enabled bitmaps of the image in `file`, loaded to track writes.
/// Bitmaps already in use (a writer died) or disabled are left alone.
pub(super) fn start_tracking(file: &FileNode, header: &Header) -> Result<Vec<Tracked>> {
    let Some(ext) = header.live_bitmaps() else {
        return Ok(Vec::new());
    };
    let cluster = header.cluster_size.bytes();
    let mut tracked = Vec::new();
    for e in read_directory(file, ext)? {
        if e.flags & BITMAP_FLAG_AUTO == 0 || e.flags & BITMAP_FLAG_IN_USE != 0 {
            continue;
        }
        tracked.push(Tracked {
            bits: load_bits(file, cluster, header.virtual_size, &e)?,
            name: e.name,
            granularity_bits: e.granularity_bits,
        });
    }
    Ok(tracked)
}

impl Qcow2Node {
    /// Records a guest write of `[offset, offset + len)` in every tracked
    /// bitmap; before the first one, the bitmaps get their in-use flag on
    /// disk, so that a writer that dies leaves them marked inconsistent.
    pub(super) fn note_write(&self, st: &mut WriteState, offset: u64, len: u64) -> Result<()> {
        if st.bitmaps.is_empty() {
            return Ok(());
        }
        if !st.bitmaps_in_use {
            self.flag_in_use(st)?;
        }
        for t in &mut st.bitmaps {
            t.mark(offset, len);
        }
        Ok(())
    }

    /// Sets the in-use flag of every tracked bitmap in the directory (same
    /// entries, same sizes: in place).
    fn flag_in_use(&self, st: &mut WriteState) -> Result<()> {
        let header = self.disk_header()?;
        let Some(ext) = header.live_bitmaps() else {
            st.bitmaps.clear();
            return Ok(());
        };
        let mut entries = read_directory(&self.file, ext)?;
        for e in &mut entries {
            if st.bitmaps.iter().any(|t| t.name == e.name) {
                e.flags |= BITMAP_FLAG_IN_USE;
            }
        }
        self.file
            .pwrite(&encode_directory(&entries), ext.directory_offset)?;
        self.file.sync()?;
        st.bitmaps_in_use = true;
        Ok(())
    }

    /// The bitmap directory as the file holds it now.
    pub fn bitmap_entries(&self) -> Result<Vec<DirEntry>> {
        let header = self.disk_header()?;
        match header.live_bitmaps() {
            Some(ext) => read_directory(&self.file, ext),
            None => Ok(Vec::new()),
        }
    }

    /// The bits of bitmap `name` (for a merge into another bitmap).
    pub fn bitmap_bits(&self, name: &str) -> Result<SourceBits> {
        let entry = self
            .bitmap_entries()?
            .into_iter()
            .find(|e| e.name == name)
            .ok_or_else(|| Error::invalid(format!("Dirty bitmap '{name}' not found")))?;
        if entry.flags & BITMAP_FLAG_IN_USE != 0 {
            return Err(in_use(name));
        }
        let bits = match self.tracked_bits(name) {
            Some(bits) => bits,
            None => load_bits(&self.file, self.cs(), self.size(), &entry)?,
        };
        Ok(SourceBits {
            name: name.to_string(),
            granularity_bits: entry.granularity_bits,
            bits,
        })
    }

    /// The bits a tracked bitmap holds now (this node has it in use).
    fn tracked_bits(&self, name: &str) -> Option<Vec<u8>> {
        let st = self.state().ok()?;
        st.bitmaps
            .iter()
            .find(|t| t.name == name)
            .map(|t| t.bits.clone())
    }

    /// Applies `ops`, in order, to bitmap `name`, as `qemu-img bitmap` does;
    /// nothing reaches the file unless every operation succeeds.
    pub fn change_bitmap(&self, name: &str, ops: &[BitmapOp]) -> Result<()> {
        let fail = |op: &BitmapOp, why: String| {
            Error::invalid(format!(
                "Operation {} on bitmap {name} failed: {why}",
                op.name()
            ))
        };
        let header = self.disk_header()?;
        let mut entries = match header.live_bitmaps() {
            Some(ext) => read_directory(&self.file, ext)?,
            None => Vec::new(),
        };
        let cluster = self.cs();
        let size = self.size();
        let mut st = self.state()?;
        // Tracked bitmaps are stored first, so the directory read below is current.
        self.store_tracked(&mut st)?;
        if let Some(ext) = self.disk_header()?.live_bitmaps() {
            entries = read_directory(&self.file, ext)?;
        }
        // The target's state as the operations go: entry and bits (None: absent).
        let mut index = entries.iter().position(|e| e.name == name);
        let mut target: Option<(DirEntry, Vec<u8>)> = None;
        let mut loaded = false;
        let mut changed = false;
        let mut readded = false;
        for op in ops {
            if !loaded {
                if let Some(i) = index {
                    let e = &entries[i];
                    let bits =
                        if e.flags & BITMAP_FLAG_IN_USE != 0 || matches!(op, BitmapOp::Remove) {
                            Vec::new()
                        } else {
                            load_bits(&self.file, cluster, size, e)?
                        };
                    target = Some((e.clone(), bits));
                }
                loaded = true;
            }
            match op {
                BitmapOp::Add { granularity } => {
                    if target.is_some() {
                        return Err(fail(op, format!("Bitmap already exists: {name}")));
                    }
                    if self.header.compat == Compat::V2 {
                        return Err(fail(
                            op,
                            format!(
                                "Can't make bitmap '{name}' persistent in '{}': Cannot store dirty bitmaps in qcow2 v2 files",
                                self.file.filename()
                            ),
                        ));
                    }
                    if name.is_empty() || name.len() > MAX_NAME_BYTES {
                        return Err(fail(
                            op,
                            format!("Bitmap names are 1 to {MAX_NAME_BYTES} bytes long"),
                        ));
                    }
                    // As in qemu-img, -g 0 means the default.
                    let g = granularity
                        .filter(|&g| g != 0)
                        .unwrap_or_else(|| default_granularity(cluster));
                    // Removed and added again in one call: it goes to the end of
                    // the directory, where qemu-img puts it.
                    readded |= index.is_some();
                    let bits = if g.is_power_of_two() {
                        g.trailing_zeros() as u8
                    } else {
                        0
                    };
                    if !g.is_power_of_two() || g < 512 {
                        return Err(fail(
                            op,
                            "Granularity must be power of 2 and at least 512".into(),
                        ));
                    }
                    if !GRANULARITY_BITS.contains(&bits) {
                        return Err(fail(op, "Granularity is too large (at most 2 GiB)".into()));
                    }
                    if entries.len() + usize::from(index.is_none()) > MAX_BITMAPS as usize {
                        return Err(fail(op, "Too many bitmaps".into()));
                    }
                    let (nbits, table_entries) = bitmap_shape(size, bits, cluster);
                    if nbits.div_ceil(8) > MAX_BITMAP_BYTES {
                        return Err(fail(
                            op,
                            "Bitmap is too large for the image (use a larger granularity)".into(),
                        ));
                    }
                    target = Some((
                        DirEntry {
                            table_offset: 0,
                            table_entries,
                            flags: BITMAP_FLAG_AUTO,
                            kind: BITMAP_TYPE_DIRTY_TRACKING,
                            granularity_bits: bits,
                            extra_len: 0,
                            name: name.to_string(),
                            extra: Vec::new(),
                        },
                        vec![0u8; nbits.div_ceil(8) as usize],
                    ));
                }
                BitmapOp::Remove => {
                    if target.take().is_none() {
                        return Err(fail(op, format!("Dirty bitmap '{name}' not found")));
                    }
                }
                BitmapOp::Clear | BitmapOp::Enable | BitmapOp::Disable | BitmapOp::Merge(_) => {
                    let Some((entry, bits)) = target.as_mut() else {
                        return Err(fail(op, format!("Dirty bitmap '{name}' not found")));
                    };
                    if entry.flags & BITMAP_FLAG_IN_USE != 0 {
                        return Err(fail(op, in_use(name).to_string()));
                    }
                    match op {
                        BitmapOp::Clear => bits.fill(0),
                        BitmapOp::Enable => entry.flags |= BITMAP_FLAG_AUTO,
                        BitmapOp::Disable => entry.flags &= !BITMAP_FLAG_AUTO,
                        BitmapOp::Merge(src) => {
                            merge(bits, entry.granularity_bits, src, size)
                                .map_err(|why| fail(op, why))?;
                        }
                        _ => {}
                    }
                }
            }
            changed = true;
        }
        if !changed {
            return Ok(());
        }
        // The new directory: the target where it was (or at the end), new bits.
        let mut release = Vec::new();
        let mut updated: Vec<(DirEntry, Option<Vec<u8>>)> =
            entries.iter().cloned().map(|e| (e, None)).collect();
        if let Some(i) = index.take() {
            release.extend(clusters_of(&self.file, cluster, &entries[i])?);
            match target {
                Some((e, bits)) if !readded => updated[i] = (e, Some(bits)),
                Some((e, bits)) => {
                    updated.remove(i);
                    updated.push((e, Some(bits)));
                }
                None => {
                    updated.remove(i);
                }
            }
        } else if let Some((e, bits)) = target {
            updated.push((e, Some(bits)));
        }
        self.begin_update(&mut st)?;
        self.store_directory(&mut st, updated, release)?;
        // What is tracked from now on follows the new directory.
        st.bitmaps = start_tracking(&self.file, &self.disk_header()?)?;
        Ok(())
    }

    /// Stores the bits of every tracked bitmap that has missed no write and
    /// clears their in-use flags; tracking goes on (a later write sets the
    /// flags again).
    pub(super) fn store_tracked(&self, st: &mut WriteState) -> Result<()> {
        if !st.bitmaps_in_use {
            return Ok(());
        }
        let header = self.disk_header()?;
        let Some(ext) = header.live_bitmaps() else {
            st.bitmaps.clear();
            return Ok(());
        };
        let entries = read_directory(&self.file, ext)?;
        let cluster = self.cs();
        let mut release = Vec::new();
        let mut updated = Vec::with_capacity(entries.len());
        for mut e in entries {
            match st.bitmaps.iter().find(|t| t.name == e.name) {
                Some(t) => {
                    release.extend(clusters_of(&self.file, cluster, &e)?);
                    e.flags &= !BITMAP_FLAG_IN_USE;
                    let bits = t.bits.clone();
                    updated.push((e, Some(bits)));
                }
                None => updated.push((e, None)),
            }
        }
        self.begin_update(st)?;
        self.store_directory(st, updated, release)?;
        st.bitmaps_in_use = false;
        Ok(())
    }

    /// Before a resize: every bitmap with its bits at the current size, and
    /// the in-use flag set on disk for all of them, so that a crash before
    /// [`bitmaps_after_resize`](Self::bitmaps_after_resize) leaves them marked
    /// inconsistent rather than of the wrong size.
    pub(super) fn bitmaps_before_resize(
        &self,
        st: &mut WriteState,
    ) -> Result<Vec<(DirEntry, Vec<u8>)>> {
        self.store_tracked(st)?;
        let header = self.disk_header()?;
        let Some(ext) = header.live_bitmaps() else {
            return Ok(Vec::new());
        };
        let entries = read_directory(&self.file, ext)?;
        if let Some(e) = entries.iter().find(|e| e.flags & BITMAP_FLAG_IN_USE != 0) {
            return Err(Error::Unsupported(format!(
                "Cannot resize: bitmap '{}' is inconsistent (a writer did not close the image); remove it first",
                e.name
            )));
        }
        let cluster = self.cs();
        let mut saved = Vec::with_capacity(entries.len());
        for e in &entries {
            saved.push((e.clone(), load_bits(&self.file, cluster, self.size(), e)?));
        }
        let flagged: Vec<DirEntry> = entries
            .into_iter()
            .map(|mut e| {
                e.flags |= BITMAP_FLAG_IN_USE;
                e
            })
            .collect();
        self.file
            .pwrite(&encode_directory(&flagged), ext.directory_offset)?;
        self.file.sync()?;
        Ok(saved)
    }

    /// After a resize: the bitmaps `saved` stored at the new size (bits past
    /// the old end clear, bits past the new end gone), with their flags as
    /// they were.
    pub(super) fn bitmaps_after_resize(
        &self,
        st: &mut WriteState,
        saved: Vec<(DirEntry, Vec<u8>)>,
    ) -> Result<()> {
        if saved.is_empty() {
            return Ok(());
        }
        let cluster = self.cs();
        let size = self.size();
        let mut release = Vec::new();
        let mut updated = Vec::with_capacity(saved.len());
        for (mut e, mut bits) in saved {
            release.extend(clusters_of(&self.file, cluster, &e)?);
            let (nbits, entries) = bitmap_shape(size, e.granularity_bits, cluster);
            bits.resize(nbits.div_ceil(8) as usize, 0);
            if nbits % 8 != 0 {
                if let Some(last) = bits.last_mut() {
                    *last &= (1u8 << (nbits % 8)) - 1;
                }
            }
            e.table_entries = entries;
            updated.push((e, Some(bits)));
        }
        self.store_directory(st, updated, release)?;
        st.bitmaps = start_tracking(&self.file, &self.disk_header()?)?;
        st.bitmaps_in_use = false;
        Ok(())
    }

    /// Writes the bits given for each entry to new clusters with a new table,
    /// then a new directory, switches the header to it, and releases
    /// `release` and the old directory.
    fn store_directory(
        &self,
        st: &mut WriteState,
        mut entries: Vec<(DirEntry, Option<Vec<u8>>)>,
        mut release: Vec<(u64, u64)>,
    ) -> Result<()> {
        let cluster = self.cs();
        self.write_back(st)?;
        // 1. Clusters for the bits, the tables and the directory, counted
        //    before anything is written into them.
        let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
        for (entry, bits) in &mut entries {
            let Some(bits) = bits.take() else {
                continue;
            };
            let mut table = Vec::with_capacity(entry.table_entries as usize * 8);
            for chunk in bits.chunks(cluster as usize) {
                if chunk.iter().all(|&b| b == 0) {
                    table.extend_from_slice(&0u64.to_be_bytes());
                    continue;
                }
                let at = st.alloc.alloc_clusters(1)?;
                let mut data = chunk.to_vec();
                data.resize(cluster as usize, 0);
                writes.push((at, data));
                table.extend_from_slice(&at.to_be_bytes());
            }
            table.resize(entry.table_entries as usize * 8, 0);
            let table_at = st
                .alloc
                .alloc_clusters((table.len() as u64).max(1).div_ceil(cluster))?;
            writes.push((table_at, table));
            entry.table_offset = table_at;
        }
        let list: Vec<DirEntry> = entries.into_iter().map(|(e, _)| e).collect();
        let directory = encode_directory(&list);
        let new_ext = if list.is_empty() {
            None
        } else {
            let at = st
                .alloc
                .alloc_clusters((directory.len() as u64).div_ceil(cluster))?;
            writes.push((at, directory.clone()));
            Some(BitmapsExtension {
                count: list.len() as u32,
                directory_size: directory.len() as u64,
                directory_offset: at,
            })
        };
        if st.alloc.write_back()? {
            self.file.sync()?;
        }
        // 2. The bits, tables and directory.
        for (at, data) in &writes {
            self.file.pwrite(data, *at)?;
        }
        self.file.sync()?;
        // 3. The header names the new directory.
        let old = self.disk_header()?;
        if let Some(ext) = old.live_bitmaps() {
            release.push((
                ext.directory_offset,
                ext.directory_size.max(1).next_multiple_of(cluster),
            ));
        }
        self.write_header_with_bitmaps(st, new_ext)?;
        // 4. What the old directory alone referred to goes.
        st.pending_free
            .extend(release.into_iter().map(|(at, len)| (at, len, true)));
        self.write_back(st)?;
        self.file.sync()
    }
}

/// ORs `src` into `bits` (granularity 2^`g`, for a disk of `size` bytes).
fn merge(bits: &mut [u8], g: u8, src: &SourceBits, size: u64) -> std::result::Result<(), String> {
    let src_bits = src.bits.len() as u64 * 8;
    let dst_bits = bits.len() as u64 * 8;
    if src.granularity_bits == g {
        if src.bits.len() != bits.len() {
            return Err(format!(
                "Bitmap '{}' is of a disk of another size",
                src.name
            ));
        }
        for (d, s) in bits.iter_mut().zip(&src.bits) {
            *d |= s;
        }
        return Ok(());
    }
    // Another granularity: every set source bit sets the bits covering its range.
    let sg = src.granularity_bits;
    for i in 0..src_bits {
        if !bit(&src.bits, i) {
            continue;
        }
        let start = i << sg;
        if start >= size {
            break;
        }
        let end = ((i + 1) << sg).min(size);
        let first = start >> g;
        let last = ((end - 1) >> g).min(dst_bits.saturating_sub(1));
        set_bits(bits, first, last);
    }
    Ok(())
}

fn in_use(name: &str) -> Error {
    Error::invalid(format!(
        "Bitmap '{name}' is inconsistent and cannot be used (a writer did not close the image); remove it, or add it anew"
    ))
}
