//! The raw format: the image file is the guest disk, byte for byte.

use crate::error::{Error, Result};
use crate::host_file::{fallocate, write_zeroes, FileOptions, NewFile};
use crate::prealloc::Prealloc;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// QEMU writes the first block of a new raw image (so that O_DIRECT users can
/// probe the alignment); we do the same so the images map identically.
const FIRST_BLOCK: u64 = 4096;

/// The length of a new raw image of `size` bytes (whole 512-byte sectors),
/// or the refusal of the request: everything `create` checks before it
/// touches a file.
pub fn plan(size: u64, prealloc: Prealloc) -> Result<u64> {
    if prealloc == Prealloc::Metadata {
        return Err(Prealloc::Metadata.unsupported());
    }
    if size > i64::MAX as u64 {
        return Err(Error::invalid("Image size must be less than 8 EiB!"));
    }
    Ok(size.div_ceil(512) * 512)
}

/// Creates a raw image of `size` bytes, rounded up to whole 512-byte sectors.
pub fn create(path: &Path, size: u64, prealloc: Prealloc, file_opts: FileOptions) -> Result<()> {
    let size = plan(size, prealloc)?;
    let new = NewFile::create(path, file_opts)?;
    if new.is_device() {
        // A device is the image already: its size is checked, and only its
        // first sector is zeroed (as qemu-img does, so that an old format
        // header there is not probed again); the rest stays as it was.
        new.set_len(size)?;
        return match prealloc {
            Prealloc::Off => {
                new.file
                    .write_all_at(&[0u8; 512], 0)
                    .map_err(|e| new.io_error("Could not write to", e))?;
                new.finish()
            }
            other => Err(Error::Unsupported(format!(
                "Preallocation mode '{other}' is not supported on block device '{}'",
                path.display()
            ))),
        };
    }
    match prealloc {
        Prealloc::Off | Prealloc::Metadata => new.set_len(size)?,
        Prealloc::Falloc => fallocate(&new.file, 0, size)
            .map_err(|e| new.io_error("Could not preallocate new data for", e))?,
        Prealloc::Full => {
            new.set_len(size)?;
            write_zeroes(&new.file, new.path(), 0, size)
                .map_err(|e| new.io_error("Could not write zeros for preallocation to", e))?;
        }
    }
    if prealloc != Prealloc::Full && size > 0 {
        let first = vec![0u8; FIRST_BLOCK.min(size) as usize];
        new.file
            .write_all_at(&first, 0)
            .map_err(|e| new.io_error("Could not write to", e))?;
    }
    new.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn raw_modes_give_sparse_or_allocated_files() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        for (mode, allocated) in [
            (Prealloc::Off, false),
            (Prealloc::Falloc, true),
            (Prealloc::Full, true),
        ] {
            let path = dir.path().join(mode.name());
            create(&path, (8 << 20) + 1, mode, FileOptions::default())?;
            let meta = std::fs::metadata(&path).map_err(|e| Error::io("stat", e))?;
            assert_eq!(meta.len(), (8 << 20) + 512);
            assert_eq!(meta.blocks() * 512 >= 8 << 20, allocated, "{mode}");
        }
        assert!(create(
            &dir.path().join("m"),
            1024,
            Prealloc::Metadata,
            FileOptions::default()
        )
        .is_err());
        assert!(!dir.path().join("m").exists());
        Ok(())
    }
}
