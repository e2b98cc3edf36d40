//! Committing an image into a backing file below it, as `qemu-img commit`
//! does: what the image and the layers between it and the base hold is
//! copied into the base, which grows to the image's size when it is
//! smaller; then the image is emptied, unless the caller keeps it.
//!
//! The guest content the image shows never changes on the way: every range
//! written into the base is one the image (or a layer above the base)
//! covers, and the image is emptied only once the base holds it all on disk.

use crate::block::BlockDev;
use crate::convert::{convert, ConvertOptions, Layers, Sparse, Workers};
use crate::error::{Error, Result};
use crate::prealloc::Prealloc;
use crate::progress::Progress;
use std::sync::Arc;

/// How to commit.
#[derive(Debug, Clone, Copy)]
pub struct CommitOptions {
    /// How far below the image the base is (1: its backing file). The
    /// base must have been opened for writing.
    pub base_depth: u32,
    /// Empty the image afterwards (qemu-img's default; `-d` and `-b` keep it).
    pub empty_top: bool,
    /// Threads reading the image.
    pub workers: Workers,
}

/// The node `depth` layers below `top`.
pub fn layer_below(top: &Arc<dyn BlockDev>, depth: u32) -> Option<Arc<dyn BlockDev>> {
    let mut node = Arc::clone(top);
    for _ in 0..depth {
        node = Arc::clone(node.backing()?);
    }
    Some(node)
}

/// Commits `top` into the base its options name.
pub fn commit(top: &Arc<dyn BlockDev>, opts: &CommitOptions, progress: Progress<'_>) -> Result<()> {
    if opts.base_depth == 0 {
        return Err(Error::invalid("An image cannot be committed into itself"));
    }
    let base = layer_below(top, opts.base_depth)
        .ok_or_else(|| Error::invalid("Image does not have a backing file"))?;
    if !base.is_writable() {
        return Err(Error::invalid(format!(
            "'{}' must be open for writing to take the commit",
            base.filename()
        )));
    }
    let emptied = if opts.empty_top {
        match top.as_qcow2() {
            Some(q) if q.is_writable() => Some(q),
            _ => {
                return Err(Error::invalid(format!(
                    "'{}' must be an image open for writing to be emptied",
                    top.filename()
                )))
            }
        }
    } else {
        None
    };
    if base.size() < top.size() {
        base.resize(top.size(), Prealloc::Off)
            .map_err(|e| e.context(&format!("Could not resize '{}'", base.filename())))?;
    }
    let copy = ConvertOptions {
        sparse: Sparse::DEFAULT,
        compress: false,
        // The base holds data: zero ranges of the layers above are written.
        zero_init: false,
        layers: Layers::Top(opts.base_depth),
        in_order: true,
        workers: opts.workers,
        copy_offload: false,
    };
    convert(&[Arc::clone(top)], base.as_ref(), &copy, progress)?;
    base.flush()?;
    if let Some(q) = emptied {
        q.make_empty()
            .map_err(|e| e.context(&format!("Could not empty '{}'", top.filename())))?;
    }
    Ok(())
}
