//! Image formats as drivers: each format is one module implementing
//! [`FormatDriver`], and the [`Registry`] lists them in probing order. Opening,
//! probing, creating, measuring, checking and `info` reach a format only
//! through its driver, so adding a format is one module and one registry line.

pub mod options;
pub mod qcow2;
pub mod raw;

use crate::block::{BlockDev, FileNode};
use crate::error::{Error, Result};
use crate::host_file::FileOptions;
use crate::measure::Measurement;
use crate::qcow2::check::CheckReport;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, LazyLock};

pub use options::{OptionKind, OptionSpec, OptionTable, OptionValue, Options};

/// A probe score no driver but the fallback (raw) gives: anything claimed
/// with more beats it, and a foreign magic is looked for only when nothing did.
pub const FALLBACK_SCORE: u32 = 1;

/// One image format.
pub trait FormatDriver: Send + Sync {
    /// The name users give with `-f`/`-O` and qemu-img shows.
    fn name(&self) -> &'static str;

    /// How sure the driver is that `head`, an image's first bytes (up to
    /// 4 KiB, fewer in a shorter file), is in its format: 0 for "not mine";
    /// the highest score among the drivers wins.
    fn probe(&self, head: &[u8]) -> u32;

    /// The creation options (with `-o help` texts, the `Formatting ...`
    /// echo, preallocation modes and what `amend` can change).
    fn options(&self) -> OptionTable;

    /// Reads the format's header from `file`, before the layer below (its
    /// backing file) is opened. May replace the file (a repair on open).
    fn open(&self, file: FileNode, ctx: &OpenContext<'_>) -> Result<OpenedLayer>;

    /// Checks a creation request as a whole, touching no file: what
    /// `create` would refuse is refused here, and the new file's layout is
    /// reported.
    fn plan_create(&self, options: &Options) -> Result<CreateFacts>;

    /// Creates an image at `path` from typed `-o` options (`size` included).
    fn create(&self, path: &Path, options: &Options, file_opts: FileOptions) -> Result<()>;

    /// What a new image in this format would need on disk.
    fn measure(&self, request: &MeasureRequest<'_>) -> Result<Measurement>;

    /// The consistency check of an image opened by this driver; None when
    /// the format has none.
    fn check(&self, _node: &dyn BlockDev) -> Option<Result<CheckReport>> {
        None
    }

    /// The format-specific part of `info` (QEMU's `format-specific` data),
    /// None when the format has none.
    fn format_specific(&self, _node: &dyn BlockDev) -> Result<Option<InfoValue>> {
        Ok(None)
    }
}

impl fmt::Debug for dyn FormatDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FormatDriver({})", self.name())
    }
}

/// What a driver's `open` is told about the layer it opens.
#[derive(Debug, Clone, Copy)]
pub struct OpenContext<'a> {
    /// The name the image was opened by (for messages).
    pub name: &'a str,
    /// The format came from probing rather than from the user.
    pub probed: bool,
}

/// The image its header names below an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingRef {
    /// The name as stored in the header.
    pub name: String,
    /// The format recorded with it, if any.
    pub format: Option<String>,
}

/// A driver's part of an image opened as far as its header: what the chain
/// needs to know before the node itself can be built over its backing node.
pub trait PendingLayer: Send {
    /// The backing file the header names.
    fn backing(&self) -> Option<BackingRef> {
        None
    }

    /// The format keeps metadata in the file: its writer grows the file, and
    /// its readers keep other writers out (QEMU's lock permissions).
    fn has_metadata(&self) -> bool;

    /// Builds the node over `backing` (opened by `backing_path`), once the
    /// file is locked.
    fn into_node(
        self: Box<Self>,
        file: Arc<FileNode>,
        backing: Option<Arc<dyn BlockDev>>,
        backing_path: Option<String>,
    ) -> Result<Arc<dyn BlockDev>>;
}

/// What a driver's `open` gives back.
pub struct OpenedLayer {
    /// The file to build on (the one given, or a reopened one).
    pub file: FileNode,
    pub layer: Box<dyn PendingLayer>,
}

/// What a checked creation request will write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateFacts {
    /// The image's virtual size (the request's, rounded as the format does).
    pub virtual_size: u64,
    /// Length of the new file.
    pub file_length: u64,
    /// Bytes of metadata in front of the data.
    pub metadata_length: u64,
}

/// A measurement request: a new image of `virtual_size` bytes, holding the
/// data of `source` if one is given, created with `options`.
pub struct MeasureRequest<'a> {
    pub virtual_size: u64,
    pub source: Option<&'a dyn BlockDev>,
    pub options: &'a Options,
}

