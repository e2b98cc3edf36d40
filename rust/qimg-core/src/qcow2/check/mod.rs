//! `check` for qcow2: every cluster's refcount recomputed from what refers
//! to it, compared with the refcounts stored in the image.
//!
//! The walk follows what `qemu-img check` (QEMU 10) does without `-r`: the
//! header cluster, the active L1 table and its L2 tables and data clusters,
//! each snapshot's L1 and L2 tables, the snapshot table, the refcount table
//! and refcount blocks, and the persistent bitmaps are counted into an
//! in-memory refcount array; then the stored refcount of every cluster of the
//! file is compared with it, and finally the COPIED flags of the active
//! tables are checked against the stored refcounts. Problems are counted as
//! corruptions or leaks and described in the lines qemu-img prints for them,
//! in the same order, so that a front end can print them unchanged.
//!
//! Nothing read from the file is trusted: offsets are masked and bounded
//! before use, table sizes come from the validated header or are checked
//! against QEMU's limits, and reads past the end of the file see zeroes, as
//! they do in QEMU.
//!
//! The same walk serves `check -r` (see `repair.rs`): a [`Checker`] given a
//! writer and a [`Fix`] mode repairs what it finds at the points where
//! qemu-img repairs, and words its lines ("Repairing ...") as qemu-img does.

pub mod repair;

use super::bitmaps;
use super::bytes::be64;
use super::entries::{BitmapTableEntry, L1Entry, L2Entry, RefTableEntry, SubclusterBitmap};
use super::header::Header;
use super::reader::Qcow2Node;
use super::refcount::set_entry;
use super::refcount_reader::decode_refcount;
use super::snapshot::{self, Snapshot};
use super::types::{Compat, RefcountOrder};
use crate::qcow2::format::{
    AUTOCLEAR_BITMAPS, BITMAP_FLAG_IN_USE, BITMAP_TYPE_DIRTY_TRACKING, MAX_BITMAP_BYTES,
    MAX_L1_BYTES, MAX_REFTABLE_BYTES, SNAPSHOT_REQUIRED_EXTRA,
};
use repair::{MetadataIndex, Overlap, ZeroFix};

use crate::block::file::MAX_REQUEST_END;
use crate::block::{BlockDev, FileNode};
use crate::error::{strerror, Error, Result};
use std::collections::{BTreeSet, HashMap};
use std::io;
use std::rc::Rc;

/// What `check` found. The counters mean what qemu-img's `--output=json`
/// fields of the same names mean.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub corruptions: u64,
    pub leaks: u64,
    pub check_errors: u64,
    pub image_end_offset: u64,
    /// Guest clusters: the virtual size (whole sectors) in clusters, rounded up.
    pub total_clusters: u64,
    pub allocated_clusters: u64,
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
    /// The per-problem lines qemu-img prints on stderr, in qemu-img's order
    /// (e.g. "Leaked cluster 4 refcount=1 reference=0", "ERROR cluster 0 refcount=0 reference=1",
    /// "ERROR OFLAG_COPIED data cluster: l2_entry=8000000000050000 refcount=0", ...),
    /// without trailing newline. qemu-img's own closing "Check failed" line is not one of them.
    pub messages: Vec<String>,
}

/// Bitmap directory limits and layout (docs/interop/qcow2.rst, "Bitmaps").
const BITMAP_MAX_TABLE_ENTRIES: u64 = 0x800_0000;
const BITMAP_KNOWN_FLAGS: u32 = 0b11;
/// QEMU refuses to check files of more clusters than this (INT_MAX).
const MAX_CHECK_CLUSTERS: u64 = i32::MAX as u64;
/// Stored refcount blocks kept decoded between lookups.
const STORED_CACHE_BLOCKS: usize = 64;

/// Checks the consistency of the qcow2 image behind `node`, read-only.
///
/// Findings in the image are reported in the result, never as errors. An
/// error means that the check could not be completed, where qemu-img says
/// `Check failed: <reason>`: the file cannot be read, it is too large to
/// check, or the snapshot table or bitmap directory is unreadable.
pub fn check(node: &Qcow2Node) -> Result<CheckReport> {
    check_opened(node.file_node(), node.header(), node.l1_table())
}

/// [`check`] of an image given by its parts: the file, its validated header
/// and its active L1 table.
pub(crate) fn check_opened(file: &FileNode, header: &Header, l1: Vec<u64>) -> Result<CheckReport> {
    let mut checker = Checker::from_parts(file, header, l1, None)?;
    checker.run()?;
    Ok(checker.report)
}

/// What a check run may repair: qemu's `BDRV_FIX_LEAKS` and `BDRV_FIX_ERRORS`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Fix {
    pub(crate) leaks: bool,
    pub(crate) errors: bool,
}

impl Fix {
    pub(crate) const NONE: Fix = Fix {
        leaks: false,
        errors: false,
    };
    pub(crate) const LEAKS: Fix = Fix {
        leaks: true,
        errors: false,
    };
}

/// Findings repaired so far (qemu's `leaks_fixed` / `corruptions_fixed`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Fixed {
    pub(crate) leaks: u64,
    pub(crate) corruptions: u64,
}

/// The counters of a run, without its lines: what qemu saves and restores
/// between the passes of a repair.
#[derive(Debug, Clone, Default)]
pub(crate) struct Counters {
    pub(crate) report: CheckReport,
    pub(crate) fixed: Fixed,
}

