//! qimg-core: the qcow2 and raw disk image engine behind qimg.
//!
//! Pure Rust with no Python in sight, so every piece can be exercised with
//! plain `cargo test`. The Python binding (`qimg-py`) is a thin layer on top.

pub mod block;
pub mod commit;
pub mod compare;
pub mod convert;
pub mod error;
pub mod formats;
pub mod host_file;
pub mod measure;
pub mod prealloc;
pub mod progress;
pub mod qcow2;
pub mod quorum;
pub mod raw_create;
pub mod rebase;

pub use error::{Error, ErrorKind, Result};
pub use prealloc::Prealloc;
