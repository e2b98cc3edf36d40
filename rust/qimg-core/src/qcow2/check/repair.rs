//! `check -r leaks|all` for qcow2: the check of `check.rs`, repairing as it
//! goes, the way `qemu-img check -r` (QEMU 10) repairs.
//!
//! One repair pass runs like this:
//!
//! 1. The references are counted. With `all`, a zero cluster whose L2 entry
//!    holds an unaligned offset becomes a plain zero cluster, and a refcount
//!    block that lies beyond the end of the file gets a file long enough to
//!    hold it (a block of zeroes).
//! 2. Stored and counted refcounts are compared. If a referenced cluster has
//!    no refcount at all, or the refcount table or a refcount block is
//!    itself broken, only a new refcount structure can help: `all` builds
//!    one from the counted refcounts (new refcount blocks and table placed
//!    in free clusters, written and synced before the header points at
//!    them), counts again and frees the old structure's clusters; `leaks`
//!    gives up ("need to rebuild"). Otherwise the refcounts `leaks` or `all`
//!    may fix are set to the counted values: too high (leaks) with either
//!    mode, too low with `all`. Clusters whose refcount drops to zero are
//!    discarded (their data punched out of the file), as QEMU discards them.
//! 3. The COPIED flags of the active L1 and L2 tables are set from the now
//!    correct refcounts (with `leaks` only if nothing else is left wrong).
//! 4. With nothing left wrong, the dirty bit (lazy refcounts) and the corrupt
//!    bit are cleared.
//!
//! When anything was repaired, the image is then checked again, read-only
//! ("Double checking the fixed image now...").
//!
//! Every write lands where the counted refcounts say nothing lives, or on
//! the entry being repaired, and writes near metadata are refused the way
//! QEMU's overlap check refuses them. Refcount blocks are synced before the
//! COPIED flags that depend on them change, and a new refcount structure is
//! synced before the header switches to it, so a crash in between leaves the
//! image no worse than it was (at most some leaked clusters).
//!
//! Two things QEMU 10 does are done differently on purpose: a refcount table
//! entry with reserved bits set or an unaligned refcount block offset is
//! rebuilt (QEMU's own overlap check refuses to write the new refcount block
//! where the broken entry points and the repair fails, leaving the image
//! marked corrupt; qimg also drops the "Can't get refcount" errors of the
//! replaced structure, so such an image ends up clean), and a refcount block
//! beyond the end of the file is given a file long enough to hold it only
//! when that grows the file by at most 1 GiB (otherwise the structure is
//! rebuilt without it). After a repair that could not complete, or that
//! left errors, the dirty bit stays set (QEMU clears it when it closes the
//! image). Incomplete snapshot table entries (`Repairing snapshot table
//! entry N is incomplete`) are completed once the refcounts are right, by
//! writing the table anew through the image's writer;
//! entries with too much extra data are cut to 1 KiB and entries past the
//! table's size limit dropped, as QEMU's repair does,
//! and persistent bitmaps are left where they are (QEMU stores them anew
//! when it closes an image it opened for writing).

use super::{check_opened, CheckReport, Checker, Counters, Fix, Fixed};
use crate::qcow2::format::{
    AUTOCLEAR_BITMAPS, HEADER_AUTOCLEAR, HEADER_INCOMPATIBLE, HEADER_REFTABLE_OFFSET,
    INCOMPAT_CORRUPT, INCOMPAT_DIRTY, MAX_REFTABLE_BYTES,
};
use crate::qcow2::header::read_head;
use crate::qcow2::reader::Qcow2Node;
use std::sync::Arc;

use crate::block::lock::{self, Sharing};
use crate::block::FileNode;
use crate::error::{Error, Result};
use crate::qcow2::bytes::be64;
use crate::qcow2::entries::{L1Entry, L2Entry, RefTableEntry, SubclusterBitmap};
use crate::qcow2::header::{kept_autoclear, Header};
use crate::qcow2::snapshot::Snapshot;
use crate::qcow2::types::{ClusterSize, Compat};
use std::io;
use std::path::Path;

/// Which problems `check -r` repairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairMode {
    /// `-r leaks`: refcounts higher than the references (leaked clusters),
    /// and COPIED flags once nothing else is wrong.
    Leaks,
    /// `-r all`: everything `leaks` repairs, refcounts that are too low,
    /// COPIED flags, and broken refcount structures (rebuilt).
    All,
}

