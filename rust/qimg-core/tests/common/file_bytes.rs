//! Reading and patching raw bytes of image files, for tests that damage
//! images on purpose.

use std::os::unix::fs::FileExt;
use std::path::Path;

/// The big-endian u64 at `at`; bytes past the end of the file read as zeroes.
pub fn read_be64(path: &Path, at: u64) -> u64 {
    let f = std::fs::File::open(path).expect("open");
    let mut b = [0u8; 8];
    let mut done = 0;
    while done < 8 {
        match f.read_at(&mut b[done..], at + done as u64).expect("read") {
            0 => break,
            n => done += n,
        }
    }
    u64::from_be_bytes(b)
}

/// Overwrites the bytes at `at` with `bytes`.
pub fn patch(path: &Path, at: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for patching");
    f.write_all_at(bytes, at).expect("patch");
}
