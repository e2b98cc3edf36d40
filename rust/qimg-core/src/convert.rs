//! The copy engine: the guest contents of one or more images (concatenated)
//! into a target node of any format.
//!
//! Worker threads take pieces of the target in order, ask the sources for
//! block status (zero and unallocated ranges are never read), read the data,
//! split off all-zero blocks (the `-S` rule) and, for `-c`, compress each
//! cluster. One writer applies the pieces to the target in guest order, so a
//! new qcow2 image gets its clusters laid out sequentially; workers may run
//! ahead of it by a bounded window only.

use crate::block::{block_status, status_above, BlockDev, FileNode, Status};
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::qcow2::compress::compress;
use crate::qcow2::CompressionType;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

/// Work handed to one worker at a time (a multiple of every cluster size).
const PIECE: u64 = 2 << 20;
/// How often the writer asks `progress` whether to go on while it waits for
/// pieces (a stalled source must not make the copy deaf to cancellation).
const TICK: std::time::Duration = std::time::Duration::from_millis(100);
/// How many pieces workers may be ahead of the writer, per worker.
const AHEAD_PER_WORKER: u64 = 4;
/// qemu-img's limit for `-m`.
pub const MAX_WORKERS: usize = 16;
/// qemu-img's limit for `-S`.
pub const MAX_SPARSE: u64 = 16 << 20;

/// `-S`: blocks of this many bytes that are all zeroes are not written.
/// `None` (`-S 0`) writes every byte, zeroes included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sparse(Option<u64>);

impl Sparse {
    /// `-S` when it is not given: 4 KiB blocks of zeroes become holes.
    pub const DEFAULT: Sparse = Sparse(Some(4096));

    pub fn new(bytes: u64) -> Result<Sparse> {
        if bytes == 0 {
            return Ok(Sparse(None));
        }
        if bytes % 512 != 0 || bytes > MAX_SPARSE {
            return Err(Error::usage(format!(
                "Invalid buffer size for sparse output specified: {bytes} (must be a multiple of 512 up to 16 MiB, or 0)"
            )));
        }
        Ok(Sparse(Some(bytes)))
    }

    /// The block size in bytes; 0 when zeroes are written as data.
    pub fn bytes(self) -> u64 {
        self.0.unwrap_or(0)
    }
}

/// `-m`: how many threads copy at once, 1 to [`MAX_WORKERS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workers(usize);

impl Workers {
    pub fn new(n: usize) -> Result<Workers> {
        if (1..=MAX_WORKERS).contains(&n) {
            Ok(Workers(n))
        } else {
            Err(Error::usage(format!(
                "Invalid number of coroutines specified. Must be between 1 and {MAX_WORKERS}."
            )))
        }
    }

    /// The default for copying `sources`: one per core (2 to 16), and at
    /// least [`REMOTE_WORKERS`] when a source is read over a network.
    pub fn default_for(sources: &[Arc<dyn BlockDev>]) -> Workers {
        let local = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .clamp(2, MAX_WORKERS);
        if sources.iter().any(|s| s.is_remote()) {
            Workers(local.max(REMOTE_WORKERS))
        } else {
            Workers(local)
        }
    }

    pub fn get(self) -> usize {
        self.0
    }
}

/// What the user chose for a copy (`-S`, `-c`, `-m`, `-W`, `-C`), checked
/// as a whole when it is built: the one place these rules are written.
#[derive(Debug, Clone, Copy)]
pub struct CopyChoices {
    pub sparse: Sparse,
    pub compress: bool,
    /// None: [`Workers::default_for`] the sources.
    pub workers: Option<Workers>,
    pub in_order: bool,
    pub copy_offload: bool,
}

impl CopyChoices {
    /// `sparse` is None when `-S` was not given; `target_format` is the
    /// target's format when it is known before the target is opened.
    pub fn new(
        sparse: Option<u64>,
        compress: bool,
        workers: Option<Workers>,
        in_order: bool,
        copy_offload: bool,
        target_format: Option<&str>,
    ) -> Result<CopyChoices> {
        let checked = sparse.map(Sparse::new).transpose()?;
        if copy_offload && compress {
            return Err(Error::usage(
                "Cannot enable copy offloading when -c is used",
            ));
        }
        if copy_offload && checked.is_some() {
            return Err(Error::usage(
                "Cannot enable copy offloading when -S is used",
            ));
        }
        if let (true, Some(format)) = (compress, target_format) {
            if format != "qcow2" {
                return Err(not_compressible(format));
            }
        }
        Ok(CopyChoices {
            sparse: checked.unwrap_or(Sparse::DEFAULT),
            compress,
            workers,
            in_order,
            copy_offload,
        })
    }

