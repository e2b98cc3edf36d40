//! Creating qcow2 images: validation, then one sequential stream of metadata
//! from offset 0, then the data region as the preallocation mode asks.

use super::entries::{L1Entry, L2Entry};
use super::header::Header;
use super::layout::{l2_entry_bytes, CreateLayout};
use super::refcount::fill_leading_ones;
use super::types::{ClusterSize, Compat, CompressionType, RefcountOrder};
use crate::error::{Error, Result};
use crate::host_file::{fallocate, write_zeroes, FileOptions, NewFile};
use crate::prealloc::Prealloc;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The backing file recorded in a new image's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingSpec {
    /// The name as the user gave it (relative names stay relative).
    pub file: String,
    /// Its format, recorded in a header extension.
    pub format: Option<String>,
}

/// Everything needed to create a qcow2 image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateSpec {
    /// Virtual size in bytes; rounded up to whole 512-byte sectors.
    pub size: u64,
    pub cluster_size: ClusterSize,
    pub compat: Compat,
    pub refcount_order: RefcountOrder,
    pub lazy_refcounts: bool,
    pub extended_l2: bool,
    pub compression: CompressionType,
    pub prealloc: Prealloc,
    pub backing: Option<BackingSpec>,
}

const NEEDS_V3: &str = "compatibility level 1.1 and above (use version=v3 or greater)";

impl CreateSpec {
    /// A spec with QEMU's defaults for everything but the size.
    pub fn new(size: u64) -> Self {
        CreateSpec {
            size,
            cluster_size: ClusterSize::DEFAULT,
            compat: Compat::V3,
            refcount_order: RefcountOrder::DEFAULT,
            lazy_refcounts: false,
            extended_l2: false,
            compression: CompressionType::Zlib,
            prealloc: Prealloc::Off,
            backing: None,
        }
    }

    /// The virtual size actually used: whole sectors, like every QEMU format.
    pub fn virtual_size(&self) -> u64 {
        self.size.div_ceil(512).saturating_mul(512)
    }

    /// Checks the combination of options, with QEMU's messages.
    pub fn validate(&self) -> Result<()> {
        if self.compat == Compat::V2 {
            if self.refcount_order != RefcountOrder::DEFAULT {
                return Err(Error::invalid(
                    "Different refcount widths than 16 bits require compatibility level 1.1 \
                     or above (use version=v3 or greater)",
                ));
            }
            if self.lazy_refcounts {
                return Err(Error::invalid(format!(
                    "Lazy refcounts only supported with {NEEDS_V3}"
                )));
            }
            if self.compression != CompressionType::Zlib {
                return Err(Error::invalid(format!(
                    "Non-zlib compression type is only supported with {NEEDS_V3}"
                )));
            }
            if self.extended_l2 {
                return Err(Error::invalid(format!(
                    "Extended L2 entries are only supported with {NEEDS_V3}"
                )));
            }
        }
        if self.extended_l2 && self.cluster_size.bytes() < 16384 {
            return Err(Error::invalid(format!(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes \
                 (cluster_size is {})",
                self.cluster_size.bytes()
            )));
        }
        if self.backing.is_some() && self.prealloc != Prealloc::Off && !self.extended_l2 {
            return Err(Error::invalid(
                "Backing file and preallocation can only be used at the same time if extended_l2 is on",
            ));
        }
        if self.size > i64::MAX as u64 {
            return Err(Error::invalid(
                "Image size must be less than 8 EiB!".to_string(),
            ));
        }
        Ok(())
    }

    /// Validates and places everything, without touching any file.
    pub fn plan(&self) -> Result<CreateLayout> {
        self.validate()?;
        CreateLayout::plan(
            self.virtual_size(),
            self.cluster_size,
            self.refcount_order,
            self.extended_l2,
            self.prealloc,
        )
        .map_err(|e| match e {
            Error::TooLarge(_) => Error::TooLarge(
                "The image size is too large for file format 'qcow2' (try using a larger cluster size)"
                    .into(),
            ),
            other => other,
        })
    }

    fn header(&self, layout: &CreateLayout) -> Header {
        let mut header = Header {
            compat: self.compat,
            cluster_size: self.cluster_size,
            virtual_size: layout.virtual_size,
            l1_entries: layout.l1_entries,
            l1_table_offset: layout.l1_table_offset(),
            reftable_offset: layout.reftable.offset,
            reftable_clusters: layout.reftable.clusters,
            refcount_order: self.refcount_order,
            compression: self.compression,
            backing_file: self.backing.as_ref().map(|b| b.file.clone()),
            backing_format: self.backing.as_ref().and_then(|b| b.format.clone()),
            ..Header::default()
        };
        header.declare_features(self.lazy_refcounts, self.extended_l2);
        header
    }
}

/// Creates the image at `path`. Everything that can be refused is refused
/// before the file is opened, so invalid options never touch the user's files.
pub fn create(path: &Path, spec: &CreateSpec, file_opts: FileOptions) -> Result<CreateLayout> {
    let layout = spec.plan()?;
    let header = spec.header(&layout).encode()?;
    let new = NewFile::create(path, file_opts)?;
    write_metadata(&new.file, &layout, &header, spec.refcount_order)
        .map_err(|e| new.io_error("Could not write metadata to", e))?;
    let data_len = layout.data.bytes(layout.cluster_size);
    match spec.prealloc {
        Prealloc::Off => {}
        Prealloc::Metadata => new.set_len(layout.file_len)?,
        Prealloc::Falloc => fallocate(&new.file, layout.data.offset, data_len)
            .map_err(|e| new.io_error("Could not preallocate data for", e))?,
        Prealloc::Full => {
            new.set_len(layout.file_len)?;
            write_zeroes(&new.file, new.path(), layout.data.offset, data_len)
                .map_err(|e| new.io_error("Could not write zeros for preallocation to", e))?;
        }
    }
    new.finish()?;
    Ok(layout)
}