/// How QEMU classifies an L2 entry (qcow2_get_cluster_type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClusterType {
    Unallocated,
    ZeroPlain,
    ZeroAlloc,
    Normal,
    Compressed,
}

fn cluster_type(entry: L2Entry, extended_l2: bool) -> ClusterType {
    if entry.is_compressed() {
        ClusterType::Compressed
    } else if entry.zero_flag() && !extended_l2 {
        if entry.host_offset() != 0 {
            ClusterType::ZeroAlloc
        } else {
            ClusterType::ZeroPlain
        }
    } else if entry.host_offset() == 0 {
        ClusterType::Unallocated
    } else {
        ClusterType::Normal
    }
}

/// One bitmap of the bitmap directory.
struct Bitmap {
    table_offset: u64,
    table_entries: u64,
}

/// The check could not be completed: `preface` lines (what qemu-img prints
/// before giving up), then qemu-img's final `Check failed: <strerror>`.
fn check_failed(preface: &str, errno: i32) -> Error {
    let context = if preface.is_empty() {
        "Check failed".to_string()
    } else {
        format!("{preface}\nCheck failed")
    };
    Error::io(context, io::Error::from_raw_os_error(errno))
}

/// C's `%#x`: `0x` before non-zero values only.
fn alt_hex(v: u64) -> String {
    if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    }
}

/// The recomputed refcounts, one entry of the image's refcount width per
/// host cluster. Storage comes in chunks allocated on first write, so the
/// memory used follows the clusters actually referenced, not the file length.
pub(crate) struct ComputedRefcounts {
    width: u32,
    pub(crate) max: u64,
    pub(crate) len: u64,
    chunks: Vec<Option<Box<[u64]>>>,
}

impl ComputedRefcounts {
    const CHUNK_BITS: u32 = 16;

    fn new(order: u32, len: u64) -> ComputedRefcounts {
        let width = 1u32 << order;
        let mut refs = ComputedRefcounts {
            width,
            max: if width == 64 {
                u64::MAX
            } else {
                (1u64 << width) - 1
            },
            len: 0,
            chunks: Vec::new(),
        };
        refs.grow(len);
        refs
    }

    pub(crate) fn grow(&mut self, len: u64) {
        if len > self.len {
            self.len = len;
            let chunks = len.div_ceil(1 << Self::CHUNK_BITS) as usize;
            self.chunks.resize_with(chunks, || None);
        }
    }

    /// (chunk, word, shift) of entry `i`.
    fn locate(&self, i: u64) -> (usize, usize, u32) {
        let chunk = (i >> Self::CHUNK_BITS) as usize;
        let bit = (i & ((1 << Self::CHUNK_BITS) - 1)) * u64::from(self.width);
        (chunk, (bit / 64) as usize, (bit % 64) as u32)
    }

    pub(crate) fn get(&self, i: u64) -> u64 {
        let (chunk, word, shift) = self.locate(i);
        match self.chunks.get(chunk) {
            Some(Some(words)) => (words[word] >> shift) & self.max,
            _ => 0,
        }
    }

    /// Sets entry `i` (< len).
    pub(crate) fn set(&mut self, i: u64, value: u64) {
        let (chunk, word, shift) = self.locate(i);
        let words_per_chunk = ((1usize << Self::CHUNK_BITS) * self.width as usize) / 64;
        let max = self.max;
        if let Some(slot) = self.chunks.get_mut(chunk) {
            let words = slot.get_or_insert_with(|| vec![0u64; words_per_chunk].into_boxed_slice());
            words[word] = (words[word] & !(max << shift)) | ((value & max) << shift);
        }
    }

    /// Refcount block `index` (of `1 << block_bits` entries) as it is
    /// stored on disk: the recomputed counts of the clusters it covers.
    pub(crate) fn encode_block(
        &self,
        index: u64,
        block_bits: u32,
        order: RefcountOrder,
        cluster_size: u64,
    ) -> Vec<u8> {
        let mut block = vec![0u8; cluster_size as usize];
        let first = index << block_bits;
        let end = (first + (1 << block_bits)).min(self.len);
        for cluster in first..end {
            let count = self.get(cluster);
            if count != 0 {
                set_entry(&mut block, order, (cluster - first) as usize, count);
            }
        }
        block
    }
}

/// A decoded stored refcount block.
enum StoredBlock {
    /// The reftable has no block here: every refcount reads as zero.
    Absent,
    Present(Rc<Vec<u8>>),
}

/// Why a stored refcount could not be read.
enum StoredError {
    /// The refcount block offset is not cluster aligned.
    Unaligned { offset: u64, index: u64 },
    /// Reading the block failed; the strerror text.
    Read(String),
}

/// The refcounts stored in the image, read block by block. In a repair,
/// updated blocks are kept (dirty) until [`StoredRefcounts::flush`].
pub(crate) struct StoredRefcounts<'a> {
    file: &'a FileNode,
    writer: Option<&'a FileNode>,
    pub(crate) reftable: Vec<u64>,
    cluster_size: u64,
    order: u32,
    /// log2 of the entries in one refcount block.
    pub(crate) block_bits: u32,
    cache: HashMap<u64, Rc<Vec<u8>>>,
    /// Offsets of cached blocks changed since the last flush.
    dirty: BTreeSet<u64>,
    /// The block of the previous lookup: comparisons walk clusters in order.
    last: Option<(u64, Rc<Vec<u8>>)>,
    /// QEMU reports the first structural corruption only.
    pub(crate) signaled_corruption: bool,
    /// A corruption was signaled while the image was open for writing: QEMU
    /// then marks the image corrupt in its header.
    pub(crate) mark_corrupt: bool,
    /// Lookups that failed (each one a check error).
    pub(crate) failed_lookups: u64,
}