    /// The engine's options for copying `sources`.
    pub fn options(
        &self,
        sources: &[Arc<dyn BlockDev>],
        zero_init: bool,
        layers: Layers,
    ) -> ConvertOptions {
        ConvertOptions {
            sparse: self.sparse,
            compress: self.compress,
            zero_init,
            layers,
            in_order: self.in_order,
            workers: self
                .workers
                .unwrap_or_else(|| Workers::default_for(sources)),
            copy_offload: self.copy_offload,
        }
    }
}

/// The refusal of `-c` for a target of a format that cannot store
/// compressed data (only qcow2 can).
fn not_compressible(format: &str) -> Error {
    Error::invalid(format!(
        "Compression not supported for this file format ({format})"
    ))
}

/// How to copy.
#[derive(Debug, Clone, Copy)]
pub struct ConvertOptions {
    pub sparse: Sparse,
    /// Store every data cluster compressed (`-c`; the target must be qcow2).
    pub compress: bool,
    /// The target reads as zeroes wherever nothing is written and its
    /// backing file, if any, does not reach (a new image): zero ranges there
    /// need no writes.
    pub zero_init: bool,
    /// Which layers of the sources are copied.
    pub layers: Layers,
    /// Write pieces in guest order (qemu-img's default; `-W` lifts it).
    pub in_order: bool,
    /// Worker threads (`-m`).
    pub workers: Workers,
    /// `-C`: data that lies plainly in a local file goes into a raw local
    /// target by copy_file_range, inside the kernel, without being read
    /// (so without `-S` zero detection); the rest is copied as usual.
    pub copy_offload: bool,
}

/// Which layers of a source's backing chain a copy takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layers {
    /// All of them: the guest content.
    Chain,
    /// What the top `n` layers (at least one) hold; what they leave
    /// unallocated is skipped, because the target has it already (`-B`:
    /// the target's backing file; commit: the base is the target).
    Top(u32),
}

impl Layers {
    fn top_only(self) -> bool {
        self != Layers::Chain
    }

    /// How many layers of a chain are asked (the whole chain: all).
    fn depth(self) -> u32 {
        match self {
            Layers::Chain => u32::MAX,
            Layers::Top(n) => n.max(1),
        }
    }
}

impl ConvertOptions {
    fn top_only(&self) -> bool {
        self.layers.top_only()
    }
}

/// Workers waiting on a network: enough to keep several requests in flight
/// whatever the core count (qemu-img's default of 8 coroutines).
pub const REMOTE_WORKERS: usize = 8;

/// Read buffers handed back after their bytes are written, so that every
/// piece does not fault in fresh memory (on a virtual machine, memory the
/// guest gave back can cost more to touch again than the copy itself).
struct Pool {
    bufs: Mutex<Vec<Vec<u8>>>,
    keep: usize,
}

impl Pool {
    fn new(keep: usize) -> Pool {
        Pool {
            bufs: Mutex::new(Vec::new()),
            keep,
        }
    }

    /// A buffer of `len` bytes (their values are whatever was there).
    fn get(&self, len: usize) -> Vec<u8> {
        let mut b = self
            .bufs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .unwrap_or_default();
        b.resize(len, 0);
        b
    }

    fn put(&self, b: Vec<u8>) {
        let mut bufs = self.bufs.lock().unwrap_or_else(PoisonError::into_inner);
        if bufs.len() < self.keep {
            bufs.push(b);
        }
    }
}

/// What one range of the target becomes.
enum Seg {
    Data(Vec<u8>),
    /// Must read as zeroes.
    Zero(u64),
    /// A whole cluster, already compressed.
    Compressed(Vec<u8>),
    /// Left to the target's backing file (or its zero initialisation).
    Skip(u64),
    /// `len` bytes at `offset` of a local file, copied in the kernel.
    Copy {
        file: Arc<FileNode>,
        offset: u64,
        len: u64,
    },
}

struct Piece {
    index: u64,
    /// Guest bytes the piece covers (for progress).
    bytes: u64,
    /// What the writer applies.
    segs: Vec<(u64, Seg)>,
}

