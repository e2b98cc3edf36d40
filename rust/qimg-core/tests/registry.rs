#![allow(clippy::expect_used)] // A test stops at the first surprise.
//! Adding a format is one driver and one registry line: a tiny format that
//! exists only in this file is probed, created, opened, read and written,
//! measured and listed in `-o help` through the registry's entry points,
//! the ones the CLI's paths use.

use qimg_core::block::{BlockDev, FileNode, OpenOptions, Status};
use qimg_core::error::{Error, Result};
use qimg_core::formats::{
    CreateFacts, FormatDriver, MeasureRequest, OpenContext, OpenedLayer, OptionKind, OptionSpec,
    OptionTable, OptionValue, Options, PendingLayer, Registry,
};
use qimg_core::host_file::{FileOptions, NewFile};
use qimg_core::measure::Measurement;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, LazyLock};

/// The tiny format: a 512-byte header (magic, virtual size, a label), then
/// the guest bytes.
const MAGIC: &[u8; 8] = b"TINYIMG\0";
const HEADER: u64 = 512;
const LABEL_AT: usize = 16;
const LABEL_MAX: usize = 64;

struct Tiny;

static TINY: Tiny = Tiny;

static WITH_TINY: LazyLock<Registry> = LazyLock::new(|| Registry::standard().with(&TINY));

impl FormatDriver for Tiny {
    fn name(&self) -> &'static str {
        "tiny"
    }

    fn probe(&self, head: &[u8]) -> u32 {
        if head.starts_with(MAGIC) {
            50
        } else {
            0
        }
    }

    fn options(&self) -> OptionTable {
        OptionTable {
            format_options: vec![
                OptionSpec::size(),
                OptionSpec::new("label", OptionKind::Str, "A name kept in the header").echoed("''"),
            ],
            echo_order: vec!["size", "label"],
            ..OptionTable::default()
        }
    }

    fn open(&self, file: FileNode, ctx: &OpenContext<'_>) -> Result<OpenedLayer> {
        let mut header = [0u8; HEADER as usize];
        if file.file_len() < HEADER {
            return Err(Error::InvalidImage(format!(
                "'{}' is too short for a tiny image",
                ctx.name
            )));
        }
        file.pread(&mut header, 0)?;
        if !header.starts_with(MAGIC) {
            return Err(Error::InvalidImage(format!("'{}' is not tiny", ctx.name)));
        }
        let mut size = [0u8; 8];
        size.copy_from_slice(&header[8..16]);
        Ok(OpenedLayer {
            file,
            layer: Box::new(PendingTiny {
                size: u64::from_be_bytes(size),
            }),
        })
    }

    fn plan_create(&self, options: &Options) -> Result<CreateFacts> {
        let size = options.size()?;
        if options.text("label")?.unwrap_or("").len() > LABEL_MAX {
            return Err(Error::invalid("label too long"));
        }
        Ok(CreateFacts {
            virtual_size: size,
            file_length: HEADER + size,
            metadata_length: HEADER,
        })
    }

    fn create(&self, path: &Path, options: &Options, file_opts: FileOptions) -> Result<()> {
        let size = self.plan_create(options)?.virtual_size;
        let label = options.text("label")?.unwrap_or("");
        let mut header = vec![0u8; HEADER as usize];
        header[..8].copy_from_slice(MAGIC);
        header[8..16].copy_from_slice(&size.to_be_bytes());
        header[LABEL_AT..LABEL_AT + label.len()].copy_from_slice(label.as_bytes());
        let new = NewFile::create(path, file_opts)?;
        new.set_len(HEADER + size)?;
        new.file
            .write_all_at(&header, 0)
            .map_err(|e| new.io_error("Could not write to", e))?;
        new.finish()
    }

    fn measure(&self, request: &MeasureRequest<'_>) -> Result<Measurement> {
        let size = HEADER + request.virtual_size;
        Ok(Measurement {
            required: size,
            fully_allocated: size,
            bitmaps: None,
        })
    }
}

struct PendingTiny {
    size: u64,
}

impl PendingLayer for PendingTiny {
    fn has_metadata(&self) -> bool {
        true
    }

    fn into_node(
        self: Box<Self>,
        file: Arc<FileNode>,
        _backing: Option<Arc<dyn BlockDev>>,
        _backing_path: Option<String>,
    ) -> Result<Arc<dyn BlockDev>> {
        Ok(Arc::new(TinyNode {
            file,
            size: self.size,
        }))
    }
}

struct TinyNode {
    file: Arc<FileNode>,
    size: u64,
}

impl BlockDev for TinyNode {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.pread(buf, HEADER + offset)
    }

    fn status(&self, offset: u64, len: u64) -> Result<Status> {
        Ok(Status {
            len,
            data: true,
            offset: Some(HEADER + offset),
            ..Status::default()
        })
    }

    fn format_name(&self) -> &'static str {
        "tiny"
    }

    fn filename(&self) -> &str {
        self.file.filename()
    }

    fn file(&self) -> Option<&Arc<FileNode>> {
        Some(&self.file)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        qimg_core::block::check_request(self, offset, buf.len() as u64)?;
        self.file.pwrite(buf, HEADER + offset)
    }
}

fn tiny_options(size: u64) -> Options {
    Options::new()
        .set("size", OptionValue::Int(size))
        .set("label", OptionValue::Str("hello".into()))
}