/// Streams header, refcount table, refcount blocks, L1 and L2 tables, in file
/// order, through one large buffer.
fn write_metadata(
    file: &File,
    layout: &CreateLayout,
    header: &[u8],
    order: RefcountOrder,
) -> io::Result<()> {
    let cs = layout.cluster_size;
    let cb = cs.bytes();
    let mut out = SeqWriter::new(file, layout.file_len);
    out.put(header)?;

    let refblock_base = layout.refblocks.offset;
    out.put_u64s(layout.reftable.clusters * cb / 8, |i| {
        if i < layout.refblocks.clusters {
            refblock_base + i * cb
        } else {
            0
        }
    })?;

    let per_block = order.entries_per_block(cs);
    let mut full = vec![0u8; cb as usize];
    fill_leading_ones(&mut full, order, per_block as usize);
    let mut partial = vec![0u8; cb as usize];
    for b in 0..layout.refblocks.clusters {
        let ones = layout
            .used_clusters
            .saturating_sub(b * per_block)
            .min(per_block);
        if ones == per_block {
            out.put(&full)?;
        } else {
            fill_leading_ones(&mut partial, order, ones as usize);
            out.put(&partial)?;
        }
    }

    let l2_base = layout.l2.offset;
    let l2_tables = layout.l2.clusters;
    if l2_tables == 0 {
        // Nothing preallocated: the L1 is all zeroes, written up to its last entry.
        out.put_zeros(layout.l1_entries * 8)?;
    } else {
        out.put_u64s(layout.l1.clusters * cb / 8, |i| {
            if i < l2_tables {
                L1Entry::new(l2_base + i * cb, true).raw()
            } else {
                0
            }
        })?;
        let data_clusters = layout.data.clusters;
        let data_base = layout.data.offset;
        // An L2 entry maps guest cluster g to data_base + g * cluster size.
        let map = |g: u64| {
            if g < data_clusters {
                L2Entry::new(data_base + g * cb, true).raw()
            } else {
                0
            }
        };
        if l2_entry_bytes(layout.extended_l2) == 16 {
            // Extended entries pair the mapping with a subcluster bitmap; it
            // stays zero, as QEMU leaves it for preallocation, so unwritten
            // subclusters still read from the backing file (or as zeroes).
            out.put_u64s(
                l2_tables * cb / 8,
                |i| if i % 2 == 0 { map(i / 2) } else { 0 },
            )?;
        } else {
            out.put_u64s(l2_tables * cb / 8, map)?;
        }
    }
    out.finish()
}

/// Size of the metadata write buffer: large sequential writes, bounded memory.
const WRITE_CHUNK: usize = 8 << 20;

/// Accumulates sequential output and writes it in large chunks.
struct SeqWriter<'f> {
    file: &'f File,
    buf: Vec<u8>,
    used: usize,
    pos: u64,
}

impl<'f> SeqWriter<'f> {
    fn new(file: &'f File, total: u64) -> Self {
        let cap = usize::try_from(total.min(WRITE_CHUNK as u64))
            .unwrap_or(WRITE_CHUNK)
            .max(8);
        SeqWriter {
            file,
            buf: vec![0u8; cap],
            used: 0,
            pos: 0,
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.used > 0 {
            self.file.write_all_at(&self.buf[..self.used], self.pos)?;
            self.pos += self.used as u64;
            self.used = 0;
        }
        Ok(())
    }

    fn put(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            if self.used == self.buf.len() {
                self.flush()?;
            }
            let n = bytes.len().min(self.buf.len() - self.used);
            self.buf[self.used..self.used + n].copy_from_slice(&bytes[..n]);
            self.used += n;
            bytes = &bytes[n..];
        }
        Ok(())
    }

    fn put_zeros(&mut self, mut n: u64) -> io::Result<()> {
        while n > 0 {
            if self.used == self.buf.len() {
                self.flush()?;
            }
            let k = usize::try_from(n)
                .unwrap_or(usize::MAX)
                .min(self.buf.len() - self.used);
            self.buf[self.used..self.used + k].fill(0);
            self.used += k;
            n -= k as u64;
        }
        Ok(())
    }

    /// Appends `count` big-endian u64 values, the i-th being `value(i)`.
    fn put_u64s(&mut self, count: u64, value: impl Fn(u64) -> u64) -> io::Result<()> {
        let mut i = 0u64;
        while i < count {
            if self.buf.len() - self.used < 8 {
                self.flush()?;
            }
            let room = ((self.buf.len() - self.used) / 8) as u64;
            let n = room.min(count - i);
            let end = self.used + n as usize * 8;
            for (k, slot) in self.buf[self.used..end].chunks_exact_mut(8).enumerate() {
                slot.copy_from_slice(&value(i + k as u64).to_be_bytes());
            }
            self.used = end;
            i += n;
        }
        Ok(())
    }

    fn finish(mut self) -> io::Result<()> {
        self.flush()
    }
}