/// Copies the sources, one after the other, into `dst` from offset 0.
/// `progress(done, total)` is called from the writing thread after each
/// piece and at least every [`TICK`] while it waits; an error it returns
/// stops the copy (every thread ends) and is returned.
pub fn convert(
    sources: &[Arc<dyn BlockDev>],
    dst: &dyn BlockDev,
    opts: &ConvertOptions,
    progress: Progress<'_>,
) -> Result<()> {
    let total: u64 = sources.iter().map(|s| s.size()).sum();
    if dst.size() < total {
        return Err(Error::invalid(format!(
            "output file '{}' is smaller than the input ({} < {total} bytes)",
            dst.filename(),
            dst.size()
        )));
    }
    let cluster = match (opts.compress, dst.as_qcow2()) {
        (false, _) => None,
        (true, Some(q)) => Some((q.header().cluster_size.bytes(), q.header().compression)),
        (true, None) => return Err(not_compressible(dst.format_name())),
    };
    // With a backing file on a new target, zeroes past the backing file's
    // end need no writes either (qemu-img leaves them unallocated).
    let backing_end =
        (opts.top_only() && opts.zero_init).then(|| dst.backing().map_or(0, |b| b.size()));
    let pieces = total.div_ceil(PIECE);
    let workers = opts.workers.get().min(pieces.max(1) as usize);
    let window = AHEAD_PER_WORKER * workers as u64;
    let next = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let written = (Mutex::new(0u64), Condvar::new());
    // The error of the lowest piece wins, so that the message does not
    // depend on thread timing.
    let first_error: Mutex<Option<(u64, Error)>> = Mutex::new(None);
    let fail = |index: u64, e: Error| {
        failed.store(true, Ordering::SeqCst);
        let mut slot = first_error.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.as_ref().is_none_or(|(i, _)| index < *i) {
            *slot = Some((index, e));
        }
        written.1.notify_all();
    };
    let (tx, rx) = sync_channel::<Piece>(workers * 2);
    let pool = Pool::new(workers * (AHEAD_PER_WORKER as usize + 4));
    let pool = &pool;
    std::thread::scope(|scope| {
        for _ in 0..workers {
            let tx = tx.clone();
            let (next, failed, written, fail) = (&next, &failed, &written, &fail);
            scope.spawn(move || loop {
                let index = next.fetch_add(1, Ordering::SeqCst);
                if index >= pieces || failed.load(Ordering::SeqCst) {
                    return;
                }
                if opts.in_order {
                    // Stay within the window ahead of the writer.
                    let mut done = written.0.lock().unwrap_or_else(PoisonError::into_inner);
                    while index >= *done + window && !failed.load(Ordering::SeqCst) {
                        done = written.1.wait(done).unwrap_or_else(PoisonError::into_inner);
                    }
                }
                let start = index * PIECE;
                let end = (start + PIECE).min(total);
                let prepared = prepare(sources, start, end, opts, cluster, backing_end, pool);
                match prepared {
                    Ok(segs) => {
                        let piece = Piece {
                            index,
                            bytes: end - start,
                            segs,
                        };
                        if tx.send(piece).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        fail(index, e);
                        return;
                    }
                }
            });
        }
        drop(tx);
        // The writer, on this thread, for every target: writes from several
        // threads into one file contend on its lock in the kernel, and on
        // the two-core bench machine they spent up to four times the system
        // time of one writer (5-8 s against 1.2-1.4 s for qemu-img's 4 GiB
        // qcow2 -> raw) in the phases where page-cache pages are dear.
        let mut pending: BTreeMap<u64, (u64, Vec<(u64, Seg)>)> = BTreeMap::new();
        let mut next_write = 0u64;
        let mut done_bytes = 0u64;
        while !failed.load(Ordering::SeqCst) {
            let piece = match rx.recv_timeout(TICK) {
                Ok(piece) => piece,
                Err(RecvTimeoutError::Timeout) => {
                    if let Err(e) = progress(done_bytes, total) {
                        fail(next_write, e);
                    }
                    continue;
                }
                // Every worker has ended: all pieces are in, or one failed.
                Err(RecvTimeoutError::Disconnected) => break,
            };
            pending.insert(piece.index, (piece.bytes, piece.segs));
            loop {
                let key = if opts.in_order {
                    next_write
                } else {
                    match pending.keys().next() {
                        Some(&k) => k,
                        None => break,
                    }
                };
                let Some((bytes, segs)) = pending.remove(&key) else {
                    break;
                };
                if let Err(e) = apply(dst, segs, opts, pool) {
                    fail(key, e);
                    break;
                }
                next_write += 1;
                done_bytes += bytes;
                *written.0.lock().unwrap_or_else(PoisonError::into_inner) = next_write;
                written.1.notify_all();
                if let Err(e) = progress(done_bytes, total) {
                    fail(key, e);
                    break;
                }
            }
        }
        // Workers blocked sending into a full channel get an error once the
        // receiver is gone, so none is left waiting when the scope joins.
        drop(rx);
        // Unblock workers waiting on the window after an error.
        written.1.notify_all();
    });
    if let Some((_, e)) = first_error
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
    {
        return Err(e);
    }
    Ok(())
}