impl RepairMode {
    /// The names qemu-img's `-r` takes.
    pub const NAMES: [&'static str; 2] = ["leaks", "all"];

    /// The mode `-r name` asks for, or qemu-img's refusal.
    pub fn parse(name: &str) -> Result<RepairMode> {
        match name {
            "leaks" => Ok(RepairMode::Leaks),
            "all" => Ok(RepairMode::All),
            _ => Err(Error::usage(format!(
                "--repair (-r) expects 'leaks' or 'all' not '{name}'"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            RepairMode::Leaks => "leaks",
            RepairMode::All => "all",
        }
    }

    fn fix(self) -> Fix {
        Fix {
            leaks: true,
            errors: self == RepairMode::All,
        }
    }
}

/// What a repair did and found.
#[derive(Debug)]
pub struct RepairOutcome {
    /// The repair pass: the lines qemu-img prints while repairing (in
    /// `messages`, e.g. "Repairing cluster 5 refcount=1 reference=0") and
    /// what it left unrepaired (the counters).
    pub repair: CheckReport,
    pub leaks_fixed: u64,
    pub corruptions_fixed: u64,
    /// The repair pass could not complete (qemu-img: `Check failed: ...`);
    /// what it repaired until then stays repaired.
    pub failure: Option<Error>,
    /// The check of the repaired image, made when anything was repaired.
    pub recheck: Option<Result<CheckReport>>,
    /// The snapshot table to write once the refcounts are right.
    rewrite_snapshots: Option<Vec<Snapshot>>,
}

impl RepairOutcome {
    /// Whether anything was repaired (qemu-img then prints what, and checks again).
    pub fn repaired_anything(&self) -> bool {
        self.leaks_fixed > 0 || self.corruptions_fixed > 0
    }
}

/// Repairs the qcow2 image at `path` as `qemu-img check -r` does, then
/// checks it again if anything was repaired.
///
/// The file is opened for writing here; nobody else may have it open for
/// writing meanwhile (another QEMU process holding the image's locks makes
/// this fail, as it makes qemu-img fail). Errors are returned for what
/// happens before the check starts (the file cannot be opened or is not a
/// qcow2 image); a check that cannot complete is reported in
/// [`RepairOutcome::failure`] with the lines printed until then.
pub fn repair(path: &Path, mode: RepairMode) -> Result<RepairOutcome> {
    let mut outcome = repair_pass(path, mode)?;
    if outcome.failure.is_none() {
        if let Some(list) = outcome.rewrite_snapshots.take() {
            outcome.failure = rewrite_snapshot_table(path, list).err();
        }
    }
    if outcome.failure.is_none() && outcome.repaired_anything() {
        outcome.recheck = Some(
            Opened::open(path)
                .and_then(|image| check_opened(&image.file, &image.header, image.l1.clone())),
        );
    }
    Ok(outcome)
}

/// Writes `list` as the snapshot table, every entry's extra data complete
/// (through the image's own writer, now that its refcounts are right).
fn rewrite_snapshot_table(path: &Path, list: Vec<Snapshot>) -> Result<()> {
    // Opened by the engine itself, with a writer's locks, not through the
    // generic opener: the backing chain plays no part, and the qcow2 driver
    // stays above this module.
    let file = open_writer(path)?;
    let header = Header::parse(&read_head(&file)?, file.file_len())
        .map_err(|e| e.context(&format!("Could not open '{}'", path.display())))?;
    let node = Qcow2Node::open(Arc::new(file), header, None, None)?;
    node.rewrite_snapshot_table(list)?;
    crate::block::BlockDev::close(&node)
}

/// For a writer opening the image at `path`: when its dirty bit is set (it
/// was not closed cleanly with lazy refcounts), repairs it the way QEMU does
/// when it opens such an image for writing (`check -r all`, no double
/// check) and returns what was done. Returns `None` for images that are not
/// dirty. Call it before opening the image for writing.
///
/// A repair that cannot complete, or leaves internal errors, is an error:
/// `Could not repair dirty image: ...`, as in QEMU.
pub fn rebuild_if_dirty(path: &Path) -> Result<Option<RepairOutcome>> {
    if !Opened::open(path)?.header.dirty() {
        return Ok(None);
    }
    let outcome = repair_pass(path, RepairMode::All)?;
    let errno = match &outcome.failure {
        Some(Error::Io { source, .. }) => Some(source.raw_os_error().unwrap_or(libc::EIO)),
        Some(_) => Some(libc::EIO),
        None if outcome.repair.check_errors > 0 => Some(libc::EIO),
        None => None,
    };
    match errno {
        Some(errno) => Err(Error::io(
            "Could not repair dirty image",
            io::Error::from_raw_os_error(errno),
        )),
        None => Ok(Some(outcome)),
    }
}

// ---- the image, opened for one pass ------------------------------------------

/// The image as read from the file: reopened after its refcount structure
/// or its length changes.
struct Opened {
    file: FileNode,
    header: Header,
    l1: Vec<u64>,
}

impl Opened {
    fn open(path: &Path) -> Result<Opened> {
        let file = FileNode::open(path)?;
        let len = file.file_len();
        let head = file.read_vec(
            0,
            len.min(ClusterSize::from_bits(ClusterSize::MAX_BITS)?.bytes()),
        )?;
        let header = Header::parse(&head, len)
            .map_err(|e| e.context(&format!("Could not open '{}'", path.display())))?;
        // The header parser bounded the L1 table by QEMU's limit and the file.
        let l1 = file
            .read_vec(header.l1_table_offset, header.l1_entries * 8)?
            .chunks_exact(8)
            .map(|c| be64(c, 0))
            .collect();
        Ok(Opened { file, header, l1 })
    }

    fn checker<'a>(&'a self, writer: &'a FileNode) -> Result<Checker<'a>> {
        Checker::from_parts(&self.file, &self.header, self.l1.clone(), Some(writer))
    }
}

/// What one pass carries from phase to phase.
#[derive(Default)]
struct Carried {
    report: CheckReport,
    fixed: Fixed,
    signaled: bool,
    mark_corrupt: bool,
    failed_lookups: u64,
    rewrite_snapshots: Option<Vec<Snapshot>>,
}

impl Carried {
    fn take_from(&mut self, c: &mut Checker<'_>) {
        self.report = std::mem::take(&mut c.report);
        self.fixed = c.fixed;
        self.signaled |= c.stored.signaled_corruption;
        self.mark_corrupt |= c.stored.mark_corrupt;
        self.failed_lookups += c.stored.failed_lookups;
        if c.rewrite_snapshots {
            self.rewrite_snapshots = Some(c.snapshots.clone());
        }
    }

    fn give_to(&mut self, c: &mut Checker<'_>) {
        c.report = std::mem::take(&mut self.report);
        c.fixed = self.fixed;
        c.stored.signaled_corruption = self.signaled;
        c.stored.mark_corrupt = self.mark_corrupt;
    }
}

/// One repair pass (no double check): what qemu-img's first check with
/// `-r` does, then the header bits.
fn repair_pass(path: &Path, mode: RepairMode) -> Result<RepairOutcome> {
    let writer = open_writer(path)?;
    // Refuse what is not a qcow2 image before anything is written.
    let first = Opened::open(path)?;
    let kept = kept_autoclear(first.header.autoclear);
    if kept != first.header.autoclear {
        writer.pwrite(&kept.to_be_bytes(), HEADER_AUTOCLEAR)?;
        writer.sync()?;
    }
    let fix = mode.fix();
    let mut carried = Carried::default();
    let result =
        first_phase(&first, &writer, fix, &mut carried).and_then(|rebuilt| match rebuilt {
            Some(rebuilt) => second_phase(path, &writer, fix, &mut carried, rebuilt),
            None => Ok(()),
        });
    let failure = result.err();
    let report = &carried.report;
    let clean = failure.is_none() && report.check_errors == 0 && report.corruptions == 0;
    let header = Opened::open(path).map(|o| o.header);
    let bits = header
        .and_then(|header| {
            update_incompatible(&writer, &header, clean, carried.mark_corrupt)?;
            writer.sync()
        })
        .err();
    Ok(RepairOutcome {
        repair: carried.report,
        leaks_fixed: carried.fixed.leaks,
        corruptions_fixed: carried.fixed.corruptions,
        failure: failure.or(bits),
        recheck: None,
        rewrite_snapshots: carried.rewrite_snapshots,
    })
}

/// The old refcount structure was replaced; what the second phase needs.
struct Rebuilt {
    /// The counters before the rebuild.
    before: Counters,
    snapshots: Vec<crate::qcow2::snapshot::Snapshot>,
    snapshots_size: u64,
    highest: u64,
}

/// Counting (with the repairs made while counting), comparing, and either
/// the refcount and COPIED repairs or a new refcount structure.
fn first_phase(
    image: &Opened,
    writer: &FileNode,
    fix: Fix,
    carried: &mut Carried,
) -> Result<Option<Rebuilt>> {
    let mut c = image.checker(writer)?;
    c.fix = fix;
    let result = (|| {
        c.read_snapshot_table()?;
        c.count_references()?;
        let before_compare = c.counters();
        let mut highest = c.compare_refcounts(Fix::NONE);
        if c.rebuild && fix.errors {
            let before = c.counters();
            c.say("Rebuilding refcount structure".to_string());
            c.rebuild_refcounts()?;
            return Ok(Some(Rebuilt {
                before,
                snapshots: c.snapshots.clone(),
                snapshots_size: c.snapshots_size,
                highest,
            }));
        }
        if c.rebuild {
            c.say("ERROR need to rebuild refcount structures".to_string());
            c.report.check_errors += 1;
            return Err(eio_failure(""));
        }
        if c.report.leaks > 0 || c.report.corruptions > 0 {
            c.set_counters(&before_compare);
            highest = c.compare_refcounts(fix);
            c.commit_refcounts()?;
        }
        c.check_copied_flags()?;
        writer.sync()?;
        c.report.image_end_offset = (highest + 1) * c.cluster_size;
        Ok(None)
    })();
    carried.take_from(&mut c);
    result
}

/// After a rebuild: counts again against the new structure, frees the old
/// one (now leaked), and repairs the COPIED flags.
fn second_phase(
    path: &Path,
    writer: &FileNode,
    fix: Fix,
    carried: &mut Carried,
    rebuilt: Rebuilt,
) -> Result<()> {
    let image = Opened::open(path)?;
    let mut c = image.checker(writer)?;
    carried.give_to(&mut c);
    c.report.corruptions = 0;
    c.report.leaks = 0;
    // Lookups that failed in the old structure say nothing about the new one.
    c.report.check_errors = c.report.check_errors.saturating_sub(carried.failed_lookups);
    c.snapshots = rebuilt.snapshots;
    c.snapshots_size = rebuilt.snapshots_size;
    let result = (|| {
        c.count_references()?;
        let mut highest = rebuilt.highest;
        let mut fresh_leaks = 0;
        if fix.leaks {
            let saved = c.counters();
            c.set_counters(&Counters::default());
            highest = c.compare_refcounts(Fix::LEAKS);
            c.commit_refcounts()?;
            if c.rebuild {
                c.say("ERROR rebuilt refcount structure is still broken".to_string());
            }
            // What is still leaked was leaked by the rebuild itself.
            fresh_leaks = c.report.leaks;
            c.set_counters(&saved);
        }
        let before = &rebuilt.before.report;
        if c.report.corruptions < before.corruptions {
            c.fixed.corruptions += before.corruptions - c.report.corruptions;
        }
        if c.report.leaks < before.leaks {
            c.fixed.leaks += before.leaks - c.report.leaks;
        }
        c.report.leaks += fresh_leaks;
        c.fix = fix;
        c.check_copied_flags()?;
        writer.sync()?;
        c.report.image_end_offset = (highest + 1) * c.cluster_size;
        Ok(())
    })();
    carried.failed_lookups = 0;
    carried.take_from(&mut c);
    result
}

/// qemu-img's `Check failed: Input/output error`, after `preface` lines.
fn eio_failure(preface: &str) -> Error {
    let context = if preface.is_empty() {
        "Check failed".to_string()
    } else {
        format!("{preface}\nCheck failed")
    };
    Error::io(context, io::Error::from_raw_os_error(libc::EIO))
}

/// Sets the incompatible feature bits a repair changes: dirty and corrupt
/// cleared on a clean result, corrupt set where a corruption was signaled.
fn update_incompatible(
    writer: &FileNode,
    header: &Header,
    clean: bool,
    mark_corrupt: bool,
) -> Result<()> {
    if header.compat != Compat::V3 {
        // v2 images have no feature bits.
        return Ok(());
    }
    let mut bits = header.incompatible;
    if clean {
        bits &= !(INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
    } else if mark_corrupt {
        bits |= INCOMPAT_CORRUPT;
    }
    if bits == header.incompatible {
        return Ok(());
    }
    // Everything the header's state depends on is on disk before it changes.
    writer.sync()?;
    writer.pwrite(&bits.to_be_bytes(), HEADER_INCOMPATIBLE)
}

/// How much a repair grows a file for a refcount block beyond its end, at most.
const MAX_GROWTH: u64 = 1 << 30;

// ---- writing -----------------------------------------------------------------

/// Opens the image file for the repair's writes, with QEMU's locks of a
/// qcow2 writer, so that a running QEMU neither is written under nor starts
/// writing during the repair. The locks go with the node.
fn open_writer(path: &Path) -> Result<FileNode> {
    let node = FileNode::open_rw(path)?;
    let want = lock::request(Sharing::default(), true, true, true);
    node.lock(want)
        .map_err(|e| e.context(&format!("Could not open '{}'", path.display())))?;
    Ok(node)
}

/// What a zero cluster repair did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ZeroFix {
    /// The entry is a plain zero cluster now: it references nothing.
    Done,
    /// Writing failed; the entry stays as it was.
    Failed,
}

/// Kinds of metadata a write must not touch (QEMU's overlap check in its
/// default "cached" mode, which leaves out inactive L2 tables).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Overlap(u32);

impl Overlap {
    const MAIN_HEADER: Overlap = Overlap(1 << 0);
    pub(crate) const ACTIVE_L1: Overlap = Overlap(1 << 1);
    pub(crate) const ACTIVE_L2: Overlap = Overlap(1 << 2);
    const REFCOUNT_TABLE: Overlap = Overlap(1 << 3);
    const REFCOUNT_BLOCK: Overlap = Overlap(1 << 4);
    const SNAPSHOT_TABLE: Overlap = Overlap(1 << 5);
    const INACTIVE_L1: Overlap = Overlap(1 << 6);
    pub(crate) const INACTIVE_L2: Overlap = Overlap(1 << 7);
    const BITMAP_DIRECTORY: Overlap = Overlap(1 << 8);
    /// The refcount structure a rebuild replaces.
    const REFCOUNTS: Overlap = Overlap(Self::REFCOUNT_TABLE.0 | Self::REFCOUNT_BLOCK.0);

    fn has(self, kind: Overlap) -> bool {
        self.0 & kind.0 != 0
    }

    fn name(self) -> &'static str {
        match self {
            Overlap::MAIN_HEADER => "qcow2_header",
            Overlap::ACTIVE_L1 => "active L1 table",
            Overlap::ACTIVE_L2 => "active L2 table",
            Overlap::REFCOUNT_TABLE => "refcount table",
            Overlap::REFCOUNT_BLOCK => "refcount block",
            Overlap::SNAPSHOT_TABLE => "snapshot table",
            Overlap::INACTIVE_L1 => "inactive L1 table",
            Overlap::INACTIVE_L2 => "inactive L2 table",
            _ => "bitmap directory",
        }
    }
}

/// Byte ranges `[start, end)` of one kind of metadata, for overlap queries
/// in logarithmic time (an image may have millions of tables).
struct Ranges {
    /// Starts, sorted.
    starts: Vec<u64>,
    /// `max_end[i]`: the furthest end among the first `i + 1` ranges.
    max_end: Vec<u64>,
}

impl Ranges {
    /// From (offset, length) pairs; empty ones are left out.
    fn new(mut ranges: Vec<(u64, u64)>) -> Ranges {
        ranges.retain(|&(_, len)| len > 0);
        ranges.sort_unstable();
        let mut furthest = 0;
        let max_end = ranges
            .iter()
            .map(|&(start, len)| {
                furthest = furthest.max(start.saturating_add(len));
                furthest
            })
            .collect();
        Ranges {
            starts: ranges.iter().map(|&(start, _)| start).collect(),
            max_end,
        }
    }

    /// Whether any range shares a byte with `[start, end)`.
    fn hit(&self, start: u64, end: u64) -> bool {
        let before_end = self.starts.partition_point(|&s| s < end);
        before_end > 0 && self.max_end[before_end - 1] > start
    }
}

/// Where an image's metadata lies, kind by kind in the order QEMU checks
/// them (the header is checked apart).
pub(crate) struct MetadataIndex {
    kinds: Vec<(Overlap, Ranges)>,
}

impl MetadataIndex {
    fn of(c: &Checker<'_>) -> MetadataIndex {
        let cs = c.cluster_size;
        let h = c.header;
        let one = |offset: u64, len: u64| Ranges::new(vec![(offset, len)]);
        let tables = |entries: &[u64], offset: fn(u64) -> u64| {
            Ranges::new(
                entries
                    .iter()
                    .map(|&e| offset(e))
                    .filter(|&offset| offset != 0)
                    .map(|offset| (offset, cs))
                    .collect(),
            )
        };
        let bitmaps = match h.bitmaps {
            Some(ext) if h.autoclear & AUTOCLEAR_BITMAPS != 0 => {
                one(ext.directory_offset, ext.directory_size)
            }
            _ => Ranges::new(Vec::new()),
        };
        MetadataIndex {
            kinds: vec![
                (Overlap::ACTIVE_L1, one(h.l1_table_offset, h.l1_entries * 8)),
                (
                    Overlap::REFCOUNT_TABLE,
                    one(h.reftable_offset, h.reftable_clusters * cs),
                ),
                (
                    Overlap::SNAPSHOT_TABLE,
                    one(h.snapshots_offset, c.snapshots_size),
                ),
                (
                    Overlap::INACTIVE_L1,
                    Ranges::new(
                        c.snapshots
                            .iter()
                            .map(|sn| (sn.l1_table_offset, sn.l1_entries.saturating_mul(8)))
                            .collect(),
                    ),
                ),
                (
                    Overlap::ACTIVE_L2,
                    tables(&c.l1, |e| L1Entry::from_raw(e).table_offset()),
                ),
                (
                    Overlap::REFCOUNT_BLOCK,
                    tables(&c.stored.reftable, |e| {
                        RefTableEntry::from_raw(e).block_offset()
                    }),
                ),
                (Overlap::BITMAP_DIRECTORY, bitmaps),
            ],
        }
    }
}

impl<'a> Checker<'a> {
    fn writer(&self) -> Result<&'a FileNode> {
        self.writer.ok_or_else(|| eio_failure(""))
    }

    /// The first kind of metadata (in QEMU's order) that `[offset, offset +
    /// size)` widened to whole clusters touches, leaving out `ignore`.
    fn overlapping(&mut self, offset: u64, size: u64, ignore: Overlap) -> Option<Overlap> {
        if size == 0 {
            return None;
        }
        let cs = self.cluster_size;
        if !ignore.has(Overlap::MAIN_HEADER) && offset < cs {
            return Some(Overlap::MAIN_HEADER);
        }
        let start = offset - offset % cs;
        let end = start.saturating_add((offset % cs).saturating_add(size).next_multiple_of(cs));
        if self.metadata.is_none() {
            self.metadata = Some(MetadataIndex::of(self));
        }
        let index = self.metadata.as_ref()?;
        index
            .kinds
            .iter()
            .find(|(kind, ranges)| !ignore.has(*kind) && ranges.hit(start, end))
            .map(|(kind, _)| *kind)
    }

    /// QEMU's overlap check before a metadata write: an overlap signals the
    /// corruption and refuses the write (EIO).
    fn refuse_overlap(&mut self, offset: u64, size: u64, ignore: Overlap) -> bool {
        let Some(kind) = self.overlapping(offset, size, ignore) else {
            return false;
        };
        let what = format!(
            "Preventing invalid write on metadata (overlaps with {})",
            kind.name()
        );
        self.stored
            .signal_corruption(&what, &mut self.report.messages);
        true
    }

    /// Makes L2 entry `index` of the table at `l2_offset` a plain zero
    /// cluster (with extended L2: every allocated subcluster a zero one).
    /// An overlap with other metadata ends the check.
    pub(crate) fn fix_l2_entry_by_zero(
        &mut self,
        l2_offset: u64,
        index: u64,
        bitmap: SubclusterBitmap,
        active: bool,
    ) -> Result<ZeroFix> {
        let extended = self.header.extended_l2();
        let entry_size = self.header.l2_entry_bytes();
        let at = l2_offset + index * entry_size;
        let mut bytes = Vec::with_capacity(entry_size as usize);
        if extended {
            let zeroes = bitmap.allocated_as_zero();
            bytes.extend_from_slice(&L2Entry::UNALLOCATED.raw().to_be_bytes());
            bytes.extend_from_slice(&zeroes.raw().to_be_bytes());
        } else {
            bytes.extend_from_slice(&L2Entry::ZERO.raw().to_be_bytes());
        }
        let own = if active {
            Overlap::ACTIVE_L2
        } else {
            Overlap::INACTIVE_L2
        };
        if self.refuse_overlap(at, entry_size, own) {
            self.say("ERROR: Overlap check failed".to_string());
            self.report.check_errors += 1;
            return Err(eio_failure(""));
        }
        let written = self
            .writer()
            .and_then(|w| w.pwrite(&bytes, at).and_then(|()| w.sync()));
        if let Err(e) = written {
            self.say(format!(
                "ERROR: Failed to overwrite L2 table entry: {}",
                e.short_text()
            ));
            self.report.check_errors += 1;
            return Ok(ZeroFix::Failed);
        }
        self.report.corruptions -= 1;
        self.fixed.corruptions += 1;
        Ok(ZeroFix::Done)
    }

    /// Grows the file so that the refcount block at `offset` (beyond its
    /// end) is inside it; Err(errno) where that cannot be done.
    pub(crate) fn grow_file_for_refblock(
        &mut self,
        offset: u64,
    ) -> Result<std::result::Result<(), i32>> {
        let cs = self.cluster_size;
        let Some(new_len) = offset.checked_add(cs).filter(|&end| end <= i64::MAX as u64) else {
            return Ok(Err(libc::EINVAL));
        };
        let w = self.writer()?;
        // A broken entry could ask for a file of exabytes: grow by at most
        // MAX_GROWTH (beyond that the refcount structure is rebuilt instead).
        let old_len = w.file_len();
        if new_len > old_len.saturating_add(MAX_GROWTH) || new_len.div_ceil(cs) > i32::MAX as u64 {
            return Ok(Err(libc::EFBIG));
        }
        if let Err(e) = w.truncate(new_len) {
            return Ok(Err(e.errno()));
        }
        let len = w.file_len();
        self.file_len = len.div_ceil(512) * 512;
        self.computed.grow(self.file_len.div_ceil(cs));
        if offset / cs >= self.computed.len {
            return Ok(Err(libc::EINVAL));
        }
        Ok(Ok(()))
    }

    /// Notes that `cluster` is free now, to be discarded once the refcount
    /// blocks saying so are on disk.
    pub(crate) fn freed(&mut self, cluster: u64) {
        match self.freed.last_mut() {
            Some((first, count)) if *first + *count == cluster => *count += 1,
            _ => self.freed.push((cluster, 1)),
        }
    }

    /// Writes the refcount blocks a comparison changed, syncs them, then
    /// discards the clusters they freed.
    pub(crate) fn commit_refcounts(&mut self) -> Result<()> {
        self.stored.flush()?;
        let w = self.writer()?;
        w.sync()?;
        for (first, count) in std::mem::take(&mut self.freed) {
            // Discarding is advice: a failure loses nothing.
            let _ = w.discard(first << self.cluster_bits, count << self.cluster_bits);
        }
        Ok(())
    }

    /// Writes entry `index` of the active L1 table.
    pub(crate) fn write_l1_entry(&mut self, index: u64, entry: L1Entry) -> Result<()> {
        let at = self.header.l1_table_offset + index * 8;
        if self.refuse_overlap(at, 8, Overlap::ACTIVE_L1) {
            self.report.check_errors += 1;
            return Err(eio_failure(""));
        }
        let written = self.writer().and_then(|w| {
            w.pwrite(&entry.raw().to_be_bytes(), at)
                .and_then(|()| w.sync())
        });
        if let Err(e) = written {
            self.report.check_errors += 1;
            return Err(e);
        }
        if let Some(slot) = self.l1.get_mut(index as usize) {
            *slot = entry.raw();
        }
        Ok(())
    }

    /// Writes a whole L2 table at `l2_offset`.
    pub(crate) fn write_l2_table(
        &mut self,
        l2_offset: u64,
        table: &[u8],
        own: Overlap,
    ) -> Result<()> {
        if self.refuse_overlap(l2_offset, table.len() as u64, own) {
            self.say(
                "ERROR: Could not write L2 table; metadata overlap check failed: Input/output error"
                    .to_string(),
            );
            self.report.check_errors += 1;
            return Err(eio_failure(""));
        }
        if let Err(e) = self.writer().and_then(|w| w.pwrite(table, l2_offset)) {
            self.say(format!(
                "ERROR: Could not write L2 table: {}",
                e.short_text()
            ));
            self.report.check_errors += 1;
            return Err(e);
        }
        Ok(())
    }

    // ---- rebuilding the refcount structure ------------------------------------

    /// Finds `count` free clusters in a row in the counted refcounts,
    /// starting the search at `*first_free` (moved to the first free cluster
    /// seen), marks them used and returns the offset of the first. Free
    /// clusters at the end of the counts continue past it.
    fn alloc_counted(&mut self, count: u64, first_free: &mut u64) -> u64 {
        let mut cluster = *first_free;
        let mut run = 0u64;
        let mut first_gap = true;
        while cluster < self.computed.len && run < count {
            if self.computed.get(cluster) == 0 {
                run += 1;
                if first_gap {
                    *first_free = cluster;
                    first_gap = false;
                }
            } else {
                run = 0;
            }
            cluster += 1;
        }
        if run < count {
            self.computed.grow(cluster + count - run);
        }
        let start = cluster - run;
        for i in 0..count {
            self.computed.set(start + i, 1);
        }
        start << self.cluster_bits
    }

    /// Writes the refcount blocks covering the used clusters in
    /// `[first, end)` from the counted refcounts, allocating the blocks not
    /// yet in `reftable` (which grows by whole clusters as needed). Returns
    /// whether `reftable` grew.
    fn write_refblocks(&mut self, first: u64, end: u64, reftable: &mut Vec<u64>) -> Result<bool> {
        let cs = self.cluster_size;
        let bits = self.cluster_bits;
        let block_bits = self.stored.block_bits;
        let order = self.header.refcount_order;
        let mut end = end;
        let mut first_free = 0u64;
        let mut grown = false;
        let mut cluster = first;
        while cluster < end {
            if self.computed.get(cluster) == 0 {
                cluster += 1;
                continue;
            }
            let index = cluster >> block_bits;
            let block_start = index << block_bits;
            let known = reftable.get(index as usize).copied().unwrap_or(0);
            let offset = if known != 0 {
                known
            } else {
                first_free = first_free.max(block_start);
                let offset = self.alloc_counted(1, &mut first_free);
                if offset >> bits >= end {
                    end = (offset >> bits) + 1;
                }
                if reftable.len() as u64 <= index {
                    let entries = ((index + 1) * 8).next_multiple_of(cs) / 8;
                    if entries * 8 > MAX_REFTABLE_BYTES {
                        self.report.check_errors += 1;
                        return Err(Error::io(
                            "ERROR allocating reftable memory\nCheck failed",
                            io::Error::from_raw_os_error(libc::EFBIG),
                        ));
                    }
                    reftable.resize(entries as usize, 0);
                    grown = true;
                }
                reftable[index as usize] = offset;
                offset
            };
            // The counts keep every live cluster from being chosen; the old
            // refcount structure is what is being replaced.
            if self.refuse_overlap(offset, cs, Overlap::REFCOUNTS) {
                self.report.check_errors += 1;
                return Err(eio_failure("ERROR writing refblock: Input/output error"));
            }
            let block = self.computed.encode_block(index, block_bits, order, cs);
            if let Err(e) = self.writer()?.pwrite(&block, offset) {
                self.report.check_errors += 1;
                return Err(Error::io(
                    format!("ERROR writing refblock: {}\nCheck failed", e.short_text()),
                    io::Error::from_raw_os_error(e.errno()),
                ));
            }
            cluster = block_start + (1 << block_bits);
        }
        Ok(grown)
    }

    /// Replaces the refcount structure with one made from the counted
    /// refcounts: new refcount blocks and a new refcount table in clusters
    /// nothing uses, synced, and only then the header switched to them. The
    /// old structure is left in place (leaked) for the next pass to free.
    pub(crate) fn rebuild_refcounts(&mut self) -> Result<()> {
        let cs = self.cluster_size;
        let bits = self.cluster_bits;
        let mut reftable: Vec<u64> = Vec::new();
        let all = self.computed.len;
        self.write_refblocks(0, all, &mut reftable)?;
        // Placing the table may need more refcount blocks, which may need a
        // bigger table: until it fits.
        let (table_offset, table_clusters) = loop {
            let clusters = (reftable.len() as u64 * 8).div_ceil(cs);
            let mut first_free = 0u64;
            let offset = self.alloc_counted(clusters, &mut first_free);
            let start = offset >> bits;
            if !self.write_refblocks(start, start + clusters, &mut reftable)? {
                break (offset, clusters);
            }
        };
        let mut table = Vec::with_capacity(reftable.len() * 8);
        for entry in &reftable {
            table.extend_from_slice(&entry.to_be_bytes());
        }
        table.resize((table_clusters * cs) as usize, 0);
        if self.refuse_overlap(table_offset, table.len() as u64, Overlap::REFCOUNTS) {
            return Err(eio_failure("ERROR writing reftable: Input/output error"));
        }
        let w = self.writer()?;
        let failed = |what: &str, e: &Error| {
            Error::io(
                format!("{what}: {}\nCheck failed", e.short_text()),
                io::Error::from_raw_os_error(e.errno()),
            )
        };
        w.pwrite(&table, table_offset)
            .and_then(|()| w.sync())
            .map_err(|e| failed("ERROR writing reftable", &e))?;
        let clusters = u32::try_from(table_clusters).map_err(|_| eio_failure(""))?;
        let mut pointer = [0u8; 12];
        pointer[..8].copy_from_slice(&table_offset.to_be_bytes());
        pointer[8..].copy_from_slice(&clusters.to_be_bytes());
        w.pwrite(&pointer, HEADER_REFTABLE_OFFSET)
            .and_then(|()| w.sync())
            .map_err(|e| failed("ERROR setting reftable", &e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_hit_only_where_they_share_a_byte() {
        let r = Ranges::new(vec![(100, 10), (0, 0), (20, 50), (200, 1)]);
        assert!(r.hit(109, 110));
        assert!(!r.hit(110, 200));
        assert!(r.hit(60, 61), "inside a range that starts earlier");
        assert!(!r.hit(0, 20), "the empty range is left out");
        assert!(r.hit(0, 21));
        assert!(r.hit(150, u64::MAX));
        assert!(!r.hit(201, u64::MAX));
        assert!(!Ranges::new(Vec::new()).hit(0, u64::MAX));
        let far = Ranges::new(vec![(u64::MAX - 5, 10)]);
        assert!(far.hit(u64::MAX - 1, u64::MAX));
    }

    #[test]
    fn repair_modes_are_named_as_in_qemu_img() {
        assert_eq!(RepairMode::parse("leaks").ok(), Some(RepairMode::Leaks));
        assert_eq!(RepairMode::parse("all").ok(), Some(RepairMode::All));
        assert_eq!(
            RepairMode::parse("errors").err().map(|e| e.to_string()),
            Some("--repair (-r) expects 'leaks' or 'all' not 'errors'".into())
        );
        for name in RepairMode::NAMES {
            assert_eq!(
                RepairMode::parse(name).map(RepairMode::name).ok(),
                Some(name)
            );
        }
        assert!(!RepairMode::Leaks.fix().errors);
        assert!(RepairMode::All.fix().errors && RepairMode::All.fix().leaks);
    }
}
