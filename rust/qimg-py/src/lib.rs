//! qimg._core: the Python face of qimg-core. Arguments come in as owned
//! values, real work runs with the GIL released, and every core error is
//! mapped to a `qimg.errors` exception in one place (`convey::to_py`).

use convey::to_py;
use pyo3::prelude::*;
use qimg_core::host_file::FileOptions;
use qimg_core::measure::{self, Qcow2Target};
use qimg_core::qcow2::layout::CreateLayout;
use qimg_core::qcow2::{self, BackingSpec, ClusterSize, Compat, CompressionType, RefcountOrder};
use qimg_core::{Error, Prealloc};
use std::path::PathBuf;

mod convey;
mod image;
mod lifecycle;
mod repairing;
mod trees;

fn prealloc(name: &str) -> PyResult<Prealloc> {
    Prealloc::from_name(name).ok_or_else(|| {
        to_py(Error::invalid(format!(
            "Parameter 'preallocation' does not accept value '{name}'"
        )))
    })
}

fn file_options(nocow: bool, extent_size_hint: Option<u64>) -> FileOptions {
    FileOptions {
        nocow,
        extent_size_hint,
    }
}

/// A validated qcow2 creation request.
#[pyclass(frozen, module = "qimg._core")]
struct Qcow2Spec {
    spec: qcow2::CreateSpec,
    /// Planned once at construction, which is also what validates the spec.
    layout: CreateLayout,
}

#[pymethods]
impl Qcow2Spec {
    #[new]
    #[pyo3(signature = (*, size, cluster_size, compat, refcount_bits, lazy_refcounts,
                        extended_l2, compression_type, preallocation,
                        backing_file=None, backing_fmt=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        size: u64,
        cluster_size: u64,
        compat: &str,
        refcount_bits: u64,
        lazy_refcounts: bool,
        extended_l2: bool,
        compression_type: &str,
        preallocation: &str,
        backing_file: Option<String>,
        backing_fmt: Option<String>,
    ) -> PyResult<Self> {
        let compat = Compat::parse(compat).ok_or_else(|| {
            to_py(Error::invalid(format!(
                "Parameter 'version' does not accept value '{compat}'"
            )))
        })?;
        let compression = CompressionType::parse(compression_type).ok_or_else(|| {
            to_py(Error::invalid(format!(
                "Parameter 'compression-type' does not accept value '{compression_type}'"
            )))
        })?;
        let spec = qcow2::CreateSpec {
            size,
            cluster_size: ClusterSize::new(cluster_size).map_err(to_py)?,
            compat,
            refcount_order: RefcountOrder::from_bits(refcount_bits).map_err(to_py)?,
            lazy_refcounts,
            extended_l2,
            compression,
            prealloc: prealloc(preallocation)?,
            backing: backing_file.map(|file| BackingSpec {
                file,
                format: backing_fmt,
            }),
        };
        let layout = spec.plan().map_err(to_py)?;
        Ok(Qcow2Spec { spec, layout })
    }

    /// The image's virtual size (the requested size in whole sectors).
    #[getter]
    fn virtual_size(&self) -> u64 {
        self.spec.virtual_size()
    }

    #[getter]
    fn cluster_size(&self) -> u64 {
        self.spec.cluster_size.bytes()
    }

    /// qcow2 version of the image: 2 or 3.
    #[getter]
    fn version(&self) -> u32 {
        self.spec.compat.version()
    }

    /// Length of the file `create` will write, in bytes.
    #[getter]
    fn file_length(&self) -> u64 {
        self.layout.file_len
    }

    /// Bytes of metadata in front of the data region.
    #[getter]
    fn metadata_length(&self) -> u64 {
        self.layout.metadata_bytes()
    }

    #[pyo3(signature = (path, *, nocow=false, extent_size_hint=None))]
    fn create(
        &self,
        py: Python<'_>,
        path: PathBuf,
        nocow: bool,
        extent_size_hint: Option<u64>,
    ) -> PyResult<()> {
        let opts = file_options(nocow, extent_size_hint);
        let spec = self.spec.clone();
        convey::run_long(py, None, move |_| qcow2::create(&path, &spec, opts))?
            .map(|_| ())
            .map_err(to_py)
    }
}

#[pyfunction]
#[pyo3(signature = (path, size, preallocation, *, nocow=false, extent_size_hint=None))]
fn create_raw(
    py: Python<'_>,
    path: PathBuf,
    size: u64,
    preallocation: &str,
    nocow: bool,
    extent_size_hint: Option<u64>,
) -> PyResult<()> {
    let mode = prealloc(preallocation)?;
    let opts = file_options(nocow, extent_size_hint);
    convey::run_long(py, None, move |_| {
        qimg_core::raw_create::create(&path, size, mode, opts)
    })?
    .map_err(to_py)
}

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

#[pyfunction]
#[pyo3(signature = (spec, *, virtual_size, data, has_source, preallocation, has_backing))]
fn measure_qcow2(
    spec: PyRef<'_, Qcow2Spec>,
    virtual_size: u64,
    data: u64,
    has_source: bool,
    preallocation: &str,
    has_backing: bool,
) -> PyResult<(u64, u64, Option<u64>)> {
    let target = Qcow2Target {
        cluster_size: spec.spec.cluster_size,
        refcount_order: spec.spec.refcount_order,
        extended_l2: spec.spec.extended_l2,
        prealloc: prealloc(preallocation)?,
        has_backing,
    };
    let m = measure::qcow2(virtual_size, data, has_source, target).map_err(to_py)?;
    Ok((m.required, m.fully_allocated, m.bitmaps))
}

/// (required, fully allocated, None) for a raw target.
#[pyfunction]
fn measure_raw(virtual_size: u64) -> (u64, u64, Option<u64>) {
    let m = measure::raw(virtual_size);
    (m.required, m.fully_allocated, m.bitmaps)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Qcow2Spec>()?;
    m.add_class::<image::Image>()?;
    m.add_class::<convey::CheckCounts>()?;
    m.add_class::<repairing::RepairOutcome>()?;
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
    m.add_function(wrap_pyfunction!(create_raw, m)?)?;
    m.add_function(wrap_pyfunction!(resolve_backing, m)?)?;
    m.add_function(wrap_pyfunction!(local_path, m)?)?;
    m.add_function(wrap_pyfunction!(measure_qcow2, m)?)?;
    m.add_function(wrap_pyfunction!(measure_raw, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
