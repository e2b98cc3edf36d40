//! QEMU's image locks, so that qimg, qemu-img, qemu-io, qemu-nbd and
//! running VMs exclude each other exactly as QEMU processes do.
//!
//! QEMU's file driver marks what an open file uses and what it will not
//! share with open-file-description (OFD) read locks on single bytes:
//! byte 100 + bit while it holds a permission, byte 200 + bit while it
//! refuses to share one. An open conflicts when another holder sits on
//! 200 + bit of a permission it wants, or on 100 + bit of one it refuses
//! to share. The locks belong to the open file, so they go with it.

use crate::error::{Error, Result};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

const PERM_BASE: libc::off_t = 100;
const SHARED_BASE: libc::off_t = 200;

/// A set of QEMU's block permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Perms(u8);

impl Perms {
    pub const NONE: Perms = Perms(0);
    pub const CONSISTENT_READ: Perms = Perms(1);
    pub const WRITE: Perms = Perms(1 << 1);
    pub const WRITE_UNCHANGED: Perms = Perms(1 << 2);
    pub const RESIZE: Perms = Perms(1 << 3);
    /// QEMU's names, by bit, as its messages show them.
    const NAMES: [&'static str; 4] = ["consistent read", "write", "write unchanged", "resize"];

    pub const fn union(self, other: Perms) -> Perms {
        Perms(self.0 | other.0)
    }

    pub const fn contains(self, other: Perms) -> bool {
        self.0 & other.0 == other.0
    }

    fn has_bit(self, bit: usize) -> bool {
        self.0 & (1 << bit) != 0
    }
}

/// What an open holds and what it refuses to share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LockRequest {
    pub held: Perms,
    pub unshared: Perms,
}

/// Why an image is opened: it decides the permissions, as the same
/// qemu-img command decides them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Purpose {
    /// Metadata only (`info`): no consistent-read permission.
    Inspect,
    /// Reading guest data (map, check, compare, measure, io -r).
    #[default]
    Read,
    /// The source of a copy (`convert`): nobody may write it meanwhile,
    /// whatever its format.
    CopySource,
    /// Changing the virtual size (`resize`): the resize permission too.
    Resize,
    /// `check -r`: opened to be read, locked as the qcow2 writer that the
    /// repair then becomes.
    Repair,
}

impl Purpose {
    pub fn from_name(name: &str) -> Option<Purpose> {
        Some(match name {
            "inspect" => Purpose::Inspect,
            "read" => Purpose::Read,
            "copy-source" => Purpose::CopySource,
            "resize" => Purpose::Resize,
            "repair" => Purpose::Repair,
            _ => return None,
        })
    }
}

/// How an image is opened with respect to other processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sharing {
    pub purpose: Purpose,
    /// qemu-img's `-U`: read-only opens that take nothing and share all.
    pub force_share: bool,
}

/// The request QEMU makes for an image layer in a `qcow2` or `raw`
/// (`qcow2 == false`) node; `top` is the image named on the command line,
/// the others are its backing files (always read-only).
pub fn request(sharing: Sharing, qcow2: bool, writable: bool, top: bool) -> LockRequest {
    let mut held = Perms::NONE;
    if sharing.purpose != Purpose::Inspect {
        held = held.union(Perms::CONSISTENT_READ);
    }
    let writing = (writable || sharing.purpose == Purpose::Repair) && top;
    if writing {
        held = held.union(Perms::WRITE);
        // qcow2 grows its file as it allocates.
        if qcow2 || sharing.purpose == Purpose::Resize {
            held = held.union(Perms::RESIZE);
        }
    }
    if sharing.force_share && !writing {
        // -U: QEMU keeps the consistent-read byte of a reader and no more.
        return LockRequest {
            held: if sharing.purpose == Purpose::Inspect {
                Perms::NONE
            } else {
                Perms::CONSISTENT_READ
            },
            unshared: Perms::NONE,
        };
    }
    let keep_out = Perms::WRITE.union(Perms::RESIZE);
    let unshared = if qcow2 || (top && sharing.purpose == Purpose::CopySource) {
        keep_out
    } else {
        Perms::NONE
    };
    if sharing.purpose == Purpose::Inspect && !qcow2 {
        // qemu-img info takes no lock at all on a raw image.
        return LockRequest::default();
    }
    LockRequest { held, unshared }
}

/// The lock bytes of `file` as `want` says (after `had`), checked against
/// every other holder. On a conflict the bytes go back to `had` and the
/// error is QEMU's. File systems without OFD locks take no locks, as QEMU's
/// `locking=auto` does.
pub fn apply(file: &File, name: &str, had: LockRequest, want: LockRequest) -> Result<()> {
    match set_bytes(file, want) {
        Ok(()) => {}
        Err(e) if unsupported(&e) => return Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
            let _ = set_bytes(file, had);
            return Err(busy(name, want.held, false));
        }
        Err(e) => return Err(Error::io(format!("Could not lock '{name}'"), e)),
    }
    let conflict = find_conflict(file, want);
    match conflict {
        Ok(None) => Ok(()),
        Ok(Some((perms, shared))) => {
            let _ = set_bytes(file, had);
            Err(busy(name, perms, shared))
        }
        Err(e) if unsupported(&e) => Ok(()),
        Err(e) => {
            let _ = set_bytes(file, had);
            Err(Error::io(format!("Could not lock '{name}'"), e))
        }
    }
}

/// Drops every lock byte `file`'s open file description holds. Closing the
/// file does that too, but only once no process holds a copy of it: a child
/// forked by another thread holds one until it executes its program, and
/// the locks would outlive the close meanwhile.
pub fn release(file: &File) {
    let _ = set_bytes(file, LockRequest::default());
}

