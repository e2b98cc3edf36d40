//! The node in QEMU's `file` role: the bytes a format driver reads and
//! writes. They live in a local file (positioned reads, holes found with
//! SEEK_DATA/SEEK_HOLE) or in an NBD export (so a qcow2 image served by
//! `qemu-nbd -f raw` reads as it does on disk).

use super::blkdebug::{Faults, IoType};
use super::cache::CacheMode;
use super::direct::DirectIo;
use super::lock::{self, LockRequest};
use super::nbd::NbdNode;
use super::{BlockDev, Status};
use crate::error::{Error, Result};
use crate::prealloc::Prealloc;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};

/// Largest request end QEMU's block layer accepts (INT64_MAX aligned down
/// to 1 GiB); reads beyond it fail with EIO, as in QEMU.
pub const MAX_REQUEST_END: u64 = (i64::MAX as u64) & !((1 << 30) - 1);

pub struct FileNode {
    io: Io,
    /// QEMU's image locks this open holds on a local file.
    locks: std::sync::Mutex<LockRequest>,
    name: String,
    /// The real length of the file in bytes (grows as writes extend it).
    len: AtomicU64,
    writable: bool,
    /// A block device: written in place, never resized.
    device: bool,
    /// Flushes reach the disk (fdatasync); with the "unsafe" cache mode they
    /// are skipped, as qemu-img convert does by default.
    durable: bool,
    /// The file is open with O_DIRECT (cache modes none, directsync).
    direct: Option<DirectIo>,
    /// A `blkdebug` node over this file: requests its rules pick fail.
    faults: Option<Faults>,
}

/// Where the bytes are.
enum Io {
    Local { file: File, path: PathBuf },
    Nbd(NbdNode),
}

impl FileNode {
    /// Opens `path` read-only. Directories and other non-files are refused.
    pub fn open(path: &Path) -> Result<FileNode> {
        Self::open_with(path, false, CacheMode::Writeback)
    }

    /// Opens `path` for reading and writing.
    pub fn open_rw(path: &Path) -> Result<FileNode> {
        Self::open_with(path, true, CacheMode::Writeback)
    }

    /// Puts a `blkdebug` node's rules over this file: the format driver
    /// above sees the failures its requests meet (metadata and data alike).
    pub fn with_faults(mut self, faults: Faults) -> FileNode {
        self.faults = Some(faults);
        self
    }

    /// Fails the request when the blkdebug rules over this file pick it.
    fn fault(&self, io: IoType, offset: u64, len: u64) -> Result<()> {
        match &self.faults {
            Some(f) => f.check(io, offset, len, &self.name),
            None => Ok(()),
        }
    }

    /// Makes flushes no-ops (qemu's `cache=unsafe`): writes still reach the
    /// page cache in order, so a killed process leaves what it left before,
    /// but nothing waits for the disk.
    pub fn without_flushes(mut self) -> FileNode {
        self.durable = false;
        self
    }