impl<'a> StoredRefcounts<'a> {
    fn block(&mut self, index: u64) -> std::result::Result<StoredBlock, StoredError> {
        let Some(&entry) = self.reftable.get(index as usize) else {
            return Ok(StoredBlock::Absent);
        };
        let offset = RefTableEntry::from_raw(entry).block_offset();
        if offset == 0 {
            return Ok(StoredBlock::Absent);
        }
        if offset % self.cluster_size != 0 {
            return Err(StoredError::Unaligned { offset, index });
        }
        if let Some(block) = self.cache.get(&offset) {
            return Ok(StoredBlock::Present(Rc::clone(block)));
        }
        if offset > MAX_REQUEST_END - self.cluster_size {
            return Err(StoredError::Read(strerror(&io::Error::from_raw_os_error(
                libc::EIO,
            ))));
        }
        let mut buf = vec![0u8; self.cluster_size as usize];
        self.file
            .pread(&mut buf, offset)
            .map_err(|e| StoredError::Read(e.short_text()))?;
        if self.cache.len() >= STORED_CACHE_BLOCKS {
            self.flush()
                .map_err(|e| StoredError::Read(e.short_text()))?;
            self.cache.clear();
        }
        let block = Rc::new(buf);
        self.cache.insert(offset, Rc::clone(&block));
        Ok(StoredBlock::Present(block))
    }

    /// The stored refcount of `cluster`; on failure the strerror text, with
    /// QEMU's one-time corruption notice added to `messages`.
    pub(crate) fn get(
        &mut self,
        cluster: u64,
        messages: &mut Vec<String>,
    ) -> std::result::Result<u64, String> {
        let index = cluster >> self.block_bits;
        let within = cluster & ((1 << self.block_bits) - 1);
        if let Some((last, block)) = &self.last {
            if *last == index {
                return Ok(decode_refcount(block, self.order, within));
            }
        }
        match self.block(index) {
            Ok(StoredBlock::Absent) => Ok(0),
            Ok(StoredBlock::Present(block)) => {
                let count = decode_refcount(&block, self.order, within);
                self.last = Some((index, block));
                Ok(count)
            }
            Err(StoredError::Read(text)) => Err(text),
            Err(StoredError::Unaligned { offset, index }) => {
                self.signal_corruption(
                    &format!(
                        "Refblock offset {} unaligned (reftable index: {})",
                        alt_hex(offset),
                        alt_hex(index)
                    ),
                    messages,
                );
                Err(strerror(&io::Error::from_raw_os_error(libc::EIO)))
            }
        }
    }

    /// QEMU's corruption notice, once: a read-only image is only reported
    /// corrupt, one open for writing is also marked corrupt.
    pub(crate) fn signal_corruption(&mut self, what: &str, messages: &mut Vec<String>) {
        if self.signaled_corruption {
            return;
        }
        self.signaled_corruption = true;
        if self.writer.is_some() {
            self.mark_corrupt = true;
            messages.push(format!(
                "qcow2: Marking image as corrupt: {what}; further corruption events will be suppressed"
            ));
        } else {
            messages.push(format!(
                "qcow2: Image is corrupt: {what}; further non-fatal corruption events will be suppressed"
            ));
        }
    }

    /// Sets the stored refcount of `cluster`, whose refcount block exists
    /// (its current refcount is not zero). The block is written by `flush`.
    pub(crate) fn set(&mut self, cluster: u64, value: u64) -> std::result::Result<(), String> {
        let index = cluster >> self.block_bits;
        let within = (cluster & ((1 << self.block_bits) - 1)) as usize;
        let eio = || strerror(&io::Error::from_raw_os_error(libc::EIO));
        let order = RefcountOrder::from_order(self.order).map_err(|_| eio())?;
        if self.writer.is_none() {
            return Err(eio());
        }
        let offset = match self.block(index) {
            Ok(StoredBlock::Present(_)) => self
                .reftable
                .get(index as usize)
                .map(|&e| RefTableEntry::from_raw(e).block_offset())
                .ok_or_else(eio)?,
            Ok(StoredBlock::Absent) | Err(StoredError::Unaligned { .. }) => return Err(eio()),
            Err(StoredError::Read(text)) => return Err(text),
        };
        // Drop the other handle on the block so that it can be changed in place.
        self.last = None;
        let block = self.cache.get_mut(&offset).ok_or_else(eio)?;
        let bytes: &mut Vec<u8> = Rc::make_mut(block);
        set_entry(bytes, order, within, value);
        self.dirty.insert(offset);
        Ok(())
    }

    /// Writes the refcount blocks changed since the last flush.
    pub(crate) fn flush(&mut self) -> Result<()> {
        let Some(writer) = self.writer else {
            return Ok(());
        };
        while let Some(offset) = self.dirty.pop_first() {
            if let Some(block) = self.cache.get(&offset) {
                writer.pwrite(block, offset)?;
            }
        }
        Ok(())
    }
}

