//! The `raw` format node: the guest disk is the file, byte for byte.

use super::{check_request, BlockDev, FileNode, Status};
use crate::error::{Error, Result};
use crate::prealloc::Prealloc;
use std::sync::Arc;

/// Whether a first sector would still be probed as raw.
pub type StillRaw = fn(&[u8]) -> bool;

pub struct RawNode {
    file: Arc<FileNode>,
    /// Set when the format was probed, not given: writes must not make the
    /// image look like another format (which a later probe would then
    /// trust). The prober is handed in so that this node names no format.
    probed: Option<StillRaw>,
    /// Opened as the bare protocol node (`"driver": "file"` or `"nbd"`).
    protocol: bool,
}

impl RawNode {
    pub fn new(file: Arc<FileNode>, probed: Option<StillRaw>) -> RawNode {
        RawNode {
            file,
            probed,
            protocol: false,
        }
    }

    /// The file itself as a node, with no format on top.
    pub fn protocol(file: Arc<FileNode>) -> RawNode {
        RawNode {
            file,
            probed: None,
            protocol: true,
        }
    }

    /// Refuses a write that would turn the first sector of a probed raw
    /// image into another format's header, as QEMU does.
    fn guard_probe(&self, buf: &[u8], offset: u64) -> Result<()> {
        let Some(still_raw) = self.probed.filter(|_| offset < PROBE_BYTES) else {
            return Ok(());
        };
        let mut head = vec![0u8; PROBE_BYTES as usize];
        self.file.pread(&mut head, 0)?;
        let from = offset as usize;
        let n = buf.len().min(head.len() - from);
        head[from..from + n].copy_from_slice(&buf[..n]);
        if still_raw(&head) {
            return Ok(());
        }
        Err(Error::io(
            format!(
                "Refusing to write a format header into the first sector of '{}', which was probed as raw (give the format explicitly to allow it)",
                self.file.filename()
            ),
            std::io::Error::from_raw_os_error(libc::EPERM),
        ))
    }
}

/// How much of the start of an image a probe looks at.
const PROBE_BYTES: u64 = 512;

impl BlockDev for RawNode {
    fn size(&self) -> u64 {
        self.file.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.pread(buf, offset)
    }

    fn status(&self, offset: u64, len: u64) -> Result<Status> {
        Ok(Status {
            len,
            offset: Some(offset),
            raw: true,
            ..Status::default()
        })
    }

    fn format_name(&self) -> &'static str {
        if self.protocol {
            self.file.format_name()
        } else {
            "raw"
        }
    }

    fn filename(&self) -> &str {
        self.file.filename()
    }

    fn file(&self) -> Option<&Arc<FileNode>> {
        Some(&self.file)
    }

    fn copy_target(&self) -> Option<&Arc<FileNode>> {
        // A probed image keeps its first sector from turning into another
        // format's header: its writes go through `write_at` and its check.
        (self.probed.is_none() && self.file.is_writable() && self.file.path().is_some())
            .then_some(&self.file)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_request(self, offset, buf.len() as u64)?;
        self.guard_probe(buf, offset)?;
        self.file.pwrite(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        check_request(self, offset, len)?;
        self.file.zero_range(offset, len, unmap)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_request(self, offset, len)?;
        self.file.discard(offset, len)
    }

    fn flush(&self) -> Result<()> {
        self.file.sync()
    }

    fn resize(&self, new_size: u64, prealloc: Prealloc) -> Result<()> {
        if !self.file.is_writable() {
            return Err(Error::InvalidArgument(format!(
                "'{}' is open read-only",
                self.file.filename()
            )));
        }
        let old = self.file.file_len();
        if prealloc == Prealloc::Metadata {
            return Err(Prealloc::Metadata.unsupported());
        }
        if new_size < old && prealloc != Prealloc::Off {
            return Err(Error::invalid(
                "Preallocation can only be used when growing an image",
            ));
        }
        self.file.truncate(new_size)?;
        if new_size > old {
            self.file.preallocate(old, new_size - old, prealloc)?;
        }
        self.file.sync()
    }
}