    /// Opens `path` (for writing too if `writable`) in cache mode `cache`.
    pub fn open_with(path: &Path, writable: bool, cache: CacheMode) -> Result<FileNode> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(cache.open_flags())
            .open(path)
            .map_err(|e| Error::open(path, e))?;
        let meta = file.metadata().map_err(|e| Error::open(path, e))?;
        if meta.is_dir() {
            return Err(Error::open(
                path,
                io::Error::from_raw_os_error(libc::EISDIR),
            ));
        }
        let len = if meta.file_type().is_file() {
            meta.len()
        } else {
            // Block devices report their size through seeking to the end.
            use std::io::Seek;
            let mut f = &file;
            f.seek(io::SeekFrom::End(0))
                .map_err(|e| Error::open(path, e))?
        };
        let device = meta.file_type().is_block_device();
        let direct = cache.direct().then(|| DirectIo::probe(&file, device));
        Ok(FileNode {
            io: Io::Local {
                file,
                path: path.to_path_buf(),
            },
            locks: std::sync::Mutex::new(LockRequest::default()),
            device,
            name: path.display().to_string(),
            len: AtomicU64::new(len),
            writable,
            durable: cache.flushes(),
            direct,
            faults: None,
        })
    }

    /// The bytes of an NBD export (writable if the node is).
    pub fn nbd(export: NbdNode) -> FileNode {
        FileNode {
            locks: std::sync::Mutex::new(LockRequest::default()),
            device: false,
            name: export.filename().to_string(),
            len: AtomicU64::new(export.size()),
            writable: export.is_writable(),
            durable: true,
            direct: None,
            faults: None,
            io: Io::Nbd(export),
        }
    }

    /// Takes QEMU's image locks for `want` (dropping what it held beyond
    /// them), refusing what another process does not share. An export's
    /// server keeps its own exclusion: nothing to take here.
    pub fn lock(&self, want: LockRequest) -> Result<()> {
        let Io::Local { file, .. } = &self.io else {
            return Ok(());
        };
        let mut held = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        lock::apply(file, &self.name, *held, want)?;
        *held = want;
        Ok(())
    }

    /// The local file's path; None for an NBD export.
    pub fn path(&self) -> Option<&Path> {
        match &self.io {
            Io::Local { path, .. } => Some(path),
            Io::Nbd(_) => None,
        }
    }

    /// The real length of the file (the node's size is this rounded up to 512).
    pub fn file_len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Bytes the file occupies on disk (st_blocks * 512), as `disk size`
    /// shows; None for an export, whose server does not say.
    pub fn allocated_bytes(&self) -> Result<Option<u64>> {
        match &self.io {
            Io::Local { file, .. } => {
                let meta = file.metadata().map_err(|e| self.error("stat", e))?;
                Ok(Some(meta.blocks() * 512))
            }
            Io::Nbd(_) => Ok(None),
        }
    }

    pub fn error(&self, what: &str, err: io::Error) -> Error {
        Error::io(format!("Could not {what} '{}'", self.name), err)
    }

    /// Reads exactly `buf.len()` bytes at `offset`; bytes past the end of the
    /// file read as zeroes, as a sparse tail would.
    pub fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.fault(IoType::Read, offset, buf.len() as u64)?;
        let file = match &self.io {
            Io::Local { file, .. } => file,
            Io::Nbd(export) => {
                let inside = self.file_len().saturating_sub(offset).min(buf.len() as u64) as usize;
                buf[inside..].fill(0);
                return export.read_at(&mut buf[..inside], offset);
            }
        };
        if let Some(direct) = &self.direct {
            let inside = self.file_len().saturating_sub(offset).min(buf.len() as u64) as usize;
            buf[inside..].fill(0);
            return direct
                .read(file, &mut buf[..inside], offset)
                .map_err(|e| self.error("read", e));
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            if pos >= self.file_len() {
                break;
            }
            match file.read_at(&mut buf[done..], pos) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.error("read", e)),
            }
        }
        buf[done..].fill(0);
        Ok(())
    }

    /// `len` bytes at `offset` in a new buffer (zeroes past the end of the
    /// file). The caller bounds `len`; requests past QEMU's limit fail.
    pub fn read_vec(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        if offset
            .checked_add(len)
            .is_none_or(|end| end > MAX_REQUEST_END)
        {
            return Err(self.error("read", io::Error::from_raw_os_error(libc::EIO)));
        }
        let mut buf = vec![0u8; len as usize];
        self.pread(&mut buf, offset)?;
        Ok(buf)
    }

    /// How much of a file's start a format probe sees.
    pub const PROBE_LEN: u64 = 4096;

    /// The first [`Self::PROBE_LEN`] bytes (fewer in a shorter file): what
    /// probing reads, and where a header parser starts.
    pub fn probe_head(&self) -> Result<Vec<u8>> {
        let mut head = vec![0u8; self.file_len().min(Self::PROBE_LEN) as usize];
        self.pread(&mut head, 0)?;
        Ok(head)
    }

    /// Writes all of `buf` at `offset`, extending the file as needed.
    pub fn pwrite(&self, buf: &[u8], offset: u64) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&end| end <= MAX_REQUEST_END)
            .ok_or_else(|| self.error("write", io::Error::from_raw_os_error(libc::EFBIG)))?;
        self.fault(IoType::Write, offset, buf.len() as u64)?;
        match &self.io {
            Io::Local { file, .. } => match &self.direct {
                Some(direct) => {
                    // The write may pad the file to a whole block, as QEMU's does.
                    let on_disk = direct
                        .write(file, buf, offset)
                        .map_err(|e| self.error("write", e))?;
                    self.len.fetch_max(on_disk, Ordering::AcqRel);
                }
                None => file
                    .write_all_at(buf, offset)
                    .map_err(|e| self.error("write", e))?,
            },
            Io::Nbd(export) => {
                // An export cannot grow: a write past its end is out of space.
                if end > self.file_len() {
                    return Err(self.error("write", io::Error::from_raw_os_error(libc::ENOSPC)));
                }
                export.write_at(buf, offset)?
            }
        }
        self.len.fetch_max(end, Ordering::AcqRel);
        Ok(())
    }

    /// Makes everything written so far durable (fdatasync).
    pub fn sync(&self) -> Result<()> {
        self.fault(IoType::Flush, 0, 0)?;
        if !self.durable {
            return Ok(());
        }
        match &self.io {
            Io::Local { file, .. } => file.sync_data().map_err(|e| self.error("flush", e)),
            Io::Nbd(export) => export.flush(),
        }
    }

    /// Sets the file's length. An export keeps the size its server gave
    /// it: only that size is accepted.
    pub fn truncate(&self, len: u64) -> Result<()> {
        match &self.io {
            // A block device has the size it has (qemu-img's words).
            Io::Local { .. } if self.device && len != self.file_len() => {
                return Err(Error::Unsupported("Cannot resize device files".into()))
            }
            Io::Local { .. } if self.device => {}
            Io::Local { file, .. } => file.set_len(len).map_err(|e| self.error("resize", e))?,
            Io::Nbd(_) if len == self.file_len() => {}
            Io::Nbd(_) => {
                return Err(Error::invalid(format!(
                    "Cannot resize '{}': an NBD export keeps the size its server gives it",
                    self.name
                )))
            }
        }
        self.len.store(len, Ordering::Release);
        Ok(())
    }

    /// Allocates `[offset, offset + len)` as `mode` says (falloc or full),
    /// growing the file to cover it.
    pub fn preallocate(&self, offset: u64, len: u64, mode: Prealloc) -> Result<()> {
        if mode != Prealloc::Off && mode != Prealloc::Metadata {
            self.fault(IoType::WriteZeroes, offset, len)?;
        }
        let err = |e| self.error("preallocate", e);
        match (&self.io, mode) {
            (_, Prealloc::Off | Prealloc::Metadata) => Ok(()),
            (Io::Local { file, .. }, Prealloc::Falloc) => {
                crate::host_file::fallocate(file, offset, len).map_err(err)?;
                self.len.fetch_max(offset + len, Ordering::AcqRel);
                Ok(())
            }
            (Io::Local { .. }, Prealloc::Full) if self.direct.is_some() => {
                self.write_zero_bytes(offset, len)
            }
            (Io::Local { file, path }, Prealloc::Full) => {
                crate::host_file::write_zeroes(file, path, offset, len).map_err(err)?;
                self.len.fetch_max(offset + len, Ordering::AcqRel);
                Ok(())
            }
            // An export's space is the server's: zeroes written with holes
            // refused are the closest request.
            (Io::Nbd(_), Prealloc::Falloc | Prealloc::Full) => self.zero_range(offset, len, false),
        }
    }

    /// Copies up to `len` bytes at `offset` into `dst` at `dst_offset`
    /// inside the kernel (copy_file_range), with no pass through user
    /// memory. Returns how many bytes were copied: fewer than `len` at the
    /// end of this file, and 0 where the kernel cannot copy between the two
    /// (an export, another file system), which the caller copies itself.
    pub fn copy_range_to(
        &self,
        dst: &FileNode,
        offset: u64,
        dst_offset: u64,
        len: u64,
    ) -> Result<u64> {
        use std::os::fd::AsRawFd;
        let (Io::Local { file: src, .. }, Io::Local { file: out, .. }) = (&self.io, &dst.io) else {
            return Ok(0);
        };
        self.fault(IoType::Read, offset, len)?;
        dst.fault(IoType::Write, dst_offset, len)?;
        let mut done = 0u64;
        while done < len {
            let (Ok(mut off_in), Ok(mut off_out)) = (
                libc::loff_t::try_from(offset + done),
                libc::loff_t::try_from(dst_offset + done),
            ) else {
                break;
            };
            let want = usize::try_from(len - done)
                .unwrap_or(usize::MAX)
                .min(1 << 30);
            // SAFETY: both descriptors are open files owned by these nodes,
            // and the offsets are locals the call updates.
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut off_in,
                    out.as_raw_fd(),
                    &mut off_out,
                    want,
                    0,
                )
            };
            if n > 0 {
                done += n as u64;
                continue;
            }
            if n == 0 {
                break; // the end of this file
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                // No in-kernel copy between these two: the caller copies.
                Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => break,
                _ => return Err(dst.error("write", err)),
            }
        }
        dst.len.fetch_max(dst_offset + done, Ordering::AcqRel);
        Ok(done)
    }

    /// Releases `[offset, offset + len)`: a hole punched in a local file
    /// (reading zeroes), a trim request to an export (reading what its
    /// server decides).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.fault(IoType::Discard, offset, len)?;
        match &self.io {
            // Past the end of the file there is nothing to give back (and
            // growing the file to punch a hole there would only grow it).
            Io::Local { .. } => {
                let inside = offset.saturating_add(len).min(self.file_len());
                if inside <= offset {
                    return Ok(());
                }
                self.zeroes(offset, inside - offset, true)
            }
            Io::Nbd(export) => export.discard(offset, len),
        }
    }

    /// Makes `[offset, offset + len)` read as zeroes: a hole where the file
    /// system can punch one (`unmap`), zeroes written otherwise.
    pub fn zero_range(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.fault(IoType::WriteZeroes, offset, len)?;
        self.zeroes(offset, len, unmap)
    }

    /// `zero_range` once the request passed the blkdebug rules.
    fn zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let end = offset.saturating_add(len);
        let inside = end.min(self.file_len());
        if inside > offset {
            let n = inside - offset;
            let (file, path) = match &self.io {
                Io::Nbd(export) => return export.write_zeroes(offset, len, unmap),
                Io::Local { file, path } => (file, path),
            };
            let done = if unmap {
                crate::host_file::punch_hole(file, offset, n)
            } else {
                crate::host_file::zero_in_place(file, offset, n)
            };
            // Where the file system cannot, zeroes are written: through the
            // aligned path on an O_DIRECT file, else by the bulk zero writer.
            match (done, &self.direct) {
                (Ok(()), _) => {}
                (Err(_), Some(_)) => self.write_zero_bytes(offset, n)?,
                (Err(_), None) => crate::host_file::write_zeroes(file, path, offset, n)
                    .map_err(|e| self.error("write", e))?,
            }
        }
        if end > inside {
            // Past the end: growing the file gives zeroes.
            self.truncate(end)?;
        }
        Ok(())
    }
}

