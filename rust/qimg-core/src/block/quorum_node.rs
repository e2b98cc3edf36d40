//! The `quorum` node: N replicas of one disk. Reads go to every child at
//! once and the children vote (see `quorum::vote`); writes go to every child
//! and succeed when enough of them do. Bad children are reported as events.

use super::{check_request, status_above, BlockDev, FileNode, Status};
use crate::error::{Error, Result};
use crate::quorum::events::{EventData, EventLog, OpType};
use crate::quorum::vote::{vote, Ballot, Verdict};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex, PoisonError};

/// The largest piece one vote looks at: bigger requests are split, so that
/// the spare buffers stay small.
pub const MAX_PIECE: u64 = 4 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadPattern {
    /// Read every child and vote.
    Quorum,
    /// Read the first child; the next one only if it fails.
    Fifo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuorumOptions {
    pub threshold: usize,
    pub blkverify: bool,
    pub rewrite_corrupted: bool,
    pub read_pattern: ReadPattern,
}

pub struct Child {
    pub node: Arc<dyn BlockDev>,
    pub name: String,
}

pub struct QuorumNode {
    children: Vec<Child>,
    opts: QuorumOptions,
    name: String,
    display: String,
    size: u64,
    writable: bool,
    log: Arc<EventLog>,
    /// Spare read buffers, kept between requests so that large reads do
    /// not fault in fresh memory every time.
    spares: Mutex<Vec<Vec<u8>>>,
}

/// Whose bytes to rewrite with the winning version after a vote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rewrite {
    Nothing,
    /// Children that returned a losing version (`rewrite-corrupted`).
    Losers,
    /// Losers and children whose read failed (a scrub's repair).
    LosersAndFailures,
}

/// Everything one voted read found, merged over its pieces. Ranges are
/// absolute node offsets `(offset, length)`.
#[derive(Debug, Default)]
pub struct Findings {
    /// (child, offset, length, error): reads that failed.
    pub errors: Vec<(usize, u64, u64, Error)>,
    /// (child, offset, length): ranges a child lost the vote on.
    pub lost: Vec<(usize, u64, u64)>,
    /// Ranges without a winner.
    pub undecided: Vec<(u64, u64)>,
    /// The error to fail the request with, when too few children answered.
    pub too_few: Option<Error>,
    /// (child, offset, length, result of the rewrite).
    pub rewrites: Vec<(usize, u64, u64, Result<()>)>,
    /// A blkverify mismatch: the offset of the first differing byte.
    pub mismatch: Option<u64>,
    /// The blocks on which the two children of a blkverify quorum differ
    /// (no events: blkverify compares, it does not vote).
    pub mismatched: Vec<(u64, u64)>,
}

impl QuorumNode {
    pub fn new(
        children: Vec<Child>,
        opts: QuorumOptions,
        name: String,
        display: String,
        writable: bool,
        log: Arc<EventLog>,
    ) -> Result<QuorumNode> {
        let n = children.len();
        if n == 0 {
            return Err(Error::invalid(
                "Number of provided children must be 1 or more",
            ));
        }
        if opts.threshold < 1 {
            return Err(Error::invalid(
                "Parameter 'vote-threshold' expects a value >= 1",
            ));
        }
        if opts.threshold > n {
            return Err(Error::invalid("threshold may not exceed children count"));
        }
        if opts.blkverify && (n != 2 || opts.threshold != 2) {
            return Err(Error::invalid(
                "blkverify=on can only be set if there are exactly two files and vote-threshold is 2",
            ));
        }
        if opts.blkverify && opts.rewrite_corrupted {
            return Err(Error::invalid(
                "rewrite-corrupted=on cannot be used with blkverify=on",
            ));
        }
        if opts.rewrite_corrupted && opts.read_pattern != ReadPattern::Quorum {
            return Err(Error::invalid(
                "rewrite-corrupted=on needs read-pattern=quorum",
            ));
        }
        let size = children[0].node.size();
        if let Some(odd) = children.iter().find(|c| c.node.size() != size) {
            return Err(Error::invalid(format!(
                "The children of quorum '{name}' differ in size: '{}' has {size} bytes, '{}' has {} (every replica must have the same size)",
                children[0].name,
                odd.name,
                odd.node.size()
            )));
        }
        Ok(QuorumNode {
            children,
            opts,
            name,
            display,
            size,
            writable,
            log,
            spares: Mutex::new(Vec::new()),
        })
    }

    pub fn children(&self) -> &[Child] {
        &self.children
    }

