//! Changing the options of an existing qcow2 image in place: compatibility
//! level (1.1 <-> 0.10), lazy refcounts, refcount width, size.
//!
//! The steps run in QEMU's order: upgrade, refcount width, lazy refcounts,
//! size, downgrade. Every step keeps the image valid on disk if the process
//! dies between two writes: new structures are written and synced before
//! the header switches to them, and old ones are released afterwards.

use super::allocator::Allocator;
use super::entries::{L1Entry, L2Entry};
use super::format::{
    COMPAT_LAZY_REFCOUNTS, EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_CRYPTO, EXT_DATA_FILE, EXT_END,
    EXT_FEATURE_TABLE, MAX_REFTABLE_BYTES, V2_HEADER_LEN, V3_HEADER_LEN,
};
use super::header::{BitmapsExtension, Header};
use super::reader::Qcow2Node;
use super::refcount::set_entry;
use super::types::{Compat, CompressionType, RefcountOrder};
use super::writer::WriteState;
use crate::block::BlockDev;
use crate::error::{Error, Result};
use crate::prealloc::Prealloc;

/// What to change; `None` keeps the current value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmendSpec {
    pub compat: Option<Compat>,
    pub lazy_refcounts: Option<bool>,
    pub refcount_order: Option<RefcountOrder>,
    pub size: Option<u64>,
}

/// A backing file as a header names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backing<'a> {
    pub name: &'a str,
    /// The backing format extension (None: none, the format is probed).
    pub format: Option<&'a str>,
}

/// The header fields amend can change, as they stand.
#[derive(Debug, Clone, Copy)]
struct Fields {
    compat: Compat,
    lazy: bool,
    compression: CompressionType,
}

impl Fields {
    fn of(h: &Header) -> Fields {
        Fields {
            compat: h.compat,
            lazy: h.lazy_refcounts(),
            compression: h.compression,
        }
    }
}

impl Qcow2Node {
    /// Applies `spec` to the image (open for writing). Everything is
    /// validated before anything is written.
    pub fn amend(&self, spec: &AmendSpec) -> Result<()> {
        let h = &self.header;
        let mut fields = Fields::of(h);
        let target_compat = spec.compat.unwrap_or(h.compat);
        let target_order = spec.refcount_order.unwrap_or(h.refcount_order);
        let target_lazy = spec
            .lazy_refcounts
            .unwrap_or(if target_compat == Compat::V2 {
                false
            } else {
                fields.lazy
            });
        if target_compat == Compat::V2 {
            if target_order != RefcountOrder::DEFAULT {
                return Err(Error::invalid("compat=0.10 requires refcount_bits=16"));
            }
            if target_lazy {
                return Err(Error::invalid(
                    "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
                ));
            }
            if h.extended_l2() {
                return Err(Error::invalid(
                    "Cannot downgrade an image with extended L2 entries to compat=0.10",
                ));
            }
        }
        if let Some(size) = spec.size {
            if size % 512 != 0 {
                return Err(Error::invalid(format!(
                    "The new size must be a multiple of 512 (not {size})"
                )));
            }
        }
        let downgrade = h.compat == Compat::V3 && target_compat == Compat::V2;
        if downgrade {
            let on_disk = self.disk_header()?;
            if on_disk.live_bitmaps().is_some_and(|b| b.count > 0) {
                return Err(Error::Unsupported(
                    "Cannot downgrade an image with persistent dirty bitmaps to compat=0.10; remove the bitmaps first".into(),
                ));
            }
            if on_disk.snapshot_count > 0 {
                // Their tables may hold zero clusters, which v2 cannot express.
                return Err(Error::Unsupported(
                    "Downgrading an image with internal snapshots to compat=0.10 is not supported by qimg; delete the snapshots first".into(),
                ));
            }
        }
        if downgrade && h.compression != CompressionType::Zlib && self.has_compressed_clusters()? {
            return Err(Error::invalid(format!(
                "Cannot downgrade an image with {} compression type and existing compressed clusters",
                h.compression.name()
            )));
        }

        if h.compat == Compat::V2 && target_compat == Compat::V3 {
            fields.compat = Compat::V3;
            let mut st = self.state()?;
            self.rewrite_header(&mut st, fields)?;
        }
        if target_order != h.refcount_order {
            let mut st = self.state()?;
            self.change_refcount_order(&mut st, target_order, fields)?;
        }
        if target_lazy != fields.lazy {
            fields.lazy = target_lazy;
            let mut st = self.state()?;
            self.write_back(&mut st)?;
            self.rewrite_header(&mut st, fields)?;
        }
        if let Some(size) = spec.size {
            if size != self.size() {
                self.resize(size, Prealloc::Off)?;
            }
        }
        if downgrade {
            let mut st = self.state()?;
            self.expand_zero_clusters(&mut st)?;
            self.write_back(&mut st)?;
            fields.compat = Compat::V2;
            fields.compression = CompressionType::Zlib;
            self.rewrite_header(&mut st, fields)?;
        }
        Ok(())
    }

