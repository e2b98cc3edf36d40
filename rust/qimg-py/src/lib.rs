//! qimg._core: the Python face of qimg-core. Arguments come in as owned
//! values, real work runs with the GIL released, and every core error is
//! mapped to a `qimg.errors` exception in one place (`convey::to_py`).

use convey::to_py;
use pyo3::prelude::*;

mod convey;
mod creating;
mod image;
mod lifecycle;
mod registry;
mod repairing;
mod requests;
mod results;
mod trees;

/// The local path file name `name` opens (`file:` and `host_device:`
/// prefixes read as qemu-img reads them; other protocols refused).
#[pyfunction]
fn local_path(name: &str) -> PyResult<String> {
    qimg_core::block::open::local_path(name)
        .map(str::to_string)
        .map_err(to_py)
}

/// Where backing file name `backing` of image `overlay` points (qemu's rule).
#[pyfunction]
fn resolve_backing(overlay: &str, backing: &str) -> String {
    qimg_core::block::open::resolve_backing(overlay, backing)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<creating::CreateRequest>()?;
    m.add_function(wrap_pyfunction!(creating::measure_image, m)?)?;
    m.add_class::<image::Image>()?;
    m.add_class::<convey::CheckCounts>()?;
    m.add_class::<repairing::RepairOutcome>()?;
    m.add_class::<results::MapExtent>()?;
    m.add_class::<results::Storage>()?;
    m.add_class::<results::Event>()?;
    m.add_class::<results::QuorumReportBad>()?;
    m.add_class::<results::QuorumFailure>()?;
    m.add_class::<results::CompareOutcome>()?;
    m.add_class::<results::RangeError>()?;
    m.add_class::<results::ScrubChild>()?;
    m.add_class::<results::ScrubResult>()?;
    m.add_class::<results::Measurement>()?;
    m.add_class::<results::FileDetails>()?;
    m.add_class::<results::BackingDetails>()?;
    m.add_class::<results::SnapshotDetails>()?;
    m.add_class::<results::ImageDetails>()?;
    m.add_class::<registry::FormatDriverInfo>()?;
    m.add_class::<registry::FormatOption>()?;
    m.add_function(wrap_pyfunction!(registry::format_drivers, m)?)?;
    m.add_function(wrap_pyfunction!(registry::qemu_only_formats, m)?)?;
    m.add_function(wrap_pyfunction!(image::open_image, m)?)?;
    m.add_function(wrap_pyfunction!(trees::open_spec, m)?)?;
    m.add_function(wrap_pyfunction!(trees::canonical_spec, m)?)?;
    m.add_function(wrap_pyfunction!(trees::scrub, m)?)?;
    m.add_function(wrap_pyfunction!(image::compare_images, m)?)?;
    m.add_function(wrap_pyfunction!(image::convert, m)?)?;
    m.add_function(wrap_pyfunction!(image::check_image, m)?)?;
    m.add_function(wrap_pyfunction!(lifecycle::commit_image, m)?)?;
    m.add_function(wrap_pyfunction!(lifecycle::rebase_copy, m)?)?;
    m.add_function(wrap_pyfunction!(lifecycle::create_snapshot, m)?)?;
    m.add_function(wrap_pyfunction!(lifecycle::apply_snapshot, m)?)?;
    m.add_function(wrap_pyfunction!(lifecycle::delete_snapshot, m)?)?;
    m.add_function(wrap_pyfunction!(lifecycle::change_bitmap, m)?)?;
    m.add_function(wrap_pyfunction!(lifecycle::open_snapshot, m)?)?;
    m.add_function(wrap_pyfunction!(repairing::repair_image, m)?)?;
    m.add_function(wrap_pyfunction!(resolve_backing, m)?)?;
    m.add_function(wrap_pyfunction!(local_path, m)?)?;
    requests::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
