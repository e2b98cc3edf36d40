//! The qcow2 format node for reading: L1/L2 lookups through a bounded cache,
//! zero and unallocated clusters, extended L2 subclusters, compressed
//! clusters, and fall-through to the backing node.

use super::compress::decompress;
use super::entries::{L1Entry, L2Entry, SubclusterBitmap};
use super::header::Header;
use super::l2cache::L2Cache;
use super::writer::WriteState;
use crate::block::{read_clipped, BlockDev, FileNode, Status};
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};

/// Reads at least this long are split across threads.
const PARALLEL_READ_MIN: usize = 4 << 20;
/// Piece of a parallel read handed to one thread.
const PARALLEL_PIECE: usize = 1 << 20;

/// Where a guest range lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Not allocated here: the backing file (or zeroes) shows through.
    /// `host` is set for an allocated cluster whose subcluster is not
    /// (extended L2): its place in the file is known, its data is not there.
    Unallocated { host: Option<u64> },
    /// Reads as zeroes; `host` is kept when a cluster stays allocated.
    Zero { host: Option<u64> },
    /// Plain data at `host` in the image file.
    Data { host: u64 },
    /// One compressed cluster: `len` bytes at byte offset `host`.
    Compressed { host: u64, len: u64 },
}

/// The state of one guest cluster (or subcluster) as its L2 entry says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Unallocated,
    UnallocatedAlloc(u64),
    ZeroPlain,
    ZeroAlloc(u64),
    Normal(u64),
    Compressed { host: u64, len: u64 },
}

pub struct Qcow2Node {
    pub(super) file: Arc<FileNode>,
    pub(super) header: Header,
    /// The active L1 table; a writer changes entries, never the length.
    pub(super) l1: RwLock<Vec<u64>>,
    pub(super) l2_cache: L2Cache,
    pub(super) backing: Option<Arc<dyn BlockDev>>,
    /// The backing file name as stored in the header.
    backing_name: Option<String>,
    /// The backing file name resolved against the image's directory.
    backing_path: Option<String>,
    /// Decided once at open: refcounts claim many more clusters than the file
    /// occupies on disk, so data clusters may be holes (metadata preallocation).
    metadata_preallocated: OnceLock<bool>,
    /// The virtual size (a writer may resize the image).
    pub(super) size: AtomicU64,
    /// Present when the image is open for writing.
    pub(super) writer: Option<Mutex<WriteState>>,
}

impl Qcow2Node {
    pub fn open(
        file: Arc<FileNode>,
        header: Header,
        backing: Option<Arc<dyn BlockDev>>,
        backing_path: Option<String>,
    ) -> Result<Qcow2Node> {
        let writable = file.is_writable();
        Qcow2Node::open_as(file, header, backing, backing_path, writable)
    }

