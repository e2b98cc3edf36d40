//! The qcow2 driver: the registry's face of the engine in `crate::qcow2`.

use super::{
    BackingRef, CreateFacts, FormatDriver, InfoValue, MeasureRequest, OpenContext, OpenedLayer,
    OptionKind, OptionSpec, OptionTable, OptionValue, Options, PendingLayer,
};
use crate::block::{BlockDev, FileNode};
use crate::error::{Error, Result};
use crate::host_file::FileOptions;
use crate::measure::{self, Measurement, Qcow2Target};
use crate::prealloc::Prealloc;
use crate::qcow2::check::CheckReport;
use crate::qcow2::format::{AUTOCLEAR_BITMAPS, MAGIC};
use crate::qcow2::header::{read_head, Header};
use crate::qcow2::reader::Qcow2Node;
use crate::qcow2::{
    bitmaps, BackingSpec, ClusterSize, Compat, CompressionType, CreateSpec, RefcountOrder,
};
use std::path::Path;
use std::sync::Arc;

pub struct Qcow2Driver;

pub static QCOW2: Qcow2Driver = Qcow2Driver;

/// A sure match: the magic and a version qimg reads.
const SCORE: u32 = 100;

impl FormatDriver for Qcow2Driver {
    fn name(&self) -> &'static str {
        "qcow2"
    }

    fn probe(&self, head: &[u8]) -> u32 {
        match head.get(..8) {
            // Version 1 is the older qcow format, refused by name.
            Some(h) if h[..4] == MAGIC && h[4..8] != [0, 0, 0, 1] => SCORE,
            _ => 0,
        }
    }

    fn options(&self) -> OptionTable {
        let modes = Prealloc::ALL.to_vec();
        // The `Formatting ...` line echoes the defaults `create` uses.
        let defaults = CreateSpec::new(0);
        let on_off = |on: bool| if on { "on" } else { "off" };
        OptionTable {
            format_options: vec![
                OptionSpec::new(
                    "cluster_size",
                    OptionKind::Size,
                    "Cluster size in bytes (512 to 2M)",
                )
                .echoed(defaults.cluster_size.bytes().to_string()),
                OptionSpec::new(
                    "extended_l2",
                    OptionKind::Bool,
                    "Split clusters into 32 subclusters (needs clusters of 16k or more)",
                )
                .echoed(on_off(defaults.extended_l2)),
                OptionSpec::preallocation(&modes),
                OptionSpec::new(
                    "compression_type",
                    OptionKind::Str,
                    "Algorithm for compressed clusters: zlib or zstd (zstd needs v3)",
                )
                .echoed(defaults.compression.name()),
                OptionSpec::size(),
                OptionSpec::new(
                    "compat",
                    OptionKind::Str,
                    "qcow2 version: v2 (alias 0.10) or v3 (alias 1.1)",
                ),
                OptionSpec::new(
                    "backing_file",
                    OptionKind::Str,
                    "Image this one is an overlay of",
                ),
                OptionSpec::new(
                    "backing_fmt",
                    OptionKind::Str,
                    "Format of the backing image",
                ),
                OptionSpec::new(
                    "lazy_refcounts",
                    OptionKind::Bool,
                    "Defer refcount updates until the image is closed (needs v3)",
                )
                .echoed(on_off(defaults.lazy_refcounts)),
                OptionSpec::new(
                    "refcount_bits",
                    OptionKind::Number,
                    "Bits per refcount entry, a power of two up to 64 (only 16 on v2)",
                )
                .echoed(defaults.refcount_order.width_bits().to_string()),
            ],
            protocol_options: vec![OptionSpec::nocow(), OptionSpec::extent_size_hint()],
            echo_order: vec![
                "cluster_size",
                "extended_l2",
                "preallocation",
                "compression_type",
                "size",
                "compat",
                "backing_file",
                "backing_fmt",
                "lazy_refcounts",
                "refcount_bits",
                "nocow",
                "extent_size_hint",
            ],
            prealloc_modes: modes,
            not_yet: vec![
                "data_file",
                "data_file_raw",
                "keep_data_file",
                "encryption",
                "encrypt.format",
                "encrypt.key-secret",
                "encrypt.cipher-alg",
                "encrypt.cipher-mode",
                "encrypt.ivgen-alg",
                "encrypt.ivgen-hash-alg",
                "encrypt.hash-alg",
                "encrypt.iter-time",
            ],
            amend_options: vec![
                "backing_file",
                "backing_fmt",
                "compat",
                "lazy_refcounts",
                "refcount_bits",
                "size",
            ],
            amend_not_yet: vec![
                "data_file",
                "data_file_raw",
                "encrypt.iter-time",
                "encrypt.keyslot",
                "encrypt.new-secret",
                "encrypt.old-secret",
                "encrypt.state",
            ],
        }
    }

    fn open(&self, file: FileNode, ctx: &OpenContext<'_>) -> Result<OpenedLayer> {
        let name = ctx.name;
        let parse = |file: &FileNode| {
            Header::parse(&read_head(file)?, file.file_len())
                .map_err(|e| e.context(&format!("Could not open '{name}'")))
        };
        let header = parse(&file)?;
        if !(file.is_writable() && header.dirty()) {
            return Ok(OpenedLayer {
                file,
                layer: Box::new(Pending(header)),
            });
        }
        // An image with lazy refcounts left dirty by a writer that never
        // closed it: its refcounts are rebuilt before anything writes, as
        // QEMU does on open.
        let Some(path) = file.path().map(Path::to_path_buf) else {
            return Err(Error::InvalidImage(format!(
                "Could not open '{name}' for writing: a writer left its refcounts dirty (lazy refcounts), and qimg rebuilds them only in local files; run 'qemu-img check -r all' on the image where it is stored, or open it read-only"
            )));
        };
        drop(file);
        crate::qcow2::check::repair::rebuild_if_dirty(&path)?;
        let file = FileNode::open_rw(&path)?;
        let header = parse(&file)?;
        Ok(OpenedLayer {
            file,
            layer: Box::new(Pending(header)),
        })
    }

    fn plan_create(&self, options: &Options) -> Result<CreateFacts> {
        let spec = spec_of(options)?;
        let layout = spec.plan()?;
        Ok(CreateFacts {
            virtual_size: spec.virtual_size(),
            file_length: layout.file_len,
            metadata_length: layout.metadata_bytes(),
        })
    }

    fn create(&self, path: &Path, options: &Options, file_opts: FileOptions) -> Result<()> {
        // `create` validates the whole spec before it touches the file.
        crate::qcow2::create(path, &spec_of(options)?, file_opts).map(|_| ())
    }

    fn measure(&self, request: &MeasureRequest<'_>) -> Result<Measurement> {
        // The size measured is the request's, whatever `-o size=` says.
        let sized = request
            .options
            .clone()
            .set("size", OptionValue::Int(request.virtual_size));
        let spec = spec_of(&sized)?;
        // Measure refuses what create would, but (as qemu-img) does not
        // check the combination of backing file and preallocation.
        CreateSpec {
            size: 0,
            prealloc: Prealloc::Off,
            backing: None,
            ..spec.clone()
        }
        .plan()?;
        let data = match request.source {
            Some(source) => measure::image_data_bytes(source, spec.cluster_size)?,
            None => 0,
        };
        let target = Qcow2Target {
            cluster_size: spec.cluster_size,
            refcount_order: spec.refcount_order,
            extended_l2: spec.extended_l2,
            prealloc: spec.prealloc,
            has_backing: spec.backing.is_some(),
        };
        let mut found =
            measure::qcow2(request.virtual_size, data, request.source.is_some(), target)?;
        // Only a v3 image carries persistent bitmaps, into a v3 target.
        if let Some(q) = request.source.and_then(|s| s.as_qcow2()) {
            if q.header().compat == Compat::V3 && spec.compat == Compat::V3 {
                let listed: Vec<(u64, usize)> = listed_bitmaps(q)?
                    .iter()
                    .map(|b| (b.granularity, b.name.len()))
                    .collect();
                found.bitmaps = Some(measure::bitmaps_bytes(q.size(), &listed, spec.cluster_size));
            }
        }
        Ok(found)
    }

    fn check(&self, node: &dyn BlockDev) -> Option<Result<CheckReport>> {
        node.as_qcow2().map(crate::qcow2::check::check)
    }

    fn format_specific(&self, node: &dyn BlockDev) -> Result<Option<InfoValue>> {
        let Some(q) = node.as_qcow2() else {
            return Ok(None);
        };
        let h = q.header();
        let v3 = h.compat == Compat::V3;
        // QEMU's ImageInfoSpecificQCow2: its member names, in its order.
        let compat = match h.compat {
            Compat::V2 => "0.10",
            Compat::V3 => "1.1",
        };
        let mut spec = vec![("compat", InfoValue::Str(compat.into()))];
        if v3 {
            spec.push(("extended-l2", InfoValue::Bool(h.extended_l2())));
            spec.push(("lazy-refcounts", InfoValue::Bool(h.lazy_refcounts())));
            spec.push(("corrupt", InfoValue::Bool(h.corrupt())));
        }
        spec.push((
            "refcount-bits",
            InfoValue::Int(h.refcount_order.width_bits()),
        ));
        if h.bitmaps.is_some() && h.autoclear & AUTOCLEAR_BITMAPS != 0 {
            let list = listed_bitmaps(q)?
                .into_iter()
                .map(|b| {
                    let mut flags = Vec::new();
                    if b.in_use {
                        flags.push(InfoValue::Str("in-use".into()));
                    }
                    if b.auto {
                        flags.push(InfoValue::Str("auto".into()));
                    }
                    InfoValue::Map(vec![
                        ("name", InfoValue::Str(b.name)),
                        ("granularity", InfoValue::Int(b.granularity)),
                        ("flags", InfoValue::List(flags)),
                    ])
                })
                .collect();
            spec.push(("bitmaps", InfoValue::List(list)));
        }
        // v2 images have no compression type field: theirs is zlib.
        spec.push((
            "compression-type",
            InfoValue::Str(h.compression.name().into()),
        ));
        Ok(Some(InfoValue::Map(spec)))
    }
}

