//! The raw driver: the guest disk is the file, byte for byte. Any bytes
//! are a raw image, so it is the fallback of probing.

use super::{
    CreateFacts, FormatDriver, MeasureRequest, OpenContext, OpenedLayer, OptionSpec, OptionTable,
    Options, PendingLayer, Registry, FALLBACK_SCORE,
};
use crate::block::raw::RawNode;
use crate::block::{BlockDev, FileNode};
use crate::error::Result;
use crate::host_file::FileOptions;
use crate::measure::{self, Measurement};
use crate::prealloc::Prealloc;
use std::path::Path;
use std::sync::Arc;

pub struct RawDriver;

pub static RAW: RawDriver = RawDriver;

/// The modes `raw_create` knows: a raw image has no metadata to allocate.
const PREALLOC_MODES: [Prealloc; 3] = [Prealloc::Off, Prealloc::Falloc, Prealloc::Full];

impl FormatDriver for RawDriver {
    fn name(&self) -> &'static str {
        "raw"
    }

    fn probe(&self, _head: &[u8]) -> u32 {
        FALLBACK_SCORE
    }

    fn options(&self) -> OptionTable {
        OptionTable {
            format_options: vec![OptionSpec::size()],
            // The file protocol's table, as qemu-img lists it for raw.
            protocol_options: vec![
                OptionSpec::size(),
                OptionSpec::nocow(),
                OptionSpec::preallocation(&PREALLOC_MODES),
                OptionSpec::extent_size_hint(),
            ],
            echo_order: vec!["size", "nocow", "preallocation", "extent_size_hint"],
            prealloc_modes: PREALLOC_MODES.to_vec(),
            ..OptionTable::default()
        }
    }

    fn open(&self, file: FileNode, ctx: &OpenContext<'_>) -> Result<OpenedLayer> {
        Ok(OpenedLayer {
            file,
            layer: Box::new(Pending { probed: ctx.probed }),
        })
    }

    fn plan_create(&self, options: &Options) -> Result<CreateFacts> {
        let size = crate::raw_create::plan(options.size()?, options.prealloc(&Prealloc::ALL)?)?;
        Ok(CreateFacts {
            virtual_size: size,
            file_length: size,
            metadata_length: 0,
        })
    }

    fn create(&self, path: &Path, options: &Options, file_opts: FileOptions) -> Result<()> {
        // Every mode passes here: `raw_create` refuses metadata with QEMU's message.
        let mode = options.prealloc(&Prealloc::ALL)?;
        crate::raw_create::create(path, options.size()?, mode, file_opts)
    }

    fn measure(&self, request: &MeasureRequest<'_>) -> Result<Measurement> {
        Ok(measure::raw(request.virtual_size))
    }
}

struct Pending {
    probed: bool,
}

impl PendingLayer for Pending {
    fn has_metadata(&self) -> bool {
        false
    }

    fn into_node(
        self: Box<Self>,
        file: Arc<FileNode>,
        _backing: Option<Arc<dyn BlockDev>>,
        _backing_path: Option<String>,
    ) -> Result<Arc<dyn BlockDev>> {
        Ok(Arc::new(RawNode::new(
            file,
            self.probed.then_some(still_raw),
        )))
    }
}

/// Whether `head`, a first sector, still probes as raw among qimg's formats.
fn still_raw(head: &[u8]) -> bool {
    Registry::standard()
        .probe(head)
        .is_ok_and(|d| d.name() == RAW.name())
}