/// A value of `info`'s format-specific data, in the order QEMU shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoValue {
    Str(String),
    Int(u64),
    Bool(bool),
    List(Vec<InfoValue>),
    Map(Vec<(&'static str, InfoValue)>),
}

/// Magic numbers of formats qimg does not read, so that such images are
/// refused by name instead of being read as raw bytes.
const FOREIGN_MAGICS: [(&[u8], usize, &str); 13] = [
    // qcow2's magic with version 1: the older qcow format.
    (b"QFI\xfb\0\0\0\x01", 0, "qcow"),
    (b"KDMV", 0, "vmdk"),
    (b"COWD", 0, "vmdk"),
    (b"LUKS\xba\xbe", 0, "luks"),
    (b"WithoutFreeSpace", 0, "parallels"),
    (b"WithouFreSpacExt", 0, "parallels"),
    (b"Bochs Virtual HD Image", 0, "bochs"),
    (b"#!/bin/sh\n#V2.0 Format\n", 0, "cloop"),
    (b"# Disk DescriptorFile", 0, "vmdk"),
    (b"conectix", 0, "vpc"),
    (b"vhdxfile", 0, "vhdx"),
    (b"QED\0", 0, "qed"),
    (b"\x7f\x10\xda\xbe", 64, "vdi"),
];

/// Formats QEMU has and qimg does not, and whether QEMU can create them;
/// named so that refusals can say why.
pub const QEMU_ONLY_FORMATS: [(&str, bool); 12] = [
    ("qcow", true),
    ("qed", true),
    ("vdi", true),
    ("vhdx", true),
    ("vmdk", true),
    ("vpc", true),
    ("parallels", true),
    ("luks", true),
    ("bochs", false),
    ("cloop", false),
    ("dmg", false),
    ("vvfat", false),
];

/// The formats qimg knows, in probing order.
#[derive(Debug, Clone)]
pub struct Registry {
    drivers: Vec<&'static dyn FormatDriver>,
}

static STANDARD: LazyLock<Registry> = LazyLock::new(|| Registry {
    drivers: vec![
        // One line per format.
        &qcow2::QCOW2,
        &raw::RAW,
    ],
});

impl Registry {
    /// qimg's formats.
    pub fn standard() -> &'static Registry {
        &STANDARD
    }

    /// This registry with `driver` added (probed after the others; a later
    /// driver of the same name replaces the earlier one).
    pub fn with(&self, driver: &'static dyn FormatDriver) -> Registry {
        let mut drivers: Vec<_> = self
            .drivers
            .iter()
            .copied()
            .filter(|d| d.name() != driver.name())
            .collect();
        drivers.push(driver);
        Registry { drivers }
    }

    /// The drivers, in probing order.
    pub fn drivers(&self) -> &[&'static dyn FormatDriver] {
        &self.drivers
    }

    /// The driver named `name`.
    pub fn get(&self, name: &str) -> Option<&'static dyn FormatDriver> {
        self.drivers.iter().copied().find(|d| d.name() == name)
    }

    /// The driver named `name`, or an error naming the formats there are.
    pub fn lookup(&self, name: &str) -> Result<&'static dyn FormatDriver> {
        self.get(name).ok_or_else(|| {
            Error::invalid(format!(
                "Unknown format '{name}': qimg reads {} images",
                self.names_joined()
            ))
        })
    }

    /// The driver of an open node (its format name).
    pub fn driver_of(&self, node: &dyn BlockDev) -> Option<&'static dyn FormatDriver> {
        self.get(node.format_name())
    }

    /// The format names as a sentence: `qcow2 and raw`.
    pub fn names_joined(&self) -> String {
        let names: Vec<&str> = self.drivers.iter().map(|d| d.name()).collect();
        match names.split_last() {
            None => String::new(),
            Some((last, [])) => (*last).to_string(),
            Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
        }
    }

    /// Identifies the format of `head`, the first bytes of a file: the
    /// driver with the highest score (the first of equals); an image in a
    /// format QEMU has and qimg does not is refused by that format's name.
    pub fn probe(
        &self,
        head: &[u8],
    ) -> std::result::Result<&'static dyn FormatDriver, &'static str> {
        let mut best: Option<(u32, &'static dyn FormatDriver)> = None;
        for d in self.drivers.iter().copied() {
            let score = d.probe(head);
            if score > 0 && best.is_none_or(|(s, _)| score > s) {
                best = Some((score, d));
            }
        }
        if let Some((score, d)) = best {
            if score > FALLBACK_SCORE {
                return Ok(d);
            }
        }
        for (magic, at, name) in FOREIGN_MAGICS {
            if head.get(at..at + magic.len()) == Some(magic) {
                return Err(name);
            }
        }
        best.map(|(_, d)| d).ok_or("unknown")
    }
}

impl Registry {
    /// Creates an image of format `format` at `path` (`options` hold `size`).
    pub fn create(
        &self,
        format: &str,
        path: &Path,
        options: &Options,
        file_opts: FileOptions,
    ) -> Result<()> {
        self.lookup(format)?.create(path, options, file_opts)
    }

    /// What a new image of format `format` would need on disk.
    pub fn measure(&self, format: &str, request: &MeasureRequest<'_>) -> Result<Measurement> {
        self.lookup(format)?.measure(request)
    }
}

/// The driver named `name` among qimg's formats.
pub fn driver(name: &str) -> Option<&'static dyn FormatDriver> {
    Registry::standard().get(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probed(head: &[u8]) -> std::result::Result<&'static str, &'static str> {
        Registry::standard().probe(head).map(|d| d.name())
    }

    #[test]
    fn probing_names_foreign_formats() {
        assert_eq!(probed(b"QFI\xfb\0\0\0\x03"), Ok("qcow2"));
        assert_eq!(probed(b"QFI\xfb\0\0\0\x01"), Err("qcow"));
        assert_eq!(probed(b"KDMV...."), Err("vmdk"));
        assert_eq!(probed(b"hello"), Ok("raw"));
        assert_eq!(probed(b""), Ok("raw"));
    }

    #[test]
    fn format_names_read_as_a_sentence() {
        assert_eq!(Registry::standard().names_joined(), "qcow2 and raw");
    }
}