/// QEMU's message for a refused lock; `shared`: a permission we refuse to
/// share is in use elsewhere.
fn busy(name: &str, perms: Perms, shared: bool) -> Error {
    let what = (0..Perms::NAMES.len())
        .find(|&b| perms.has_bit(b))
        .map_or("write", |b| Perms::NAMES[b]);
    let kind = if shared { "shared " } else { "" };
    Error::Busy(format!(
        "Failed to get {kind}\"{what}\" lock\nIs another process using the image [{name}]?"
    ))
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOLCK | libc::EOPNOTSUPP | libc::ENOSYS)
    )
}

fn set_bytes(file: &File, req: LockRequest) -> io::Result<()> {
    for bit in 0..Perms::NAMES.len() {
        let at = bit as libc::off_t;
        set_byte(file, PERM_BASE + at, req.held.has_bit(bit))?;
        set_byte(file, SHARED_BASE + at, req.unshared.has_bit(bit))?;
    }
    Ok(())
}

/// The first permission someone else blocks: (it, whether the conflict is
/// about a permission we refuse to share).
fn find_conflict(file: &File, req: LockRequest) -> io::Result<Option<(Perms, bool)>> {
    for bit in 0..Perms::NAMES.len() {
        if req.held.has_bit(bit) && held_elsewhere(file, SHARED_BASE + bit as libc::off_t)? {
            return Ok(Some((Perms(1 << bit), false)));
        }
    }
    for bit in 0..Perms::NAMES.len() {
        if req.unshared.has_bit(bit) && held_elsewhere(file, PERM_BASE + bit as libc::off_t)? {
            return Ok(Some((Perms(1 << bit), true)));
        }
    }
    Ok(None)
}

fn flock(kind: libc::c_int, byte: libc::off_t) -> libc::flock {
    // SAFETY: `flock` is plain data; all zeroes is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

fn set_byte(file: &File, byte: libc::off_t, locked: bool) -> io::Result<()> {
    let fl = flock(if locked { libc::F_RDLCK } else { libc::F_UNLCK }, byte);
    // SAFETY: F_OFD_SETLK only reads the `flock` we pass, which outlives the call.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether another open file holds a lock on `byte`.
fn held_elsewhere(file: &File, byte: libc::off_t) -> io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK, byte);
    // SAFETY: F_OFD_GETLK reads and fills the `flock` we pass, which outlives the call.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(req: LockRequest) -> Vec<i64> {
        let mut out = Vec::new();
        for bit in 0..4 {
            if req.held.has_bit(bit) {
                out.push(100 + bit as i64);
            }
        }
        for bit in 0..4 {
            if req.unshared.has_bit(bit) {
                out.push(200 + bit as i64);
            }
        }
        out
    }

    fn sharing(purpose: Purpose) -> Sharing {
        Sharing {
            purpose,
            force_share: false,
        }
    }

    /// The bytes qemu-img 10 locks, as strace shows them.
    #[test]
    fn requests_match_what_qemu_img_locks() {
        let read = sharing(Purpose::Read);
        assert_eq!(bytes(request(read, true, false, true)), [100, 201, 203]);
        assert_eq!(bytes(request(read, false, false, true)), [100]);
        assert_eq!(
            bytes(request(read, true, true, true)),
            [100, 101, 103, 201, 203]
        );
        assert_eq!(bytes(request(read, false, true, true)), [100, 101]);
        let resize = sharing(Purpose::Resize);
        assert_eq!(bytes(request(resize, false, true, true)), [100, 101, 103]);
        let copy = sharing(Purpose::CopySource);
        assert_eq!(bytes(request(copy, false, false, true)), [100, 201, 203]);
        let inspect = sharing(Purpose::Inspect);
        assert_eq!(bytes(request(inspect, true, false, true)), [201, 203]);
        assert!(bytes(request(inspect, false, false, true)).is_empty());
        // Backing files: read, and qcow2 keeps writers out.
        assert_eq!(bytes(request(read, false, true, false)), [100]);
        assert_eq!(bytes(request(read, true, true, false)), [100, 201, 203]);
        // -U
        let forced = Sharing {
            purpose: Purpose::CopySource,
            force_share: true,
        };
        assert_eq!(bytes(request(forced, true, false, true)), [100]);
    }

    #[test]
    fn a_second_open_file_is_refused_what_the_first_does_not_share() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("img");
        std::fs::write(&path, b"").expect("create");
        let a = File::open(&path).expect("open");
        let b = File::open(&path).expect("open");
        let writer = request(sharing(Purpose::Read), true, true, true);
        apply(&a, "img", LockRequest::default(), writer).expect("first writer");
        let reader = request(sharing(Purpose::Read), true, false, true);
        let err = apply(&b, "img", LockRequest::default(), reader).expect_err("conflict");
        assert_eq!(
            err.to_string(),
            "Failed to get shared \"write\" lock\nIs another process using the image [img]?"
        );
        let err = apply(&b, "img", LockRequest::default(), writer).expect_err("conflict");
        assert!(err.to_string().starts_with("Failed to get \"write\" lock"));
        // The refused open holds nothing afterwards; -U gets in.
        let forced = Sharing {
            purpose: Purpose::Read,
            force_share: true,
        };
        apply(
            &b,
            "img",
            LockRequest::default(),
            request(forced, true, false, true),
        )
        .expect("force share");
        drop(a);
        apply(&b, "img", LockRequest::default(), writer).expect("writer after close");
    }
}
