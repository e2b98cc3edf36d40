//! Reading stored refcounts of an existing image.

use super::image_header::ImageHeader;
use super::l2cache::L2Cache;
use crate::block::{BlockDev, FileNode};
use crate::error::{Error, Result};

/// Reftable entry: bits 9-63 hold the refcount block offset.
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

pub struct RefcountReader<'a> {
    file: &'a FileNode,
    reftable: Vec<u64>,
    cluster_size: u64,
    order: u32,
    entries_per_block: u64,
    blocks: L2Cache,
}

impl<'a> RefcountReader<'a> {
    pub fn new(file: &'a FileNode, header: &ImageHeader) -> Result<RefcountReader<'a>> {
        let cs = header.cluster_size.bytes();
        // The header parser bounded the table by QEMU's 8 MiB limit and the file length.
        let mut raw = vec![0u8; (header.reftable_clusters * cs) as usize];
        file.pread(&mut raw, header.reftable_offset)?;
        let reftable = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        Ok(RefcountReader {
            file,
            reftable,
            cluster_size: cs,
            order: header.refcount_order.order(),
            entries_per_block: header.refcount_order.entries_per_block(header.cluster_size),
            blocks: L2Cache::new(cs),
        })
    }

    pub fn reftable(&self) -> &[u64] {
        &self.reftable
    }

    pub fn entries_per_block(&self) -> u64 {
        self.entries_per_block
    }

    /// The refcount block covering `cluster`, or None when its reftable entry is 0.
    fn block(&self, cluster: u64) -> Result<Option<std::sync::Arc<[u64]>>> {
        let index = cluster / self.entries_per_block;
        let Some(&entry) = self.reftable.get(index as usize) else {
            return Ok(None);
        };
        let offset = entry & REFT_OFFSET_MASK;
        if offset == 0 {
            return Ok(None);
        }
        if offset % self.cluster_size != 0
            || offset > self.file.file_len().saturating_sub(self.cluster_size)
        {
            return Err(Error::InvalidImage(format!(
                "Corrupt qcow2 image '{}': refcount block offset {offset:#x} (reftable index {index}) is unaligned or beyond the end of the file",
                self.file.filename()
            )));
        }
        self.blocks
            .get_or_load(offset, |buf| self.file.pread(buf, offset))
            .map(Some)
    }

    /// The stored refcount of `cluster`.
    pub fn get(&self, cluster: u64) -> Result<u64> {
        let Some(block) = self.block(cluster)? else {
            return Ok(0);
        };
        Ok(entry(&block, self.order, cluster % self.entries_per_block))
    }

    /// Counts clusters with a non-zero refcount from `cluster` to the end of
    /// its refcount block (at most `max` clusters); returns (count, examined).
    pub fn nonzero_run(&self, cluster: u64, max: u64) -> Result<(u64, u64)> {
        let first = cluster % self.entries_per_block;
        let n = (self.entries_per_block - first).min(max);
        let Some(block) = self.block(cluster)? else {
            return Ok((0, n));
        };
        let count = (first..first + n)
            .filter(|&i| entry(&block, self.order, i) != 0)
            .count() as u64;
        Ok((count, n))
    }
}

/// Entry `i` of a refcount block decoded as big-endian u64 words.
fn entry(words: &[u64], order: u32, i: u64) -> u64 {
    let bits = 1u64 << order;
    let bit = i * bits;
    let word = words[(bit / 64) as usize];
    if bits == 64 {
        return word;
    }
    // Entries narrower than a byte are packed from the least significant
    // bit of each byte; bytes and wider entries are big-endian.
    let byte_index = (bit / 8) % 8; // byte within the word, 0 = most significant
    let shift_bytes = 56 - byte_index * 8;
    if bits < 8 {
        let byte = (word >> shift_bytes) & 0xff;
        (byte >> (bit % 8)) & ((1 << bits) - 1)
    } else {
        let shift = 64 - bits - (bit % 64);
        (word >> shift) & ((1u64 << bits) - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::entry;

    fn words(bytes: &[u8]) -> Vec<u64> {
        let mut b = bytes.to_vec();
        b.resize(b.len().next_multiple_of(8), 0);
        b.chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8")))
            .collect()
    }

    #[test]
    fn decodes_every_width() {
        let w = words(&[0b1000_0101, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0]);
        assert_eq!(entry(&w, 0, 0), 1);
        assert_eq!(entry(&w, 0, 1), 0);
        assert_eq!(entry(&w, 0, 2), 1);
        assert_eq!(entry(&w, 0, 7), 1);
        assert_eq!(entry(&w, 1, 0), 1);
        assert_eq!(entry(&w, 1, 3), 2);
        assert_eq!(entry(&w, 2, 0), 5);
        assert_eq!(entry(&w, 2, 1), 8);
        assert_eq!(entry(&w, 3, 1), 0x12);
        assert_eq!(entry(&w, 4, 1), 0x3456);
        assert_eq!(entry(&w, 5, 1), 0x789a_bcde);
        assert_eq!(entry(&w, 6, 1), 0xf000_0000_0000_0000);
    }
}
