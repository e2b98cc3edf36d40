//! What the binding's calls return, as typed, frozen Python classes: the
//! facts `info` shows of an image, `map` extents, quorum events, the outcome
//! of a compare, the report of a scrub and a measurement. Each mirrors the
//! core's own value; the Python side shapes them into qemu-img's output.

use crate::convey::to_py;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyList};
use qimg_core::block::{status, BlockDev};
use qimg_core::compare;
use qimg_core::formats::{InfoValue, Registry};
use qimg_core::measure;
use qimg_core::qcow2::reader::Qcow2Node;
use qimg_core::qcow2::snapshot;
use qimg_core::quorum::events::{EventData, EventLog};
use qimg_core::quorum::scrub;
use std::sync::Arc;

/// A run of guest bytes with one allocation status, as `map` prints it.
#[pyclass(frozen, get_all, module = "qimg._core")]
pub struct MapExtent {
    start: u64,
    length: u64,
    depth: u32,
    present: bool,
    zero: bool,
    data: bool,
    compressed: bool,
    offset: Option<u64>,
    filename: Option<String>,
}

impl From<status::MapExtent> for MapExtent {
    fn from(e: status::MapExtent) -> MapExtent {
        MapExtent {
            start: e.start,
            length: e.length,
            depth: e.depth,
            present: e.present,
            zero: e.zero,
            data: e.data,
            compressed: e.compressed,
            offset: e.offset,
            filename: e.filename,
        }
    }
}

/// Where an image's bytes are: its protocol node's driver and name.
#[pyclass(frozen, get_all, module = "qimg._core")]
pub struct Storage {
    format: &'static str,
    filename: String,
}

impl Storage {
    pub(crate) fn of(node: &dyn BlockDev) -> Option<Storage> {
        node.file().map(|file| Storage {
            format: file.format_name(),
            filename: file.filename().to_string(),
        })
    }
}

/// One event a node recorded. `sector_num` and `sectors_count` are the
/// range it is about in 512-byte sectors, as QMP reports them; `detail` is
/// what the kind of event adds (`QuorumReportBad` or `QuorumFailure`).
#[pyclass(frozen, get_all, module = "qimg._core")]
pub struct Event {
    kind: &'static str,
    seconds: u64,
    microseconds: u32,
    sector_num: u64,
    sectors_count: u64,
    detail: Py<PyAny>,
}

/// A `QUORUM_REPORT_BAD`: child `node_name` failed a request of kind `op`
/// (`error` set) or returned data that lost the vote (`error` None).
#[pyclass(frozen, get_all, module = "qimg._core")]
pub struct QuorumReportBad {
    op: &'static str,
    error: Option<String>,
    node_name: String,
}

/// A `QUORUM_FAILURE`: no version of the range reached the vote threshold
/// in quorum `reference`.
#[pyclass(frozen, get_all, module = "qimg._core")]
pub struct QuorumFailure {
    reference: String,
}

/// The events `log` recorded since the last call, oldest first.
pub(crate) fn take_events(py: Python<'_>, log: Option<&Arc<EventLog>>) -> PyResult<Vec<Event>> {
    let Some(log) = log else {
        return Ok(Vec::new());
    };
    log.take()
        .into_iter()
        .map(|e| {
            let kind = e.data.name();
            let (sector_num, sectors_count, detail) = match e.data {
                EventData::ReportBad {
                    op,
                    error,
                    node_name,
                    sector_num,
                    sectors_count,
                } => {
                    let detail = QuorumReportBad {
                        op: op.name(),
                        error,
                        node_name,
                    };
                    (sector_num, sectors_count, Py::new(py, detail)?.into_any())
                }
                EventData::Failure {
                    reference,
                    sector_num,
                    sectors_count,
                } => {
                    let detail = QuorumFailure { reference };
                    (sector_num, sectors_count, Py::new(py, detail)?.into_any())
                }
            };
            Ok(Event {
                kind,
                seconds: e.seconds,
                microseconds: e.microseconds,
                sector_num,
                sectors_count,
                detail,
            })
        })
        .collect()
}

/// How a compare ended: `kind` is "identical", "mismatch" (contents differ
/// at `offset`), "size-mismatch" (strict mode) or "status-mismatch" (strict
/// mode, allocation differs at `offset`); `size_mismatch`: the sizes differ.
#[pyclass(frozen, get_all, module = "qimg._core")]
pub struct CompareOutcome {
    kind: &'static str,
    offset: Option<u64>,
    size_mismatch: bool,
}