/// One run of the check over one opened image: the reference walk, the
/// refcount comparison and the COPIED flags, with the repairs of `fix`
/// where a `writer` is given.
pub(crate) struct Checker<'a> {
    pub(crate) header: &'a Header,
    /// The active L1 table as read when the image was opened.
    pub(crate) l1: Vec<u64>,
    file: &'a FileNode,
    pub(crate) cluster_size: u64,
    pub(crate) cluster_bits: u32,
    extended_l2: bool,
    /// The file length as QEMU sees it: whole 512-byte sectors.
    pub(crate) file_len: u64,
    pub(crate) computed: ComputedRefcounts,
    pub(crate) stored: StoredRefcounts<'a>,
    pub(crate) snapshots: Vec<Snapshot>,
    pub(crate) snapshots_size: u64,
    pub(crate) report: CheckReport,
    /// What this run repairs (nothing without a writer).
    pub(crate) fix: Fix,
    pub(crate) writer: Option<&'a FileNode>,
    pub(crate) fixed: Fixed,
    /// The refcount structure itself is broken: only a rebuild repairs it.
    pub(crate) rebuild: bool,
    /// Runs of clusters (first, count) whose refcount a repair dropped to zero.
    pub(crate) freed: Vec<(u64, u64)>,
    /// Where the metadata lies, for a repair's overlap checks (made on first use).
    pub(crate) metadata: Option<MetadataIndex>,
    /// The snapshot table as read is not the one to keep (entries lack the
    /// extra data v3 requires, or hold what QEMU refuses): the repair writes
    /// `snapshots` as the table once the refcounts are right.
    pub(crate) rewrite_snapshots: bool,
}

