//! `check -r`: repairing a qcow2 image in place, then checking it again.

use crate::convey::run_long;
use crate::convey::{to_py, CheckCounts};
use pyo3::prelude::*;
use qimg_core::qcow2::check::repair::{self, RepairMode};
use std::path::PathBuf;

/// What `check -r` did: the report of the repair pass (its lines included),
/// what it fixed, the exception of a repair pass that could not complete,
/// and the report of the second check (or the exception that ended it).
#[pyclass(frozen, get_all, module = "qimg._core")]
pub struct RepairOutcome {
    repair: Py<CheckCounts>,
    leaks_fixed: u64,
    corruptions_fixed: u64,
    failure: Option<Py<PyAny>>,
    recheck: Option<Py<CheckCounts>>,
    recheck_failure: Option<Py<PyAny>>,
}

/// Repairs the qcow2 image at `path` (`mode`: "leaks" or "all") and checks
/// it again when anything was repaired.
#[pyfunction]
pub fn repair_image(py: Python<'_>, path: PathBuf, mode: &str) -> PyResult<RepairOutcome> {
    let mode = RepairMode::parse(mode).map_err(to_py)?;
    let outcome = run_long(py, None, move |_| repair::repair(&path, mode))?.map_err(to_py)?;
    let (recheck, recheck_failure) = match outcome.recheck {
        None => (None, None),
        Some(Ok(report)) => (Some(Py::new(py, CheckCounts::from(report))?), None),
        Some(Err(e)) => (None, Some(to_py(e).into_value(py).into_any())),
    };
    Ok(RepairOutcome {
        repair: Py::new(py, CheckCounts::from(outcome.repair))?,
        leaks_fixed: outcome.leaks_fixed,
        corruptions_fixed: outcome.corruptions_fixed,
        failure: outcome.failure.map(|e| to_py(e).into_value(py).into_any()),
        recheck,
        recheck_failure,
    })
}
