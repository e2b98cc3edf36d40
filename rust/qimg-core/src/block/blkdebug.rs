//! The `blkdebug` node: passes requests through to its image, failing the
//! ones its rules pick. Tests use it to make one replica fail.
//!
//! Rules follow QEMU's `inject-error` options, with one difference in who
//! fires the events: QEMU's format drivers announce `read_aio`, `write_aio`,
//! `flush_to_disk` to the blkdebug node below them; here the blkdebug node
//! announces them itself for each request it receives (reads; writes,
//! write-zeroes and discards; flushes). That makes `raw -> blkdebug -> file`
//! and `blkdebug -> raw -> file` the same, and lets blkdebug sit above any node.

use super::{block_status, BlockDev, FileNode, Status};
use crate::error::{Error, Result};
use crate::prealloc::Prealloc;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex, PoisonError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DebugEvent {
    ReadAio,
    WriteAio,
    FlushToDisk,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoType {
    Read,
    Write,
    WriteZeroes,
    Discard,
    Flush,
}

impl IoType {
    fn event(self) -> DebugEvent {
        match self {
            IoType::Read => DebugEvent::ReadAio,
            IoType::Write | IoType::WriteZeroes | IoType::Discard => DebugEvent::WriteAio,
            IoType::Flush => DebugEvent::FlushToDisk,
        }
    }

    fn name(self) -> &'static str {
        match self {
            IoType::Read => "read",
            IoType::Write => "write",
            IoType::WriteZeroes => "write-zeroes",
            IoType::Discard => "discard",
            IoType::Flush => "flush",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectError {
    pub event: DebugEvent,
    /// Only requests of this type (any type when None).
    pub iotype: Option<IoType>,
    pub errno: i32,
    /// Only requests covering this 512-byte sector (any request when None).
    pub sector: Option<u64>,
    /// The rule goes away after it fired once.
    pub once: bool,
}

impl InjectError {
    fn matches(&self, io: IoType, offset: u64, len: u64) -> bool {
        if self.event != io.event() || self.iotype.is_some_and(|t| t != io) {
            return false;
        }
        match self.sector {
            None => true,
            Some(s) => {
                let at = s.saturating_mul(512);
                len > 0 && at >= offset && at - offset < len
            }
        }
    }
}

/// A set of `inject-error` rules: the one place that decides which request fails.
#[derive(Debug, Default)]
pub struct Faults {
    rules: Mutex<Vec<InjectError>>,
}

impl Faults {
    pub fn new(rules: Vec<InjectError>) -> Faults {
        Faults {
            rules: Mutex::new(rules),
        }
    }

    /// Fails the request on `name` when a rule picks it.
    pub fn check(&self, io: IoType, offset: u64, len: u64, name: &str) -> Result<()> {
        let mut rules = self.rules.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(i) = rules.iter().position(|r| r.matches(io, offset, len)) else {
            return Ok(());
        };
        let errno = rules[i].errno;
        if rules[i].once {
            rules.remove(i);
        }
        Err(Error::io(
            format!(
                "blkdebug: injected error on {} of {len} bytes at offset {offset} of '{name}'",
                io.name(),
            ),
            std::io::Error::from_raw_os_error(errno),
        ))
    }
}

pub struct BlkdebugNode {
    image: Arc<dyn BlockDev>,
    faults: Faults,
    display: String,
}

impl BlkdebugNode {
    pub fn new(image: Arc<dyn BlockDev>, rules: Vec<InjectError>) -> BlkdebugNode {
        let display = format!("blkdebug:{}", image.filename());
        BlkdebugNode {
            image,
            faults: Faults::new(rules),
            display,
        }
    }

    fn check(&self, io: IoType, offset: u64, len: u64) -> Result<()> {
        self.faults.check(io, offset, len, self.image.filename())
    }
}

impl BlockDev for BlkdebugNode {
    fn size(&self) -> u64 {
        self.image.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(IoType::Read, offset, buf.len() as u64)?;
        self.image.read_at(buf, offset)
    }

    fn status(&self, offset: u64, len: u64) -> Result<Status> {
        let s = block_status(self.image.as_ref(), offset, len)?;
        Ok(Status {
            offset: None,
            raw: false,
            recurse: false,
            ..s
        })
    }

    fn format_name(&self) -> &'static str {
        "blkdebug"
    }

    fn is_remote(&self) -> bool {
        self.image.is_remote()
    }

    fn is_writable(&self) -> bool {
        self.image.is_writable()
    }

    fn filename(&self) -> &str {
        &self.display
    }

    fn file(&self) -> Option<&Arc<FileNode>> {
        None
    }

    fn children(&self) -> Vec<&Arc<dyn BlockDev>> {
        vec![&self.image]
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check(IoType::Write, offset, buf.len() as u64)?;
        self.image.write_at(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.check(IoType::WriteZeroes, offset, len)?;
        self.image.write_zeroes(offset, len, unmap)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check(IoType::Discard, offset, len)?;
        self.image.discard(offset, len)
    }

    fn flush(&self) -> Result<()> {
        self.check(IoType::Flush, 0, 0)?;
        self.image.flush()
    }

    fn resize(&self, new_size: u64, prealloc: Prealloc) -> Result<()> {
        self.image.resize(new_size, prealloc)
    }

    fn close(&self) -> Result<()> {
        self.image.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(sector: Option<u64>, iotype: Option<IoType>) -> InjectError {
        InjectError {
            event: DebugEvent::ReadAio,
            iotype,
            errno: libc::EIO,
            sector,
            once: false,
        }
    }

    #[test]
    fn a_sector_rule_picks_requests_covering_it() {
        let r = rule(Some(8), None);
        assert!(r.matches(IoType::Read, 4096, 512));
        assert!(r.matches(IoType::Read, 0, 8192));
        assert!(!r.matches(IoType::Read, 0, 4096));
        assert!(!r.matches(IoType::Read, 4608, 512));
        assert!(!r.matches(IoType::Write, 4096, 512));
    }

    #[test]
    fn events_and_iotypes_must_both_fit() {
        let mut r = rule(None, Some(IoType::Read));
        assert!(r.matches(IoType::Read, 0, 1));
        r.event = DebugEvent::WriteAio;
        r.iotype = Some(IoType::WriteZeroes);
        assert!(r.matches(IoType::WriteZeroes, 0, 1));
        assert!(!r.matches(IoType::Write, 0, 1));
    }
}
