//! The block driver graph: a protocol node (`file`) under a format node
//! (`raw`, `qcow2`), format nodes optionally over a backing node, all behind
//! one trait so that commands work on any of them.

pub mod blkdebug;
pub mod cache;
pub mod direct;
pub mod file;
pub mod lock;
pub mod nbd;
pub mod open;
pub mod quorum_node;
pub mod raw;
pub mod spec;
pub mod status;

use crate::error::{Error, Result};
use crate::prealloc::Prealloc;
use std::any::Any;
use std::sync::Arc;

pub use file::FileNode;
pub use open::{open_image, OpenOptions};
pub use spec::{canonical_spec, open_spec, SpecOptions};
pub use status::{block_status, map_extents, status_above, MapExtent};

/// What a driver says about a range starting at the queried offset, before
/// the generic rules of `status::block_status` are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Status {
    /// Bytes from the queried offset that share this status (> 0 inside the node).
    pub len: u64,
    /// The range holds data at this layer.
    pub data: bool,
    /// The range reads as zeroes.
    pub zero: bool,
    /// This layer decides the content (set by the generic rules for data or zero).
    pub allocated: bool,
    /// Where the range lives in the protocol node below, when it lives there plainly.
    pub offset: Option<u64>,
    pub compressed: bool,
    /// The format node is a plain window onto its file: take the file's status.
    pub raw: bool,
    /// Ask the file whether the host range is a hole (metadata-preallocated images).
    pub recurse: bool,
    /// The range ends at the end of the node.
    pub eof: bool,
}

/// One node of the graph. Every node is shared between threads: reads may be
/// served in parallel.
/// Any node as [`Any`], so that a driver can find its own nodes among the
/// trait objects (`as_qcow2`, `as_quorum`) without the block layer naming
/// every driver.
pub trait AsAny: Any {
    fn as_any(&self) -> &dyn Any;
}

impl<T: Any> AsAny for T {
    fn as_any(&self) -> &dyn Any {
        self
    }
}

pub trait BlockDev: AsAny + Send + Sync {
    /// The node's size in bytes (what a reader can address).
    fn size(&self) -> u64;

    /// Fills `buf` with the bytes at `offset`; `offset + buf.len()` must not
    /// exceed `size()` (callers clip).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// The driver's own status of `[offset, offset + len)`, `len > 0`, inside the node.
    fn status(&self, offset: u64, len: u64) -> Result<Status>;

    /// The driver name as qemu-img shows it (`file`, `raw`, `qcow2`).
    fn format_name(&self) -> &'static str;

    /// The name the node was opened with.
    fn filename(&self) -> &str;

    /// The protocol node holding this node's bytes, if any.
    fn file(&self) -> Option<&Arc<FileNode>>;

    /// The nodes below this one other than its file and backing node (a
    /// quorum's children, a filter's image).
    fn children(&self) -> Vec<&Arc<dyn BlockDev>> {
        Vec::new()
    }

    /// Calls `f` with every protocol node of the graph below (and at) this
    /// node: what holds files, locks and connections.
    fn visit_files(&self, f: &mut dyn FnMut(&FileNode)) {
        if let Some(file) = self.file() {
            f(file);
        }
        if let Some(b) = self.backing() {
            b.visit_files(f);
        }
        for child in self.children() {
            child.visit_files(f);
        }
    }

    /// The backing node, for formats that have one.
    fn backing(&self) -> Option<&Arc<dyn BlockDev>> {
        None
    }

    /// Whether the format can have a backing file at all (unallocated ranges
    /// of such formats read as zeroes when there is none).
    fn supports_backing(&self) -> bool {
        false
    }

    /// The local file this node writes guest bytes into unchanged, at the
    /// same offsets, so that a copy may go into it inside the kernel.
    fn copy_target(&self) -> Option<&Arc<FileNode>> {
        None
    }

    /// The node was opened for writing.
    fn is_writable(&self) -> bool {
        self.file().is_some_and(|f| f.is_writable())
    }

    /// Requests wait on a network rather than on local memory or disk, so
    /// readers gain from having many in flight.
    fn is_remote(&self) -> bool {
        self.file().is_some_and(|f| f.is_remote()) || self.backing().is_some_and(|b| b.is_remote())
    }

    /// Writes `buf` at `offset`; the range must lie inside the node.
    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(read_only(self.filename()))
    }

    /// Makes `[offset, offset + len)` read as zeroes. With `unmap`, the
    /// space may be released.
    fn write_zeroes(&self, _offset: u64, _len: u64, _unmap: bool) -> Result<()> {
        Err(read_only(self.filename()))
    }

    /// Tells the node that `[offset, offset + len)` is no longer needed.
    /// What it reads afterwards depends on the format (zeroes, or the
    /// backing file for qcow2 v2 images).
    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(read_only(self.filename()))
    }

    /// Makes every completed write durable.
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// Changes the virtual size; growing preallocates the new area as
    /// `prealloc` says, shrinking drops what lies past the new end.
    fn resize(&self, _new_size: u64, _prealloc: Prealloc) -> Result<()> {
        Err(Error::InvalidArgument(format!(
            "'{}' ({}) cannot be resized",
            self.filename(),
            self.format_name()
        )))
    }

    /// Flushes and leaves the image consistent on disk (the node stays
    /// usable; dropping it closes too, without reporting errors).
    fn close(&self) -> Result<()> {
        self.flush()
    }
}

pub(crate) fn read_only(name: &str) -> Error {
    Error::InvalidArgument(format!("'{name}' is open read-only"))
}

/// Refuses requests that do not lie inside the node, as QEMU's block layer does.
pub fn check_request(node: &dyn BlockDev, offset: u64, len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= node.size() => Ok(()),
        _ => Err(Error::io(
            format!(
                "Request of {len} bytes at offset {offset} is beyond the end of '{}' ({} bytes)",
                node.filename(),
                node.size()
            ),
            std::io::Error::from_raw_os_error(libc::EIO),
        )),
    }
}

/// Reads `buf.len()` bytes at `offset` from `node`, where the range may
/// extend past the node's end: that part reads as zeroes (how an overlay sees
/// a shorter backing file).
pub fn read_clipped(node: &dyn BlockDev, buf: &mut [u8], offset: u64) -> Result<()> {
    let size = node.size();
    let inside = size.saturating_sub(offset).min(buf.len() as u64) as usize;
    if inside > 0 {
        node.read_at(&mut buf[..inside], offset)?;
    }
    buf[inside..].fill(0);
    Ok(())
}
