//! How long work reports how far it got, and how its caller stops it.

use crate::error::Result;

/// `progress(done, total)`, in bytes. Long work calls it between pieces
/// (and, where it may wait on a slow source, at least every 100 ms); an
/// error it returns stops the work, which unwinds as after a failure and
/// returns that error. This is how signals and failing callbacks cancel.
pub type Progress<'a> = &'a (dyn Fn(u64, u64) -> Result<()> + Sync);

/// A `Progress` that never stops anything.
pub fn ignore(_done: u64, _total: u64) -> Result<()> {
    Ok(())
}