    pub fn node_name(&self) -> &str {
        &self.name
    }

    pub fn options(&self) -> QuorumOptions {
        self.opts
    }

    pub fn events(&self) -> &Arc<EventLog> {
        &self.log
    }

    /// Reads `[offset, offset + buf.len())` from every child and votes,
    /// piece by piece, doing the rewrites `rewrite` asks for. `buf` gets the
    /// winning bytes where there is a winner. Nothing is recorded: the
    /// caller passes the findings to [`QuorumNode::report`].
    pub fn read_voted(&self, buf: &mut [u8], offset: u64, rewrite: Rewrite) -> Findings {
        let mut found = Findings::default();
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(MAX_PIECE as usize);
            let at = offset + done as u64;
            self.vote_piece(&mut buf[done..done + n], at, rewrite, &mut found);
            done += n;
        }
        found
    }

    fn vote_piece(&self, buf: &mut [u8], offset: u64, rewrite: Rewrite, found: &mut Findings) {
        let len = buf.len() as u64;
        let mut spares = self.take_spares(buf.len());
        let results = self.read_children(buf, &mut spares, offset);
        let mut failures: Vec<(usize, Error)> = Vec::new();
        for (child, r) in results.into_iter().enumerate() {
            if let Err(e) = r {
                failures.push((child, e));
            }
        }
        if failures.is_empty() && spares.iter().all(|s| s.as_slice() == &*buf) {
            self.put_spares(spares);
            return;
        }
        // Child 0's bytes are in `buf`: they vote from there, and only the
        // blocks another child wins are copied in afterwards.
        let verdict = {
            let ballots: Vec<Ballot<'_>> = (0..self.children.len())
                .filter(|c| !failures.iter().any(|(f, _)| f == c))
                .map(|c| Ballot {
                    child: c,
                    data: if c == 0 { &*buf } else { &spares[c - 1] },
                })
                .collect();
            if ballots.len() < self.opts.threshold {
                None
            } else if let (true, [a, b]) = (self.opts.blkverify, ballots.as_slice()) {
                // blkverify compares, it does not vote: no events.
                if let Some(i) = a.data.iter().zip(b.data).position(|(x, y)| x != y) {
                    found.mismatch.get_or_insert(offset + i as u64);
                    for (a, b) in vote(offset, &ballots, 2).undecided {
                        merge_range(&mut found.mismatched, offset + a, b - a);
                    }
                }
                Some(Verdict::default())
            } else {
                Some(vote(offset, &ballots, self.opts.threshold))
            }
        };
        let Some(verdict) = verdict else {
            if found.too_few.is_none() {
                found.too_few = Some(most_common(&failures));
            }
            merge_range(&mut found.undecided, offset, len);
            for (c, e) in failures {
                push_error(&mut found.errors, c, offset, len, e);
            }
            self.put_spares(spares);
            return;
        };
        if found.mismatch.is_some() {
            self.put_spares(spares);
            return;
        }
        for ((a, b), src) in &verdict.sources {
            if *src != 0 {
                let (a, b) = (*a as usize, *b as usize);
                buf[a..b].copy_from_slice(&spares[*src - 1][a..b]);
            }
        }
        for (c, (a, b)) in &verdict.lost {
            merge_child(&mut found.lost, *c, offset + a, b - a);
        }
        for (a, b) in &verdict.undecided {
            merge_range(&mut found.undecided, offset + a, b - a);
        }
        let mut fix: Vec<(usize, u64, u64)> = Vec::new();
        if rewrite != Rewrite::Nothing {
            fix.extend(verdict.lost.iter().map(|(c, (a, b))| (*c, *a, *b)));
        }
        if rewrite == Rewrite::LosersAndFailures {
            for (c, _) in &failures {
                for ((a, b), _) in &verdict.sources {
                    fix.push((*c, *a, *b));
                }
            }
        }
        for (c, e) in failures {
            push_error(&mut found.errors, c, offset, len, e);
        }
        for (c, a, b) in fix {
            let (x, y) = (a as usize, b as usize);
            let r = self.children[c].node.write_at(&buf[x..y], offset + a);
            found.rewrites.push((c, offset + a, b - a, r));
        }
        self.put_spares(spares);
    }

    /// Reads every child in parallel: child 0 into `buf`, child i into
    /// `spares[i - 1]`.
    fn read_children(
        &self,
        buf: &mut [u8],
        spares: &mut [Vec<u8>],
        offset: u64,
    ) -> Vec<Result<()>> {
        let (first, rest) = match self.children.split_first() {
            Some(x) => x,
            None => return Vec::new(),
        };
        if rest.is_empty() {
            return vec![first.node.read_at(buf, offset)];
        }
        std::thread::scope(|s| {
            let handles: Vec<_> = rest
                .iter()
                .zip(spares.iter_mut())
                .map(|(c, b)| s.spawn(move || c.node.read_at(b, offset)))
                .collect();
            let mut results = vec![first.node.read_at(buf, offset)];
            for h in handles {
                results.push(h.join().unwrap_or_else(|_| Err(panicked())));
            }
            results
        })
    }

    fn take_spares(&self, len: usize) -> Vec<Vec<u8>> {
        let want = self.children.len().saturating_sub(1);
        let mut pool = self.spares.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = Vec::with_capacity(want);
        for _ in 0..want {
            let mut b = pool.pop().unwrap_or_default();
            b.resize(len, 0);
            b.truncate(len);
            out.push(b);
        }
        out
    }

    fn put_spares(&self, spares: Vec<Vec<u8>>) {
        let mut pool = self.spares.lock().unwrap_or_else(PoisonError::into_inner);
        // Keep enough for a couple of concurrent readers, no more.
        let keep = 4 * self.children.len();
        for b in spares {
            if pool.len() < keep {
                pool.push(b);
            }
        }
    }

    /// Records the events of a voted read: failed reads, then losers (each
    /// by child, then offset), then ranges without a winner.
    pub fn report(&self, found: &Findings) {
        let op = OpType::Read;
        let mut errors: Vec<_> = found.errors.iter().collect();
        errors.sort_by_key(|(c, off, _, _)| (*c, *off));
        for (c, off, len, e) in errors {
            self.log.record(EventData::report_bad(
                op,
                Some(event_error(e)),
                &self.children[*c].name,
                *off,
                *len,
            ));
        }
        let mut lost = found.lost.clone();
        lost.sort_by_key(|(c, off, _)| (*c, *off));
        for (c, off, len) in lost {
            self.log.record(EventData::report_bad(
                op,
                None,
                &self.children[c].name,
                off,
                len,
            ));
        }
        for (off, len) in &found.undecided {
            self.log.record(EventData::failure(&self.name, *off, *len));
        }
    }

    fn read_fifo(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut last: Option<Error> = None;
        for child in &self.children {
            match child.node.read_at(buf, offset) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    self.log.record(EventData::report_bad(
                        OpType::Read,
                        Some(event_error(&e)),
                        &child.name,
                        offset,
                        buf.len() as u64,
                    ));
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(panicked))
    }

    /// Sends one request to every child in parallel; it succeeds when at
    /// least `threshold` children do.
    fn broadcast(
        &self,
        op: OpType,
        offset: u64,
        len: u64,
        f: &(dyn Fn(&dyn BlockDev) -> Result<()> + Sync),
    ) -> Result<()> {
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .children
                .iter()
                .map(|c| s.spawn(move || f(c.node.as_ref())))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(panicked())))
                .collect()
        });
        let mut failures: Vec<(usize, Error)> = Vec::new();
        for (c, r) in results.into_iter().enumerate() {
            if let Err(e) = r {
                failures.push((c, e));
            }
        }
        let (ev_off, ev_len) = if op == OpType::Flush {
            (0, 0)
        } else {
            (offset, len)
        };
        for (c, e) in &failures {
            self.log.record(EventData::report_bad(
                op,
                Some(event_error(e)),
                &self.children[*c].name,
                ev_off,
                ev_len,
            ));
        }
        if self.children.len() - failures.len() >= self.opts.threshold {
            return Ok(());
        }
        if op != OpType::Flush {
            self.log.record(EventData::failure(&self.name, offset, len));
        }
        Err(most_common(&failures))
    }

    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "'{}' is open read-only",
                self.display
            )))
        }
    }
}