impl Drop for FileNode {
    fn drop(&mut self) {
        let held = *self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        if let (Io::Local { file, .. }, true) = (&self.io, held != LockRequest::default()) {
            lock::release(file);
        }
    }
}

impl FileNode {
    /// Writes `len` zero bytes at `offset` as data.
    fn write_zero_bytes(&self, offset: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeroes = vec![0u8; len.min(CHUNK) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK);
            self.pwrite(&zeroes[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }
}

impl BlockDev for FileNode {
    fn size(&self) -> u64 {
        match &self.io {
            Io::Local { .. } => self.file_len().div_ceil(512) * 512,
            Io::Nbd(export) => export.size(),
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.pread(buf, offset)
    }

    // Through the trait a file takes writes like any node: inside its size,
    // and only when it was opened for writing (the inherent `pwrite` may
    // also grow the file, which format drivers need).
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable_inside(offset, buf.len() as u64)?;
        self.pwrite(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.writable_inside(offset, len)?;
        self.zero_range(offset, len, unmap)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.writable_inside(offset, len)?;
        FileNode::discard(self, offset, len)
    }

    fn flush(&self) -> Result<()> {
        if self.writable {
            self.sync()
        } else {
            Ok(())
        }
    }

    fn status(&self, offset: u64, len: u64) -> Result<Status> {
        if let Io::Nbd(export) = &self.io {
            return export.status(offset, len);
        }
        let (data, n) = self.extent_at(offset, len)?;
        Ok(Status {
            len: n,
            data,
            zero: !data,
            offset: Some(offset),
            ..Status::default()
        })
    }

    fn format_name(&self) -> &'static str {
        match &self.io {
            Io::Local { .. } => "file",
            Io::Nbd(export) => export.format_name(),
        }
    }

    fn is_remote(&self) -> bool {
        matches!(self.io, Io::Nbd(_))
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn filename(&self) -> &str {
        &self.name
    }

    fn file(&self) -> Option<&Arc<FileNode>> {
        None
    }

    fn visit_files(&self, f: &mut dyn FnMut(&FileNode)) {
        f(self);
    }
}

impl FileNode {
    /// Refuses a change through the `BlockDev` trait to a file opened
    /// read-only, or outside its size.
    fn writable_inside(&self, offset: u64, len: u64) -> Result<()> {
        if !self.writable {
            return Err(super::read_only(&self.name));
        }
        super::check_request(self, offset, len)
    }

    /// Whether `offset` starts data or a hole, and how far that lasts (<= len).
    fn extent_at(&self, offset: u64, len: u64) -> Result<(bool, u64)> {
        use std::os::fd::AsRawFd;
        let file_len = self.file_len();
        if offset >= file_len {
            return Ok((false, len));
        }
        let fd = match &self.io {
            Io::Local { file, .. } => file.as_raw_fd(),
            Io::Nbd(_) => return Ok((true, len)),
        };
        let seek = |pos: u64, whence| -> io::Result<u64> {
            let off = libc::off_t::try_from(pos)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: lseek on a descriptor we own has no memory effects.
            let r = unsafe { libc::lseek(fd, off, whence) };
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(r as u64)
            }
        };
        match seek(offset, libc::SEEK_DATA) {
            Ok(data) if data > offset => Ok((false, (data - offset).min(len))),
            Ok(_) => {
                let hole = match seek(offset, libc::SEEK_HOLE) {
                    Ok(h) => h,
                    Err(_) => file_len,
                };
                Ok((true, hole.saturating_sub(offset).clamp(1, len)))
            }
            // No data after offset: the rest of the file is a hole.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok((false, len)),
            // No SEEK_DATA support: everything is data.
            Err(_) => Ok((true, len)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_range_to_copies_in_the_kernel_and_stops_at_the_end_of_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (src_path, dst_path) = (dir.path().join("src"), dir.path().join("dst"));
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&src_path, &data).expect("write source");
        std::fs::write(&dst_path, b"").expect("create target");
        let src = FileNode::open(&src_path).expect("open source");
        let dst = FileNode::open_rw(&dst_path).expect("open target");
        assert_eq!(
            src.copy_range_to(&dst, 1000, 4096, 50_000).expect("copy"),
            50_000
        );
        // Past the end of the source only what is there is copied.
        assert_eq!(
            src.copy_range_to(&dst, 90_000, 60_000, 20_000)
                .expect("copy"),
            10_000
        );
        assert_eq!(dst.file_len(), 70_000);
        let out = std::fs::read(&dst_path).expect("read target");
        assert!(out[4096..54_096] == data[1000..51_000]);
        assert!(out[60_000..70_000] == data[90_000..]);
        assert!(out[..4096].iter().all(|&b| b == 0));
    }

    #[test]
    fn writes_through_the_trait_stay_inside_a_writable_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 4096]).expect("write file");
        let ro: &dyn BlockDev = &FileNode::open(&path).expect("open read-only");
        let refused = ro.write_at(b"x", 0).err().map(|e| e.to_string());
        assert_eq!(
            refused,
            Some(format!("'{}' is open read-only", path.display()))
        );
        assert!(ro.write_zeroes(0, 512, false).is_err());
        assert!(ro.discard(0, 512).is_err());
        assert!(ro.flush().is_ok());

        let rw_node = FileNode::open_rw(&path).expect("open read-write");
        let rw: &dyn BlockDev = &rw_node;
        rw.write_at(b"abc", 10).expect("write inside");
        rw.write_zeroes(512, 512, false).expect("zeroes inside");
        rw.flush().expect("flush");
        // Past the end is refused (the inherent pwrite is what grows a file).
        assert!(rw.write_at(b"abc", 4095).is_err());
        assert!(rw.write_zeroes(4000, 512, false).is_err());
        assert_eq!(rw_node.file_len(), 4096);
        let out = std::fs::read(&path).expect("read back");
        assert_eq!(&out[10..13], b"abc");
        assert!(out[512..1024].iter().all(|&b| b == 0));
        assert!(out[1024..].iter().all(|&b| b == 7));
    }
}
