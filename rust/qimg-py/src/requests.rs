//! What a request names by a word (cache modes, repair modes, preallocation
//! modes) and the copy options of `convert`, each checked once, in the core,
//! when Python builds it. Python keeps only the command line's shape.

use crate::convey::to_py;
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use qimg_core::block::cache::{CacheMode, CacheRole};
use qimg_core::convert::{CopyChoices, Workers};
use qimg_core::qcow2::check::repair::RepairMode;
use qimg_core::Prealloc;

/// The preallocation mode named `name` (Python's `PreallocMode` values).
pub(crate) fn prealloc(name: &str) -> PyResult<Prealloc> {
    Prealloc::parse(name).map_err(to_py)
}

/// The target cache mode named `name` (`-t`).
pub(crate) fn target_cache(name: &str) -> PyResult<CacheMode> {
    CacheMode::parse(name, CacheRole::Target).map_err(to_py)
}

fn role(source: bool) -> CacheRole {
    if source {
        CacheRole::Source
    } else {
        CacheRole::Target
    }
}

/// QEMU's name of the cache mode `name` (`off` is `none`), or qemu-img's
/// refusal of a `-t` value (of a `-T` value with `source`).
#[pyfunction]
#[pyo3(signature = (name, *, source=false))]
pub fn cache_mode(name: &str, source: bool) -> PyResult<&'static str> {
    CacheMode::parse(name, role(source))
        .map(CacheMode::name)
        .map_err(to_py)
}

/// `-r`'s argument checked: `leaks` or `all`, or qemu-img's refusal.
#[pyfunction]
pub fn repair_mode(name: &str) -> PyResult<&'static str> {
    RepairMode::parse(name).map(RepairMode::name).map_err(to_py)
}

/// `convert`'s copy options, checked as a whole at construction: `-S`
/// (None: not given), `-c` (with the target's format when it is known
/// before it is opened), `-m` (None: chosen for the sources), `-W`, `-C`,
/// and the target's and sources' cache modes (`-t`, `-T`).
#[pyclass(frozen, module = "qimg._core")]
pub struct ConvertOptions {
    pub(crate) choices: CopyChoices,
    cache: CacheMode,
    source_cache: CacheMode,
}

#[pymethods]
impl ConvertOptions {
    #[new]
    #[pyo3(signature = (*, sparse_size=None, compress=false, workers=None, in_order=true,
                        copy_offload=false, target_format=None, cache="unsafe",
                        source_cache="writeback"))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        sparse_size: Option<u64>,
        compress: bool,
        workers: Option<usize>,
        in_order: bool,
        copy_offload: bool,
        target_format: Option<&str>,
        cache: &str,
        source_cache: &str,
    ) -> PyResult<Self> {
        // qemu-img's order: -m, then -t and -T, then -S and the rules that tie options together.
        let workers = workers.map(Workers::new).transpose().map_err(to_py)?;
        let cache = target_cache(cache)?;
        let source_cache = CacheMode::parse(source_cache, CacheRole::Source).map_err(to_py)?;
        let choices = CopyChoices::new(
            sparse_size,
            compress,
            workers,
            in_order,
            copy_offload,
            target_format,
        )
        .map_err(to_py)?;
        Ok(ConvertOptions {
            choices,
            cache,
            source_cache,
        })
    }

    /// Zero blocks of this many bytes become holes; 0: zeroes are written.
    #[getter]
    fn sparse_size(&self) -> u64 {
        self.choices.sparse.bytes()
    }

    #[getter]
    fn compress(&self) -> bool {
        self.choices.compress
    }

    /// The `-m` given; None: chosen for the sources when the copy starts.
    #[getter]
    fn workers(&self) -> Option<usize> {
        self.choices.workers.map(Workers::get)
    }

    #[getter]
    fn in_order(&self) -> bool {
        self.choices.in_order
    }

    #[getter]
    fn copy_offload(&self) -> bool {
        self.choices.copy_offload
    }

    /// The target's cache mode, by QEMU's name.
    #[getter]
    fn cache(&self) -> &'static str {
        self.cache.name()
    }

    /// The sources' cache mode, by QEMU's name.
    #[getter]
    fn source_cache(&self) -> &'static str {
        self.source_cache.name()
    }
}

/// Adds this module's names to `_core`.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ConvertOptions>()?;
    m.add_function(wrap_pyfunction!(cache_mode, m)?)?;
    m.add_function(wrap_pyfunction!(repair_mode, m)?)?;
    m.add("CACHE_MODES", PyTuple::new(m.py(), CacheMode::NAMES)?)?;
    m.add("REPAIR_MODES", PyTuple::new(m.py(), RepairMode::NAMES)?)?;
    Ok(())
}