    /// `open`, read-only even when the file is writable (`writable` false).
    pub(super) fn open_as(
        file: Arc<FileNode>,
        header: Header,
        backing: Option<Arc<dyn BlockDev>>,
        backing_path: Option<String>,
        writable: bool,
    ) -> Result<Qcow2Node> {
        let mut raw = vec![0u8; (header.l1_entries * 8) as usize];
        file.pread(&mut raw, header.l1_table_offset)?;
        let l1 = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        let l2_cache = L2Cache::new(header.cluster_size.bytes());
        let writer = if writable {
            Some(Mutex::new(WriteState::new(&file, &header)?))
        } else {
            None
        };
        Ok(Qcow2Node {
            size: AtomicU64::new(header.virtual_size & !511),
            backing_name: header.backing_file.clone(),
            file,
            header,
            l1: RwLock::new(l1),
            l2_cache,
            backing,
            backing_path,
            metadata_preallocated: OnceLock::new(),
            writer,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The header as the file holds it now: snapshot, bitmap and amend
    /// commands change fields after this node read [`header`](Self::header).
    pub(super) fn disk_header(&self) -> Result<Header> {
        let head = super::header::read_head(&self.file)?;
        Header::parse(&head, self.file.file_len())
    }

    pub fn backing_name(&self) -> Option<&str> {
        self.backing_name.as_deref()
    }

    pub fn backing_path(&self) -> Option<&str> {
        self.backing_path.as_deref()
    }

    pub fn file_node(&self) -> &Arc<FileNode> {
        &self.file
    }

    /// A copy of the active L1 table.
    pub fn l1_table(&self) -> Vec<u64> {
        self.l1_read().clone()
    }

    pub(super) fn l1_read(&self) -> std::sync::RwLockReadGuard<'_, Vec<u64>> {
        self.l1.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn corrupt(&self, msg: String) -> Error {
        Error::InvalidImage(format!(
            "Corrupt qcow2 image '{}': {msg}",
            self.file.filename()
        ))
    }

    /// The L2 table that maps L1 slot `l1_index` and its offset, or None if unallocated.
    pub(super) fn l2_table(&self, l1_index: u64) -> Result<Option<(Arc<[u64]>, u64)>> {
        let Some(entry) = self.l1_read().get(l1_index as usize).copied() else {
            return Ok(None);
        };
        let offset = L1Entry::from_raw(entry).table_offset();
        if offset == 0 {
            return Ok(None);
        }
        let cs = self.header.cluster_size.bytes();
        if offset % cs != 0 {
            return Err(self.corrupt(format!(
                "L2 table offset {offset:#x} is not cluster aligned (L1 index {l1_index})"
            )));
        }
        if let Some(table) = self.l2_cache.get(offset) {
            // Cached tables were validated when loaded, or made by the writer.
            return Ok(Some((table, offset)));
        }
        if offset + cs > self.file.file_len() {
            return Err(self.corrupt(format!(
                "L2 table offset {offset:#x} lies beyond the end of the file (L1 index {l1_index})"
            )));
        }
        self.l2_cache
            .get_or_load(offset, |buf| self.file.pread(buf, offset))
            .map(|t| Some((t, offset)))
    }

    /// Classifies subcluster `sc` of the cluster described by L2 slot `index`.
    fn kind(&self, table: &[u64], index: usize, sc: u64, l2_offset: u64) -> Result<Kind> {
        let ext = self.header.extended_l2();
        let (entry, bitmap) = if ext {
            (
                L2Entry::from_raw(table[index * 2]),
                SubclusterBitmap::from_raw(table[index * 2 + 1]),
            )
        } else {
            (L2Entry::from_raw(table[index]), SubclusterBitmap::NONE)
        };
        let cs = self.header.cluster_size.bytes();
        if entry.is_compressed() {
            let data = entry.compressed_data(self.header.cluster_size.bits());
            return Ok(Kind::Compressed {
                host: data.host,
                len: data.read_len(),
            });
        }
        let host = entry.host_offset();
        if host != 0 && host % cs != 0 {
            return Err(self.corrupt(format!(
                "Cluster offset {host:#x} is not cluster aligned (L2 table {l2_offset:#x}, index {index})"
            )));
        }
        if !ext {
            return Ok(match (entry.zero_flag(), host) {
                (true, 0) => Kind::ZeroPlain,
                (true, h) => Kind::ZeroAlloc(h),
                (false, 0) => Kind::Unallocated,
                (false, h) => Kind::Normal(h),
            });
        }
        let alloc = bitmap.allocated(sc);
        let zero = bitmap.zero(sc);
        let sc_host = host + sc * (cs / 32);
        if host == 0 {
            if bitmap.any_allocated() {
                return Err(self.corrupt(format!(
                    "Unallocated cluster has allocated subclusters (L2 table {l2_offset:#x}, index {index})"
                )));
            }
            return Ok(if zero {
                Kind::ZeroPlain
            } else {
                Kind::Unallocated
            });
        }
        match (alloc, zero) {
            (true, true) => Err(self.corrupt(format!(
                "Subcluster {sc} is both allocated and zero (L2 table {l2_offset:#x}, index {index})"
            ))),
            (false, true) => Ok(Kind::ZeroAlloc(sc_host)),
            (true, false) => Ok(Kind::Normal(sc_host)),
            (false, false) => Ok(Kind::UnallocatedAlloc(sc_host)),
        }
    }

    /// Where `offset` lives and for how many bytes (<= `max_len`) the same
    /// mapping holds with contiguous host offsets.
    pub fn lookup(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64)> {
        let cs = self.header.cluster_size.bytes();
        let l2_entries = self.header.l2_entries();
        let ext = self.header.extended_l2();
        let unit = if ext { cs / 32 } else { cs };
        let cluster = offset / cs;
        let l1_index = cluster / l2_entries;
        let mut index = (cluster % l2_entries) as usize;
        // Bytes until the end of what this L2 table maps.
        let table_end = (l1_index + 1) * l2_entries * cs;
        let limit = max_len.min(table_end - offset);
        let Some((table, l2_offset)) = self.l2_table(l1_index)? else {
            return Ok((Mapping::Unallocated { host: None }, limit));
        };
        let mut sc = if ext { (offset % cs) / unit } else { 0 };
        let first = self.kind(&table, index, sc, l2_offset)?;
        let into_unit = offset % unit;
        let mut run = unit - into_unit;
        if let Kind::Compressed { host, len } = first {
            return Ok((
                Mapping::Compressed { host, len },
                (cs - offset % cs).min(limit),
            ));
        }
        let mut k = 0u64;
        while run < limit {
            sc += 1;
            if !ext || sc == 32 {
                sc = 0;
                index += 1;
            }
            k += 1;
            let next = self.kind(&table, index, sc, l2_offset)?;
            let same = match (first, next) {
                (Kind::Normal(a), Kind::Normal(b))
                | (Kind::ZeroAlloc(a), Kind::ZeroAlloc(b))
                | (Kind::UnallocatedAlloc(a), Kind::UnallocatedAlloc(b)) => b == a + k * unit,
                (Kind::Unallocated, Kind::Unallocated) | (Kind::ZeroPlain, Kind::ZeroPlain) => true,
                _ => false,
            };
            if !same {
                break;
            }
            run += unit;
        }
        let run = run.min(limit);
        let mapping = match first {
            Kind::Unallocated => Mapping::Unallocated { host: None },
            Kind::UnallocatedAlloc(h) => Mapping::Unallocated {
                host: Some(h + into_unit),
            },
            Kind::ZeroPlain => Mapping::Zero { host: None },
            Kind::ZeroAlloc(h) => Mapping::Zero {
                host: Some(h + into_unit),
            },
            Kind::Normal(h) => Mapping::Data {
                host: h + into_unit,
            },
            Kind::Compressed { host, len } => Mapping::Compressed { host, len },
        };
        Ok((mapping, run))
    }

    /// Reads one range serially.
    pub(super) fn read_serial(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        let mut cluster_buf: Vec<u8> = Vec::new();
        while done < buf.len() {
            let pos = offset + done as u64;
            let (mapping, n) = self.lookup(pos, (buf.len() - done) as u64)?;
            let n = n as usize;
            let out = &mut buf[done..done + n];
            match mapping {
                Mapping::Data { host } => self.file.pread(out, host)?,
                Mapping::Zero { .. } => out.fill(0),
                Mapping::Unallocated { .. } => match &self.backing {
                    Some(b) => read_clipped(b.as_ref(), out, pos)?,
                    None => out.fill(0),
                },
                Mapping::Compressed { host, len } => {
                    let cs = self.header.cluster_size.bytes() as usize;
                    cluster_buf.resize(cs, 0);
                    self.read_compressed(host, len, &mut cluster_buf)?;
                    let at = (pos % cs as u64) as usize;
                    out.copy_from_slice(&cluster_buf[at..at + n]);
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Decompresses the cluster stored at `host` (`len` bytes) into `out`.
    pub fn read_compressed(&self, host: u64, len: u64, out: &mut [u8]) -> Result<()> {
        if host >= self.file.file_len() {
            return Err(self.corrupt(format!(
                "Compressed cluster at {host:#x} lies beyond the end of the file"
            )));
        }
        let mut input = vec![0u8; len as usize];
        self.file.pread(&mut input, host)?;
        decompress(self.header.compression, &input, out).map_err(|why| Error::Io {
            context: format!(
                "Could not decompress the {} cluster at host offset {host:#x} of '{}': {why}",
                self.header.compression.name(),
                self.file.filename()
            ),
            source: std::io::Error::from_raw_os_error(libc::EIO),
        })
    }

    /// Like QEMU: when the refcounts claim clearly more clusters than the
    /// file has blocks on disk, the image was preallocated with metadata only
    /// and "allocated" data clusters may be holes that read as zeroes.
    fn detect_metadata_preallocation(&self) -> Result<bool> {
        let cs = self.header.cluster_size.bytes();
        // An export's allocation is unknown: as in QEMU, no preallocation is assumed.
        let Some(real) = self.file.allocated_bytes()? else {
            return Ok(false);
        };
        let real_clusters = real / cs;
        let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
        let refcounts = super::refcount_reader::RefcountReader::new(&self.file, &self.header)?;
        let end = self.file.file_len().div_ceil(cs);
        let mut used = 0u64;
        let mut cluster = 0u64;
        while cluster < end && used < threshold {
            let (count, run) = refcounts.nonzero_run(cluster, end - cluster)?;
            used += count;
            cluster += run;
        }
        Ok(used >= threshold)
    }
}

impl BlockDev for Qcow2Node {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if buf.len() < PARALLEL_READ_MIN {
            return self.read_serial(buf, offset);
        }
        let cs = self.header.cluster_size.bytes() as usize;
        let piece = PARALLEL_PIECE.max(cs);
        // The first piece ends on a piece boundary so that every piece starts
        // on a cluster and no compressed cluster is inflated twice.
        let head = (piece - (offset % piece as u64) as usize) % piece;
        let (first, rest) = buf.split_at_mut(head.min(buf.len()));
        self.read_serial(first, offset)?;
        let base = offset + first.len() as u64;
        rest.par_chunks_mut(piece)
            .enumerate()
            .try_for_each(|(i, chunk)| self.read_serial(chunk, base + (i * piece) as u64))
    }

    fn status(&self, offset: u64, len: u64) -> Result<Status> {
        let (mapping, n) = self.lookup(offset, len)?;
        let mut s = Status {
            len: n,
            ..Status::default()
        };
        match mapping {
            Mapping::Unallocated { host } => s.offset = host,
            Mapping::Zero { host } => {
                s.zero = true;
                s.offset = host;
            }
            Mapping::Data { host } => {
                s.data = true;
                s.offset = Some(host);
                s.recurse = *self
                    .metadata_preallocated
                    .get_or_init(|| self.detect_metadata_preallocation().unwrap_or(false));
            }
            Mapping::Compressed { .. } => {
                s.data = true;
                s.compressed = true;
            }
        }
        Ok(s)
    }

    fn format_name(&self) -> &'static str {
        "qcow2"
    }

    fn filename(&self) -> &str {
        self.file.filename()
    }

    fn file(&self) -> Option<&Arc<FileNode>> {
        Some(&self.file)
    }

    fn backing(&self) -> Option<&Arc<dyn BlockDev>> {
        self.backing.as_ref()
    }

    fn supports_backing(&self) -> bool {
        true
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        super::writer::write_at(self, buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        super::writer::write_zeroes(self, offset, len, unmap)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        super::writer::discard(self, offset, len)
    }

    fn flush(&self) -> Result<()> {
        super::writer::flush(self)
    }

    fn close(&self) -> Result<()> {
        self.close_writer()
    }

    fn resize(&self, new_size: u64, prealloc: crate::prealloc::Prealloc) -> Result<()> {
        Qcow2Node::resize(self, new_size, prealloc)
    }
}

impl dyn BlockDev {
    /// The qcow2 node itself, for callers that need its header or tables.
    pub fn as_qcow2(&self) -> Option<&Qcow2Node> {
        self.as_any().downcast_ref::<Qcow2Node>()
    }
}
