//! The one error type of the core. Messages are user facing: they say what
//! was wrong, in QEMU's wording where qemu-img users already know it.

use std::io;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed as a whole: a value outside what the
    /// option takes, or options that exclude each other (qemu-img's usage
    /// errors).
    #[error("{0}")]
    Usage(String),
    /// A value given by the user (an option, a size) is not acceptable.
    #[error("{0}")]
    InvalidArgument(String),
    /// The requested image does not fit the format's limits.
    #[error("{0}")]
    TooLarge(String),
    /// An existing image (or backing file) is not what it claims to be.
    #[error("{0}")]
    InvalidImage(String),
    /// Another process holds the image with permissions this open needs
    /// (QEMU's image locks).
    #[error("{0}")]
    Busy(String),
    /// The request is valid but qimg (or this kind of node) cannot do it.
    #[error("{0}")]
    Unsupported(String),
    /// The caller stopped the work: a signal, or a callback that failed.
    #[error("{0}")]
    Cancelled(String),
    /// The operating system refused an I/O operation.
    #[error("{context}: {}", strerror(.source))]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// What kind of failure an error is, for callers that react differently
/// to each (the Python binding maps these to built-in exception classes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Usage,
    InvalidArgument,
    TooLarge,
    InvalidImage,
    NotFound,
    Permission,
    IsADirectory,
    ReadOnly,
    Busy,
    NoSpace,
    Unsupported,
    Cancelled,
    /// Any other failure of the operating system (EIO, ...).
    Io,
}

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    pub fn usage(msg: impl Into<String>) -> Self {
        Error::Usage(msg.into())
    }

    /// An I/O error about `path`, worded like QEMU's: `Could not open 'x': No such file or directory`.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The same error with `prefix: ` in front of its message (same kind, same errno).
    pub fn context(self, prefix: &str) -> Self {
        match self {
            Error::Usage(m) => Error::Usage(format!("{prefix}: {m}")),
            Error::Busy(m) => Error::Busy(format!("{prefix}: {m}")),
            Error::Unsupported(m) => Error::Unsupported(format!("{prefix}: {m}")),
            Error::Cancelled(m) => Error::Cancelled(m),
            Error::InvalidArgument(m) => Error::InvalidArgument(format!("{prefix}: {m}")),
            Error::TooLarge(m) => Error::TooLarge(format!("{prefix}: {m}")),
            Error::InvalidImage(m) => Error::InvalidImage(format!("{prefix}: {m}")),
            Error::Io { context, source } => Error::Io {
                context: format!("{prefix}: {context}"),
                source,
            },
        }
    }

    pub fn open(path: &Path, source: io::Error) -> Self {
        let shown = path.display().to_string();
        Error::io(format!("Could not open '{}'", printable(&shown)), source)
    }

    /// The work was stopped by its caller.
    pub fn cancelled() -> Self {
        Error::Cancelled("Operation cancelled".into())
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Usage(_) => ErrorKind::Usage,
            Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Error::TooLarge(_) => ErrorKind::TooLarge,
            Error::InvalidImage(_) => ErrorKind::InvalidImage,
            Error::Busy(_) => ErrorKind::Busy,
            Error::Unsupported(_) => ErrorKind::Unsupported,
            Error::Cancelled(_) => ErrorKind::Cancelled,
            Error::Io { source, .. } => match source.raw_os_error() {
                Some(libc::ENOENT) => ErrorKind::NotFound,
                Some(libc::EACCES | libc::EPERM) => ErrorKind::Permission,
                Some(libc::EISDIR) => ErrorKind::IsADirectory,
                Some(libc::EROFS) => ErrorKind::ReadOnly,
                Some(libc::ENOSPC | libc::EDQUOT) => ErrorKind::NoSpace,
                Some(libc::ENOTSUP | libc::ENOSYS) => ErrorKind::Unsupported,
                _ => ErrorKind::Io,
            },
        }
    }

    /// The errno behind the error; EIO for errors that carry none.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::Busy(_) => libc::EAGAIN,
            Error::Cancelled(_) => libc::ECANCELED,
            _ => libc::EIO,
        }
    }

    /// The system's wording for I/O errors (as QEMU's events and check
    /// lines have it); the whole message otherwise.
    pub fn short_text(&self) -> String {
        match self {
            Error::Io { source, .. } => strerror(source),
            other => other.to_string(),
        }
    }

    /// The same error again (errors hold an `io::Error`, which cannot be cloned).
    pub fn duplicate(&self) -> Error {
        match self {
            Error::Usage(m) => Error::Usage(m.clone()),
            Error::InvalidArgument(m) => Error::InvalidArgument(m.clone()),
            Error::TooLarge(m) => Error::TooLarge(m.clone()),
            Error::InvalidImage(m) => Error::InvalidImage(m.clone()),
            Error::Busy(m) => Error::Busy(m.clone()),
            Error::Unsupported(m) => Error::Unsupported(m.clone()),
            Error::Cancelled(m) => Error::Cancelled(m.clone()),
            Error::Io { context, source } => Error::io(
                context.clone(),
                match source.raw_os_error() {
                    Some(errno) => io::Error::from_raw_os_error(errno),
                    None => io::Error::new(source.kind(), source.to_string()),
                },
            ),
        }
    }
}

/// `text` with its control characters escaped (`\n` for a newline), for
/// names that come from an image header or a user and are quoted in a
/// message: an error stays one line whatever bytes a name holds.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Shows an `io::Error` the way strerror does: "No such file or directory",
/// without Rust's " (os error 2)" suffix, so messages match qemu-img's.
pub fn strerror(err: &io::Error) -> String {
    let text = err.to_string();
    match text.rfind(" (os error ") {
        Some(cut) => text[..cut].to_string(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_control_characters_stay_on_one_line() {
        assert_eq!(printable("disk.qcow2"), "disk.qcow2");
        assert_eq!(printable("a\nb\tc"), "a\\nb\\tc");
        assert_eq!(printable("dïsk"), "dïsk");
        let err = Error::open(Path::new("/tmp/x\ny"), io::Error::from_raw_os_error(2));
        assert_eq!(
            err.to_string(),
            "Could not open '/tmp/x\\ny': No such file or directory"
        );
    }
}
