//! Reading stored refcounts of an existing image.

use super::bytes::{be16, be32, be64};
use super::entries::RefTableEntry;
use super::header::Header;
use crate::block::{BlockDev, FileNode};
use crate::error::{Error, Result};
use std::cell::RefCell;
use std::rc::Rc;

pub struct RefcountReader<'a> {
    file: &'a FileNode,
    reftable: Vec<u64>,
    cluster_size: u64,
    order: u32,
    entries_per_block: u64,
    /// The last block read, with its offset.
    last: RefCell<Option<(u64, Rc<Vec<u8>>)>>,
}

impl<'a> RefcountReader<'a> {
    pub fn new(file: &'a FileNode, header: &Header) -> Result<RefcountReader<'a>> {
        let cs = header.cluster_size.bytes();
        // The header parser bounded the table by QEMU's 8 MiB limit and the file length.
        let mut raw = vec![0u8; (header.reftable_clusters * cs) as usize];
        file.pread(&mut raw, header.reftable_offset)?;
        let reftable = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
        Ok(RefcountReader {
            file,
            reftable,
            cluster_size: cs,
            order: header.refcount_order.order(),
            entries_per_block: header.refcount_order.entries_per_block(header.cluster_size),
            last: RefCell::new(None),
        })
    }

    /// The refcount block covering `cluster` (raw bytes), or None when its
    /// reftable entry is 0. Blocks are read in order, so one is kept.
    fn block(&self, cluster: u64) -> Result<Option<Rc<Vec<u8>>>> {
        let index = cluster / self.entries_per_block;
        let Some(&entry) = self.reftable.get(index as usize) else {
            return Ok(None);
        };
        let offset = RefTableEntry::from_raw(entry).block_offset();
        if offset == 0 {
            return Ok(None);
        }
        if let Some((at, block)) = &*self.last.borrow() {
            if *at == offset {
                return Ok(Some(Rc::clone(block)));
            }
        }
        if offset % self.cluster_size != 0
            || offset > self.file.file_len().saturating_sub(self.cluster_size)
        {
            return Err(Error::InvalidImage(format!(
                "Corrupt qcow2 image '{}': refcount block offset {offset:#x} (reftable index {index}) is unaligned or beyond the end of the file",
                self.file.filename()
            )));
        }
        let mut buf = vec![0u8; self.cluster_size as usize];
        self.file.pread(&mut buf, offset)?;
        let block = Rc::new(buf);
        *self.last.borrow_mut() = Some((offset, Rc::clone(&block)));
        Ok(Some(block))
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
            .filter(|&i| decode_refcount(&block, self.order, i) != 0)
            .count() as u64;
        Ok((count, n))
    }
}

/// Entry `i` of a refcount block: entries narrower than a byte are packed
/// from the least significant bit of each byte; wider ones are big-endian.
pub(crate) fn decode_refcount(block: &[u8], order: u32, i: u64) -> u64 {
    let i = i as usize;
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = i * bits;
            (u64::from(block[bit / 8]) >> (bit % 8)) & ((1 << bits) - 1)
        }
        3 => u64::from(block[i]),
        4 => u64::from(be16(block, i * 2)),
        5 => u64::from(be32(block, i * 4)),
        _ => be64(block, i * 8),
    }
}

#[cfg(test)]
mod tests {
    use super::decode_refcount as entry;

    fn words(bytes: &[u8]) -> Vec<u8> {
        let mut b = bytes.to_vec();
        b.resize(b.len().next_multiple_of(8), 0);
        b
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