impl<'a> Checker<'a> {
    /// A checker over `file`, whose validated header is `header` and active
    /// L1 table `l1`; with a writer it can repair (see [`Checker::fix`]).
    pub(crate) fn from_parts(
        file: &'a FileNode,
        header: &'a Header,
        l1: Vec<u64>,
        writer: Option<&'a FileNode>,
    ) -> Result<Checker<'a>> {
        let cluster_size = header.cluster_size.bytes();
        let cluster_bits = header.cluster_size.bits();
        let order = header.refcount_order.order();
        let file_len = file.size();
        let clusters = file_len.div_ceil(cluster_size);
        if clusters > MAX_CHECK_CLUSTERS {
            return Err(check_failed("", libc::EFBIG));
        }
        // The header parser holds these to QEMU's limits; a header built by
        // other means must not size the tables read below either.
        if header.l1_entries > MAX_L1_BYTES / 8
            || header.reftable_clusters * cluster_size > MAX_REFTABLE_BYTES
        {
            return Err(Error::InvalidImage(format!(
                "Cannot check '{}': its L1 or refcount table is larger than qcow2 allows",
                file.filename()
            )));
        }
        let mut raw = vec![0u8; (header.reftable_clusters * cluster_size) as usize];
        file.pread(&mut raw, header.reftable_offset)?;
        let reftable = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
        let stored = StoredRefcounts {
            file,
            writer,
            reftable,
            cluster_size,
            order,
            block_bits: cluster_bits + 3 - order,
            cache: HashMap::new(),
            dirty: BTreeSet::new(),
            last: None,
            signaled_corruption: false,
            mark_corrupt: false,
            failed_lookups: 0,
        };
        Ok(Checker {
            header,
            l1,
            file,
            cluster_size,
            cluster_bits,
            extended_l2: header.extended_l2(),
            file_len,
            computed: ComputedRefcounts::new(order, clusters),
            stored,
            snapshots: Vec::new(),
            snapshots_size: 0,
            report: CheckReport {
                total_clusters: (header.virtual_size & !511).div_ceil(cluster_size),
                ..CheckReport::default()
            },
            fix: Fix::NONE,
            writer,
            fixed: Fixed::default(),
            rewrite_snapshots: false,
            rebuild: false,
            freed: Vec::new(),
            metadata: None,
        })
    }

    pub(crate) fn say(&mut self, line: String) {
        self.report.messages.push(line);
    }

    fn corruption(&mut self, line: String) {
        self.report.corruptions += 1;
        self.say(line);
    }

    /// The counters so far (not the lines).
    pub(crate) fn counters(&mut self) -> Counters {
        let messages = std::mem::take(&mut self.report.messages);
        let report = self.report.clone();
        self.report.messages = messages;
        Counters {
            report,
            fixed: self.fixed,
        }
    }

    /// Puts back counters saved by [`Checker::counters`]; lines stay printed.
    pub(crate) fn set_counters(&mut self, saved: &Counters) {
        let messages = std::mem::take(&mut self.report.messages);
        self.report = CheckReport {
            messages,
            ..saved.report.clone()
        };
        self.fixed = saved.fixed;
    }

    /// The plain check: nothing is repaired.
    fn run(&mut self) -> Result<()> {
        self.read_snapshot_table()?;
        self.count_references()?;
        let highest = self.compare_refcounts(Fix::NONE);
        self.check_copied_flags()?;
        self.report.image_end_offset = (highest + 1) * self.cluster_size;
        Ok(())
    }

    /// Whether repairs of errors (not only leaks) are made in this run.
    fn fixes_errors(&self) -> bool {
        self.writer.is_some() && self.fix.errors
    }

    /// Reads `len` bytes at `offset` (zeroes past the end of the file).
    fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.file.read_vec(offset, len)
    }

    // ---- snapshot table -------------------------------------------------

    /// Reads the snapshot table (the shared parser, QEMU's limits) before
    /// counting references; a table QEMU refuses ends the check.
    pub(crate) fn read_snapshot_table(&mut self) -> Result<()> {
        if self.header.snapshot_count == 0 {
            return Ok(());
        }
        let table = snapshot::read_table(self.file, self.header)?;
        if let Some(&first) = table.problems.first() {
            if self.writer.is_none() || !self.fix.errors {
                return Err(check_failed(
                    &format!(
                        "ERROR failed to read the snapshot table: {}",
                        first.refusal()
                    ),
                    libc::EFBIG,
                ));
            }
            // Repaired as QEMU repairs it: what it refuses is dropped and
            // the table written anew once the refcounts are right.
            for problem in &table.problems {
                self.say(problem.repair_line());
                self.fixed.corruptions += problem.corruptions();
            }
            self.rewrite_snapshots = true;
        }
        self.snapshots = table.snapshots;
        self.snapshots_size = table.byte_len;
        if self.header.compat == Compat::V3 {
            for i in 0..self.snapshots.len() {
                if self.snapshots[i].extra_data_size < SNAPSHOT_REQUIRED_EXTRA {
                    if self.writer.is_some() && self.fix.errors {
                        self.say(format!("Repairing snapshot table entry {i} is incomplete"));
                        self.fixed.corruptions += 1;
                        self.rewrite_snapshots = true;
                    } else {
                        self.corruption(format!("ERROR snapshot table entry {i} is incomplete"));
                    }
                }
            }
        }
        Ok(())
    }

    // ---- references -------------------------------------------------------

    /// Counts one reference to every cluster `[offset, offset + size)` touches.
    fn reference(&mut self, offset: u64, size: u64) -> Result<()> {
        if size == 0 {
            return Ok(());
        }
        if offset > i64::MAX as u64 {
            // A negative offset to QEMU: its refcount array cannot grow that far.
            self.report.check_errors += 1;
            return Err(check_failed("", libc::ENOMEM));
        }
        let end = i128::from(offset) + i128::from(size);
        // The last cluster may be partly beyond the end of the file, no more.
        if end - i128::from(self.file_len) >= i128::from(self.cluster_size) {
            self.corruption(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {offset:#x} size {size:#x}"
            ));
            return Ok(());
        }
        let first = offset >> self.cluster_bits;
        let last = (offset + size - 1) >> self.cluster_bits;
        for cluster in first..=last {
            if cluster >= self.computed.len {
                self.computed.grow(cluster + 1);
            }
            let count = self.computed.get(cluster);
            if count == self.computed.max {
                self.corruption(format!(
                    "ERROR: overflow cluster offset={:#x}",
                    cluster << self.cluster_bits
                ));
                self.say(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing"
                        .to_string(),
                );
                continue;
            }
            self.computed.set(cluster, count + 1);
        }
        Ok(())
    }

    pub(crate) fn count_references(&mut self) -> Result<()> {
        let cs = self.cluster_size;
        self.reference(0, cs)?;
        let (l1_offset, l1_entries) = (self.header.l1_table_offset, self.header.l1_entries);
        self.check_l1(l1_offset, l1_entries, true)?;

        for i in 0..self.snapshots.len() {
            let (l1_offset, l1_entries) = (
                self.snapshots[i].l1_table_offset,
                self.snapshots[i].l1_entries,
            );
            if l1_offset % cs != 0 {
                let sn = &self.snapshots[i];
                let line = format!(
                    "ERROR snapshot {} ({}) l1_offset={}: L1 table is not cluster aligned; snapshot table entry corrupted",
                    sn.id,
                    sn.name,
                    alt_hex(l1_offset)
                );
                self.corruption(line);
                continue;
            }
            if l1_entries > MAX_L1_BYTES / 8 {
                let sn = &self.snapshots[i];
                let line = format!(
                    "ERROR snapshot {} ({}) l1_size={}: L1 table is too large; snapshot table entry corrupted",
                    sn.id,
                    sn.name,
                    alt_hex(l1_entries)
                );
                self.corruption(line);
                continue;
            }
            self.check_l1(l1_offset, l1_entries, false)?;
        }
        self.reference(self.header.snapshots_offset, self.snapshots_size)?;
        self.reference(
            self.header.reftable_offset,
            self.header.reftable_clusters * cs,
        )?;
        self.count_bitmaps()?;
        self.check_refblocks()
    }

    /// Counts an L1 table, its L2 tables and everything they map.
    fn check_l1(&mut self, l1_offset: u64, entries: u64, active: bool) -> Result<()> {
        if entries == 0 {
            return Ok(());
        }
        self.reference(l1_offset, entries * 8)?;
        let table = self
            .read(l1_offset, entries * 8)
            .map_err(|e| check_failed("ERROR: I/O error in check_refcounts_l1", e.errno()))?;
        for chunk in table.chunks_exact(8) {
            let entry = L1Entry::from_raw(be64(chunk, 0));
            if entry == L1Entry::UNALLOCATED {
                continue;
            }
            if entry.reserved_bits() != 0 {
                self.corruption(format!(
                    "ERROR found L1 entry with reserved bits set: {:x}",
                    entry.raw()
                ));
            }
            let l2_offset = entry.table_offset();
            self.reference(l2_offset, self.cluster_size)?;
            if l2_offset % self.cluster_size != 0 {
                self.corruption(format!(
                    "ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
            }
            self.check_l2(l2_offset, active)?;
        }
        Ok(())
    }

    /// Counts the clusters one L2 table maps, checking its entries; the
    /// allocation figures are taken from the active tables only.
    fn check_l2(&mut self, l2_offset: u64, active: bool) -> Result<()> {
        let cs = self.cluster_size;
        let table = self
            .read(l2_offset, cs)
            .map_err(|e| check_failed("ERROR: I/O error in check_refcounts_l2", e.errno()))?;
        let stride = if self.extended_l2 { 16 } else { 8 };
        let bits = self.cluster_bits;
        let mut next_contiguous = 0u64;
        for (index, raw) in table.chunks_exact(stride).enumerate() {
            let entry = L2Entry::from_raw(be64(raw, 0));
            let bitmap =
                SubclusterBitmap::from_raw(if self.extended_l2 { be64(raw, 8) } else { 0 });
            let kind = cluster_type(entry, self.extended_l2);
            if kind != ClusterType::Compressed && entry.reserved_bits() != 0 {
                self.corruption(format!(
                    "ERROR found l2 entry with reserved bits set: {:x}",
                    entry.raw()
                ));
            }
            match kind {
                ClusterType::Compressed => {
                    let data = entry.compressed_data(bits);
                    if entry.copied() {
                        self.corruption(format!(
                            "ERROR: coffset={:#x}: copied flag must never be set for compressed clusters",
                            data.host
                        ));
                    }
                    if bitmap != SubclusterBitmap::NONE {
                        self.corruption(format!(
                            "ERROR compressed cluster {index} with non-zero subcluster allocation bitmap, entry={:#x}",
                            entry.raw()
                        ));
                        continue;
                    }
                    self.reference(data.host, data.read_len())?;
                    if active {
                        self.report.allocated_clusters += 1;
                        self.report.compressed_clusters += 1;
                        // Compressed clusters always count as fragmented.
                        self.report.fragmented_clusters += 1;
                    }
                }
                ClusterType::ZeroAlloc | ClusterType::Normal => {
                    let host = entry.host_offset();
                    if bitmap.conflicts() {
                        self.corruption(format!(
                            "ERROR offset={host:x}: Allocated cluster has corrupted subcluster allocation bitmap"
                        ));
                    }
                    if host % cs != 0 {
                        let has_data = if self.extended_l2 {
                            bitmap.any_allocated()
                        } else {
                            !entry.zero_flag()
                        };
                        if has_data {
                            self.corruption(format!(
                                "ERROR offset={host:x}: Data cluster is not properly aligned; L2 entry corrupted."
                            ));
                        } else {
                            let fixing = self.fixes_errors();
                            self.corruption(format!(
                                "{} offset={host:x}: Preallocated cluster is not properly aligned; L2 entry corrupted.",
                                if fixing { "Repairing" } else { "ERROR" }
                            ));
                            // A zero cluster loses nothing by becoming a plain zero cluster.
                            if fixing
                                && self.fix_l2_entry_by_zero(
                                    l2_offset,
                                    index as u64,
                                    bitmap,
                                    active,
                                )? == ZeroFix::Done
                            {
                                continue;
                            }
                        }
                    }
                    if active {
                        self.report.allocated_clusters += 1;
                        if next_contiguous != 0 && host != next_contiguous {
                            self.report.fragmented_clusters += 1;
                        }
                        next_contiguous = host + cs;
                    }
                    self.reference(host, cs)?;
                }
                ClusterType::ZeroPlain => {}
                ClusterType::Unallocated => {
                    if bitmap.any_allocated() {
                        self.corruption(
                            "ERROR: Unallocated cluster has non-zero subcluster allocation map"
                                .to_string(),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Counts the bitmap directory, the bitmap tables and their data
    /// clusters; a directory or table QEMU cannot load ends the check.
    fn count_bitmaps(&mut self) -> Result<()> {
        if self.header.autoclear & AUTOCLEAR_BITMAPS == 0 {
            return Ok(());
        }
        let Some(ext) = self.header.bitmaps else {
            return Ok(());
        };
        if ext.count == 0 {
            return Ok(());
        }
        let (dir_offset, dir_size) = (ext.directory_offset, ext.directory_size);
        self.reference(dir_offset, dir_size)?;
        let loaded = self.load_bitmap_directory(ext.count, dir_offset, dir_size);
        let Some(loaded) = loaded else {
            self.report.corruptions += 1;
            return Err(check_failed("", libc::EINVAL));
        };
        let cs = self.cluster_size;
        for bitmap in loaded {
            self.reference(bitmap.table_offset, bitmap.table_entries * 8)?;
            let table = self.read(bitmap.table_offset, bitmap.table_entries * 8)?;
            let entries: Vec<BitmapTableEntry> = table
                .chunks_exact(8)
                .map(|c| BitmapTableEntry::from_raw(be64(c, 0)))
                .collect();
            let valid = |e: BitmapTableEntry| {
                let offset = e.data_offset();
                e.reserved_bits() == 0 && (offset == 0 || (!e.all_ones() && offset % cs == 0))
            };
            if !entries.iter().all(|&e| valid(e)) {
                self.report.corruptions += 1;
                return Err(check_failed("", libc::EINVAL));
            }
            for entry in entries {
                let offset = entry.data_offset();
                if offset != 0 {
                    self.reference(offset, cs)?;
                }
            }
        }
        Ok(())
    }

    /// The bitmaps of the directory, or None where QEMU refuses to load it.
    fn load_bitmap_directory(&self, count: u32, offset: u64, size: u64) -> Option<Vec<Bitmap>> {
        if size == 0 || size > bitmaps::MAX_DIRECTORY_BYTES {
            return None;
        }
        let dir = self.read(offset, size).ok()?;
        let virtual_size = self.header.virtual_size & !511;
        let cs = self.cluster_size;
        let mut out = Vec::new();
        for e in bitmaps::parse_directory(&dir, count).ok()? {
            let constraints_hold = e.table_entries != 0
                && e.table_offset != 0
                && e.table_offset % cs == 0
                && e.table_entries <= BITMAP_MAX_TABLE_ENTRIES
                && e.flags & !BITMAP_KNOWN_FLAGS == 0
                && e.extra_len == 0
                && e.kind == BITMAP_TYPE_DIRTY_TRACKING;
            if !constraints_hold {
                return None;
            }
            let data_bytes = e.table_entries * cs;
            if data_bytes > MAX_BITMAP_BYTES {
                return None;
            }
            if e.flags & BITMAP_FLAG_IN_USE == 0
                && virtual_size > (data_bytes * 8) << e.granularity_bits
            {
                return None;
            }
            out.push(Bitmap {
                table_offset: e.table_offset,
                table_entries: e.table_entries,
            });
        }
        Some(out)
    }

    /// Checks the refcount table entries and counts the refcount blocks.
    fn check_refblocks(&mut self) -> Result<()> {
        let cs = self.cluster_size;
        for i in 0..self.stored.reftable.len() {
            let entry = RefTableEntry::from_raw(self.stored.reftable[i]);
            let offset = entry.block_offset();
            let cluster = offset >> self.cluster_bits;
            if entry.reserved_bits() != 0 {
                self.corruption(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                self.rebuild = true;
                continue;
            }
            if offset % cs != 0 {
                self.corruption(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ));
                self.rebuild = true;
                continue;
            }
            if cluster >= self.computed.len {
                let fixing = self.fixes_errors();
                self.corruption(format!(
                    "{} refcount block {i} is outside image",
                    if fixing { "Repairing" } else { "ERROR" }
                ));
                if fixing {
                    // Growing the file makes the block a block of zeroes.
                    match self.grow_file_for_refblock(offset)? {
                        Ok(()) => {
                            self.report.corruptions -= 1;
                            self.fixed.corruptions += 1;
                            self.reference(offset, cs)?;
                        }
                        Err(errno) => {
                            self.rebuild = true;
                            self.say(format!(
                                "ERROR could not resize image: {}",
                                strerror(&io::Error::from_raw_os_error(errno))
                            ));
                        }
                    }
                }
                continue;
            }
            if offset != 0 {
                self.reference(offset, cs)?;
                let count = self.computed.get(cluster);
                if count != 1 {
                    self.corruption(format!("ERROR refcount block {i} refcount={count}"));
                    self.rebuild = true;
                }
            }
        }
        Ok(())
    }

    // ---- comparison -------------------------------------------------------

    /// Compares stored and recomputed refcounts of every cluster, repairing
    /// what `fix` allows (changed refcount blocks are written by the caller,
    /// see [`StoredRefcounts::flush`]); returns the last cluster that either
    /// count says is in use.
    pub(crate) fn compare_refcounts(&mut self, fix: Fix) -> u64 {
        let fix = if self.writer.is_some() {
            fix
        } else {
            Fix::NONE
        };
        let mut highest = 0;
        for cluster in 0..self.computed.len {
            let stored = match self.stored.get(cluster, &mut self.report.messages) {
                Ok(count) => count,
                Err(why) => {
                    self.report.check_errors += 1;
                    self.stored.failed_lookups += 1;
                    self.say(format!("Can't get refcount for cluster {cluster}: {why}"));
                    continue;
                }
            };
            let computed = self.computed.get(cluster);
            if stored > 0 || computed > 0 {
                highest = cluster;
            }
            if stored == computed {
                continue;
            }
            // A cluster without a refcount may lack its refcount block too:
            // only a rebuilt refcount structure can account for it.
            let repair = if stored == 0 {
                self.rebuild = true;
                false
            } else if stored > computed {
                fix.leaks
            } else {
                fix.errors
            };
            let word = if repair {
                "Repairing"
            } else if stored < computed {
                "ERROR"
            } else {
                "Leaked"
            };
            self.say(format!(
                "{word} cluster {cluster} refcount={stored} reference={computed}"
            ));
            if repair && self.stored.set(cluster, computed).is_ok() {
                if stored > computed {
                    self.fixed.leaks += 1;
                    if computed == 0 {
                        self.freed(cluster);
                    }
                } else {
                    self.fixed.corruptions += 1;
                }
                continue;
            }
            if stored < computed {
                self.report.corruptions += 1;
            } else {
                self.report.leaks += 1;
            }
        }
        highest
    }

    /// COPIED must be set exactly on the active L1 and L2 entries whose
    /// target has a stored refcount of one. Repairs follow `self.fix`: all
    /// of them when errors are fixed; with leaks only, when nothing else is
    /// wrong (the refcounts are then known to be right).
    pub(crate) fn check_copied_flags(&mut self) -> Result<()> {
        let repair = self.writer.is_some()
            && (self.fix.errors
                || (self.fix.leaks
                    && self.report.check_errors == 0
                    && self.report.corruptions == 0
                    && self.report.leaks == 0));
        let word = if repair { "Repairing" } else { "ERROR" };
        let cs = self.cluster_size;
        let stride = if self.extended_l2 { 16 } else { 8 };
        // A copy: repairs change self.l1 as they write.
        let l1 = self.l1.clone();
        let result = (|| {
            for (index, &raw) in l1.iter().enumerate() {
                let l1_entry = L1Entry::from_raw(raw);
                let l2_offset = l1_entry.table_offset();
                if l2_offset == 0 {
                    continue;
                }
                if let Ok(count) = self
                    .stored
                    .get(l2_offset >> self.cluster_bits, &mut self.report.messages)
                {
                    if (count == 1) != l1_entry.copied() {
                        self.corruption(format!(
                            "{word} OFLAG_COPIED L2 cluster: l1_index={index} l1_entry={raw:x} refcount={count}"
                        ));
                        if repair {
                            self.write_l1_entry(index as u64, l1_entry.with_copied(count == 1))?;
                            self.report.corruptions -= 1;
                            self.fixed.corruptions += 1;
                        }
                    }
                }
                let mut table = self.read(l2_offset, cs).map_err(|e| {
                    self.report.check_errors += 1;
                    check_failed(
                        &format!("ERROR: Could not read L2 table: {}", e.short_text()),
                        e.errno(),
                    )
                })?;
                let mut changed = 0;
                for raw in table.chunks_exact_mut(stride) {
                    let entry = L2Entry::from_raw(be64(raw, 0));
                    match cluster_type(entry, self.extended_l2) {
                        ClusterType::Normal | ClusterType::ZeroAlloc => {}
                        _ => continue,
                    }
                    let host = entry.host_offset();
                    let Ok(count) = self
                        .stored
                        .get(host >> self.cluster_bits, &mut self.report.messages)
                    else {
                        continue;
                    };
                    if (count == 1) != entry.copied() {
                        self.corruption(format!(
                            "{word} OFLAG_COPIED data cluster: l2_entry={:x} refcount={count}",
                            entry.raw()
                        ));
                        if repair {
                            let fixed = entry.with_copied(count == 1);
                            raw[..8].copy_from_slice(&fixed.raw().to_be_bytes());
                            changed += 1;
                        }
                    }
                }
                if changed > 0 {
                    self.write_l2_table(l2_offset, &table, Overlap::ACTIVE_L2)?;
                    self.report.corruptions -= changed;
                    self.fixed.corruptions += changed;
                }
            }
            Ok(())
        })();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l2_entries_are_classified_like_qemu() {
        let zero_alloc = L2Entry::new(0x10000, false).with_zero_flag();
        let compressed = L2Entry::from_raw(1 << 62);
        assert!(compressed.is_compressed());
        assert_eq!(
            cluster_type(L2Entry::UNALLOCATED, false),
            ClusterType::Unallocated
        );
        assert_eq!(cluster_type(L2Entry::ZERO, false), ClusterType::ZeroPlain);
        assert_eq!(cluster_type(zero_alloc, false), ClusterType::ZeroAlloc);
        assert_eq!(
            cluster_type(L2Entry::new(0x10000, true), false),
            ClusterType::Normal
        );
        assert_eq!(cluster_type(compressed, false), ClusterType::Compressed);
        // With extended L2 the zero flag is not a cluster type.
        assert_eq!(cluster_type(L2Entry::ZERO, true), ClusterType::Unallocated);
        assert_eq!(cluster_type(zero_alloc, true), ClusterType::Normal);
        // COPIED alone maps nothing.
        assert_eq!(
            cluster_type(L2Entry::new(0, true), false),
            ClusterType::Unallocated
        );
    }

    #[test]
    fn computed_refcounts_saturate_at_the_entry_width() {
        for order in 0..=6 {
            let mut refs = ComputedRefcounts::new(order, 3);
            refs.set(1, refs.max);
            assert_eq!(refs.get(0), 0);
            assert_eq!(refs.get(1), refs.max);
            assert_eq!(refs.get(2), 0);
            refs.set(1, 0);
            assert_eq!(refs.get(1), 0);
            refs.grow(200_000);
            refs.set(199_999, 1);
            assert_eq!(refs.get(199_999), 1);
            assert_eq!(refs.get(199_998), 0);
        }
        assert_eq!(ComputedRefcounts::new(0, 1).max, 1);
        assert_eq!(ComputedRefcounts::new(4, 1).max, 0xffff);
        assert_eq!(ComputedRefcounts::new(6, 1).max, u64::MAX);
    }

    #[test]
    fn stored_refcounts_decode_every_width() {
        let block = [
            0b1000_0101u8,
            0x12,
            0x34,
            0x56,
            0x78,
            0x9a,
            0xbc,
            0xde,
            0xf0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ];
        assert_eq!(decode_refcount(&block, 0, 0), 1);
        assert_eq!(decode_refcount(&block, 0, 1), 0);
        assert_eq!(decode_refcount(&block, 0, 2), 1);
        assert_eq!(decode_refcount(&block, 0, 7), 1);
        assert_eq!(decode_refcount(&block, 1, 3), 2);
        assert_eq!(decode_refcount(&block, 2, 0), 5);
        assert_eq!(decode_refcount(&block, 2, 1), 8);
        assert_eq!(decode_refcount(&block, 3, 1), 0x12);
        assert_eq!(decode_refcount(&block, 4, 1), 0x3456);
        assert_eq!(decode_refcount(&block, 5, 1), 0x789a_bcde);
        assert_eq!(decode_refcount(&block, 6, 1), 0xf000_0000_0000_0000);
    }

    #[test]
    fn c_formatting_helpers() {
        assert_eq!(alt_hex(0), "0");
        assert_eq!(alt_hex(0x200), "0x200");
    }
}