    /// Writes the whole header cluster anew from the current layout.
    fn rewrite_header(&self, st: &mut WriteState, f: Fields) -> Result<()> {
        let backing = self.backing_name().map(|name| Backing {
            name,
            format: self.header.backing_format.as_deref(),
        });
        self.write_header(st, f, backing)
    }

    /// Points the image at another backing file (`None`: no backing file),
    /// rewriting only the header, as `qemu-img rebase -u` does: the guest
    /// content of the image changes if the new backing file holds other data.
    pub fn set_backing_name(&self, backing: Option<Backing<'_>>) -> Result<()> {
        // (The header encoder refuses a name longer than qcow2 allows.)
        if backing.is_some_and(|b| b.name.is_empty()) {
            return Err(Error::invalid(
                "An empty backing file name means none: give no backing file",
            ));
        }
        let mut st = self.state()?;
        self.write_back(&mut st)?;
        self.write_header(&mut st, Fields::of(&self.header), backing)
    }

    fn write_header(
        &self,
        st: &mut WriteState,
        f: Fields,
        backing: Option<Backing<'_>>,
    ) -> Result<()> {
        let on_disk = self.disk_header()?;
        let bitmaps = on_disk.live_bitmaps().cloned();
        self.write_header_as(st, f, backing, &on_disk, bitmaps)
    }

    /// Rewrites the header with the bitmaps extension `bitmaps` (None: no
    /// bitmaps), keeping everything else as it stands.
    pub(super) fn write_header_with_bitmaps(
        &self,
        st: &mut WriteState,
        bitmaps: Option<BitmapsExtension>,
    ) -> Result<()> {
        let on_disk = self.disk_header()?;
        let backing = on_disk.backing_file.as_deref().map(|name| Backing {
            name,
            format: on_disk.backing_format.as_deref(),
        });
        self.write_header_as(st, Fields::of(&on_disk), backing, &on_disk, bitmaps)
    }

    fn write_header_as(
        &self,
        st: &mut WriteState,
        f: Fields,
        backing: Option<Backing<'_>>,
        on_disk: &Header,
        bitmaps: Option<BitmapsExtension>,
    ) -> Result<()> {
        let (reftable_offset, reftable_clusters) = st.alloc.reftable();
        // The snapshot table stays as it stands on disk; the rest is the
        // node's current layout and the new settings.
        let mut header = Header {
            compat: f.compat,
            cluster_size: self.header.cluster_size,
            virtual_size: self.size(),
            l1_entries: self.l1_read().len() as u64,
            l1_table_offset: st.l1_offset,
            reftable_offset,
            reftable_clusters,
            refcount_order: st.alloc.order(),
            compression: f.compression,
            backing_file: backing.map(|b| b.name.to_string()),
            backing_format: backing.and_then(|b| b.format.map(str::to_string)),
            snapshot_count: on_disk.snapshot_count,
            snapshots_offset: on_disk.snapshots_offset,
            bitmaps,
            ..Header::default()
        };
        header.declare_features(f.lazy, self.header.extended_l2());
        let mut raw = header.encode()?;
        self.keep_foreign_header_parts(&mut raw, f.compat)?;
        if raw.len() as u64 > self.cs() {
            return Err(Error::invalid(
                "the new header does not fit in the image's first cluster",
            ));
        }
        self.file.pwrite(&raw, 0)?;
        self.file.sync()?;
        // The new header is clean; closing must not write the old feature bits.
        st.set_clean_header(f.lazy, header.incompatible);
        Ok(())
    }