/// Guest bytes a segment covers (compressed segments are counted by the
/// piece, not here).
fn seg_len(s: &Seg) -> u64 {
    match s {
        Seg::Data(d) => d.len() as u64,
        Seg::Zero(n) | Seg::Skip(n) => *n,
        Seg::Copy { len, .. } => *len,
        Seg::Compressed(_) => 0,
    }
}

/// Writes one prepared piece.
fn apply(
    dst: &dyn BlockDev,
    segs: Vec<(u64, Seg)>,
    opts: &ConvertOptions,
    pool: &Pool,
) -> Result<()> {
    let skip_zeroes = opts.zero_init && !opts.top_only();
    for (offset, seg) in segs {
        match seg {
            Seg::Data(d) => {
                dst.write_at(&d, offset)?;
                pool.put(d);
            }
            // `-S 0`: zeroes are written as data, as qemu-img does (a zero
            // write would leave zero clusters in qcow2 and unwritten extents,
            // which read as holes, in files).
            Seg::Zero(n) if opts.sparse.0.is_none() => write_zero_data(dst, offset, n)?,
            Seg::Zero(n) if !skip_zeroes => dst.write_zeroes(offset, n, true)?,
            Seg::Zero(_) | Seg::Skip(_) => {}
            Seg::Compressed(packed) => match dst.as_qcow2() {
                Some(q) => q.write_compressed_packed(&packed, offset)?,
                None => return Err(Error::invalid("compressed output needs a qcow2 target")),
            },
            Seg::Copy {
                file,
                offset: from,
                len,
            } => {
                let copied = match dst.copy_target() {
                    Some(out) => file.copy_range_to(out, from, offset, len)?,
                    None => 0,
                };
                // What the kernel did not copy (the end of the file, a
                // target it cannot copy into) is read and written.
                let mut done = copied;
                while done < len {
                    let n = (len - done).min(PIECE);
                    let mut buf = pool.get(n as usize);
                    file.pread(&mut buf, from + done)?;
                    dst.write_at(&buf, offset + done)?;
                    pool.put(buf);
                    done += n;
                }
            }
        }
    }
    Ok(())
}

/// Where `[offset, offset + len)` of `top` (a prefix of it) lies plainly in
/// a local file: the file, the offset there and the length. None when the
/// range is not plain data (zeroes, compressed, a quorum, an export, ...).
/// Only the layers `layers` names are asked.
fn plain_run(
    top: &dyn BlockDev,
    offset: u64,
    len: u64,
    layers: Layers,
) -> Result<Option<(Arc<FileNode>, u64, u64)>> {
    let mut node = top;
    let mut left = layers.depth();
    loop {
        left -= 1;
        let s = block_status(node, offset, len)?;
        if s.data && !s.zero && !s.compressed {
            return Ok(match (s.offset, node.file()) {
                (Some(host), Some(file)) if file.path().is_some() => {
                    Some((Arc::clone(file), host, s.len.clamp(1, len)))
                }
                _ => None,
            });
        }
        match node.backing() {
            Some(b) if !s.zero && left > 0 => node = b.as_ref(),
            _ => return Ok(None),
        }
    }
}