/// A qcow2 image read as far as its header.
struct Pending(Header);

impl PendingLayer for Pending {
    fn backing(&self) -> Option<BackingRef> {
        self.0.backing_file.as_ref().map(|name| BackingRef {
            name: name.clone(),
            format: self.0.backing_format.clone(),
        })
    }

    fn has_metadata(&self) -> bool {
        true
    }

    fn into_node(
        self: Box<Self>,
        file: Arc<FileNode>,
        backing: Option<Arc<dyn BlockDev>>,
        backing_path: Option<String>,
    ) -> Result<Arc<dyn BlockDev>> {
        let filename = file.filename().to_string();
        Ok(Arc::new(
            Qcow2Node::open(file, self.0, backing, backing_path)
                .map_err(|e| e.context(&format!("Could not open '{filename}'")))?,
        ))
    }
}

/// The persistent bitmaps of `q` as QEMU lists them: none when a writer
/// that does not know bitmaps cleared the directory's autoclear bit.
fn listed_bitmaps(q: &Qcow2Node) -> Result<Vec<bitmaps::BitmapInfo>> {
    let h = q.header();
    match h.bitmaps.filter(|_| h.autoclear & AUTOCLEAR_BITMAPS != 0) {
        Some(ext) => bitmaps::read_bitmap_directory(q.file_node(), &ext),
        None => Ok(Vec::new()),
    }
}

