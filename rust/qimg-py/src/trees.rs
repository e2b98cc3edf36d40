//! Node trees opened from specs, and the scrub of a quorum of replicas.

use crate::convey::run_long;
use crate::convey::to_py;
use crate::image::Image;
use crate::results::ScrubResult;
use pyo3::prelude::*;
use qimg_core::block::{self, BlockDev, SpecOptions};
use qimg_core::quorum::events::EventLog;
use qimg_core::quorum::scrub as engine;
use qimg_core::Error;
use std::sync::Arc;

/// Opens the canonical node tree `spec_json` (made by `qimg.spec`).
#[pyfunction]
#[pyo3(signature = (spec_json, *, writable=false, cache="writeback", force_share=false,
                    purpose="read"))]
pub fn open_spec(
    py: Python<'_>,
    spec_json: String,
    writable: bool,
    cache: &str,
    force_share: bool,
    purpose: &str,
) -> PyResult<Image> {
    let log = EventLog::new();
    let opts = SpecOptions {
        writable,
        cache: crate::requests::target_cache(cache)?,
        sharing: crate::image::sharing(force_share, purpose)?,
    };
    let opened = Arc::clone(&log);
    let node = run_long(py, None, move |_| {
        block::open_spec(&spec_json, opts, &opened)
    })?
    .map_err(to_py)?;
    Ok(Image {
        node,
        events: Some(log),
    })
}

/// The canonical document `json` as the core reads it, written back with
/// its keys sorted; opens nothing. Raises the core's error (naming what is
/// wrong) when `json` is not a canonical document.
#[pyfunction]
pub fn canonical_spec(json: &str) -> PyResult<String> {
    block::canonical_spec(json).map_err(to_py)
}

/// Reads the whole quorum `image`, votes on every block, and returns what
/// each child got wrong; with `repair` (image open for writing) the losers
/// and failed reads are rewritten with the winning bytes.
#[pyfunction]
#[pyo3(signature = (image, *, repair=false, workers=None, progress=None))]
pub fn scrub(
    py: Python<'_>,
    image: PyRef<'_, Image>,
    repair: bool,
    workers: Option<usize>,
    progress: Option<Py<PyAny>>,
) -> PyResult<ScrubResult> {
    let node = Arc::clone(&image.node);
    let Some(q) = node.as_quorum() else {
        return Err(to_py(Error::invalid(format!(
            "'{}' is a {} image, not a quorum: scrub needs a quorum of replicas (json:{{\"driver\":\"quorum\",...}})",
            node.filename(),
            node.format_name()
        ))));
    };
    // Two pieces at a time keep two cores busy on local replicas; remote
    // ones need more requests in flight.
    let workers = workers.unwrap_or(if q.is_remote() { 8 } else { 2 });
    let report = run_long(py, progress, move |p| match node.as_quorum() {
        Some(q) => engine::scrub(q, repair, workers, p),
        None => Err(Error::invalid("not a quorum")),
    })?
    .map_err(to_py)?;
    ScrubResult::new(py, report)
}
