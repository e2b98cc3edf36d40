//! Quorum: what a replicated read decides and reports, kept apart from the
//! node that does the I/O (`block::quorum_node`) so that it can be tested alone.

pub mod events;
pub mod scrub;
pub mod vote;
