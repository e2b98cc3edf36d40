//! The `raw` format node: the guest disk is the file, byte for byte.

use super::{check_request, BlockDev, FileNode, Status};
use crate::error::Result;
use std::sync::Arc;

pub struct RawNode {
    file: Arc<FileNode>,
}

impl RawNode {
    pub fn new(file: Arc<FileNode>) -> RawNode {
        RawNode { file }
    }
}

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
        "raw"
    }

    fn filename(&self) -> &str {
        self.file.filename()
    }

    fn file(&self) -> Option<&Arc<FileNode>> {
        Some(&self.file)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_request(self, offset, buf.len() as u64)?;
        self.file.pwrite(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        check_request(self, offset, len)?;
        self.file.zero_range(offset, len, unmap)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_request(self, offset, len)?;
        self.file.zero_range(offset, len, true)
    }

    fn flush(&self) -> Result<()> {
        self.file.sync()
    }
}
