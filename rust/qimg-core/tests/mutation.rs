//! Untrusted images: thousands of mutants of small valid qcow2 images are opened, read and
//! mapped, and every one of them must either work or fail with an `Error` — never panic, never
//! hang, never write to the file it reads.
//!
//! The seeds (`tests/data/*.qcow2.gz`, made by `tests/data/make-seeds.sh` with qemu-img and
//! qemu-io) cover v3 with 64k clusters, zlib and zstd compressed clusters, extended L2, v2 with
//! 512-byte clusters, a backing chain with a backing format extension, an internal snapshot,
//! metadata preallocation with 1-bit refcounts and persistent bitmaps. Each mutant stacks a few bit flips and u8 / u32 /
//! u64 overwrites, biased toward the header fields, the L1 and L2 tables and the refcount
//! structures, and sometimes truncates or extends the file.
//!
//! Each mutant that opens is read (its first and last 4 MiB in 64 KiB steps, a read across its
//! end, one parallel 5 MiB read), its snapshot table is read and it is checked (what `info` and
//! `check` read), its snapshots and bitmaps are read, and its first and last 256 MiB are
//! mapped. Then a copy of it is opened for writing and changed as the life-cycle commands
//! change images (a write, snapshot create/apply/delete, bitmap clear/add).
//!
//! Knobs (environment variables):
//! - `QIMG_MUTATION_CASES=N`: mutants per seed (default 800; 10 seeds).
//! - `QIMG_MUTATION_RNG=N`: base seed of the random generator (default 80); the mutant of
//!   (seed image, case) depends only on this, the seed image and the case number.
//! - `QIMG_MUTATION_ONLY=NAME:CASE`: run one case (as named in a failure report).
//! - `QIMG_MUTATION_SAVE=DIR`: copy every failing mutant to DIR for a closer look.
//! - `QIMG_MUTATION_MESSAGES=1`: print every distinct error message (numbers and paths
//!   blanked), with how often it was seen, to review their wording.
//!
//! Run with `cargo test -p qimg-core --test mutation -- --nocapture` to see the counts.
#![allow(clippy::expect_used)] // A test stops at the first surprise.

use flate2::read::GzDecoder;
use qimg_core::block::{map_extents, open_image, read_clipped, BlockDev, OpenOptions};
use qimg_core::formats::qcow2::QCOW2;
use qimg_core::qcow2::bitmap_ops::BitmapOp;
use qimg_core::qcow2::check::check;
use qimg_core::qcow2::snapshot::read_snapshots;
use qimg_core::qcow2::snapshot_ops::SnapshotRef;
use qimg_core::qcow2::Compat;
use std::fmt::Write as _;
use std::io::Read;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// Mutants per seed image unless `QIMG_MUTATION_CASES` says otherwise.
const DEFAULT_CASES: u64 = 800;
/// The seed images, in `tests/data/NAME.gz`. `base.qcow2` is also the backing file of
/// `backed.qcow2` and stays unmutated beside it.
const SEEDS: [&str; 10] = [
    "v3_64k.qcow2",
    "zlib_4k.qcow2",
    "zstd_4k.qcow2",
    "extl2_16k.qcow2",
    "v2_512.qcow2",
    "backed.qcow2",
    "base.qcow2",
    "snapshot.qcow2",
    "prealloc.qcow2",
    "bitmaps.qcow2",
];
/// Bytes read from the start and from the end of each opened mutant.
const READ_CAP: u64 = 4 << 20;
/// Step of the serial reads.
const READ_STEP: u64 = 64 << 10;
/// A read this long goes through the parallel path of the qcow2 reader.
const BIG_READ: u64 = 5 << 20;
/// Bytes mapped at the start and at the end of each opened mutant.
const MAP_CAP: u64 = 256 << 20;
/// A case taking longer than this (not counting `check`) is reported as (nearly) hanging.
const SLOW_CASE: Duration = Duration::from_secs(2);
/// `check` takes time in proportion to the problems it lists, like qemu-img's: a 2 MiB mutant
/// whose L1 table runs over data clusters has 200,000 of them and takes 2 s in a release build.
const SLOW_CHECK: Duration = Duration::from_secs(10);
/// A case still running after this long stops the test: the reader hangs.
const HUNG_CASE: Duration = Duration::from_secs(30);
/// Largest sparse extension of a mutant file.
const MAX_EXTENSION: u64 = 4 << 20;

// ---------------------------------------------------------------------------------------------
// A tiny deterministic random generator (xorshift64, seeded through splitmix64).

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in `0..n` (0 when n is 0).
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