impl From<compare::CompareResult> for CompareOutcome {
    fn from(r: compare::CompareResult) -> CompareOutcome {
        let (kind, offset, size_mismatch) = match r.outcome {
            compare::Outcome::Identical => ("identical", None, r.size_mismatch),
            compare::Outcome::Mismatch { offset } => ("mismatch", Some(offset), r.size_mismatch),
            compare::Outcome::SizeMismatch => ("size-mismatch", None, true),
            compare::Outcome::StatusMismatch { offset } => {
                ("status-mismatch", Some(offset), r.size_mismatch)
            }
        };
        CompareOutcome {
            kind,
            offset,
            size_mismatch,
        }
    }
}

/// A range of a quorum child that could not be read or rewritten, with the error.
#[pyclass(frozen, get_all, module = "qimg._core")]
pub struct RangeError {
    offset: u64,
    length: u64,
    error: String,
}

fn range_errors(py: Python<'_>, errors: Vec<(u64, u64, String)>) -> PyResult<Vec<Py<RangeError>>> {
    errors
        .into_iter()
        .map(|(offset, length, error)| {
            Py::new(
                py,
                RangeError {
                    offset,
                    length,
                    error,
                },
            )
        })
        .collect()
}

/// What a scrub found in one child of the quorum: the `(offset, length)`
/// ranges where it lost the vote, the ranges it could not read, and what
/// the repair rewrote and failed to rewrite.
#[pyclass(frozen, get_all, module = "qimg._core")]
pub struct ScrubChild {
    node_name: String,
    bad_ranges: Vec<(u64, u64)>,
    read_errors: Vec<Py<RangeError>>,
    repaired_bytes: u64,
    repair_errors: Vec<Py<RangeError>>,
}

/// What a scrub found: the bytes it compared and settled as zeroes without
/// reading, each child's findings, and the ranges no version won.
#[pyclass(frozen, get_all, module = "qimg._core")]
pub struct ScrubResult {
    size: u64,
    bytes_compared: u64,
    bytes_skipped_zero: u64,
    children: Vec<Py<ScrubChild>>,
    unvoted_ranges: Vec<(u64, u64)>,
}

impl ScrubResult {
    pub(crate) fn new(py: Python<'_>, report: scrub::ScrubReport) -> PyResult<ScrubResult> {
        let children = report
            .children
            .into_iter()
            .map(|c| {
                let child = ScrubChild {
                    node_name: c.name,
                    bad_ranges: c.bad,
                    read_errors: range_errors(py, c.read_errors)?,
                    repaired_bytes: c.repaired_bytes,
                    repair_errors: range_errors(py, c.repair_errors)?,
                };
                Py::new(py, child)
            })
            .collect::<PyResult<_>>()?;
        Ok(ScrubResult {
            size: report.size,
            bytes_compared: report.bytes_compared,
            bytes_skipped_zero: report.bytes_skipped_zero,
            children,
            unvoted_ranges: report.unvoted,
        })
    }
}

/// qemu-img measure's numbers: the file size the new image needs, with
/// every cluster allocated, and for persistent bitmaps (None: the target
/// cannot carry them).
#[pyclass(frozen, get_all, module = "qimg._core")]
pub struct Measurement {
    required: u64,
    fully_allocated: u64,
    bitmaps: Option<u64>,
}

impl From<measure::Measurement> for Measurement {
    fn from(m: measure::Measurement) -> Measurement {
        Measurement {
            required: m.required,
            fully_allocated: m.fully_allocated,
            bitmaps: m.bitmaps,
        }
    }
}

/// The protocol node below a format node: its name and driver, its length,
/// and the bytes it takes on disk (None for an export, whose server does
/// not say).
#[pyclass(frozen, get_all, module = "qimg._core")]
pub struct FileDetails {
    filename: String,
    format: &'static str,
    length: u64,
    actual_size: Option<u64>,
}

/// The backing file an image's header names, where it points, and the
/// format the header records for it.
#[pyclass(frozen, get_all, module = "qimg._core")]
pub struct BackingDetails {
    filename: String,
    full_filename: Option<String>,
    format: Option<String>,
}

/// One internal snapshot of a qcow2 image (`icount` None when the entry
/// does not record it).
#[pyclass(frozen, get_all, module = "qimg._core")]
pub struct SnapshotDetails {
    id: String,
    name: String,
    vm_state_size: u64,
    date_sec: u32,
    date_nsec: u32,
    vm_clock_nsec: u64,
    icount: Option<u64>,
}