    /// Carries over into the freshly encoded header cluster `raw` what the
    /// header on disk holds that qimg does not interpret, as QEMU does when
    /// it rewrites a header: extensions of unknown types (placed before the
    /// end marker) and, for v3, compatible feature bits other than lazy
    /// refcounts.
    fn keep_foreign_header_parts(&self, raw: &mut Vec<u8>, compat: Compat) -> Result<()> {
        let cs = self.cs();
        let head = self.file.read_vec(0, cs.min(self.file.file_len()))?;
        let be32 = |b: &[u8], at: usize| -> Option<u32> {
            Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
        };
        let be64 = |b: &[u8], at: usize| -> Option<u64> {
            Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
        };
        let old_v3 = be32(&head, 4) == Some(3);
        let start = if old_v3 {
            be32(&head, 100).map_or(head.len(), |l| l as usize)
        } else {
            V2_HEADER_LEN
        };
        let limit = match be64(&head, 8) {
            Some(b) if b != 0 => (b as usize).min(head.len()),
            _ => head.len(),
        };
        let mut foreign = Vec::new();
        let mut at = start;
        while at + 8 <= limit {
            let (Some(kind), Some(len)) = (be32(&head, at), be32(&head, at + 4)) else {
                break;
            };
            let data_end = at + 8 + len as usize;
            if kind == EXT_END || data_end > limit {
                break;
            }
            let known = [
                EXT_BACKING_FORMAT,
                EXT_FEATURE_TABLE,
                EXT_BITMAPS,
                EXT_CRYPTO,
                EXT_DATA_FILE,
            ];
            if !known.contains(&kind) {
                foreign.extend_from_slice(&head[at..data_end]);
                foreign.resize(foreign.len().next_multiple_of(8), 0);
            }
            at += 8 + (len as usize).next_multiple_of(8);
        }
        if compat == Compat::V3 && old_v3 {
            let other = be64(&head, 80).unwrap_or(0) & !COMPAT_LAZY_REFCOUNTS;
            let bits = be64(raw, 80).unwrap_or(0) | other;
            raw[80..88].copy_from_slice(&bits.to_be_bytes());
        }
        if foreign.is_empty() {
            return Ok(());
        }
        // Find the end marker of the new header and slide everything after
        // it (the backing file name) along.
        let mut end = if compat == Compat::V3 {
            V3_HEADER_LEN
        } else {
            V2_HEADER_LEN
        };
        while let (Some(kind), Some(len)) = (be32(raw, end), be32(raw, end + 4)) {
            if kind == EXT_END {
                break;
            }
            end += 8 + (len as usize).next_multiple_of(8);
        }
        let backing = be64(raw, 8).unwrap_or(0) as usize;
        let used = if backing != 0 {
            backing + be32(raw, 16).unwrap_or(0) as usize
        } else {
            end + 8
        };
        if used + foreign.len() > raw.len() {
            return Err(Error::invalid(
                "the header, its extensions and the backing file name no longer fit in the image's first cluster",
            ));
        }
        raw.truncate(used);
        raw.splice(end..end, foreign.iter().copied());
        if backing != 0 {
            let moved = (backing + foreign.len()) as u64;
            raw[8..16].copy_from_slice(&moved.to_be_bytes());
        }
        raw.resize(cs as usize, 0);
        Ok(())
    }

