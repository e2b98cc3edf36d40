//! The qcow2 format: on-disk types, layout math, header encoding and creation.

pub mod allocator;
pub mod amend;
pub mod bitmap_ops;
pub mod bitmaps;
pub mod bytes;
pub mod check;
pub mod compress;
pub mod create;
pub mod entries;
pub mod format;
pub mod header;
pub mod l2cache;
pub mod layout;
pub mod reader;
pub mod refcount;
pub mod refcount_reader;
pub mod resize;
pub mod snapshot;
pub mod snapshot_ops;
pub mod types;
pub mod writer;

pub use create::{create, BackingSpec, CreateSpec};

pub use types::{ClusterSize, Compat, CompressionType, RefcountOrder};