/// The facts `info` shows of one image. `file` is its protocol node (None
/// for a node with no file below it); `cluster_size` and `backing` are set
/// for formats that have them; `dirty` is false for those without the flag.
/// `format_specific` is what the format's driver adds, as plain data in
/// QEMU's member names and order (the `data` of info's `format-specific`).
#[pyclass(frozen, get_all, module = "qimg._core")]
pub struct ImageDetails {
    filename: String,
    format: &'static str,
    virtual_size: u64,
    file: Option<Py<FileDetails>>,
    cluster_size: Option<u64>,
    dirty: bool,
    backing: Option<Py<BackingDetails>>,
    snapshots: Vec<Py<SnapshotDetails>>,
    format_specific: Option<Py<PyAny>>,
}

impl ImageDetails {
    /// Reads what `info` shows of `node` (the GIL released for the reads).
    pub(crate) fn gather(py: Python<'_>, node: &dyn BlockDev) -> PyResult<ImageDetails> {
        let file = match node.file() {
            None => None,
            Some(file) => {
                let actual_size = py.detach(|| file.allocated_bytes()).map_err(to_py)?;
                let details = FileDetails {
                    filename: file.filename().to_string(),
                    format: file.format_name(),
                    length: file.size(),
                    actual_size,
                };
                Some(Py::new(py, details)?)
            }
        };
        let mut details = ImageDetails {
            filename: node.filename().to_string(),
            format: node.format_name(),
            virtual_size: node.size(),
            file,
            cluster_size: None,
            dirty: false,
            backing: None,
            snapshots: Vec::new(),
            format_specific: None,
        };
        if let Some(q) = node.as_qcow2() {
            details.add_qcow2_header(py, q)?;
        }
        let specific = py
            .detach(|| match Registry::standard().driver_of(node) {
                Some(driver) => driver.format_specific(node),
                None => Ok(None),
            })
            .map_err(to_py)?;
        if let Some(value) = specific {
            details.format_specific = Some(plain_data(py, value)?.unbind());
        }
        if let Some(q) = node.as_qcow2() {
            details.add_snapshots(py, q)?;
        }
        Ok(details)
    }

    fn add_qcow2_header(&mut self, py: Python<'_>, q: &Qcow2Node) -> PyResult<()> {
        let h = q.header();
        self.cluster_size = Some(h.cluster_size.bytes());
        self.dirty = h.dirty();
        if let Some(name) = q.backing_name() {
            let backing = BackingDetails {
                filename: name.to_string(),
                full_filename: q.backing_path().map(str::to_string),
                format: h.backing_format.clone(),
            };
            self.backing = Some(Py::new(py, backing)?);
        }
        Ok(())
    }

    fn add_snapshots(&mut self, py: Python<'_>, q: &Qcow2Node) -> PyResult<()> {
        let h = q.header();
        if h.snapshot_count > 0 {
            let snaps = py
                .detach(|| snapshot::read_snapshots(q.file_node(), h))
                .map_err(to_py)?;
            self.snapshots = snaps
                .into_iter()
                .map(|s| {
                    let entry = SnapshotDetails {
                        id: s.id,
                        name: s.name,
                        vm_state_size: s.vm_state_size,
                        date_sec: s.date_sec,
                        date_nsec: s.date_nsec,
                        vm_clock_nsec: s.vm_clock_nsec,
                        icount: s.icount,
                    };
                    Py::new(py, entry)
                })
                .collect::<PyResult<_>>()?;
        }
        Ok(())
    }
}

/// A driver's `info` data as Python values (maps keep their order).
fn plain_data<'py>(py: Python<'py>, value: InfoValue) -> PyResult<Bound<'py, PyAny>> {
    Ok(match value {
        InfoValue::Str(s) => s.into_pyobject(py)?.into_any(),
        InfoValue::Int(n) => n.into_pyobject(py)?.into_any(),
        InfoValue::Bool(b) => PyBool::new(py, b).to_owned().into_any(),
        InfoValue::List(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(plain_data(py, item)?)?;
            }
            list.into_any()
        }
        InfoValue::Map(entries) => {
            let dict = PyDict::new(py);
            for (key, item) in entries {
                dict.set_item(key, plain_data(py, item)?)?;
            }
            dict.into_any()
        }
    })
}
