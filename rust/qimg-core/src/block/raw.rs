//! The `raw` format node: the guest disk is the file, byte for byte.

use super::{BlockDev, FileNode, Status};
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
}