impl BlockDev for QuorumNode {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_request(self, offset, buf.len() as u64)?;
        if self.opts.read_pattern == ReadPattern::Fifo {
            return self.read_fifo(buf, offset);
        }
        let rewrite = if self.opts.rewrite_corrupted {
            Rewrite::Losers
        } else {
            Rewrite::Nothing
        };
        let found = self.read_voted(buf, offset, rewrite);
        self.report(&found);
        if let Some(e) = found.too_few {
            return Err(e);
        }
        if let Some(at) = found.mismatch {
            return Err(Error::io(
                format!(
                    "quorum: offset={offset} bytes={} contents mismatch at offset {at}",
                    buf.len()
                ),
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        if let Some((at, len)) = found.undecided.first() {
            return Err(Error::io(
                format!(
                    "Quorum '{}': no version of the {len} bytes at offset {at} has the {} votes it needs",
                    self.name, self.opts.threshold
                ),
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        Ok(())
    }

    fn status(&self, offset: u64, len: u64) -> Result<Status> {
        // Zero only where every child reads as zeroes. A child that cannot
        // say counts as data: the read that follows votes without it and
        // reports it, as any failing child.
        let mut n = len;
        let mut zero = true;
        for c in &self.children {
            match status_above(c.node.as_ref(), offset, n) {
                Ok(e) => {
                    n = e.length.clamp(1, n);
                    zero &= e.zero;
                }
                Err(_) => zero = false,
            }
        }
        Ok(Status {
            len: n,
            data: !zero,
            zero,
            ..Status::default()
        })
    }

    fn format_name(&self) -> &'static str {
        "quorum"
    }

    fn is_remote(&self) -> bool {
        self.children.iter().any(|c| c.node.is_remote())
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn filename(&self) -> &str {
        &self.display
    }

    fn file(&self) -> Option<&Arc<FileNode>> {
        None
    }

    fn children(&self) -> Vec<&Arc<dyn BlockDev>> {
        self.children.iter().map(|c| &c.node).collect()
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        check_request(self, offset, buf.len() as u64)?;
        self.broadcast(OpType::Write, offset, buf.len() as u64, &|c| {
            c.write_at(buf, offset)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_writable()?;
        check_request(self, offset, len)?;
        self.broadcast(OpType::Write, offset, len, &|c| {
            c.write_zeroes(offset, len, unmap)
        })
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        check_request(self, offset, len)?;
        self.broadcast(OpType::Write, offset, len, &|c| c.discard(offset, len))
    }

    fn flush(&self) -> Result<()> {
        self.broadcast(OpType::Flush, 0, 0, &|c| c.flush())
    }

    fn close(&self) -> Result<()> {
        self.broadcast(OpType::Flush, 0, 0, &|c| c.close())
    }
}

/// The error text of an event: the system's wording for I/O errors, as
/// QEMU's events have it; the whole message otherwise.
pub fn event_error(e: &Error) -> String {
    e.short_text()
}

/// The error most children failed with (a copy of the first such child's
/// error; the failures themselves are still reported).
fn most_common(failures: &[(usize, Error)]) -> Error {
    let mut best: Option<(&Error, usize)> = None;
    for (_, e) in failures {
        let n = failures
            .iter()
            .filter(|(_, x)| x.errno() == e.errno())
            .count();
        if best.is_none_or(|(_, m)| n > m) {
            best = Some((e, n));
        }
    }
    match best {
        Some((e, _)) => e.duplicate(),
        None => Error::io(
            "Too few quorum children answered",
            std::io::Error::from_raw_os_error(libc::EIO),
        ),
    }
}

fn panicked() -> Error {
    Error::io(
        "A quorum child's I/O thread failed",
        std::io::Error::from_raw_os_error(libc::EIO),
    )
}

fn merge_range(runs: &mut Vec<(u64, u64)>, offset: u64, len: u64) {
    if let Some((o, l)) = runs.last_mut() {
        if *o + *l == offset {
            *l += len;
            return;
        }
    }
    runs.push((offset, len));
}

fn merge_child(runs: &mut Vec<(usize, u64, u64)>, child: usize, offset: u64, len: u64) {
    if let Some(run) = runs
        .iter_mut()
        .rev()
        .find(|(c, o, l)| *c == child && *o + *l == offset)
    {
        run.2 += len;
        return;
    }
    runs.push((child, offset, len));
}

fn push_error(
    runs: &mut Vec<(usize, u64, u64, Error)>,
    child: usize,
    offset: u64,
    len: u64,
    e: Error,
) {
    // Adjacent failures of one child merge only when they failed alike.
    if let Some(run) = runs
        .iter_mut()
        .rev()
        .find(|(c, o, l, x)| *c == child && *o + *l == offset && x.errno() == e.errno())
    {
        run.2 += len;
        return;
    }
    runs.push((child, offset, len, e));
}

impl dyn BlockDev {
    /// The quorum node itself, for a scrub.
    pub fn as_quorum(&self) -> Option<&QuorumNode> {
        self.as_any().downcast_ref::<QuorumNode>()
    }
}
