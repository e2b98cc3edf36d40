//! The copying half of a safe rebase (`qemu-img rebase` without `-u`):
//! before an image names a new backing file, every range the image leaves
//! to its backing chain and where the old chain and the new backing file
//! differ gets the old content written into the image itself, so the guest
//! sees the same bytes before and after. The caller rewrites the header.
//!
//! The guest content never changes on the way: only ranges the image does
//! not hold are written, with exactly what the old chain shows there.

use crate::block::{block_status, read_clipped, status_above, BlockDev};
use crate::convert::status_top;
use crate::error::{Error, Result};
use crate::progress::Progress;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

/// Bytes compared per step (a multiple of every cluster size, and large
/// enough for reads to be split across threads).
const CHUNK: u64 = 4 << 20;

/// How to copy.
#[derive(Debug, Clone, Copy, Default)]
pub struct RebaseOptions {
    /// Write the copied clusters compressed (`-c`).
    pub compress: bool,
}

/// Writes into `top` (a qcow2 image open for writing, with its old backing
/// chain) what it must hold so that it reads the same over `new` (None: no
/// backing file at all). Returns the bytes written.
pub fn copy_differences(
    top: &Arc<dyn BlockDev>,
    new: Option<&Arc<dyn BlockDev>>,
    opts: &RebaseOptions,
    progress: Progress<'_>,
) -> Result<u64> {
    let q = top.as_qcow2().filter(|q| q.is_writable()).ok_or_else(|| {
        Error::invalid(format!(
            "'{}' is not a qcow2 image open for writing",
            top.filename()
        ))
    })?;
    let cluster = q.header().cluster_size.bytes();
    let unit = if q.header().extended_l2() {
        cluster / 32
    } else {
        cluster
    };
    let old = top.backing().cloned();
    // When the new backing file is a layer of the old chain, only what the
    // layers between them hold can differ.
    let between = match (&old, new) {
        (Some(old), Some(new)) => depth_in_chain(old, new)?,
        _ => None,
    };
    let size = top.size();
    let mut written = 0u64;
    let mut old_buf = Vec::new();
    let mut new_buf = Vec::new();
    let mut offset = 0u64;
    while offset < size {
        progress(offset, size)?;
        let want = (CHUNK - offset % CHUNK).min(size - offset);
        let own = block_status(top.as_ref(), offset, want)?;
        let n = own.len.clamp(1, want);
        if own.allocated {
            offset += n;
            continue;
        }
        let n = match (&old, between) {
            // Rebasing onto the backing file it has: nothing changes.
            (_, Some(0)) => {
                offset += n;
                continue;
            }
            (Some(old), Some(depth)) if offset < old.size() => {
                let n = n.min(old.size() - offset);
                let s = status_top(old.as_ref(), offset, n, depth)?;
                if !s.allocated {
                    offset += s.len.clamp(1, n);
                    continue;
                }
                s.len.clamp(1, n)
            }
            _ => n,
        };
        let old_zero = match &old {
            Some(o) if offset < o.size() => {
                let e = status_above(o.as_ref(), offset, n.min(o.size() - offset))?;
                e.zero.then_some(e.length)
            }
            _ => Some(n),
        };
        let new_zero = match new {
            Some(b) if offset < b.size() => {
                let e = status_above(b.as_ref(), offset, n.min(b.size() - offset))?;
                e.zero.then_some(e.length)
            }
            _ => Some(n),
        };
        if let (Some(a), Some(b)) = (old_zero, new_zero) {
            // Zeroes on both sides: equal without reading.
            offset += a.min(b).clamp(1, n);
            continue;
        }
        old_buf.resize(n as usize, 0);
        new_buf.resize(n as usize, 0);
        match &old {
            Some(o) => read_clipped(o.as_ref(), &mut old_buf, offset)?,
            None => old_buf.fill(0),
        }
        match new {
            Some(b) => read_clipped(b.as_ref(), &mut new_buf, offset)?,
            None => new_buf.fill(0),
        }
        written += write_differences(q, &old_buf, &new_buf, offset, unit, cluster, size, opts)?;
        offset += n;
    }
    top.flush()?;
    progress(size, size)?;
    Ok(written)
}

/// Writes the units of `old` (at guest `offset`) that differ from `new`.
#[allow(clippy::too_many_arguments)]
fn write_differences(
    q: &crate::qcow2::reader::Qcow2Node,
    old: &[u8],
    new: &[u8],
    offset: u64,
    unit: u64,
    cluster: u64,
    size: u64,
    opts: &RebaseOptions,
) -> Result<u64> {
    let len = old.len() as u64;
    let step = if opts.compress { cluster } else { unit };
    let mut written = 0u64;
    let mut pos = 0u64;
    // A run of differing units, written as one request.
    let mut run: Option<(u64, u64)> = None;
    while pos < len {
        // Steps keep to the guest grid, so compressed clusters are whole.
        let end = ((offset + pos) / step * step + step).min(offset + len) - offset;
        let (a, b) = (pos as usize, end as usize);
        let differs = old[a..b] != new[a..b];
        if differs {
            let whole =
                (offset + pos) % cluster == 0 && (end - pos == cluster || offset + end == size);
            if opts.compress && whole && !is_zero(&old[a..b]) {
                flush_run(q, old, offset, &mut run, &mut written)?;
                q.write_compressed(&old[a..b], offset + pos)?;
                written += end - pos;
            } else {
                run = match run {
                    Some((s, e))
                        if e == pos
                            && is_zero(&old[s as usize..e as usize]) == is_zero(&old[a..b]) =>
                    {
                        Some((s, end))
                    }
                    Some(r) => {
                        let mut r = Some(r);
                        flush_run(q, old, offset, &mut r, &mut written)?;
                        Some((pos, end))
                    }
                    None => Some((pos, end)),
                };
            }
        } else {
            flush_run(q, old, offset, &mut run, &mut written)?;
        }
        pos = end;
    }
    flush_run(q, old, offset, &mut run, &mut written)?;
    Ok(written)
}

/// Writes the pending run of `old`: zeroes as a zero request (a zero
/// cluster where the format has them), anything else as data.
fn flush_run(
    q: &crate::qcow2::reader::Qcow2Node,
    old: &[u8],
    offset: u64,
    run: &mut Option<(u64, u64)>,
    written: &mut u64,
) -> Result<()> {
    let Some((s, e)) = run.take() else {
        return Ok(());
    };
    let data = &old[s as usize..e as usize];
    if is_zero(data) {
        q.write_zeroes(offset + s, e - s, false)?;
    } else {
        q.write_at(data, offset + s)?;
    }
    *written += e - s;
    Ok(())
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// How many layers below `chain`'s top the file `node` reads is (0: the top
/// itself), when it is one of them.
fn depth_in_chain(chain: &Arc<dyn BlockDev>, node: &Arc<dyn BlockDev>) -> Result<Option<u32>> {
    let Some(want) = identity(node.as_ref()) else {
        return Ok(None);
    };
    let mut layer = Arc::clone(chain);
    let mut depth = 0u32;
    loop {
        if identity(layer.as_ref()) == Some(want) && layer.format_name() == node.format_name() {
            return Ok(Some(depth));
        }
        let Some(next) = layer.backing().cloned() else {
            return Ok(None);
        };
        layer = next;
        depth += 1;
    }
}

/// The device and inode of the local file holding `node`'s bytes.
fn identity(node: &dyn BlockDev) -> Option<(u64, u64)> {
    let path = node.file()?.path()?;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.dev(), meta.ino()))
}