#[test]
fn a_format_added_in_a_test_is_probed_created_opened_and_measured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.tiny");
    let name = path.to_str().expect("utf-8 path");
    let registry: &'static Registry = &WITH_TINY;

    registry
        .create(
            "tiny",
            &path,
            &tiny_options(1 << 20),
            FileOptions::default(),
        )
        .expect("create");
    let bytes = std::fs::read(&path).expect("read back");
    assert_eq!(bytes.len() as u64, HEADER + (1 << 20));
    assert_eq!(&bytes[LABEL_AT..LABEL_AT + 5], b"hello");

    // Probing: the new registry knows it; qimg's own reads it as raw bytes.
    let probed = registry.probe(&bytes[..4096]).expect("probe");
    assert_eq!(probed.name(), "tiny");
    let standard = Registry::standard().probe(&bytes[..4096]).expect("probe");
    assert_eq!(standard.name(), "raw");
    // The formats qimg had still probe as before.
    assert_eq!(
        registry.probe(b"QFI\xfb\0\0\0\x03").map(|d| d.name()),
        Ok("qcow2")
    );
    assert_eq!(registry.probe(b"KDMV....").map(|d| d.name()), Err("vmdk"));
    assert_eq!(registry.probe(b"plain").map(|d| d.name()), Ok("raw"));

    // Opening (probed), writing, and reading back through a second open.
    let writable = OpenOptions {
        writable: true,
        ..OpenOptions::default()
    };
    let node = registry.open_image(name, &writable).expect("open");
    assert_eq!((node.format_name(), node.size()), ("tiny", 1 << 20));
    node.write_at(b"guest data", 4096).expect("write");
    node.close().expect("close");
    drop(node);
    let node = registry
        .open_image(name, &OpenOptions::default())
        .expect("reopen");
    let mut buf = [0u8; 10];
    node.read_at(&mut buf, 4096).expect("read");
    assert_eq!(&buf, b"guest data");
    assert!(node.write_at(b"x", 0).is_err(), "opened read-only");
    // The bytes sit behind the header, where the driver put them.
    let bytes = std::fs::read(&path).expect("read back");
    assert_eq!(&bytes[(HEADER + 4096) as usize..][..10], b"guest data");

    // A format given by name comes from the same registry.
    let by_name = OpenOptions {
        format: Some(registry.lookup("tiny").expect("lookup")),
        ..OpenOptions::default()
    };
    let named = registry.open_image(name, &by_name).expect("open by name");
    assert_eq!(named.format_name(), "tiny");
    assert!(Registry::standard().lookup("tiny").is_err());

    // Measuring a new tiny image for the data of this one, and of a size.
    let request = MeasureRequest {
        virtual_size: node.size(),
        source: Some(node.as_ref()),
        options: &tiny_options(node.size()),
    };
    let m = registry.measure("tiny", &request).expect("measure");
    assert_eq!(
        (m.required, m.fully_allocated),
        (HEADER + (1 << 20), HEADER + (1 << 20))
    );
    let raw = registry.measure("raw", &request).expect("measure raw");
    assert_eq!(raw.required, 1 << 20);

    // The driver's table makes its `-o help` listing; it has no check and
    // no format-specific info.
    let driver = registry
        .driver_of(node.as_ref())
        .expect("driver of the node");
    let help = driver.options().help_text("tiny", false);
    assert!(help.starts_with("Supported tiny options:\n"), "{help}");
    assert!(
        help.contains("  label=<str>            - A name kept in the header\n"),
        "{help}"
    );
    assert!(help.contains("  size=<size>"), "{help}");
    assert!(driver.options().amend_help_text("tiny").is_none());
    assert!(driver.check(node.as_ref()).is_none());
    assert_eq!(driver.format_specific(node.as_ref()).expect("info"), None);
}

#[test]
fn unknown_formats_are_refused_naming_the_registry_formats() {
    assert_eq!(WITH_TINY.names_joined(), "qcow2, raw and tiny");
    let err = WITH_TINY.lookup("vmdk").map(|d| d.name());
    assert_eq!(
        err.map_err(|e| e.to_string()),
        Err("Unknown format 'vmdk': qimg reads qcow2, raw and tiny images".to_string())
    );
}

#[test]
fn the_standard_drivers_create_and_measure_through_the_registry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::standard();
    let qcow2 = dir.path().join("a.qcow2");
    let options = Options::new()
        .set("size", OptionValue::Int(64 << 20))
        .set("cluster_size", OptionValue::Int(4096));
    registry
        .create("qcow2", &qcow2, &options, FileOptions::default())
        .expect("create qcow2");
    let node = registry
        .open_image(qcow2.to_str().expect("utf-8"), &OpenOptions::default())
        .expect("open qcow2");
    assert_eq!((node.format_name(), node.size()), ("qcow2", 64 << 20));
    let driver = registry.driver_of(node.as_ref()).expect("qcow2 driver");
    let report = driver
        .check(node.as_ref())
        .expect("qcow2 has a check")
        .expect("check");
    assert_eq!((report.corruptions, report.leaks), (0, 0));
    assert!(driver
        .format_specific(node.as_ref())
        .expect("info")
        .is_some());

    // The numbers qemu-img measure gives for an empty 2 GiB qcow2 image.
    let options = Options::new().set("size", OptionValue::Int(2 << 30));
    let m = registry
        .measure(
            "qcow2",
            &MeasureRequest {
                virtual_size: 2 << 30,
                source: None,
                options: &options,
            },
        )
        .expect("measure");
    assert_eq!((m.required, m.fully_allocated), (589_824, 2_148_073_472));

    let raw = dir.path().join("b.raw");
    let options = Options::new()
        .set("size", OptionValue::Int(1000))
        .set("preallocation", OptionValue::Str("metadata".into()));
    let err = registry
        .create("raw", &raw, &options, FileOptions::default())
        .map_err(|e| e.to_string());
    assert_eq!(
        err,
        Err("Unsupported preallocation mode: metadata".to_string())
    );
    assert!(!raw.exists());
}
