//! The copy engine on every error path: a target that runs out of space
//! after any number of writes, a source that fails any read, and a progress
//! hook that cancels. Each round runs under a hard deadline: the engine
//! must return the error, with no thread left blocked (a worker stuck on
//! the full channel once the writer stopped used to hang the copy).
#![allow(clippy::expect_used)] // A test stops at the first surprise.

use qimg_core::block::{BlockDev, FileNode, Status};
use qimg_core::convert::{convert, CopyChoices, Layers, Workers};
use qimg_core::{Error, ErrorKind, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

const MIB: u64 = 1 << 20;
/// A round that takes longer than this has hung.
const DEADLINE: Duration = Duration::from_secs(20);

/// Guest data made up on the fly; read number `fail_read` fails with EIO.
struct Source {
    size: u64,
    reads: AtomicU64,
    fail_read: Option<u64>,
}

impl BlockDev for Source {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if Some(self.reads.fetch_add(1, Ordering::SeqCst)) == self.fail_read {
            return Err(Error::io(
                "Could not read 'source'",
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        for (i, b) in buf.iter_mut().enumerate() {
            *b = ((offset + i as u64) % 251 + 1) as u8;
        }
        Ok(())
    }
    fn status(&self, offset: u64, len: u64) -> Result<Status> {
        Ok(Status {
            len: len.min(self.size - offset),
            data: true,
            ..Status::default()
        })
    }
    fn format_name(&self) -> &'static str {
        "test-source"
    }
    fn filename(&self) -> &str {
        "source"
    }
    fn file(&self) -> Option<&Arc<FileNode>> {
        None
    }
}

/// A target whose write number `full_after` and every later one fail with
/// ENOSPC; slow writes let the workers fill the channel first.
struct Target {
    size: u64,
    writes: AtomicU64,
    full_after: u64,
    slow: bool,
}

impl BlockDev for Target {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], _offset: u64) -> Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn status(&self, offset: u64, len: u64) -> Result<Status> {
        Ok(Status {
            len: len.min(self.size - offset),
            zero: true,
            ..Status::default()
        })
    }
    fn format_name(&self) -> &'static str {
        "test-target"
    }
    fn filename(&self) -> &str {
        "target"
    }
    fn file(&self) -> Option<&Arc<FileNode>> {
        None
    }
    fn is_writable(&self) -> bool {
        true
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        if self.slow {
            std::thread::sleep(Duration::from_millis(2));
        }
        if self.writes.fetch_add(1, Ordering::SeqCst) >= self.full_after {
            return Err(Error::io(
                "Could not write 'target'",
                std::io::Error::from_raw_os_error(libc::ENOSPC),
            ));
        }
        Ok(())
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _unmap: bool) -> Result<()> {
        Ok(())
    }
}

/// Runs one copy on its own thread and returns its result, failing the
/// test if it does not end within the deadline.
fn copy_within_deadline(
    source: Source,
    target: Target,
    workers: usize,
    cancel_after: Option<u64>,
) -> Result<()> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let sources: Vec<Arc<dyn BlockDev>> = vec![Arc::new(source)];
        let calls = AtomicU64::new(0);
        let progress = |_: u64, _: u64| -> Result<()> {
            if cancel_after.is_some_and(|n| calls.fetch_add(1, Ordering::SeqCst) >= n) {
                return Err(Error::cancelled());
            }
            Ok(())
        };
        let opts = CopyChoices::new(
            None,
            false,
            Some(Workers::new(workers).expect("a valid worker count")),
            true,
            false,
            None,
        )
        .expect("plain copy options")
        .options(&sources, true, Layers::Chain);
        let _ = tx.send(convert(&sources, &target, &opts, &progress));
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(r) => r,
        Err(_) => panic!("the copy hung (workers {workers}, cancel after {cancel_after:?})"),
    }
}

fn source(size: u64, fail_read: Option<u64>) -> Source {
    Source {
        size,
        reads: AtomicU64::new(0),
        fail_read,
    }
}

fn target(size: u64, full_after: u64, slow: bool) -> Target {
    Target {
        size,
        writes: AtomicU64::new(0),
        full_after,
        slow,
    }
}

#[test]
fn a_full_target_stops_the_copy_at_any_write_without_a_hang() {
    let mut rounds = 0;
    for workers in [1, 2, 4, 8, 16] {
        for full_after in [0, 1, 2, 3, 5, 8, 13, 21, 34] {
            for slow in [false, true] {
                let size = 96 * MIB;
                let err = copy_within_deadline(
                    source(size, None),
                    target(size, full_after, slow),
                    workers,
                    None,
                )
                .expect_err("the copy must fail");
                assert_eq!(err.kind(), ErrorKind::NoSpace, "{err}");
                assert_eq!(
                    err.to_string(),
                    "Could not write 'target': No space left on device"
                );
                rounds += 1;
            }
        }
    }
    assert_eq!(rounds, 90);
}

#[test]
fn a_failing_read_stops_the_copy_without_a_hang() {
    for workers in [1, 2, 8] {
        for fail_read in [0, 1, 4, 9, 20] {
            let size = 64 * MIB;
            let err = copy_within_deadline(
                source(size, Some(fail_read)),
                target(size, u64::MAX, true),
                workers,
                None,
            )
            .expect_err("the copy must fail");
            assert_eq!(err.kind(), ErrorKind::Io, "{err}");
        }
    }
}

#[test]
fn a_progress_hook_error_cancels_the_copy() {
    for workers in [1, 2, 8] {
        for after in [0, 1, 3, 7] {
            let size = 64 * MIB;
            let err = copy_within_deadline(
                source(size, None),
                target(size, u64::MAX, true),
                workers,
                Some(after),
            )
            .expect_err("the copy must stop");
            assert_eq!(err.kind(), ErrorKind::Cancelled, "{err}");
        }
    }
}
