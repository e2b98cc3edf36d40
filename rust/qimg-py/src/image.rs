//! Open images as Python objects: reads, map, the facts `info` shows,
//! compare and convert (their results are typed in `results`). Every call that touches the disk releases the GIL.

use crate::convey::run_long;
use crate::convey::to_py;
use crate::results::{self, CompareOutcome, Event, ImageDetails, MapExtent, Storage};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes};
use qimg_core::block::lock::{LockRequest, Purpose, Sharing};
use qimg_core::block::{self, BlockDev, OpenOptions};
use qimg_core::compare;
use qimg_core::convert as engine;
use qimg_core::formats::{FormatDriver, Registry};
use qimg_core::qcow2::amend::{AmendSpec, Backing};
use qimg_core::qcow2::{ClusterSize, Compat, RefcountOrder};
use qimg_core::quorum::events::EventLog;
use qimg_core::Error;
use std::sync::Arc;

/// An open image (format node with its backing chain).
#[pyclass(frozen, module = "qimg._core")]
pub struct Image {
    pub(crate) node: Arc<dyn BlockDev>,
    /// Where the graph's quorum nodes record events (None: no quorum).
    pub(crate) events: Option<Arc<EventLog>>,
}

fn parse_format(name: Option<&str>) -> PyResult<Option<&'static dyn FormatDriver>> {
    name.map(|n| Registry::standard().lookup(n))
        .transpose()
        .map_err(to_py)
}

#[pyfunction]
#[pyo3(signature = (path, format=None, *, no_backing=false, writable=false, cache="writeback",
                    force_share=false, purpose="read", writable_backing=None))]
#[allow(clippy::too_many_arguments)]
pub fn open_image(
    py: Python<'_>,
    path: String,
    format: Option<String>,
    no_backing: bool,
    writable: bool,
    cache: &str,
    force_share: bool,
    purpose: &str,
    writable_backing: Option<u32>,
) -> PyResult<Image> {
    let opts = OpenOptions {
        format: parse_format(format.as_deref())?,
        no_backing,
        writable,
        writable_backing,
        cache: crate::requests::target_cache(cache)?,
        sharing: sharing(force_share, purpose)?,
    };
    let node = run_long(py, None, move |_| block::open_image(&path, &opts))?.map_err(to_py)?;
    Ok(Image { node, events: None })
}

/// The lock intent of an open: `purpose` is one of `lock::Purpose`'s names.
pub(crate) fn sharing(force_share: bool, purpose: &str) -> PyResult<Sharing> {
    let purpose = Purpose::from_name(purpose)
        .ok_or_else(|| to_py(Error::invalid(format!("Unknown open purpose '{purpose}'"))))?;
    Ok(Sharing {
        purpose,
        force_share,
    })
}

/// Runs `f` on the contents of a `bytes` (without copying) or a `bytearray`
/// (copied first: it could be resized while the GIL is released).
fn with_bytes<T>(data: &Bound<'_, PyAny>, f: impl FnOnce(&[u8]) -> PyResult<T>) -> PyResult<T> {
    if let Ok(b) = data.cast::<PyBytes>() {
        return f(b.as_bytes());
    }
    if let Ok(b) = data.cast::<PyByteArray>() {
        return f(&b.to_vec());
    }
    Err(pyo3::exceptions::PyTypeError::new_err(format!(
        "expected bytes or bytearray, not {}",
        data.get_type().name()?
    )))
}

impl Image {
    fn check_range(&self, offset: u64, length: u64) -> PyResult<()> {
        let size = self.node.size();
        if offset.checked_add(length).is_none_or(|end| end > size) {
            return Err(to_py(Error::invalid(format!(
                "Read of {length} bytes at offset {offset} is outside the image ({size} bytes)"
            ))));
        }
        Ok(())
    }
}

#[pymethods]
impl Image {
    #[getter]
    fn size(&self) -> u64 {
        self.node.size()
    }

