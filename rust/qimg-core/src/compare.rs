//! `compare`: are two images' guest contents the same?
//!
//! Follows qemu-img's procedure so that answers agree: ranges both images
//! report as zeroes are not read; a range allocated in one image only must
//! read as zeroes in it; mismatches are reported at 512-byte granularity;
//! the tail of the larger image must be zeroes unless strict mode refuses
//! any size difference.

use crate::block::{status_above, BlockDev, MapExtent};
use crate::error::Result;
use crate::progress::Progress;

/// Largest piece read from each image at once.
const CHUNK: u64 = 2 << 20;
const SECTOR: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Identical,
    /// The first differing 512-byte sector starts here.
    Mismatch {
        offset: u64,
    },
    /// Strict mode: the sizes differ.
    SizeMismatch,
    /// Strict mode: allocation status differs at this offset.
    StatusMismatch {
        offset: u64,
    },
}

/// Which image a read error came from, so the caller can name it.
#[derive(Debug)]
pub struct CompareError {
    pub image: usize,
    pub error: crate::error::Error,
}

pub struct CompareResult {
    pub outcome: Outcome,
    pub size_mismatch: bool,
}

fn status(node: &dyn BlockDev, offset: u64, len: u64) -> Result<MapExtent> {
    status_above(node, offset, len)
}

/// The flags strict mode compares: everything a status says about a range.
fn flags(e: &MapExtent, eof: bool) -> (bool, bool, bool, bool, bool, bool) {
    (
        e.data,
        e.zero,
        e.present,
        e.offset.is_some(),
        e.compressed,
        eof,
    )
}

/// Compares `a` and `b`; `progress` is called with the bytes done so far
/// (an error from it stops the comparison and is returned).
pub fn compare(
    a: &dyn BlockDev,
    b: &dyn BlockDev,
    strict: bool,
    progress: Progress<'_>,
) -> std::result::Result<CompareResult, CompareError> {
    let (size_a, size_b) = (a.size(), b.size());
    let size_mismatch = size_a != size_b;
    let done = |outcome| {
        Ok(CompareResult {
            outcome,
            size_mismatch,
        })
    };
    if strict && size_mismatch {
        return done(Outcome::SizeMismatch);
    }
    let common = size_a.min(size_b);
    let total = size_a.max(size_b);
    let mut buf_a = vec![0u8; CHUNK as usize];
    let mut buf_b = vec![0u8; CHUNK as usize];
    let on = |image: usize| move |error| CompareError { image, error };

    let mut offset = 0u64;
    while offset < common {
        let ea = status(a, offset, size_a - offset).map_err(on(0))?;
        let eb = status(b, offset, size_b - offset).map_err(on(1))?;
        let mut chunk = ea.length.min(eb.length).max(1);
        if strict
            && flags(&ea, offset + ea.length == size_a) != flags(&eb, offset + eb.length == size_b)
        {
            return done(Outcome::StatusMismatch { offset });
        }
        if ea.zero && eb.zero {
            // Both read as zeroes: nothing to read.
        } else if ea.present == eb.present {
            if ea.present {
                chunk = chunk.min(CHUNK);
                let n = chunk as usize;
                a.read_at(&mut buf_a[..n], offset).map_err(on(0))?;
                b.read_at(&mut buf_b[..n], offset).map_err(on(1))?;
                if let Some(at) = first_different_sector(&buf_a[..n], &buf_b[..n]) {
                    return done(Outcome::Mismatch {
                        offset: offset + at as u64,
                    });
                }
            }
        } else {
            chunk = chunk.min(CHUNK);
            let (node, image) = if ea.present { (a, 0) } else { (b, 1) };
            let n = chunk as usize;
            node.read_at(&mut buf_a[..n], offset).map_err(on(image))?;
            if let Some(at) = first_nonzero_sector(&buf_a[..n]) {
                return done(Outcome::Mismatch {
                    offset: offset + at as u64,
                });
            }
        }
        offset += chunk;
        progress(offset, total).map_err(on(0))?;
    }

    if size_mismatch {
        let (over, image, size) = if size_a > size_b {
            (a, 0, size_a)
        } else {
            (b, 1, size_b)
        };
        let mut offset = common;
        while offset < size {
            let e = status(over, offset, size - offset).map_err(on(image))?;
            let mut chunk = e.length.max(1);
            if e.present {
                chunk = chunk.min(CHUNK);
                let n = chunk as usize;
                over.read_at(&mut buf_a[..n], offset).map_err(on(image))?;
                if let Some(at) = first_nonzero_sector(&buf_a[..n]) {
                    return done(Outcome::Mismatch {
                        offset: offset + at as u64,
                    });
                }
            }
            offset += chunk;
            progress(offset, total).map_err(on(0))?;
        }
    }
    done(Outcome::Identical)
}

/// Start of the first 512-byte sector (counted from the buffer start) where
/// the buffers differ.
fn first_different_sector(a: &[u8], b: &[u8]) -> Option<usize> {
    a.chunks(SECTOR)
        .zip(b.chunks(SECTOR))
        .position(|(x, y)| x != y)
        .map(|i| i * SECTOR)
}

/// Start of the first 512-byte sector that is not all zeroes.
fn first_nonzero_sector(a: &[u8]) -> Option<usize> {
    a.chunks(SECTOR)
        .position(|s| s.iter().any(|b| *b != 0))
        .map(|i| i * SECTOR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatches_are_reported_at_sector_starts() {
        let a = vec![0u8; 4096];
        let mut b = a.clone();
        b[1500] = 1;
        assert_eq!(first_different_sector(&a, &b), Some(1024));
        assert_eq!(first_nonzero_sector(&b), Some(1024));
        assert_eq!(first_different_sector(&a, &a), None);
    }
}