/// The status of `[offset, offset + len)` (a prefix of it) as the top
/// `depth` layers of `top` say: the first of them that holds the range
/// decides; where none does, the status of the lowest of them stands (so
/// the range is unallocated, or reads as zeroes when nothing lies below).
pub(crate) fn status_top(top: &dyn BlockDev, offset: u64, len: u64, depth: u32) -> Result<Status> {
    let mut node = top;
    let mut len = len;
    for _ in 1..depth.max(1) {
        let s = block_status(node, offset, len)?;
        if s.allocated {
            return Ok(s);
        }
        len = s.len.clamp(1, len);
        match node.backing() {
            Some(b) => node = b.as_ref(),
            None => return Ok(s),
        }
    }
    let mut s = block_status(node, offset, len)?;
    s.len = s.len.clamp(1, len);
    Ok(s)
}

/// Writes `n` zero bytes at `offset` as data.
fn write_zero_data(dst: &dyn BlockDev, offset: u64, n: u64) -> Result<()> {
    let zeroes = vec![0u8; n.min(PIECE) as usize];
    let mut done = 0u64;
    while done < n {
        let len = (n - done).min(PIECE) as usize;
        dst.write_at(&zeroes[..len], offset + done)?;
        done += len as u64;
    }
    Ok(())
}

/// Where target range `[start, end)` comes from: (source, offset in it, target offset, length).
fn spans(
    sources: &[Arc<dyn BlockDev>],
    start: u64,
    end: u64,
) -> Vec<(&Arc<dyn BlockDev>, u64, u64, u64)> {
    let mut out = Vec::new();
    let mut base = 0u64;
    for s in sources {
        let (lo, hi) = (base, base + s.size());
        let a = start.max(lo);
        let b = end.min(hi);
        if a < b {
            out.push((s, a - lo, a, b - a));
        }
        base = hi;
    }
    out
}

/// Reads and classifies target range `[start, end)`.
fn prepare(
    sources: &[Arc<dyn BlockDev>],
    start: u64,
    end: u64,
    opts: &ConvertOptions,
    cluster: Option<(u64, CompressionType)>,
    backing_end: Option<u64>,
    pool: &Pool,
) -> Result<Vec<(u64, Seg)>> {
    let mut segs: Vec<(u64, Seg)> = Vec::new();
    for (src, local, target, len) in spans(sources, start, end) {
        let mut pos = 0u64;
        while pos < len {
            let (n, zero, data) = if let Layers::Top(depth) = opts.layers {
                let s = status_top(src.as_ref(), local + pos, len - pos, depth)?;
                (s.len.clamp(1, len - pos), s.zero, s.data)
            } else {
                let e = status_above(src.as_ref(), local + pos, len - pos)?;
                (e.length.clamp(1, len - pos), e.zero, e.data || e.present)
            };
            let at = target + pos;
            if zero {
                // Past the target's backing file (when it has one and is
                // new), the target reads as zeroes already.
                let keep = backing_end.map_or(n, |e| e.saturating_sub(at).min(n));
                if keep > 0 {
                    push_zero(&mut segs, at, keep);
                }
                if keep < n {
                    segs.push((at + keep, Seg::Skip(n - keep)));
                }
            } else if !data {
                // top_only: unallocated here, the backing file shows through;
                // otherwise (no backing anywhere) it reads as zeroes.
                if opts.top_only() {
                    segs.push((at, Seg::Skip(n)));
                } else {
                    push_zero(&mut segs, at, n);
                }
            } else if let Some(copied) = offload(src.as_ref(), local + pos, n, at, opts, cluster)? {
                segs.extend(copied);
            } else {
                let mut buf = pool.get(n as usize);
                src.read_at(&mut buf, local + pos)?;
                split_zero_blocks(&mut segs, buf, at, opts.sparse, pool);
            }
            pos += n;
        }
    }
    match cluster {
        Some(c) => compress_clusters(sources, segs, start, end, c, opts.sparse),
        None => Ok(segs),
    }
}

/// With `-C`, the data range `[local, local + n)` of `src` (target offset
/// `at`) as in-kernel copies, when all of it lies plainly in local files.
fn offload(
    src: &dyn BlockDev,
    local: u64,
    n: u64,
    at: u64,
    opts: &ConvertOptions,
    cluster: Option<(u64, CompressionType)>,
) -> Result<Option<Vec<(u64, Seg)>>> {
    if !opts.copy_offload || cluster.is_some() {
        return Ok(None);
    }
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < n {
        let Some((file, offset, len)) = plain_run(src, local + pos, n - pos, opts.layers)? else {
            return Ok(None);
        };
        let len = len.min(n - pos);
        out.push((at + pos, Seg::Copy { file, offset, len }));
        pos += len;
    }
    Ok(Some(out))
}

