//! Node trees from specs, quorum events and scrub, as Python objects.

use crate::image::Image;
use crate::long::run_long;
use crate::to_py;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use qimg_core::block::{self, BlockDev, SpecOptions};
use qimg_core::quorum::events::{Event, EventData, EventLog};
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
        cache: crate::image::cache_mode(cache)?,
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

/// An event as Python gets it: (name, seconds, microseconds, QMP data).
pub(crate) type EventTuple<'py> = (&'static str, u64, u32, Bound<'py, PyDict>);

fn event_tuple<'py>(py: Python<'py>, e: &Event) -> PyResult<EventTuple<'py>> {
    let d = PyDict::new(py);
    match &e.data {
        EventData::ReportBad {
            op,
            error,
            node_name,
            sector_num,
            sectors_count,
        } => {
            d.set_item("type", op.name())?;
            if let Some(err) = error {
                d.set_item("error", err)?;
            }
            d.set_item("node-name", node_name)?;
            d.set_item("sector-num", sector_num)?;
            d.set_item("sectors-count", sectors_count)?;
        }
        EventData::Failure {
            reference,
            sector_num,
            sectors_count,
        } => {
            d.set_item("reference", reference)?;
            d.set_item("sector-num", sector_num)?;
            d.set_item("sectors-count", sectors_count)?;
        }
    }
    Ok((e.data.name(), e.seconds, e.microseconds, d))
}

/// The events `log` recorded since the last call, oldest first:
/// (name, seconds, microseconds, data).
pub(crate) fn take_events<'py>(
    py: Python<'py>,
    log: Option<&Arc<EventLog>>,
) -> PyResult<Vec<crate::quorum::EventTuple<'py>>> {
    let Some(log) = log else {
        return Ok(Vec::new());
    };
    log.take().iter().map(|e| event_tuple(py, e)).collect()
}

fn ranges<'py>(py: Python<'py>, r: &[(u64, u64)]) -> PyResult<Bound<'py, PyList>> {
    PyList::new(py, r.iter().map(|(o, l)| vec![*o, *l]))
}

fn error_ranges<'py>(py: Python<'py>, r: &[(u64, u64, String)]) -> PyResult<Bound<'py, PyList>> {
    let items: Vec<(u64, u64, String)> = r.to_vec();
    PyList::new(py, items)
}

/// Reads the whole quorum `image`, votes on every block, and returns what
/// each child got wrong; with `repair` (image open for writing) the losers
/// and failed reads are rewritten with the winning bytes.
#[pyfunction]
#[pyo3(signature = (image, *, repair=false, workers=None, progress=None))]
pub fn scrub<'py>(
    py: Python<'py>,
    image: PyRef<'_, Image>,
    repair: bool,
    workers: Option<usize>,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
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
    let out = PyDict::new(py);
    out.set_item("size", report.size)?;
    out.set_item("bytes-compared", report.bytes_compared)?;
    out.set_item("bytes-skipped-zero", report.bytes_skipped_zero)?;
    let children = PyList::empty(py);
    for c in &report.children {
        let d = PyDict::new(py);
        d.set_item("node-name", &c.name)?;
        d.set_item("bad-ranges", ranges(py, &c.bad)?)?;
        d.set_item("read-errors", error_ranges(py, &c.read_errors)?)?;
        d.set_item("repaired-bytes", c.repaired_bytes)?;
        d.set_item("repair-errors", error_ranges(py, &c.repair_errors)?)?;
        children.append(d)?;
    }
    out.set_item("children", children)?;
    out.set_item("unvoted-ranges", ranges(py, &report.unvoted)?)?;
    Ok(out)
}
