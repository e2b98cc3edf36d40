//! Scrub: read a whole quorum, vote on every block, and say per child what
//! was wrong; optionally write the winning bytes back over what was.

use crate::block::quorum_node::{Findings, QuorumNode, Rewrite, MAX_PIECE};
use crate::block::{block_status, BlockDev};
use crate::error::Result;
use crate::progress::Progress;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

/// A range `(offset, length)` of the node.
pub type Range = (u64, u64);

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ChildReport {
    pub name: String,
    /// Ranges where the child lost the vote.
    pub bad: Vec<Range>,
    /// Ranges the child could not read, with the error.
    pub read_errors: Vec<(u64, u64, String)>,
    /// Bytes written back with the winning version.
    pub repaired_bytes: u64,
    /// Repairs that failed, with the error.
    pub repair_errors: Vec<(u64, u64, String)>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScrubReport {
    pub size: u64,
    /// Bytes read from every child and compared.
    pub bytes_compared: u64,
    /// Bytes every child reported as zeroes, settled without reading.
    pub bytes_skipped_zero: u64,
    pub children: Vec<ChildReport>,
    /// Ranges where no version had enough votes.
    pub unvoted: Vec<Range>,
}

impl ScrubReport {
    pub fn clean(&self) -> bool {
        self.unvoted.is_empty()
            && self
                .children
                .iter()
                .all(|c| c.bad.is_empty() && c.read_errors.is_empty())
    }
}

/// More data runs than this in one piece: read the piece whole rather than
/// run by run.
const MAX_RUNS: usize = 8;

struct PieceResult {
    compared: u64,
    skipped: u64,
    findings: Vec<Findings>,
}

/// Scrubs `q` with `workers` threads (each reads all children in
/// parallel). Events are recorded in offset order, as a single reader
/// would record them. `progress(done, total)` follows the reported pieces.
pub fn scrub(
    q: &QuorumNode,
    repair: bool,
    workers: usize,
    progress: Progress<'_>,
) -> Result<ScrubReport> {
    let size = q.size();
    let pieces = size.div_ceil(MAX_PIECE);
    let rewrite = if repair {
        Rewrite::LosersAndFailures
    } else {
        Rewrite::Nothing
    };
    let mut report = ScrubReport {
        size,
        children: q
            .children()
            .iter()
            .map(|c| ChildReport {
                name: c.name.clone(),
                ..ChildReport::default()
            })
            .collect(),
        ..ScrubReport::default()
    };
    let next = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<(u64, crate::Error)>> = Mutex::new(None);
    // Pieces done but not yet reported, and the next one to report.
    let ordered: Mutex<(u64, BTreeMap<u64, PieceResult>, &mut ScrubReport)> =
        Mutex::new((0, BTreeMap::new(), &mut report));
    std::thread::scope(|s| {
        for _ in 0..workers.clamp(1, 8) {
            s.spawn(|| {
                let mut buf: Vec<u8> = Vec::new();
                loop {
                    let index = next.fetch_add(1, Ordering::SeqCst);
                    if index >= pieces || failed.load(Ordering::SeqCst) {
                        return;
                    }
                    let start = index * MAX_PIECE;
                    let end = (start + MAX_PIECE).min(size);
                    let outcome =
                        scrub_piece(q, start, end, rewrite, &mut buf).and_then(|result| {
                            let mut guard = ordered.lock().unwrap_or_else(PoisonError::into_inner);
                            let (next_report, pending, report) = &mut *guard;
                            pending.insert(index, result);
                            while let Some(r) = pending.remove(next_report) {
                                absorb(q, report, r);
                                *next_report += 1;
                                progress((*next_report * MAX_PIECE).min(size), size)?;
                            }
                            Ok(())
                        });
                    match outcome {
                        Ok(()) => {}
                        Err(e) => {
                            failed.store(true, Ordering::SeqCst);
                            let mut slot =
                                first_error.lock().unwrap_or_else(PoisonError::into_inner);
                            if slot.as_ref().is_none_or(|(i, _)| index < *i) {
                                *slot = Some((index, e));
                            }
                            return;
                        }
                    }
                }
            });
        }
    });
    drop(ordered);
    if let Some((_, e)) = first_error
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
    {
        return Err(e);
    }
    Ok(report)
}

/// Reads and votes `[start, end)`, skipping what every child says is zero.
fn scrub_piece(
    q: &QuorumNode,
    start: u64,
    end: u64,
    rewrite: Rewrite,
    buf: &mut Vec<u8>,
) -> Result<PieceResult> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut skipped = 0u64;
    let mut at = start;
    while at < end {
        let st = block_status(q, at, end - at)?;
        let n = st.len.clamp(1, end - at);
        if st.zero {
            skipped += n;
        } else {
            match runs.last_mut() {
                Some((o, l)) if *o + *l == at => *l += n,
                _ => runs.push((at, n)),
            }
        }
        at += n;
    }
    if runs.len() > MAX_RUNS {
        let (first, last) = (runs[0].0, runs[runs.len() - 1]);
        let span_end = last.0 + last.1;
        skipped -= (span_end - first) - runs.iter().map(|r| r.1).sum::<u64>();
        runs = vec![(first, span_end - first)];
    }
    let mut findings = Vec::with_capacity(runs.len());
    let mut compared = 0u64;
    for (offset, len) in runs {
        buf.resize(len as usize, 0);
        findings.push(q.read_voted(&mut buf[..len as usize], offset, rewrite));
        compared += len;
    }
    Ok(PieceResult {
        compared,
        skipped,
        findings,
    })
}

fn absorb(q: &QuorumNode, report: &mut ScrubReport, piece: PieceResult) {
    report.bytes_compared += piece.compared;
    report.bytes_skipped_zero += piece.skipped;
    for f in piece.findings {
        q.report(&f);
        for (c, off, len, e) in &f.errors {
            let list = &mut report.children[*c].read_errors;
            let text = crate::block::quorum_node::event_error(e);
            match list.last_mut() {
                Some((o, l, t)) if *o + *l == *off && *t == text => *l += len,
                _ => list.push((*off, *len, text)),
            }
        }
        for (c, off, len) in &f.lost {
            merge(&mut report.children[*c].bad, *off, *len);
        }
        for (off, len) in f.undecided.iter().chain(&f.mismatched) {
            merge(&mut report.unvoted, *off, *len);
        }
        for (c, off, len, r) in &f.rewrites {
            let child = &mut report.children[*c];
            match r {
                Ok(()) => child.repaired_bytes += len,
                Err(e) => child.repair_errors.push((
                    *off,
                    *len,
                    crate::block::quorum_node::event_error(e),
                )),
            }
        }
    }
}

fn merge(runs: &mut Vec<Range>, offset: u64, len: u64) {
    // Findings of one piece come per child in offset order, and pieces in
    // offset order: merging with the last run is enough.
    if let Some((o, l)) = runs.last_mut() {
        if *o + *l == offset {
            *l += len;
            return;
        }
    }
    runs.push((offset, len));
}