/// The creation spec `options` ask for, QEMU's defaults for the rest; not
/// yet validated.
pub fn spec_of(options: &Options) -> Result<CreateSpec> {
    let defaults = CreateSpec::new(options.size()?);
    let compat = match options.text("compat")? {
        None => defaults.compat,
        Some(c) => Compat::parse(c).ok_or_else(|| {
            Error::invalid(format!("Parameter 'version' does not accept value '{c}'"))
        })?,
    };
    let compression = match options.text("compression_type")? {
        None => defaults.compression,
        Some(c) => CompressionType::parse(c).ok_or_else(|| {
            Error::invalid(format!(
                "Parameter 'compression-type' does not accept value '{c}'"
            ))
        })?,
    };
    let backing_format = options.text("backing_fmt")?.map(str::to_string);
    Ok(CreateSpec {
        cluster_size: ClusterSize::new(
            options.int("cluster_size", defaults.cluster_size.bytes())?,
        )?,
        compat,
        refcount_order: RefcountOrder::from_bits(
            options.int("refcount_bits", defaults.refcount_order.width_bits())?,
        )?,
        lazy_refcounts: options.flag("lazy_refcounts", defaults.lazy_refcounts)?,
        extended_l2: options.flag("extended_l2", defaults.extended_l2)?,
        compression,
        prealloc: options.prealloc(&Prealloc::ALL)?,
        backing: options.text("backing_file")?.map(|file| BackingSpec {
            file: file.to_string(),
            format: backing_format,
        }),
        ..defaults
    })
}
