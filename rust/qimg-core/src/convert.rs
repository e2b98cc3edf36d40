//! The copy engine: an image's guest contents into a raw file.
//!
//! Driven by block status so that zero and unallocated ranges are never
//! read; data is read and written in pieces spread over every core; blocks
//! of data that happen to be all zeroes become holes (the `-S` rule).

use crate::block::{status_above, BlockDev};
use crate::error::{Error, Result};
use crate::file::{punch_zeroes, FileOptions, NewFile};
use rayon::prelude::*;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Work handed to one thread at a time.
const PIECE: u64 = 2 << 20;

/// How to treat the output file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Create (or truncate) the file: it starts out all zeroes.
    New,
    /// Write into an existing file (`-n`): zero ranges must be zeroed.
    Existing,
}

/// `-S`: blocks of this many bytes that are all zeroes are not written.
/// `None` (`-S 0`) writes every data byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sparse(Option<u64>);

impl Sparse {
    pub const DEFAULT: Sparse = Sparse(Some(4096));

    pub fn new(bytes: u64) -> Result<Sparse> {
        if bytes == 0 {
            return Ok(Sparse(None));
        }
        if bytes % 512 != 0 || bytes > (1 << 30) {
            return Err(Error::invalid(format!(
                "Invalid buffer size for sparse output specified: {bytes} (must be a multiple of 512 up to 1 GiB, or 0)"
            )));
        }
        Ok(Sparse(Some(bytes)))
    }
}

/// Copies the guest contents of `src` to the raw file `dst`.
/// `progress(done, total)` may be called from any thread.
pub fn to_raw(
    src: &dyn BlockDev,
    dst: &Path,
    target: Target,
    sparse: Sparse,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<()> {
    let size = src.size();
    match target {
        Target::New => {
            let new = NewFile::create(dst, FileOptions::default())?;
            new.file
                .set_len(size)
                .map_err(|e| new.io_error("Could not resize", e))?;
            copy(src, &new.file, dst, false, sparse, progress)?;
            new.keep();
            Ok(())
        }
        Target::Existing => {
            let file = OpenOptions::new()
                .write(true)
                .open(dst)
                .map_err(|e| Error::open(dst, e))?;
            let len = file.metadata().map_err(|e| Error::open(dst, e))?.len();
            if len < size {
                return Err(Error::invalid(format!(
                    "output file '{}' is smaller than the input ({len} < {size} bytes)",
                    dst.display()
                )));
            }
            copy(src, &file, dst, true, sparse, progress)
        }
    }
}

fn copy(
    src: &dyn BlockDev,
    out: &File,
    dst: &Path,
    zero_needed: bool,
    sparse: Sparse,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<()> {
    let size = src.size();
    let pieces = size.div_ceil(PIECE);
    let done = AtomicU64::new(0);
    let write_err = |e| Error::io(format!("Could not write to '{}'", dst.display()), e);
    (0..pieces)
        .into_par_iter()
        .try_for_each_init(Vec::<u8>::new, |buf, i| -> Result<()> {
            let start = i * PIECE;
            let end = (start + PIECE).min(size);
            let mut pos = start;
            while pos < end {
                let e = status_above(src, pos, end - pos)?;
                let n = e.length.clamp(1, end - pos);
                if e.zero || !(e.data || e.present) {
                    if sparse.0.is_none() {
                        // -S 0: the output is fully allocated, zeroes included.
                        buf.clear();
                        buf.resize(n as usize, 0);
                        out.write_all_at(buf, pos).map_err(write_err)?;
                    } else if zero_needed {
                        punch_zeroes(out, pos, n).map_err(write_err)?;
                    }
                } else {
                    buf.resize(n as usize, 0);
                    src.read_at(buf, pos)?;
                    write_nonzero(out, buf, pos, sparse, zero_needed).map_err(write_err)?;
                }
                pos += n;
            }
            let total = done.fetch_add(end - start, Ordering::Relaxed) + (end - start);
            progress(total, size);
            Ok(())
        })
}

/// Writes `buf` at `offset`, skipping (or, for an existing file, punching)
/// the `sparse`-sized blocks that are all zeroes.
fn write_nonzero(
    out: &File,
    buf: &[u8],
    offset: u64,
    sparse: Sparse,
    zero_needed: bool,
) -> std::io::Result<()> {
    let Sparse(Some(block)) = sparse else {
        return out.write_all_at(buf, offset);
    };
    let block = block as usize;
    let mut at = 0usize;
    while at < buf.len() {
        // Blocks are aligned to the guest offset, so the same data always
        // gives the same holes wherever a piece starts.
        let into = ((offset + at as u64) % block as u64) as usize;
        let n = (block - into).min(buf.len() - at);
        let zero = is_zero(&buf[at..at + n]);
        let mut run = n;
        while at + run < buf.len() {
            let m = block.min(buf.len() - at - run);
            if is_zero(&buf[at + run..at + run + m]) != zero {
                break;
            }
            run += m;
        }
        let pos = offset + at as u64;
        if !zero {
            out.write_all_at(&buf[at..at + run], pos)?;
        } else if zero_needed {
            punch_zeroes(out, pos, run as u64)?;
        }
        at += run;
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
    fn sparse_size_must_be_whole_sectors() {
        assert!(Sparse::new(0).is_ok());
        assert!(Sparse::new(4096).is_ok());
        assert!(Sparse::new(1000).is_err());
    }
}