    fn has_compressed_clusters(&self) -> Result<bool> {
        let ext = self.header.extended_l2();
        let stride = if ext { 2 } else { 1 };
        let l1 = self.l1_table();
        for index in 0..l1.len() as u64 {
            if L1Entry::from_raw(l1[index as usize]).table_offset() == 0 {
                continue;
            }
            if let Some((table, _)) = self.l2_table(index)? {
                if table
                    .iter()
                    .step_by(stride)
                    .any(|&e| L2Entry::from_raw(e).is_compressed())
                {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// For v2, which has no zero flag: zero clusters that keep a host
    /// cluster get real zeroes written there; the others become unallocated
    /// (no backing file) or get a new cluster of zeroes (the backing file
    /// must not show through).
    fn expand_zero_clusters(&self, st: &mut WriteState) -> Result<()> {
        let cs = self.cs();
        let zeros = vec![0u8; cs as usize];
        let has_backing = self.backing.is_some();
        let l1_len = self.l1_read().len() as u64;
        for l1_index in 0..l1_len {
            let entry = L1Entry::from_raw(self.l1_read()[l1_index as usize]);
            if entry.table_offset() == 0 {
                continue;
            }
            let Some((table, offset)) = self.l2_table(l1_index)? else {
                continue;
            };
            let zero_slots: Vec<(usize, u64)> = table
                .iter()
                .map(|&e| L2Entry::from_raw(e))
                .enumerate()
                .filter(|(_, e)| e.zero_flag() && !e.is_compressed())
                .map(|(i, e)| (i, e.host_offset()))
                .collect();
            drop(table);
            if zero_slots.is_empty() {
                continue;
            }
            let mut updates = Vec::with_capacity(zero_slots.len());
            for (slot, host) in zero_slots {
                let new = if host != 0 {
                    self.file.pwrite(&zeros, host)?;
                    L2Entry::new(host, true)
                } else if has_backing {
                    let fresh = st.alloc.alloc_clusters(1)?;
                    self.file.pwrite(&zeros, fresh)?;
                    L2Entry::new(fresh, true)
                } else {
                    L2Entry::UNALLOCATED
                };
                updates.push((slot, new.raw()));
            }
            self.edit_l2(offset, l1_index, |t| {
                for &(slot, new) in &updates {
                    t[slot] = new;
                }
            })?;
        }
        Ok(())
    }

    /// Rewrites the refcount structures with entries of a new width: new
    /// blocks and table after the end of the file, then the header, then the
    /// old structures are released.
    fn change_refcount_order(
        &self,
        st: &mut WriteState,
        order: RefcountOrder,
        fields: Fields,
    ) -> Result<()> {
        self.write_back(st)?;
        let cs = self.cs();
        let end = st.alloc.end().max(self.file.file_len().div_ceil(cs));
        let width = order.width_bits();
        let max = if width >= 64 {
            u64::MAX
        } else {
            (1 << width) - 1
        };
        let mut counts = Vec::with_capacity(end as usize);
        for cluster in 0..end {
            let n = st.alloc.get(cluster)?;
            if n > max {
                return Err(Error::invalid(format!(
                    "Cannot change the refcount width to {width} bits: cluster {cluster} (offset {:#x}) has a refcount of {n}",
                    cluster * cs
                )));
            }
            counts.push(n);
        }
        let per_block = order.entries_per_block(self.header.cluster_size);
        // New blocks and table live past `end` and count themselves.
        let (mut blocks, mut table) = (0u64, 0u64);
        loop {
            let total = end + blocks + table;
            let b = total.div_ceil(per_block);
            let t = (b * 8).div_ceil(cs);
            if (b, t) == (blocks, table) {
                break;
            }
            (blocks, table) = (b, t);
        }
        if table * cs > MAX_REFTABLE_BYTES {
            return Err(Error::TooLarge(
                "the new refcount table would exceed QEMU's limit".into(),
            ));
        }
        counts.resize((end + blocks + table) as usize, 1);
        let mut reftable = vec![0u8; (table * cs) as usize];
        for b in 0..blocks {
            let mut block = vec![0u8; cs as usize];
            let first = b * per_block;
            let last = ((b + 1) * per_block).min(counts.len() as u64);
            for c in first..last {
                set_entry(&mut block, order, (c - first) as usize, counts[c as usize]);
            }
            let at = (end + b) * cs;
            self.file.pwrite(&block, at)?;
            reftable[(b * 8) as usize..(b * 8 + 8) as usize].copy_from_slice(&at.to_be_bytes());
        }
        let table_at = (end + blocks) * cs;
        self.file.pwrite(&reftable, table_at)?;
        self.file.sync()?;

        let old_blocks = st.alloc.block_offsets();
        let (old_table, old_clusters) = st.alloc.reftable();
        st.alloc = Allocator::with_layout(
            std::sync::Arc::clone(&self.file),
            self.header.cluster_size,
            order,
            table_at,
            table,
        )?;
        self.rewrite_header(st, fields)?;
        // The old structures are counted (once each) in the new ones: release them.
        for offset in old_blocks {
            st.alloc.free_range(offset, cs)?;
        }
        st.alloc.free_range(old_table, old_clusters * cs)?;
        if st.alloc.write_back()? {
            self.file.sync()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{open_image, OpenOptions};

    use crate::host_file::FileOptions;
    use crate::qcow2::{create, BackingSpec, CreateSpec};

    use std::path::Path;

    const FOREIGN_KIND: u32 = 0x5149_4d47;

    /// Puts an extension of an unknown type before the end marker (the
    /// backing file name moves along) and sets compatible bit 5.
    fn add_foreign_parts(path: &Path) {
        let mut head = std::fs::read(path).expect("read image");
        let be32 = |b: &[u8], at: usize| u32::from_be_bytes(b[at..at + 4].try_into().expect("4"));
        let v3 = be32(&head, 4) == 3;
        let mut at = if v3 { be32(&head, 100) as usize } else { 72 };
        while be32(&head, at) != EXT_END {
            at += 8 + (be32(&head, at + 4) as usize).next_multiple_of(8);
        }
        let mut ext = FOREIGN_KIND.to_be_bytes().to_vec();
        ext.extend_from_slice(&5u32.to_be_bytes());
        ext.extend_from_slice(b"hello\0\0\0");
        let backing = u64::from_be_bytes(head[8..16].try_into().expect("8")) as usize;
        let name_len = be32(&head, 16) as usize;
        let tail: Vec<u8> = if backing != 0 {
            head[at..backing + name_len].to_vec()
        } else {
            head[at..at + 8].to_vec()
        };
        head.splice(at..at + tail.len(), ext.iter().chain(&tail).copied());
        if backing != 0 {
            head[8..16].copy_from_slice(&((backing + ext.len()) as u64).to_be_bytes());
        }
        if v3 {
            head[87] |= 1 << 5;
        }
        let cs = 1usize << be32(&head, 20);
        let mut file = std::fs::read(path).expect("read image");
        file[..cs].copy_from_slice(&head[..cs]);
        std::fs::write(path, file).expect("write image");
    }

    fn amend(path: &Path, spec: &AmendSpec) {
        let opts = OpenOptions {
            writable: true,
            ..OpenOptions::default()
        };
        let node = open_image(path.to_str().expect("utf-8 path"), &opts).expect("open");
        node.as_qcow2().expect("qcow2").amend(spec).expect("amend");
    }

    fn header_of(path: &Path) -> Vec<u8> {
        let mut head = std::fs::read(path).expect("read image");
        head.truncate(65536);
        head
    }

    #[test]
    fn unknown_extensions_and_compatible_bits_survive_every_amend() {
        let dir = tempfile::tempdir().expect("temp dir");
        let base = dir.path().join("base.qcow2");
        create(&base, &CreateSpec::new(1 << 20), FileOptions::default()).expect("create base");
        let img = dir.path().join("t.qcow2");
        let mut spec = CreateSpec::new(1 << 20);
        spec.backing = Some(BackingSpec {
            file: "base.qcow2".into(),
            format: Some("qcow2".into()),
        });
        create(&img, &spec, FileOptions::default()).expect("create");
        add_foreign_parts(&img);
        let steps = [
            AmendSpec {
                lazy_refcounts: Some(true),
                ..AmendSpec::default()
            },
            AmendSpec {
                refcount_order: RefcountOrder::from_order(3).ok(),
                ..AmendSpec::default()
            },
            AmendSpec {
                compat: Some(Compat::V2),
                refcount_order: Some(RefcountOrder::DEFAULT),
                lazy_refcounts: Some(false),
                ..AmendSpec::default()
            },
            AmendSpec {
                compat: Some(Compat::V3),
                ..AmendSpec::default()
            },
        ];
        for (n, step) in steps.iter().enumerate() {
            amend(&img, step);
            let head = header_of(&img);
            let found = head
                .windows(13)
                .any(|w| w[..4] == FOREIGN_KIND.to_be_bytes() && &w[8..13] == b"hello");
            assert!(found, "step {n}: the unknown extension is gone");
            let v3 = head[7] == 3;
            // Lost on the way through v2, which has no compatible bits.
            assert_eq!(v3 && n < 2, head[87] & (1 << 5) != 0, "step {n}");
            let node =
                open_image(img.to_str().expect("utf-8"), &OpenOptions::default()).expect("reopen");
            let q = node.as_qcow2().expect("qcow2");
            assert_eq!(q.backing_name(), Some("base.qcow2"), "step {n}");
        }
    }
}