fn push_zero(segs: &mut Vec<(u64, Seg)>, at: u64, n: u64) {
    if let Some((_, Seg::Zero(m))) = segs.last_mut() {
        *m += n;
        return;
    }
    segs.push((at, Seg::Zero(n)));
}

/// Turns `buf` (guest data at `at`) into data and zero segments: blocks of
/// the sparse size, aligned to the guest offset, that are all zeroes become
/// zero segments, so the same data always gives the same holes.
fn split_zero_blocks(
    segs: &mut Vec<(u64, Seg)>,
    buf: Vec<u8>,
    at: u64,
    sparse: Sparse,
    pool: &Pool,
) {
    let Sparse(Some(block)) = sparse else {
        segs.push((at, Seg::Data(buf)));
        return;
    };
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    let mut i = 0usize;
    while i < buf.len() {
        let into = ((at + i as u64) % block) as usize;
        let n = (block as usize - into).min(buf.len() - i);
        let zero = is_zero(&buf[i..i + n]);
        match runs.last_mut() {
            Some((_, end, z)) if *z == zero => *end = i + n,
            _ => runs.push((i, i + n, zero)),
        }
        i += n;
    }
    if runs.len() == 1 && !runs[0].2 {
        segs.push((at, Seg::Data(buf)));
        return;
    }
    for (a, b, zero) in runs {
        if zero {
            push_zero(segs, at + a as u64, (b - a) as u64);
        } else {
            let mut part = pool.get(b - a);
            part.copy_from_slice(&buf[a..b]);
            segs.push((at + a as u64, Seg::Data(part)));
        }
    }
    pool.put(buf);
}

/// Re-cuts a piece into whole clusters: all-zero clusters stay zero (with
/// `-S 0` they are compressed like the others), clusters left wholly to the
/// backing file stay skipped, and the rest are compressed (or kept as data
/// when they do not shrink). A compressed cluster is written whole, so a
/// cluster only partly left to the backing file takes those bytes from the
/// sources' backing chains.
fn compress_clusters(
    sources: &[Arc<dyn BlockDev>],
    segs: Vec<(u64, Seg)>,
    start: u64,
    end: u64,
    (cs, kind): (u64, CompressionType),
    sparse: Sparse,
) -> Result<Vec<(u64, Seg)>> {
    if segs.iter().all(|(_, s)| matches!(s, Seg::Skip(_))) {
        return Ok(segs);
    }
    // Rebuild the piece's bytes; pieces are cluster aligned.
    let len = end - start;
    let clusters = len.div_ceil(cs) as usize;
    let cluster_len = |c: usize| (c as u64 * cs + cs).min(len) - c as u64 * cs;
    let mut bytes = vec![0u8; len as usize];
    let mut has_data = vec![false; clusters];
    let mut skipped = vec![0u64; clusters];
    for (at, seg) in &segs {
        let from = at - start;
        let n = seg_len(seg);
        if n == 0 {
            continue;
        }
        match seg {
            Seg::Data(_) | Seg::Copy { .. } => {
                let dst = &mut bytes[from as usize..(from + n) as usize];
                match seg {
                    Seg::Copy { file, offset, .. } => file.pread(dst, *offset)?,
                    Seg::Data(d) => dst.copy_from_slice(d),
                    _ => {}
                }
                for c in from / cs..=(from + n - 1) / cs {
                    has_data[c as usize] = true;
                }
            }
            Seg::Skip(_) => {
                for c in from / cs..=(from + n - 1) / cs {
                    let (a, b) = (c * cs, (c * cs + cs).min(len));
                    skipped[c as usize] += (from + n).min(b) - from.max(a);
                }
            }
            Seg::Zero(_) | Seg::Compressed(_) => {}
        }
    }
    for (at, seg) in &segs {
        let Seg::Skip(n) = seg else { continue };
        let from = at - start;
        for c in from / cs..=(from + n - 1) / cs {
            let whole = skipped[c as usize] == cluster_len(c as usize);
            if whole {
                continue;
            }
            let a = from.max(c * cs);
            let b = (from + n).min(c * cs + cs).min(len);
            read_sources(sources, &mut bytes[a as usize..b as usize], start + a)?;
        }
    }
    let mut out = Vec::new();
    for c in 0..clusters {
        let a = c as u64 * cs;
        let b = a + cluster_len(c);
        if skipped[c] == b - a {
            out.push((start + a, Seg::Skip(b - a)));
            continue;
        }
        let chunk = &bytes[a as usize..b as usize];
        let zero = (!has_data[c] && skipped[c] == 0) || is_zero(chunk);
        if zero && sparse.0.is_some() {
            push_zero(&mut out, start + a, b - a);
            continue;
        }
        let mut full = chunk.to_vec();
        full.resize(cs as usize, 0);
        match compress(kind, &full, cs as usize) {
            Some(packed) => out.push((start + a, Seg::Compressed(packed))),
            None => out.push((start + a, Seg::Data(chunk.to_vec()))),
        }
    }
    Ok(out)
}