    #[getter]
    fn format(&self) -> &'static str {
        self.node.format_name()
    }

    #[getter]
    fn filename(&self) -> String {
        self.node.filename().to_string()
    }

    /// Where the image's bytes are: the protocol node's format and name
    /// (`None` for a node with no file below it).
    #[getter]
    fn storage(&self) -> Option<Storage> {
        Storage::of(self.node.as_ref())
    }

    /// Writes the bytes of `data` (any buffer) at guest `offset`.
    fn write(&self, py: Python<'_>, offset: u64, data: &Bound<'_, PyAny>) -> PyResult<()> {
        with_bytes(data, |bytes| {
            py.detach(|| self.node.write_at(bytes, offset))
                .map_err(to_py)
        })
    }

    /// Makes `length` bytes at `offset` read as zeroes; `unmap` lets the
    /// image release the space.
    #[pyo3(signature = (offset, length, *, unmap=false))]
    fn write_zeroes(&self, py: Python<'_>, offset: u64, length: u64, unmap: bool) -> PyResult<()> {
        py.detach(|| self.node.write_zeroes(offset, length, unmap))
            .map_err(to_py)
    }

    /// Discards whole clusters of `[offset, offset + length)`.
    fn discard(&self, py: Python<'_>, offset: u64, length: u64) -> PyResult<()> {
        py.detach(|| self.node.discard(offset, length))
            .map_err(to_py)
    }

    /// Makes every write so far durable.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.node.flush()).map_err(to_py)
    }

    /// Changes the virtual size; `preallocation` applies to a grown area.
    #[pyo3(signature = (size, *, preallocation="off"))]
    fn resize(&self, py: Python<'_>, size: u64, preallocation: &str) -> PyResult<()> {
        let mode = crate::requests::prealloc(preallocation)?;
        let node = Arc::clone(&self.node);
        run_long(py, None, move |_| node.resize(size, mode))?.map_err(to_py)
    }

    /// Names another backing file in the header (None: none), as `qemu-img
    /// rebase -u` does; the data is not touched. Close the image afterwards:
    /// its open backing chain is the old one.
    #[pyo3(signature = (backing_file, backing_fmt))]
    fn set_backing_name(
        &self,
        py: Python<'_>,
        backing_file: Option<String>,
        backing_fmt: Option<String>,
    ) -> PyResult<()> {
        self.node.as_qcow2().ok_or_else(|| {
            to_py(Error::invalid(format!(
                "Format driver '{}' does not support changing the backing file",
                self.node.format_name()
            )))
        })?;
        let node = Arc::clone(&self.node);
        run_long(py, None, move |_| {
            let q = node
                .as_qcow2()
                .ok_or_else(|| Error::invalid("not a qcow2 image"))?;
            let backing = backing_file.as_deref().map(|name| Backing {
                name,
                format: backing_fmt.as_deref(),
            });
            q.set_backing_name(backing)
        })?
        .map_err(to_py)
    }

    /// Changes qcow2 options in place (see `qimg amend`); None keeps a value.
    /// Returns the handle to use from now on (this one is retired).
    #[pyo3(signature = (*, compat=None, lazy_refcounts=None, refcount_bits=None, size=None))]
    fn amend(
        &self,
        py: Python<'_>,
        compat: Option<&str>,
        lazy_refcounts: Option<bool>,
        refcount_bits: Option<u64>,
        size: Option<u64>,
    ) -> PyResult<Image> {
        self.node.as_qcow2().ok_or_else(|| {
            to_py(Error::invalid(format!(
                "Format driver '{}' does not support option amendment",
                self.node.format_name()
            )))
        })?;
        let compat = compat
            .map(|c| {
                Compat::parse(c).ok_or_else(|| {
                    Error::invalid(format!(
                        "Invalid compatibility level: '{c}' (use 0.10 or v2, 1.1 or v3)"
                    ))
                })
            })
            .transpose()
            .map_err(to_py)?;
        let refcount_order = refcount_bits
            .map(RefcountOrder::from_bits)
            .transpose()
            .map_err(to_py)?;
        let spec = AmendSpec {
            compat,
            lazy_refcounts,
            refcount_order,
            size,
        };
        let node = Arc::clone(&self.node);
        // The amended image comes back as a new handle that follows its new
        // header; this one is retired.
        let fresh = run_long(py, None, move |_| match node.as_qcow2() {
            Some(q) => q.amend(&spec).and_then(|()| q.reopen()),
            None => Err(Error::invalid("not a qcow2 image")),
        })?
        .map_err(to_py)?;
        Ok(Image {
            node: Arc::new(fresh),
            events: self.events.clone(),
        })
    }

    /// Gives up QEMU's image locks every file of the image holds: when it is
    /// closed (this object may live on until Python collects it), or before
    /// another open of the same file in this process takes them (`check -r`).
    fn release_locks(&self) -> PyResult<()> {
        let mut result = Ok(());
        self.node.visit_files(&mut |f| {
            if let Err(e) = f.lock(LockRequest::default()) {
                result = Err(e);
            }
        });
        result.map_err(to_py)
    }

    /// Flushes and leaves the image clean on disk.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.node.close()).map_err(to_py)
    }

    /// Writes one whole cluster compressed (the cluster must be unallocated).
    fn write_compressed(
        &self,
        py: Python<'_>,
        offset: u64,
        data: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let q = self.node.as_qcow2().ok_or_else(|| {
            to_py(Error::invalid(format!(
                "'{}' is a {} image: only qcow2 stores compressed clusters",
                self.node.filename(),
                self.node.format_name()
            )))
        })?;
        with_bytes(data, |bytes| {
            py.detach(|| q.write_compressed(bytes, offset))
                .map_err(to_py)
        })
    }

    #[getter]
    fn writable(&self) -> bool {
        self.node.is_writable()
    }

    /// `length` bytes of guest data at `offset`.
    fn read<'py>(
        &self,
        py: Python<'py>,
        offset: u64,
        length: u64,
    ) -> PyResult<Bound<'py, PyBytes>> {
        self.check_range(offset, length)?;
        let mut buf = vec![0u8; length as usize];
        py.detach(|| self.node.read_at(&mut buf, offset))
            .map_err(to_py)?;
        Ok(PyBytes::new(py, &buf))
    }

    /// Fills the bytearray `buffer` with guest data at `offset`; returns its length.
    fn readinto(
        &self,
        py: Python<'_>,
        offset: u64,
        buffer: &Bound<'_, PyByteArray>,
    ) -> PyResult<usize> {
        let n = buffer.len();
        self.check_range(offset, n as u64)?;
        // Read into our own memory with the GIL released, then copy in while
        // holding it: the bytearray may not be resized meanwhile.
        let mut tmp = vec![0u8; n];
        py.detach(|| self.node.read_at(&mut tmp, offset))
            .map_err(to_py)?;
        // SAFETY: we hold the GIL and do not call back into Python while the
        // slice is alive, so the bytearray cannot be resized or freed.
        unsafe { buffer.as_bytes_mut() }.copy_from_slice(&tmp);
        Ok(n)
    }

    /// Merged extents as `map` prints them.
    #[pyo3(signature = (start=0, length=None))]
    fn map(&self, py: Python<'_>, start: u64, length: Option<u64>) -> PyResult<Vec<MapExtent>> {
        let len = length.unwrap_or(u64::MAX);
        let node = Arc::clone(&self.node);
        let extents = run_long(py, None, move |_| {
            block::map_extents(node.as_ref(), start, len)
        })?
        .map_err(to_py)?;
        Ok(extents.into_iter().map(MapExtent::from).collect())
    }

    /// The quorum events recorded since the last call, oldest first.
    fn take_events(&self, py: Python<'_>) -> PyResult<Vec<Event>> {
        results::take_events(py, self.events.as_ref())
    }

    /// The backing image, if the chain was opened.
    fn backing(&self) -> Option<Image> {
        self.node.backing().map(|b| Image {
            node: Arc::clone(b),
            events: None,
        })
    }

    /// Bytes of data as `measure` counts them, for a target cluster size.
    fn data_bytes(&self, py: Python<'_>, cluster_size: u64) -> PyResult<u64> {
        let cs = ClusterSize::new(cluster_size).map_err(to_py)?;
        py.detach(|| qimg_core::measure::image_data_bytes(self.node.as_ref(), cs))
            .map_err(to_py)
    }

    /// The facts `info` shows.
    fn details(&self, py: Python<'_>) -> PyResult<ImageDetails> {
        ImageDetails::gather(py, self.node.as_ref())
    }
}

