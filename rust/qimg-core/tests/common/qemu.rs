//! Running QEMU's qemu-img and qemu-io, and a scratch image to run them on,
//! for the tests that compare qimg with QEMU (check.rs, repair.rs).
//!
//! Include it with `#[path = "common/qemu.rs"] mod qemu;`. Only what every
//! including crate uses lives here: a test crate is a binary, so an item one
//! crate leaves unused would be dead code there. A helper that one test file
//! alone needs stays in that file, as a further `impl Scratch` block when it
//! is a method.

#[path = "file_bytes.rs"]
mod file_bytes;

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tempfile::TempDir;

/// The mask of a host offset in an L1, L2 or refcount table entry.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Runs `cmd` to completion, whatever its exit status.
pub fn output(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

/// Runs `cmd`, which must succeed.
pub fn run(cmd: &str, args: &[&str]) {
    let out = output(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs qemu-img, which must succeed.
pub fn qemu_img(args: &[&str]) {
    run("qemu-img", args);
}

/// Runs qemu-io commands on a qcow2 image; they must succeed.
pub fn qemu_io(path: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(path.to_str().expect("utf-8 path"));
    run("qemu-io", &args);
}

/// A scratch directory with one image in it, `t.qcow2`.
pub struct Scratch {
    /// Held only so that the directory lives as long as the image; files
    /// beside the image are named from `path`.
    _dir: TempDir,
    pub path: PathBuf,
}

impl Scratch {
    pub fn new() -> Scratch {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.qcow2");
        Scratch { _dir: dir, path }
    }

    pub fn p(&self) -> &str {
        self.path.to_str().expect("utf-8 path")
    }

    /// `qemu-img create -f qcow2 [-o opts] t.qcow2 size`.
    pub fn create(&self, opts: &str, size: &str) {
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([self.p(), size]);
        qemu_img(&args);
    }

    /// Runs qemu-io commands on the image.
    pub fn io(&self, cmds: &[&str]) {
        qemu_io(&self.path, cmds);
    }

    /// The big-endian u64 at `at`; bytes past the end of the file read as zeroes.
    pub fn read_be64(&self, at: u64) -> u64 {
        file_bytes::read_be64(&self.path, at)
    }

    /// Overwrites the bytes at `at`.
    pub fn patch(&self, at: u64, bytes: &[u8]) {
        file_bytes::patch(&self.path, at, bytes);
    }

    pub fn patch_be64(&self, at: u64, v: u64) {
        self.patch(at, &v.to_be_bytes());
    }

    pub fn len(&self) -> u64 {
        std::fs::metadata(&self.path).expect("stat").len()
    }

    pub fn set_len(&self, len: u64) {
        let f = OpenOptions::new()
            .write(true)
            .open(&self.path)
            .expect("open");
        f.set_len(len).expect("truncate");
    }

    pub fn l1_offset(&self) -> u64 {
        self.read_be64(40)
    }

    pub fn reftable_offset(&self) -> u64 {
        self.read_be64(48)
    }

    /// Offset of the first L2 table (L1 entry 0 must be allocated).
    pub fn l2_offset(&self) -> u64 {
        let l2 = self.read_be64(self.l1_offset()) & OFFSET_MASK;
        assert_ne!(l2, 0, "L1 entry 0 is not allocated");
        l2
    }

    /// Offset of the first refcount block.
    pub fn refblock_offset(&self) -> u64 {
        self.read_be64(self.reftable_offset()) & OFFSET_MASK
    }

    /// Sets the stored refcount of `cluster` (in the first refcount block,
    /// for 16-bit refcounts).
    pub fn set_refcount(&self, cluster: u64, value: u16) {
        self.patch(self.refblock_offset() + 2 * cluster, &value.to_be_bytes());
    }
}
