//! `check -r`: repairing a qcow2 image in place, then checking it again.

use crate::convey::run_long;
use crate::convey::{report_dict, to_py};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use qimg_core::qcow2::check::repair::{self, RepairMode};
use qimg_core::Error;
use std::path::PathBuf;

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
