//! Allocation status across a node and its backing chain, and the merged
//! extent list that `map` prints.
//!
//! The rules follow what qemu-img reports so that `map` output agrees:
//! a format that passes its bytes through (raw) takes its file's answer;
//! data or zero at a layer means that layer decides the content; an
//! unallocated range of a format with no backing file reads as zeroes; a
//! range past the end of the backing file reads as zeroes.

use super::{BlockDev, Status};
use crate::error::Result;

/// The status of `[offset, offset + len)` of `node` after the generic rules.
/// `len` is clipped to the node's size; the answer covers a prefix of it.
pub fn block_status(node: &dyn BlockDev, offset: u64, len: u64) -> Result<Status> {
    let size = node.size();
    if offset >= size {
        return Ok(Status {
            len: 0,
            eof: true,
            ..Status::default()
        });
    }
    let len = len.min(size - offset);
    let mut s = node.status(offset, len)?;
    s.len = s.len.clamp(1, len);
    if s.raw {
        if let (Some(file), Some(host)) = (node.file(), s.offset) {
            let mut inner = block_status(file.as_ref(), host, s.len)?;
            if inner.len == 0 {
                // Past the end of the file: reads as zeroes.
                inner.len = s.len;
                inner.zero = true;
            }
            inner.allocated = inner.data || inner.zero;
            inner.eof = offset + inner.len == size;
            return Ok(inner);
        }
    }
    if s.data || s.zero {
        s.allocated = true;
    } else if node.supports_backing() {
        match node.backing() {
            None => s.zero = true,
            Some(b) if offset >= b.size() => s.zero = true,
            Some(_) => {}
        }
    }
    if s.recurse && s.data && !s.zero {
        if let (Some(file), Some(host)) = (node.file(), s.offset) {
            let inner = block_status(file.as_ref(), host, s.len)?;
            if inner.eof && (inner.len == 0 || inner.zero) {
                s.zero = true;
            } else {
                s.len = inner.len;
                s.zero |= inner.zero;
            }
        }
    }
    if offset + s.len == size {
        s.eof = true;
    }
    Ok(s)
}

/// One line of `map` output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapExtent {
    pub start: u64,
    pub length: u64,
    /// How far down the backing chain the content comes from (0 = the image itself).
    pub depth: u32,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
    /// Host offset in `filename`, when the range lives there plainly.
    pub offset: Option<u64>,
    /// The file holding the bytes (when `offset` is known).
    pub filename: Option<String>,
}

impl MapExtent {
    fn extends(&self, next: &MapExtent) -> bool {
        self.length > 0
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && self.depth == next.depth
            && self.present == next.present
            && self.filename == next.filename
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            }
    }
}

/// Status of the range at `offset` (a prefix of `len` bytes), walking down the
/// backing chain until a layer decides.
pub fn status_above(top: &dyn BlockDev, offset: u64, len: u64) -> Result<MapExtent> {
    let mut node = top;
    let mut depth = 0u32;
    let mut len = len;
    loop {
        let s = block_status(node, offset, len)?;
        len = s.len.max(1).min(len);
        if s.data || s.zero {
            return Ok(extent(node, offset, len, depth, &s));
        }
        match node.backing() {
            Some(b) => {
                node = b.as_ref();
                depth += 1;
            }
            None => return Ok(extent(node, offset, len, depth, &s)),
        }
    }
}

fn extent(node: &dyn BlockDev, start: u64, length: u64, depth: u32, s: &Status) -> MapExtent {
    let filename = s.offset.map(|_| {
        node.file()
            .map(|f| f.filename().to_string())
            .unwrap_or_else(|| node.filename().to_string())
    });
    MapExtent {
        start,
        length,
        depth,
        present: s.allocated,
        zero: s.zero,
        data: s.data,
        compressed: s.compressed,
        offset: s.offset,
        filename,
    }
}

/// The merged extents of `[start, start + max_len)` of `top` (clipped to its
/// size), as `map` prints them.
pub fn map_extents(top: &dyn BlockDev, start: u64, max_len: u64) -> Result<Vec<MapExtent>> {
    let end = start.saturating_add(max_len).min(top.size());
    let mut out: Vec<MapExtent> = Vec::new();
    if start >= end {
        // Like qemu-img: an empty range still yields one empty extent.
        out.push(MapExtent {
            start,
            length: 0,
            depth: 0,
            present: false,
            zero: false,
            data: false,
            compressed: false,
            offset: None,
            filename: None,
        });
        return Ok(out);
    }
    let mut pos = start;
    while pos < end {
        let next = status_above(top, pos, end - pos)?;
        pos += next.length;
        match out.last_mut() {
            Some(cur) if cur.extends(&next) => cur.length += next.length,
            _ => out.push(next),
        }
    }
    Ok(out)
}
