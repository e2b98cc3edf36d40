//! Opening a node tree from its canonical JSON description.
//!
//! The Python side parses what users type (`json:{...}`, `--image-opts`),
//! checks it and explains mistakes; it hands over one canonical document in
//! which every node has its driver and node name and every option its final
//! type. `schema` is that document as types, read strictly (anything
//! unexpected is an error naming it, never ignored); `opener` builds the
//! nodes from a parsed document.

mod opener;
mod ranges;
pub mod schema;
mod strict;
#[cfg(test)]
mod tests;

use super::cache::CacheMode;
use super::lock::Sharing;
use super::BlockDev;
use crate::error::{Error, Result};
use crate::quorum::events::EventLog;
use schema::Node;
use serde_json::Value;
use std::sync::Arc;

/// How the tree is opened.
#[derive(Debug, Clone, Copy, Default)]
pub struct SpecOptions {
    /// The top node takes writes (and so do the nodes under it that must).
    pub writable: bool,
    /// QEMU's cache mode for the local files of the tree.
    pub cache: CacheMode,
    /// Which of QEMU's image locks to take, and whether to share all (`-U`).
    pub sharing: Sharing,
}

/// Opens the tree described by `json`; quorum events go to `log`.
pub fn open_spec(json: &str, opts: SpecOptions, log: &Arc<EventLog>) -> Result<Arc<dyn BlockDev>> {
    if opts.sharing.force_share && opts.writable {
        return Err(Error::invalid(
            "force-share=on can only be used with read-only images",
        ));
    }
    opener::open_node(&parse(json)?, opts, log)
}

/// The document `json` as the core reads it, written back (keys sorted,
/// no spaces); opens nothing.
pub fn canonical_spec(json: &str) -> Result<String> {
    Ok(to_value(&parse(json)?)?.to_string())
}

/// Reads a canonical document.
fn parse(json: &str) -> Result<Node> {
    // Through a `Value` first: a key given twice keeps its last value, as
    // the core always read documents, where the derived reader would
    // refuse the duplicate.
    let value: Value = serde_json::from_str(json).map_err(malformed)?;
    strict::object(value).map_err(malformed)
}

/// `node` as a JSON value, its keys sorted.
fn to_value(node: &Node) -> Result<Value> {
    serde_json::to_value(node).map_err(malformed)
}

fn malformed(e: serde_json::Error) -> Error {
    Error::invalid(format!("Invalid node specification: {e}"))
}