// ---------------------------------------------------------------------------------------------
// Where the metadata of a seed image lives.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Area {
    Header,
    L1,
    /// A whole L2 table, mostly unused entries.
    L2,
    /// One L2 entry in use (with its bitmap, with extended L2).
    L2Entry,
    /// The whole refcount table or a whole refcount block.
    Refcount,
    /// A refcount table entry in use, or the part of a refcount block that covers the file.
    RefcountEntry,
    Snapshot,
    Data,
}

struct Layout {
    cluster_size: u64,
    areas: Vec<(Area, Range<u64>)>,
}

fn be32(b: &[u8], at: u64) -> u64 {
    let at = at as usize;
    u64::from(u32::from_be_bytes(
        b[at..at + 4].try_into().expect("4 bytes"),
    ))
}

fn be64(b: &[u8], at: u64) -> u64 {
    let at = at as usize;
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The areas of a valid seed image, read from its header and tables.
fn layout(img: &[u8]) -> Layout {
    let len = img.len() as u64;
    let cs = 1u64 << be32(img, 20);
    let ext_l2 = be32(img, 4) >= 3 && be64(img, 72) & (1 << 4) != 0;
    let mut areas = vec![(Area::Header, 0..cs.min(1024).min(len))];
    let cluster = |off: u64| (off & 0x00ff_ffff_ffff_fe00, cs);

    let l1_off = be64(img, 40);
    let l1_len = be32(img, 36) * 8;
    areas.push((Area::L1, l1_off..l1_off + l1_len));
    for i in 0..be32(img, 36) {
        let (l2, n) = cluster(be64(img, l1_off + i * 8));
        if l2 == 0 {
            continue;
        }
        areas.push((Area::L2, l2..l2 + n));
        let step = if ext_l2 { 16 } else { 8 };
        for e in (0..n).step_by(step as usize) {
            let entry = be64(img, l2 + e);
            if entry != 0 || (ext_l2 && be64(img, l2 + e + 8) != 0) {
                areas.push((Area::L2Entry, l2 + e..l2 + e + step));
            }
            if entry & (1 << 62) != 0 {
                let shift = 62 - (be32(img, 20) - 8);
                let host = entry & ((1 << shift) - 1);
                areas.push((Area::Data, host..(host + 512).min(len)));
            } else if entry & 0x00ff_ffff_ffff_fe00 != 0 {
                let host = entry & 0x00ff_ffff_ffff_fe00;
                areas.push((Area::Data, host..(host + cs).min(len)));
            }
        }
    }

    let rt_off = be64(img, 48);
    let rt_len = be32(img, 56) * cs;
    let refcount_bits = if be32(img, 4) >= 3 {
        1 << be32(img, 96)
    } else {
        16
    };
    let covered = (len.div_ceil(cs) * refcount_bits).div_ceil(8).min(cs);
    areas.push((Area::Refcount, rt_off..rt_off + rt_len));
    for i in 0..rt_len / 8 {
        let rb = be64(img, rt_off + i * 8) & !511;
        if rb != 0 {
            areas.push((Area::RefcountEntry, rt_off + i * 8..rt_off + i * 8 + 8));
            areas.push((Area::Refcount, rb..rb + cs));
            areas.push((Area::RefcountEntry, rb..rb + covered));
        }
    }

    if be32(img, 60) > 0 {
        let sn = be64(img, 64);
        areas.push((Area::Snapshot, sn..(sn + 1024).min(len)));
    }
    Layout {
        cluster_size: cs,
        areas,
    }
}

// ---------------------------------------------------------------------------------------------
// Mutations.

/// The fixed header fields: (offset, width in bytes).
const HEADER_FIELDS: [(u64, u64); 19] = [
    (0, 4),   // magic
    (4, 4),   // version
    (8, 8),   // backing_file_offset
    (16, 4),  // backing_file_size
    (20, 4),  // cluster_bits
    (24, 8),  // size
    (32, 4),  // crypt_method
    (36, 4),  // l1_size
    (40, 8),  // l1_table_offset
    (48, 8),  // refcount_table_offset
    (56, 4),  // refcount_table_clusters
    (60, 4),  // nb_snapshots
    (64, 8),  // snapshots_offset
    (72, 8),  // incompatible_features
    (80, 8),  // compatible_features
    (88, 8),  // autoclear_features
    (96, 4),  // refcount_order
    (100, 4), // header_length
    (104, 1), // compression_type
];

struct Mutant {
    bytes: Vec<u8>,
    /// The file is extended (sparsely) to this length after `bytes` are written.
    sparse_len: Option<u64>,
    /// What was done, for failure reports.
    ops: Vec<String>,
}

/// A value worth writing into a field `width` bytes wide of an image of `len` bytes.
fn interesting(rng: &mut Rng, width: u64, cs: u64, len: u64) -> u64 {
    let clusters = len.div_ceil(cs) + 4;
    let v = match rng.below(12) {
        0 => 0,
        1 => 1,
        2 => u64::MAX,
        3 => 1 << rng.below(64),
        4 => (1 << rng.below(64)) - 1,
        5 => rng.below(70),
        6 => rng.below(clusters) * cs,
        7 => (rng.below(clusters) * cs) | rng.pick(&[1u64 << 63, 1, 1 << 62, 512, 8]),
        8 => len + rng.below(4) * cs,
        9 => rng.pick(&[i64::MAX as u64, 1 << 63, u64::MAX - cs + 1, 1 << 56]),
        10 => rng.below(cs * 4),
        _ => rng.next(),
    };
    if width >= 8 {
        v
    } else {
        v & ((1u64 << (width * 8)) - 1)
    }
}

fn put(bytes: &mut [u8], at: u64, width: u64, value: u64) {
    let at = at as usize;
    let w = width as usize;
    bytes[at..at + w].copy_from_slice(&value.to_be_bytes()[8 - w..]);
}

/// An offset inside an area picked with the header, L1, L2 and refcount areas favoured.
fn pick_offset(rng: &mut Rng, layout: &Layout, len: u64) -> u64 {
    let weights = [
        (Area::Header, 30),
        (Area::L1, 12),
        (Area::L2, 8),
        (Area::L2Entry, 14),
        (Area::Refcount, 6),
        (Area::RefcountEntry, 14),
        (Area::Snapshot, 6),
        (Area::Data, 6),
    ];
    let present: Vec<(Area, u64)> = weights
        .into_iter()
        .filter(|(a, _)| {
            layout
                .areas
                .iter()
                .any(|(b, r)| a == b && r.start < r.end && r.end <= len)
        })
        .collect();
    let total: u64 = present.iter().map(|(_, w)| w).sum::<u64>() + 8;
    let mut roll = rng.below(total);
    for (area, w) in present {
        if roll < w {
            let ranges: Vec<&Range<u64>> = layout
                .areas
                .iter()
                .filter(|(b, r)| *b == area && r.start < r.end && r.end <= len)
                .map(|(_, r)| r)
                .collect();
            let r = ranges[rng.below(ranges.len() as u64) as usize];
            return r.start + rng.below(r.end - r.start);
        }
        roll -= w;
    }
    rng.below(len)
}

fn mutate(seed: &[u8], layout: &Layout, rng: &mut Rng) -> Mutant {
    let cs = layout.cluster_size;
    let mut m = Mutant {
        bytes: seed.to_vec(),
        sparse_len: None,
        ops: Vec::new(),
    };
    let n_ops = 1 + rng.below(3);
    for _ in 0..n_ops {
        let len = m.bytes.len() as u64;
        if len < 8 {
            break;
        }
        match rng.below(20) {
            // A typed value into one of the fixed header fields.
            0..=4 => {
                let (at, width) = rng.pick(&HEADER_FIELDS);
                if at + width > len {
                    continue;
                }
                let v = if at == 72 || at == 80 || at == 88 {
                    // feature bits: flip one, or set a whole pattern
                    let old = be64(&m.bytes, at);
                    if rng.chance(70) {
                        old ^ (1 << rng.below(64))
                    } else {
                        interesting(rng, width, cs, len)
                    }
                } else {
                    interesting(rng, width, cs, len)
                };
                put(&mut m.bytes, at, width, v);
                m.ops
                    .push(format!("header field @{at}: {width} bytes := {v:#x}"));
            }
            // Bit flip.
            5..=9 => {
                let at = pick_offset(rng, layout, len);
                let bit = rng.below(8);
                m.bytes[at as usize] ^= 1 << bit;
                m.ops.push(format!("flip bit {bit} @{at:#x}"));
            }
            // u8 / u32 / u64 overwrite, usually aligned to its width.
            10..=16 => {
                let width = rng.pick(&[1u64, 4, 8, 8]);
                let mut at = pick_offset(rng, layout, len);
                if rng.chance(85) {
                    at -= at % width;
                }
                if at + width > len {
                    continue;
                }
                let v = interesting(rng, width, cs, len);
                put(&mut m.bytes, at, width, v);
                m.ops.push(format!("u{} @{at:#x} := {v:#x}", width * 8));
            }
            // Truncation: inside the header, at a cluster boundary, or anywhere.
            17 => {
                let to = match rng.below(3) {
                    0 => rng.below(len.min(cs)),
                    1 => rng.below(len / cs + 1) * cs,
                    _ => rng.below(len),
                };
                m.bytes.truncate(to as usize);
                m.ops.push(format!("truncate to {to}"));
            }
            // Extension: random bytes, zeroes, or a sparse tail.
            18 => {
                let add = 1 + rng.below(3 * cs);
                if rng.chance(50) {
                    let mut extra: Vec<u8> = (0..add).map(|_| rng.next() as u8).collect();
                    m.bytes.append(&mut extra);
                    m.ops.push(format!("append {add} random bytes"));
                } else {
                    m.bytes.resize((len + add) as usize, 0);
                    m.ops.push(format!("append {add} zero bytes"));
                }
            }
            _ => {
                let to = len + 1 + rng.below(MAX_EXTENSION);
                m.sparse_len = Some(to);
                m.ops.push(format!("extend sparsely to {to}"));
            }
        }
    }
    if let Some(to) = m.sparse_len {
        if to <= m.bytes.len() as u64 {
            m.sparse_len = None;
        }
    }
    m
}

// ---------------------------------------------------------------------------------------------
// Exercising one mutant.

#[derive(Default)]
struct Outcome {
    opened: bool,
    /// Messages of every error seen (open, read, map).
    errors: Vec<String>,
    /// Broken invariants (not errors: wrong answers).
    violations: Vec<String>,
    /// How long each step took, for reports of slow cases.
    steps: Vec<(&'static str, Duration)>,
}

impl Outcome {
    /// Ends the step that started at `*t0` and starts the next one.
    fn step(&mut self, name: &'static str, t0: &mut Instant) {
        self.steps.push((name, t0.elapsed()));
        *t0 = Instant::now();
    }
}

/// Records an error, and a violation if its message is empty, spans lines (one `qimg: ...`
/// line is the rule; `check`'s failure report is several lines on purpose, as qemu-img's is)
/// or shows Rust's raw io error text.
fn note(out: &mut Outcome, what: &str, e: &qimg_core::Error) {
    let msg = e.to_string();
    if msg.trim().is_empty() {
        out.violations
            .push(format!("{what}: empty error message ({e:?})"));
    } else if msg.contains('\n') && what != "check" {
        out.violations
            .push(format!("{what}: error message spans lines: {msg:?}"));
    } else if msg.contains(" (os error ") {
        out.violations
            .push(format!("{what}: raw Rust io error in message: {msg:?}"));
    }
    out.errors.push(format!("{what}: {msg}"));
}

/// Opens, reads and maps `path` the way `convert` and `map` would.
fn exercise(path: &str, opts: &OpenOptions) -> Outcome {
    let mut out = Outcome::default();
    let mut t0 = Instant::now();
    let opened = open_image(path, opts);
    out.step("open", &mut t0);
    let node = match opened {
        Ok(n) => n,
        Err(e) => {
            note(&mut out, "open", &e);
            return out;
        }
    };
    out.opened = true;
    let node: &dyn BlockDev = node.as_ref();
    let size = node.size();

    // Serial reads of the first and the last READ_CAP bytes, READ_STEP at a time.
    let mut buf = vec![0u8; READ_STEP as usize];
    let head = 0..size.min(READ_CAP);
    let tail = size.saturating_sub(READ_CAP).max(head.end)..size;
    let mut read_errors = 0;
    'ranges: for range in [head, tail] {
        let mut pos = range.start;
        while pos < range.end {
            let n = READ_STEP.min(range.end - pos);
            if let Err(e) = node.read_at(&mut buf[..n as usize], pos) {
                note(&mut out, &format!("read {n} bytes at {pos}"), &e);
                read_errors += 1;
                if read_errors > 8 {
                    break 'ranges;
                }
            }
            pos += n;
        }
    }

    out.step("serial reads", &mut t0);

    // A read across the end (the tail reads as zeroes), and one big (parallel) read.
    let at = size.saturating_sub(1000);
    let mut across = vec![0xa5u8; 4096];
    match read_clipped(node, &mut across, at) {
        Ok(()) => {
            let inside = (size - at) as usize;
            if across[inside..].iter().any(|&b| b != 0) {
                out.violations.push(format!(
                    "read_clipped at {at}: bytes past the end are not zero"
                ));
            }
        }
        Err(e) => note(&mut out, &format!("read_clipped 4096 bytes at {at}"), &e),
    }
    if size >= BIG_READ / 2 {
        let n = BIG_READ.min(size);
        let start = (size - n) / 2 / 512 * 512;
        let mut big = vec![0u8; n as usize];
        if let Err(e) = node.read_at(&mut big, start) {
            note(&mut out, &format!("read {n} bytes at {start}"), &e);
        }
    }

    out.step("big reads", &mut t0);

    // What `info` and `check` read beyond the tables of the read path.
    if let Some(q) = node.as_qcow2() {
        if let Err(e) = read_snapshots(q.file_node(), q.header()) {
            note(&mut out, "read_snapshots", &e);
        }
        out.step("read_snapshots", &mut t0);
        if let Err(e) = check(q) {
            note(&mut out, "check", &e);
        }
        out.step("check", &mut t0);
        // What `convert -l`, `bitmap --merge` and `convert --bitmaps` read.
        match q.snapshot_list() {
            Ok(list) => {
                for sn in list.iter().take(4) {
                    match q.snapshot_view(&SnapshotRef::IdOrName(sn.id.clone())) {
                        Ok(view) => {
                            let n = READ_STEP.min(view.size()) as usize;
                            if let Err(e) = view.read_at(&mut buf[..n], 0) {
                                note(&mut out, "read a snapshot", &e);
                            }
                        }
                        Err(e) => note(&mut out, "snapshot_view", &e),
                    }
                }
            }
            Err(e) => note(&mut out, "snapshot_list", &e),
        }
        match q.bitmap_entries() {
            Ok(entries) => {
                for e in entries.iter().take(4) {
                    if let Err(err) = q.bitmap_bits(&e.name) {
                        note(&mut out, "bitmap_bits", &err);
                    }
                }
            }
            Err(e) => note(&mut out, "bitmap_entries", &e),
        }
        out.step("snapshots and bitmaps", &mut t0);
    }

    // Block status over the first and the last MAP_CAP bytes.
    for start in [0, size.saturating_sub(MAP_CAP)] {
        match map_extents(node, start, MAP_CAP) {
            Ok(extents) => {
                let end = start.saturating_add(MAP_CAP).min(size);
                if start >= end {
                    // An empty range: qemu-img answers with one empty extent.
                    if extents.iter().any(|e| e.start != start || e.length != 0) {
                        out.violations
                            .push(format!("map of the empty range at {start}: {extents:?}"));
                    }
                    break;
                }
                let mut pos = start;
                for e in &extents {
                    if e.start != pos || e.length == 0 {
                        out.violations.push(format!(
                            "map from {start}: extent {e:?} does not continue at {pos}"
                        ));
                        break;
                    }
                    pos += e.length;
                }
                if pos != end && out.violations.is_empty() {
                    out.violations
                        .push(format!("map from {start}: extents end at {pos}, not {end}"));
                }
            }
            Err(e) => note(&mut out, &format!("map from {start}"), &e),
        }
        if size <= MAP_CAP {
            break;
        }
    }
    out.step("map", &mut t0);
    change_a_copy(path, &mut out);
    out.step("changes on a copy", &mut t0);
    out
}

/// Opens a copy of the mutant for writing (without its backing file) and
/// makes the changes the life-cycle commands make: a write, a snapshot
/// created, applied and deleted, a bitmap cleared and added. Each may fail
/// with an `Error`; none may panic or hang. The mutant itself is not touched.
fn change_a_copy(path: &str, out: &mut Outcome) {
    let copy = format!("{path}.changes");
    if std::fs::copy(path, &copy).is_err() {
        return;
    }
    let opts = OpenOptions {
        format: Some(&QCOW2),
        no_backing: true,
        writable: true,
        ..OpenOptions::default()
    };
    let node = match open_image(&copy, &opts) {
        Ok(n) => n,
        Err(e) => {
            note(out, "open a copy for writing", &e);
            let _ = std::fs::remove_file(&copy);
            return;
        }
    };
    if let Some(q) = node.as_qcow2() {
        if node.size() >= 4096 {
            if let Err(e) = node.write_at(&[0x5a; 4096], 0) {
                note(out, "write to the copy", &e);
            }
        }
        // (1-bit refcounts cannot count a snapshot's second reference.)
        let one_bit = q.header().refcount_order.width_bits() == 1;
        if !one_bit {
            if let Err(e) = q.create_snapshot("mutant", 1, 0) {
                note(out, "create_snapshot", &e);
            }
        }
        if let Ok(list) = q.snapshot_list() {
            if let Some(first) = list.first() {
                if let Err(e) = q.apply_snapshot(&first.id) {
                    note(out, "apply_snapshot", &e);
                }
            }
        }
        if !one_bit {
            if let Err(e) = q.delete_snapshot("mutant") {
                note(out, "delete_snapshot", &e);
            }
        }
        if let Ok(entries) = q.bitmap_entries() {
            if let Some(first) = entries.first() {
                if let Err(e) = q.change_bitmap(&first.name, &[BitmapOp::Clear]) {
                    note(out, "clear a bitmap", &e);
                }
            }
        }
        // (v2 images cannot hold bitmaps.)
        if q.header().compat != Compat::V2 {
            let add = [BitmapOp::Add { granularity: None }];
            if let Err(e) = q.change_bitmap("mutant", &add) {
                note(out, "add a bitmap", &e);
            }
        }
    }
    if let Err(e) = node.close() {
        note(out, "close the copy", &e);
    }
    drop(node);
    let _ = std::fs::remove_file(&copy);
}

// ---------------------------------------------------------------------------------------------
// The driver: seeds, cases, reports.

/// Where the most recent panic happened (set by the panic hook of this test).
static PANIC_AT: Mutex<Option<String>> = Mutex::new(None);

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    let msg = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic payload)".into());
    let at = PANIC_AT
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .unwrap_or_default();
    format!("{msg} at {at}")
}

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

