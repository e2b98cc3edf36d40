//! Big-endian fields out of byte buffers, in one place.
//!
//! [`Fields`] reads untrusted bytes (the header, its extensions, the snapshot
//! table, the bitmap directory): every read is bounded, and one past the end
//! is an error naming what was read, never a panic. The parsers of those
//! structures deny `clippy::indexing_slicing` and read through it alone.
//!
//! `be16`/`be32`/`be64` read buffers whose size the caller fixed (a table
//! read whole, a block of known length); an offset past such a buffer is a
//! bug in qimg, not in the image, and panics.

use crate::error::{Error, Result};

/// A byte buffer read as big-endian fields, each bounded by the buffer.
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    bytes: &'a [u8],
    /// What the bytes are, for errors ("the qcow2 header").
    what: &'static str,
}

impl<'a> Fields<'a> {
    pub fn new(bytes: &'a [u8], what: &'static str) -> Fields<'a> {
        Fields { bytes, what }
    }

    /// Bytes in the buffer.
    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The `len` bytes at `at`.
    pub fn slice(&self, at: u64, len: u64) -> Result<&'a [u8]> {
        let range = at
            .checked_add(len)
            .and_then(|end| Some(usize::try_from(at).ok()?..usize::try_from(end).ok()?));
        range.and_then(|r| self.bytes.get(r)).ok_or_else(|| {
            Error::InvalidImage(format!(
                "{}: {len} bytes at offset {at} lie past its end ({} bytes)",
                self.what,
                self.bytes.len()
            ))
        })
    }

    /// The bytes from `at` to the end.
    pub fn rest(&self, at: u64) -> Result<&'a [u8]> {
        self.slice(at, self.len().saturating_sub(at))
    }

    fn array<const N: usize>(&self, at: u64) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.slice(at, N as u64)?);
        Ok(out)
    }

    pub fn u8(&self, at: u64) -> Result<u8> {
        let [b] = self.array::<1>(at)?;
        Ok(b)
    }

    pub fn u16(&self, at: u64) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array(at)?))
    }

    pub fn u32(&self, at: u64) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array(at)?))
    }

    pub fn u64(&self, at: u64) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array(at)?))
    }
}

/// The big-endian u16 at `at` of a buffer the caller sized to hold it.
#[allow(clippy::indexing_slicing)] // The caller's size is the bound (see the module comment).
pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The big-endian u32 at `at` of a buffer the caller sized to hold it.
#[allow(clippy::indexing_slicing)] // The caller's size is the bound.
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(v)
}

/// The big-endian u64 at `at` of a buffer the caller sized to hold it.
#[allow(clippy::indexing_slicing)] // The caller's size is the bound.
pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_bounded_by_the_buffer() {
        let f = Fields::new(&[0, 1, 2, 3, 4, 5, 6, 7, 8], "nine bytes");
        assert_eq!(f.u8(8).ok(), Some(8));
        assert_eq!(f.u16(0).ok(), Some(1));
        assert_eq!(f.u32(1).ok(), Some(0x0102_0304));
        assert_eq!(f.u64(1).ok(), Some(0x0102_0304_0506_0708));
        assert!(f.u64(2).is_err());
        assert!(f.slice(u64::MAX, 2).is_err());
        let err = f.u32(7).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("nine bytes: 4 bytes at offset 7"), "{err}");
        assert_eq!(f.rest(7).ok(), Some(&[7u8, 8][..]));
    }
}