/// Compares two images (see `CompareOutcome`). A read error names the image.
#[pyfunction]
#[pyo3(signature = (a, b, *, strict=false, progress=None))]
pub fn compare_images(
    py: Python<'_>,
    a: PyRef<'_, Image>,
    b: PyRef<'_, Image>,
    strict: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<CompareOutcome> {
    let (na, nb) = (Arc::clone(&a.node), Arc::clone(&b.node));
    let r = run_long(py, progress, move |p| {
        compare::compare(na.as_ref(), nb.as_ref(), strict, p)
    })?;
    match r {
        Ok(r) => Ok(CompareOutcome::from(r)),
        Err(e) => {
            let which = if e.image == 0 { &a } else { &b };
            Err(to_py(e.error.context(&format!(
                "Error while reading '{}'",
                which.node.filename()
            ))))
        }
    }
}

/// Copies the guest contents of `sources` (concatenated) into `target`,
/// which must be open for writing, as `options` say. `zero_init`: the
/// target reads as zeroes where nothing is written; `top_only`: only what
/// the sources' top layers hold is copied (the target's backing file has
/// the rest).
#[pyfunction]
#[pyo3(signature = (sources, target, options, *, zero_init=true, top_only=false, progress=None))]
pub fn convert(
    py: Python<'_>,
    sources: Vec<PyRef<'_, Image>>,
    target: PyRef<'_, Image>,
    options: PyRef<'_, crate::requests::ConvertOptions>,
    zero_init: bool,
    top_only: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<()> {
    let nodes: Vec<Arc<dyn BlockDev>> = sources.iter().map(|s| Arc::clone(&s.node)).collect();
    let layers = if top_only {
        engine::Layers::Top(1)
    } else {
        engine::Layers::Chain
    };
    let opts = options.choices.options(&nodes, zero_init, layers);
    let dst = Arc::clone(&target.node);
    run_long(py, progress, move |p| {
        engine::convert(&nodes, dst.as_ref(), &opts, p)
    })?
    .map_err(to_py)
}

/// Runs the qcow2 consistency check on `image`; None for formats without one.
#[pyfunction]
pub fn check_image(
    py: Python<'_>,
    image: PyRef<'_, Image>,
) -> PyResult<Option<crate::convey::CheckCounts>> {
    let node = Arc::clone(&image.node);
    let Some(driver) = Registry::standard().driver_of(node.as_ref()) else {
        return Ok(None);
    };
    let report =
        run_long(py, None, move |_| driver.check(node.as_ref()).transpose())?.map_err(to_py)?;
    Ok(report.map(crate::convey::CheckCounts::from))
}