/// Reads target range `[offset, offset + buf.len())` from the sources,
/// their backing chains included.
fn read_sources(sources: &[Arc<dyn BlockDev>], buf: &mut [u8], offset: u64) -> Result<()> {
    for (src, local, target, len) in spans(sources, offset, offset + buf.len() as u64) {
        let from = (target - offset) as usize;
        src.read_at(&mut buf[from..from + len as usize], local)?;
    }
    Ok(())
}

fn is_zero(b: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets.
        unsafe { b.align_to::<u64>() }
    };
    head.iter().all(|x| *x == 0) && words.iter().all(|x| *x == 0) && tail.iter().all(|x| *x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection_covers_unaligned_slices() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v[1..]));
        v[4098] = 1;
        assert!(!is_zero(&v[1..]));
        assert!(is_zero(&v[..4098]));
    }

    #[test]
    fn copy_choices_are_checked_once_at_construction() {
        let plain = CopyChoices::new(None, false, None, true, false, Some("raw"));
        assert!(plain.is_ok_and(|c| c.sparse == Sparse::DEFAULT));
        let refused = |r: Result<CopyChoices>| r.err().map(|e| (e.kind(), e.to_string()));
        assert_eq!(
            refused(CopyChoices::new(None, true, None, true, true, None)),
            Some((
                crate::ErrorKind::Usage,
                "Cannot enable copy offloading when -c is used".into()
            ))
        );
        assert_eq!(
            refused(CopyChoices::new(Some(4096), false, None, true, true, None)),
            Some((
                crate::ErrorKind::Usage,
                "Cannot enable copy offloading when -S is used".into()
            ))
        );
        assert_eq!(
            refused(CopyChoices::new(None, true, None, true, false, Some("raw"))),
            Some((
                crate::ErrorKind::InvalidArgument,
                "Compression not supported for this file format (raw)".into()
            ))
        );
        assert!(CopyChoices::new(None, true, None, true, false, Some("qcow2")).is_ok());
        // A target opened later (a node tree) is checked by the engine.
        assert!(CopyChoices::new(None, true, None, true, false, None).is_ok());
        assert!(CopyChoices::new(Some(1000), false, None, true, false, None).is_err());
    }

    #[test]
    fn workers_are_one_to_sixteen() {
        assert!(Workers::new(0).is_err());
        assert!(Workers::new(1).is_ok());
        assert!(Workers::new(MAX_WORKERS).is_ok());
        assert_eq!(
            Workers::new(17).err().map(|e| e.to_string()),
            Some("Invalid number of coroutines specified. Must be between 1 and 16.".into())
        );
    }

    #[test]
    fn sparse_size_must_be_whole_sectors() {
        assert!(Sparse::new(0).is_ok());
        assert!(Sparse::new(4096).is_ok());
        assert!(Sparse::new(1000).is_err());
        assert!(Sparse::new(MAX_SPARSE).is_ok());
        assert!(Sparse::new(MAX_SPARSE + 512).is_err());
    }

    #[test]
    fn zero_blocks_split_on_guest_alignment() {
        let mut buf = vec![1u8; 3 * 4096];
        buf[4096..8192].fill(0);
        let mut segs = Vec::new();
        split_zero_blocks(&mut segs, buf, 0, Sparse::DEFAULT, &Pool::new(1));
        let kinds: Vec<(u64, bool)> = segs
            .iter()
            .map(|(at, s)| (*at, matches!(s, Seg::Zero(_))))
            .collect();
        assert_eq!(kinds, vec![(0, false), (4096, true), (8192, false)]);
    }
}
