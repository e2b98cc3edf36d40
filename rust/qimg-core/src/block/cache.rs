//! QEMU's cache modes (`-t` / `-T`): whether I/O bypasses the page cache
//! (O_DIRECT), whether each write waits for the disk (O_DSYNC), and whether
//! flushes reach the disk at all.

/// One of QEMU's cache modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// The page cache, flushed when asked (QEMU's default).
    #[default]
    Writeback,
    /// The page cache, never flushed (qemu-img convert's default target).
    Unsafe,
    /// O_DIRECT: around the page cache, flushed when asked.
    None,
    /// O_DIRECT and O_DSYNC: every write on the disk when it returns.
    DirectSync,
    /// O_DSYNC through the page cache.
    WriteThrough,
}

/// Whose cache mode a name is: the target's (`-t`) or the sources' (`-T`).
/// qemu-img's refusal names which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheRole {
    Target,
    Source,
}

impl CacheMode {
    /// The names QEMU takes; `off` is also taken, as an alias of `none`.
    pub const NAMES: [&'static str; 5] =
        ["writeback", "unsafe", "none", "directsync", "writethrough"];

    /// The mode named `name`, or qemu-img's refusal of it.
    pub fn parse(name: &str, role: CacheRole) -> crate::Result<CacheMode> {
        Ok(match name {
            "writeback" => CacheMode::Writeback,
            "unsafe" => CacheMode::Unsafe,
            "none" | "off" => CacheMode::None,
            "directsync" => CacheMode::DirectSync,
            "writethrough" => CacheMode::WriteThrough,
            _ => {
                let whose = match role {
                    CacheRole::Target => "",
                    CacheRole::Source => "source ",
                };
                return Err(crate::Error::usage(format!(
                    "Invalid {whose}cache option: {name}"
                )));
            }
        })
    }

    /// The mode's name as QEMU prints it.
    pub fn name(self) -> &'static str {
        match self {
            CacheMode::Writeback => "writeback",
            CacheMode::Unsafe => "unsafe",
            CacheMode::None => "none",
            CacheMode::DirectSync => "directsync",
            CacheMode::WriteThrough => "writethrough",
        }
    }

    /// I/O goes around the page cache (O_DIRECT): requests must be aligned.
    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::DirectSync)
    }

    /// Every write waits for the disk (O_DSYNC).
    pub fn dsync(self) -> bool {
        matches!(self, CacheMode::DirectSync | CacheMode::WriteThrough)
    }

    /// Flushes reach the disk (all but `unsafe`).
    pub fn flushes(self) -> bool {
        self != CacheMode::Unsafe
    }

    /// The flags `open(2)` takes for this mode.
    pub fn open_flags(self) -> libc::c_int {
        let mut flags = 0;
        if self.direct() {
            flags |= libc::O_DIRECT;
        }
        if self.dsync() {
            flags |= libc::O_DSYNC;
        }
        flags
    }
}