fn load_seed(name: &str) -> Vec<u8> {
    let path = data_dir().join(format!("{name}.gz"));
    let file = std::fs::File::open(&path).expect("open a seed image");
    let mut bytes = Vec::new();
    GzDecoder::new(file)
        .read_to_end(&mut bytes)
        .expect("inflate a seed image");
    bytes
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, not {v:?}")),
        Err(_) => default,
    }
}

fn options_for(case: u64) -> OpenOptions {
    match case % 4 {
        0 | 1 => OpenOptions::default(),
        2 => OpenOptions {
            format: Some(&QCOW2),
            no_backing: false,
            ..OpenOptions::default()
        },
        _ => OpenOptions {
            format: Some(&QCOW2),
            no_backing: true,
            ..OpenOptions::default()
        },
    }
}

/// Name of the thread that runs the cases.
const WORKER: &str = "mutants";

type PanicHook = dyn Fn(&std::panic::PanicHookInfo<'_>) + Send + Sync + 'static;

/// From the worker to the watching thread: a case starts (what it is), or it is done.
enum Msg {
    Start(String),
    Done(Report),
}

/// What one case did.
struct Report {
    seed: &'static str,
    /// Every error message of the case ("what: message").
    messages: Vec<String>,
    opened: bool,
    errors_after_open: bool,
    elapsed: Duration,
    failure: Option<String>,
}

fn write_mutant(path: &Path, m: &Mutant) {
    std::fs::write(path, &m.bytes).expect("write the mutant");
    if let Some(to) = m.sparse_len {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .expect("reopen the mutant");
        f.set_len(to).expect("extend the mutant");
    }
}

/// Whether the file at `path` still holds exactly the mutant.
fn unchanged(path: &Path, m: &Mutant) -> Result<(), String> {
    let now = std::fs::read(path).map_err(|e| format!("cannot read it back: {e}"))?;
    let expect_len = m.sparse_len.unwrap_or(m.bytes.len() as u64);
    if now.len() as u64 != expect_len {
        return Err(format!(
            "the file changed length from {expect_len} to {}",
            now.len()
        ));
    }
    let (prefix, tail) = now.split_at(m.bytes.len());
    if prefix != m.bytes.as_slice() || tail.iter().any(|&b| b != 0) {
        return Err("the file's content changed".into());
    }
    Ok(())
}

/// A seed image, inflated, with the areas its mutations favour.
struct Seed {
    name: &'static str,
    /// Position in SEEDS (part of the random seed of its cases).
    index: u64,
    bytes: Vec<u8>,
    layout: Layout,
}

/// Mutates `seed` as case `case` prescribes, writes the mutant into `dir` and exercises it.
fn run_case(tx: &mpsc::Sender<Msg>, dir: &Path, seed: &Seed, base_rng: u64, case: u64) -> Report {
    let seed_name = seed.name;
    // Mix the base seed first: a plain XOR with the case number would make other base seeds
    // replay the same mutants under other case numbers.
    let mut rng = Rng::new(Rng::new(base_rng).next() ^ (seed.index << 40) ^ case);
    let m = mutate(&seed.bytes, &seed.layout, &mut rng);
    let path = dir.join(seed_name);
    write_mutant(&path, &m);
    let name = path.to_str().expect("a UTF-8 temp path").to_string();
    let opts = options_for(case);
    let what = format!(
        "{seed_name}:{case} ({opts:?}; mutations: {})",
        m.ops.join("; ")
    );
    // If the watcher is gone the test is over anyway.
    let _ = tx.send(Msg::Start(what.clone()));
    let t0 = Instant::now();
    let result = catch_unwind(AssertUnwindSafe(|| exercise(&name, &opts)));
    let elapsed = t0.elapsed();

    let mut problems: Vec<String> = Vec::new();
    let mut errors_after_open = false;
    let mut messages = Vec::new();
    let opened = match result {
        Ok(out) => {
            errors_after_open = out.opened && !out.errors.is_empty();
            messages.clone_from(&out.errors);
            problems.extend(out.violations);
            let checking = out
                .steps
                .iter()
                .filter(|(name, _)| *name == "check")
                .map(|(_, t)| *t)
                .sum::<Duration>();
            if elapsed - checking > SLOW_CASE || checking > SLOW_CHECK {
                problems.push(format!(
                    "took {elapsed:?}: {:?} (errors: {:?})",
                    out.steps,
                    out.errors.first()
                ));
            }
            out.opened
        }
        Err(payload) => {
            problems.push(format!("PANIC: {}", panic_text(payload.as_ref())));
            false
        }
    };
    if let Err(why) = unchanged(&path, &m) {
        problems.push(format!("reading wrote to the image: {why}"));
    }
    let failure = (!problems.is_empty()).then(|| {
        if let Ok(save) = std::env::var("QIMG_MUTATION_SAVE") {
            let to = Path::new(&save).join(format!("{seed_name}.case{case}"));
            let _ = std::fs::create_dir_all(&save);
            let _ = std::fs::copy(&path, &to);
        }
        let mut text = what;
        for p in problems {
            let _ = write!(text, "\n    {p}");
        }
        text
    });
    Report {
        seed: seed_name,
        messages,
        opened,
        errors_after_open,
        elapsed,
        failure,
    }
}

/// `m` with quoted names as `'F'`, runs of digits (and 0x hex numbers) as `N`, and repeated
/// list items once: the shape of a message.
fn blank_numbers(m: &str) -> String {
    let mut out = String::new();
    let mut chars = m.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\'' {
            for q in chars.by_ref() {
                if q == '\'' {
                    break;
                }
            }
            out.push_str("'F'");
        } else if c.is_ascii_digit() {
            if c == '0' && chars.peek() == Some(&'x') {
                chars.next();
                while chars.peek().is_some_and(|c| c.is_ascii_hexdigit()) {
                    chars.next();
                }
            }
            while chars.peek().is_some_and(|c| c.is_ascii_digit()) {
                chars.next();
            }
            out.push('N');
        } else {
            out.push(c);
        }
    }
    let mut items: Vec<&str> = out.split(", ").collect();
    items.dedup();
    items.join(", ").escape_debug().to_string()
}

