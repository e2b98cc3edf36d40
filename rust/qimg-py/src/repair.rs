//! `check -r`: repairing a qcow2 image in place, then checking it again.

use crate::long::run_long;
use crate::to_py;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use qimg_core::qcow2::check::CheckReport;
use qimg_core::qcow2::repair::{self, RepairMode};
use qimg_core::Error;
use std::path::PathBuf;

/// A check report as the dict `qimg.check.CheckReport` is built from.
pub(crate) fn report_dict<'py>(
    py: Python<'py>,
    report: &CheckReport,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("corruptions", report.corruptions)?;
    d.set_item("leaks", report.leaks)?;
    d.set_item("check_errors", report.check_errors)?;
    d.set_item("image_end_offset", report.image_end_offset)?;
    d.set_item("total_clusters", report.total_clusters)?;
    d.set_item("allocated_clusters", report.allocated_clusters)?;
    d.set_item("fragmented_clusters", report.fragmented_clusters)?;
    d.set_item("compressed_clusters", report.compressed_clusters)?;
    d.set_item("messages", &report.messages)?;
    Ok(d)
}

/// Repairs the qcow2 image at `path` (`mode`: "leaks" or "all") and checks
/// it again when anything was repaired. Returns a dict: `repair` (the report
/// of the repair pass, its lines included), `leaks_fixed`,
/// `corruptions_fixed`, `failure` (the exception of a repair pass that
/// could not complete, or None), `recheck` (the report of the second check,
/// or None) and `recheck_failure` (its exception, or None).
#[pyfunction]
pub fn repair_image<'py>(
    py: Python<'py>,
    path: PathBuf,
    mode: &str,
) -> PyResult<Bound<'py, PyDict>> {
    let mode = RepairMode::from_name(mode).ok_or_else(|| {
        to_py(Error::invalid(format!(
            "--repair (-r) expects 'leaks' or 'all' not '{mode}'"
        )))
    })?;
    let outcome = run_long(py, None, move |_| repair::repair(&path, mode))?.map_err(to_py)?;
    let d = PyDict::new(py);
    d.set_item("repair", report_dict(py, &outcome.repair)?)?;
    d.set_item("leaks_fixed", outcome.leaks_fixed)?;
    d.set_item("corruptions_fixed", outcome.corruptions_fixed)?;
    d.set_item("failure", outcome.failure.map(|e| to_py(e).into_value(py)))?;
    let (recheck, recheck_failure) = match outcome.recheck {
        None => (None, None),
        Some(Ok(report)) => (Some(report_dict(py, &report)?), None),
        Some(Err(e)) => (None, Some(to_py(e).into_value(py))),
    };
    d.set_item("recheck", recheck)?;
    d.set_item("recheck_failure", recheck_failure)?;
    Ok(d)
}
