//! The one error type of the core. Messages are user facing: they say what
//! was wrong, in QEMU's wording where qemu-img users already know it.

use std::io;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A value given by the user (an option, a size) is not acceptable.
    #[error("{0}")]
    InvalidArgument(String),
    /// The requested image does not fit the format's limits.
    #[error("{0}")]
    TooLarge(String),
    /// An existing image (or backing file) is not what it claims to be.
    #[error("{0}")]
    InvalidImage(String),
    /// The operating system refused an I/O operation.
    #[error("{context}: {}", strerror(.source))]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
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
        Error::io(format!("Could not open '{}'", path.display()), source)
    }
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