#[derive(Default)]
struct Tally {
    cases: u64,
    opened: u64,
    /// Opened, then a read or a map failed.
    errors_after_open: u64,
    slowest: Duration,
}

#[test]
fn mutated_images_open_read_and_map_without_panics_hangs_or_writes() {
    let cases = env_u64("QIMG_MUTATION_CASES", DEFAULT_CASES);
    let base_rng = env_u64("QIMG_MUTATION_RNG", 80);
    let only: Option<(String, u64)> = std::env::var("QIMG_MUTATION_ONLY").ok().map(|v| {
        let (name, case) = v.rsplit_once(':').expect("QIMG_MUTATION_ONLY is NAME:CASE");
        (name.to_string(), case.parse().expect("a case number"))
    });

    // Panics are caught per case and reported with their location; the hook records it.
    // Panics outside the worker thread (another test) are shown as usual.
    let previous_hook: Arc<PanicHook> = Arc::from(std::panic::take_hook());
    let shown_by = Arc::clone(&previous_hook);
    std::panic::set_hook(Box::new(move |info| {
        let at = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        *PANIC_AT.lock().unwrap_or_else(|p| p.into_inner()) = Some(at);
        if std::thread::current().name() != Some(WORKER) {
            shown_by(info);
        }
    }));
    let restore_hook = move || std::panic::set_hook(Box::new(move |info| previous_hook(info)));

    let (tx, rx) = mpsc::channel::<Msg>();
    let only_in_worker = only.clone();
    let worker = std::thread::Builder::new()
        .name(WORKER.into())
        .spawn(move || {
            for (i, &seed_name) in SEEDS.iter().enumerate() {
                let dir = tempfile::tempdir().expect("a temp dir");
                let bytes = load_seed(seed_name);
                let seed = Seed {
                    name: seed_name,
                    index: i as u64,
                    layout: layout(&bytes),
                    bytes,
                };
                let base = load_seed("base.qcow2");
                // The backing file of backed.qcow2, unmutated beside every mutant.
                if seed_name == "backed.qcow2" {
                    std::fs::write(dir.path().join("base.qcow2"), &base).expect("write base");
                }
                for case in 0..cases {
                    if let Some((name, c)) = &only_in_worker {
                        if name != seed_name || *c != case {
                            continue;
                        }
                    }
                    let report = run_case(&tx, dir.path(), &seed, base_rng, case);
                    if tx.send(Msg::Done(report)).is_err() {
                        return;
                    }
                }
                if seed_name == "backed.qcow2" {
                    let now = std::fs::read(dir.path().join("base.qcow2")).expect("read base");
                    assert!(
                        now == base,
                        "reading backed.qcow2 mutants wrote to its backing file"
                    );
                }
            }
        })
        .expect("start the worker thread");

    let started = Instant::now();
    let mut tallies: Vec<(&'static str, Tally)> =
        SEEDS.iter().map(|&s| (s, Tally::default())).collect();
    let mut failures: Vec<String> = Vec::new();
    let mut running = String::from("(none started)");
    let show_messages = std::env::var_os("QIMG_MUTATION_MESSAGES").is_some();
    let mut messages: std::collections::BTreeMap<String, u64> = Default::default();
    loop {
        match rx.recv_timeout(HUNG_CASE) {
            Ok(Msg::Start(what)) => running = what,
            Ok(Msg::Done(r)) => {
                if let Some((_, t)) = tallies.iter_mut().find(|(s, _)| *s == r.seed) {
                    t.cases += 1;
                    t.opened += u64::from(r.opened);
                    t.errors_after_open += u64::from(r.errors_after_open);
                    t.slowest = t.slowest.max(r.elapsed);
                }
                failures.extend(r.failure);
                if show_messages {
                    for m in r.messages {
                        *messages.entry(blank_numbers(&m)).or_insert(0u64) += 1;
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                restore_hook();
                panic!("a case hangs (no answer for {HUNG_CASE:?}): {running}");
            }
        }
    }
    let worker_result = worker.join();
    restore_hook();
    if let Err(payload) = worker_result {
        panic!("the worker thread failed: {}", panic_text(payload.as_ref()));
    }

    for (m, n) in &messages {
        println!("{n:>6}  {m}");
    }
    let mut total = Tally::default();
    println!("mutants per seed: {cases} (QIMG_MUTATION_RNG={base_rng})");
    for (name, t) in &tallies {
        println!(
            "  {name:<16} {:>6} mutants: {:>6} opened ({:>5} of them failed a later step), {:>6} refused; slowest case {:?}",
            t.cases,
            t.opened,
            t.errors_after_open,
            t.cases - t.opened,
            t.slowest
        );
        total.cases += t.cases;
        total.opened += t.opened;
        total.errors_after_open += t.errors_after_open;
        total.slowest = total.slowest.max(t.slowest);
    }
    println!(
        "  {:<16} {:>6} mutants: {:>6} opened ({:>5} of them failed a later step), {:>6} refused; slowest case {:?}; {:?} in all",
        "total",
        total.cases,
        total.opened,
        total.errors_after_open,
        total.cases - total.opened,
        total.slowest,
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} of {} mutants failed (rerun one with QIMG_MUTATION_ONLY=NAME:CASE):\n{}",
        failures.len(),
        total.cases,
        failures.join("\n")
    );
    if only.is_none() {
        assert!(
            total.cases >= 3000 || cases < DEFAULT_CASES,
            "too few mutants: {}",
            total.cases
        );
    }
}

#[test]
fn every_seed_opens_reads_and_maps_cleanly() {
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::write(dir.path().join("base.qcow2"), load_seed("base.qcow2")).expect("write base");
    for name in SEEDS {
        let path = dir.path().join(name);
        if name != "base.qcow2" {
            std::fs::write(&path, load_seed(name)).expect("write seed");
        }
        let name = path.to_str().expect("a UTF-8 temp path");
        let out = exercise(name, &OpenOptions::default());
        assert!(out.opened, "{name}: {:?}", out.errors);
        assert!(out.errors.is_empty(), "{name}: {:?}", out.errors);
        assert!(out.violations.is_empty(), "{name}: {:?}", out.violations);
    }
}
