//! The vote: given what each child returned for one request, which bytes
//! win, which children lost, and which ranges have no winner.
//!
//! Requests are judged in blocks of [`VOTE_BLOCK`] bytes aligned to the
//! node's offsets, not as a whole: a child that is wrong in one block still
//! votes in the others, and each finding names its block. Blocks on which
//! every child agrees are settled by comparing bytes; only blocks with a
//! disagreement are hashed (SHA-256) and grouped into versions.
//!
//! The winner of a block is the version with the most votes. Ties go to the
//! version holding the lowest-numbered child. A winner needs at least
//! `threshold` votes; a block without one is undecided.

use sha2::{Digest, Sha256};

/// The granularity of votes and of the ranges events report.
pub const VOTE_BLOCK: u64 = 64 * 1024;

/// One child's successful read of the request.
#[derive(Debug, Clone, Copy)]
pub struct Ballot<'a> {
    pub child: usize,
    pub data: &'a [u8],
}

/// A range of the request, `[start, end)` relative to its first byte.
pub type Span = (u64, u64);

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Decided ranges and the child whose bytes won there (the lowest child
    /// of the winning version), in order.
    pub sources: Vec<(Span, usize)>,
    /// Ranges each losing child got wrong: (child, range), by child then offset.
    pub lost: Vec<(usize, Span)>,
    /// Ranges where no version reached the threshold, in order.
    pub undecided: Vec<Span>,
}

impl Verdict {
    pub fn is_unanimous(&self) -> bool {
        self.lost.is_empty() && self.undecided.is_empty()
    }
}

/// Votes on a request at node offset `offset`. `ballots` are the successful
/// reads, in child order, all of the request's length; there must be at
/// least `threshold` of them (the caller fails the request otherwise).
pub fn vote(offset: u64, ballots: &[Ballot<'_>], threshold: usize) -> Verdict {
    let mut verdict = Verdict::default();
    let Some(first) = ballots.first() else {
        return verdict;
    };
    let len = first.data.len() as u64;
    if ballots.iter().all(|b| b.data == first.data) {
        if len > 0 {
            verdict.sources.push(((0, len), first.child));
        }
        return verdict;
    }
    let mut lost: Vec<Vec<Span>> = vec![Vec::new(); ballots.len()];
    let mut start = 0u64;
    while start < len {
        let boundary = (offset + start) / VOTE_BLOCK * VOTE_BLOCK + VOTE_BLOCK - offset;
        let end = boundary.min(len);
        let (a, b) = (start as usize, end as usize);
        let reference = &first.data[a..b];
        if ballots.iter().all(|x| &x.data[a..b] == reference) {
            push_span(&mut verdict.sources, (start, end), first.child);
        } else {
            match winner(ballots, a, b, threshold) {
                Some(members) => {
                    push_span(
                        &mut verdict.sources,
                        (start, end),
                        ballots[members[0]].child,
                    );
                    for (i, runs) in lost.iter_mut().enumerate() {
                        if !members.contains(&i) {
                            merge_into(runs, (start, end));
                        }
                    }
                }
                None => merge_into(&mut verdict.undecided, (start, end)),
            }
        }
        start = end;
    }
    for (i, runs) in lost.into_iter().enumerate() {
        verdict
            .lost
            .extend(runs.into_iter().map(|span| (ballots[i].child, span)));
    }
    verdict
}

/// The ballots (indices) of the winning version of `[a, b)`, if it has
/// `threshold` votes.
fn winner(ballots: &[Ballot<'_>], a: usize, b: usize, threshold: usize) -> Option<Vec<usize>> {
    let mut versions: Vec<([u8; 32], Vec<usize>)> = Vec::new();
    for (i, ballot) in ballots.iter().enumerate() {
        let digest: [u8; 32] = Sha256::digest(&ballot.data[a..b]).into();
        match versions.iter_mut().find(|(d, _)| *d == digest) {
            Some((_, members)) => members.push(i),
            None => versions.push((digest, vec![i])),
        }
    }
    // Versions are in order of their lowest ballot, so the first of the
    // largest wins a tie.
    let mut best: Option<Vec<usize>> = None;
    for (_, members) in versions {
        if best.as_ref().is_none_or(|b| members.len() > b.len()) {
            best = Some(members);
        }
    }
    best.filter(|m| m.len() >= threshold)
}

fn push_span(runs: &mut Vec<(Span, usize)>, span: Span, child: usize) {
    if let Some(((_, end), c)) = runs.last_mut() {
        if *c == child && *end == span.0 {
            *end = span.1;
            return;
        }
    }
    runs.push((span, child));
}

fn merge_into(runs: &mut Vec<Span>, span: Span) {
    if let Some((_, end)) = runs.last_mut() {
        if *end == span.0 {
            *end = span.1;
            return;
        }
    }
    runs.push(span);
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: usize = VOTE_BLOCK as usize;

    fn ballots<'a>(reads: &'a [Vec<u8>]) -> Vec<Ballot<'a>> {
        reads
            .iter()
            .enumerate()
            .map(|(child, d)| Ballot { child, data: d })
            .collect()
    }

    #[test]
    fn agreeing_children_need_no_vote() {
        let reads = vec![vec![7u8; 3 * B]; 3];
        let v = vote(0, &ballots(&reads), 2);
        assert!(v.is_unanimous());
        assert_eq!(v.sources, vec![((0, 3 * B as u64), 0)]);
    }

    #[test]
    fn a_corrupt_block_is_named_to_the_block() {
        let mut reads = vec![vec![1u8; 4 * B]; 3];
        reads[2][2 * B + 5] = 9;
        let v = vote(0, &ballots(&reads), 2);
        assert_eq!(v.lost, vec![(2, (2 * B as u64, 3 * B as u64))]);
        assert!(v.undecided.is_empty());
    }

    #[test]
    fn blocks_follow_node_offsets_not_the_request() {
        let mut reads = vec![vec![1u8; B]; 3];
        // The request starts half-way into a block: the first vote block
        // is its first half.
        reads[1][B / 2] = 0;
        let v = vote(VOTE_BLOCK / 2, &ballots(&reads), 2);
        assert_eq!(v.lost, vec![(1, (B as u64 / 2, B as u64))]);
    }

    #[test]
    fn different_children_wrong_in_different_blocks_still_give_data() {
        let mut reads = vec![vec![1u8; 2 * B]; 3];
        reads[0][0] = 2;
        reads[1][B] = 2;
        let v = vote(0, &ballots(&reads), 2);
        assert_eq!(
            v.lost,
            vec![(0, (0, B as u64)), (1, (B as u64, 2 * B as u64))]
        );
        assert_eq!(
            v.sources,
            vec![((0, B as u64), 1), ((B as u64, 2 * B as u64), 0)]
        );
    }

    #[test]
    fn no_majority_is_undecided() {
        let reads = vec![vec![1u8; B], vec![2u8; B], vec![3u8; B]];
        let v = vote(0, &ballots(&reads), 2);
        assert_eq!(v.undecided, vec![(0, B as u64)]);
        assert!(v.lost.is_empty());
    }

    #[test]
    fn ties_go_to_the_lowest_child() {
        let reads = vec![
            vec![1u8; 512],
            vec![2u8; 512],
            vec![2u8; 512],
            vec![1u8; 512],
        ];
        let v = vote(0, &ballots(&reads), 2);
        assert_eq!(v.sources, vec![((0, 512), 0)]);
        assert_eq!(v.lost, vec![(1, (0, 512)), (2, (0, 512))]);
    }
}
