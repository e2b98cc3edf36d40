//! I/O on a file opened with O_DIRECT: offsets, lengths and buffers must be
//! multiples of the file's alignment, so unaligned requests go through an
//! aligned bounce buffer, and unaligned writes read the blocks they only
//! partly cover first. Writes are serialised, so that two read-modify-write
//! cycles on one block cannot undo each other.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, PoisonError};

/// Buffers are aligned this much whatever the file needs (QEMU's largest
/// probe; every memory page is).
const BUF_ALIGN: usize = 4096;
/// The request alignments QEMU probes, smallest first.
const PROBES: [usize; 5] = [1, 512, 1024, 2048, 4096];
const BLKSSZGET: libc::c_ulong = 0x1268;

/// A zeroed buffer whose start is aligned to [`BUF_ALIGN`].
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn zeroed(len: usize) -> AlignedBuf {
        let storage = vec![0u8; len + BUF_ALIGN];
        let start = storage.as_ptr().align_offset(BUF_ALIGN);
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// The O_DIRECT state of one open file.
pub struct DirectIo {
    /// Offsets and lengths are multiples of this.
    align: u64,
    writes: Mutex<()>,
}

impl DirectIo {
    /// Probes the alignment `file` needs as QEMU does: a block device says
    /// it; otherwise the smallest read that the file accepts (where even a
    /// one-byte read works, the file system does not say, and the page size
    /// is the safe guess).
    pub fn probe(file: &File, device: bool) -> DirectIo {
        let align = if device {
            let mut size: libc::c_int = 0;
            // SAFETY: BLKSSZGET writes one int into `size`, which outlives the call.
            let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET, &mut size) };
            if r == 0 && size > 0 {
                size as u64
            } else {
                Self::probe_reads(file)
            }
        } else {
            Self::probe_reads(file)
        };
        DirectIo {
            align,
            writes: Mutex::new(()),
        }
    }

    fn probe_reads(file: &File) -> u64 {
        let mut buf = AlignedBuf::zeroed(BUF_ALIGN);
        for len in PROBES {
            match file.read_at(&mut buf.as_mut_slice()[..len], 0) {
                Ok(_) => {
                    return if len == 1 {
                        BUF_ALIGN as u64
                    } else {
                        len as u64
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
                // Something else went wrong: nothing learnt, be safe.
                Err(_) => break,
            }
        }
        BUF_ALIGN as u64
    }

    pub fn align(&self) -> u64 {
        self.align
    }

    fn span(&self, offset: u64, len: u64) -> (u64, u64) {
        let lo = offset / self.align * self.align;
        let hi = (offset + len).next_multiple_of(self.align);
        (lo, hi)
    }

    /// Reads what `file` holds at `[lo, lo + buf.len())` (both aligned);
    /// past the end of the file the buffer keeps its zeroes.
    fn read_aligned(&self, file: &File, buf: &mut [u8], lo: u64) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], lo + done as u64) {
                Ok(0) => break,
                Ok(n) => {
                    done += n;
                    // A short read ends at the end of the file.
                    if done % self.align as usize != 0 {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Fills `buf` from `offset` (zeroes past the end of the file).
    pub fn read(&self, file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let (lo, hi) = self.span(offset, buf.len() as u64);
        let mut bounce = AlignedBuf::zeroed((hi - lo) as usize);
        self.read_aligned(file, bounce.as_mut_slice(), lo)?;
        let skip = (offset - lo) as usize;
        buf.copy_from_slice(&bounce.as_slice()[skip..skip + buf.len()]);
        Ok(())
    }

    /// Writes all of `buf` at `offset`; returns where the write ended on
    /// disk (the end rounded up to the alignment: like QEMU, a write at the
    /// end of the file pads it to a whole block).
    pub fn write(&self, file: &File, buf: &[u8], offset: u64) -> io::Result<u64> {
        let _serial = self.writes.lock().unwrap_or_else(PoisonError::into_inner);
        let (lo, hi) = self.span(offset, buf.len() as u64);
        let a = self.align as usize;
        let mut bounce = AlignedBuf::zeroed((hi - lo) as usize);
        let out = bounce.as_mut_slice();
        let head = (offset - lo) as usize;
        let tail = head + buf.len();
        if head != 0 {
            self.read_aligned(file, &mut out[..a], lo)?;
        }
        if tail % a != 0 {
            let last = out.len() - a;
            self.read_aligned(file, &mut out[last..], lo + last as u64)?;
        }
        out[head..tail].copy_from_slice(buf);
        file.write_all_at(out, lo)?;
        Ok(hi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    #[test]
    fn unaligned_requests_read_and_write_the_right_bytes() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("d");
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &data)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)?;
        let direct = DirectIo::probe(&file, false);
        assert!([512, 1024, 2048, 4096].contains(&direct.align()));
        let mut got = vec![0u8; 777];
        direct.read(&file, &mut got, 1234)?;
        assert_eq!(got, &data[1234..1234 + 777]);
        direct.write(&file, &[0xee; 100], 5000)?;
        let mut expect = data.clone();
        expect[5000..5100].fill(0xee);
        drop(file);
        let back = std::fs::read(&path)?;
        assert_eq!(&back[..20_000], &expect[..]);
        Ok(())
    }
}
