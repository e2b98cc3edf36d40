//! Creating and measuring images of any registered format: Python hands over
//! the typed `-o` values it parsed, and the format's driver does the rest.
//! No format is named here.

use crate::convey::{run_long, to_py};
use crate::image::Image;
use crate::results::Measurement;
use pyo3::prelude::*;
use qimg_core::formats::{
    CreateFacts, FormatDriver, MeasureRequest, OptionValue, Options, Registry,
};
use qimg_core::host_file::FileOptions;
use std::path::PathBuf;

/// One `-o` value as Python parsed it (bool before int: a Python bool is an int).
#[derive(FromPyObject)]
pub enum PyOptionValue {
    Bool(bool),
    Int(u64),
    Str(String),
}

fn options_of(values: Vec<(String, PyOptionValue)>) -> Options {
    values
        .into_iter()
        .fold(Options::new(), |options, (name, value)| {
            let value = match value {
                PyOptionValue::Bool(b) => OptionValue::Bool(b),
                PyOptionValue::Int(n) => OptionValue::Int(n),
                PyOptionValue::Str(s) => OptionValue::Str(s),
            };
            options.set(&name, value)
        })
}

/// A creation request checked by its format's driver at construction,
/// before any file is touched: `format` and its typed `-o` values (`size`
/// included). Options left out take the format's defaults, which live in
/// the core.
#[pyclass(frozen, module = "qimg._core")]
pub struct CreateRequest {
    driver: &'static dyn FormatDriver,
    options: Options,
    facts: CreateFacts,
}

#[pymethods]
impl CreateRequest {
    #[new]
    fn new(format: &str, options: Vec<(String, PyOptionValue)>) -> PyResult<Self> {
        let driver = Registry::standard().lookup(format).map_err(to_py)?;
        let options = options_of(options);
        let facts = driver.plan_create(&options).map_err(to_py)?;
        Ok(CreateRequest {
            driver,
            options,
            facts,
        })
    }

    #[getter]
    fn format(&self) -> &'static str {
        self.driver.name()
    }

    /// The image's virtual size (the requested size, rounded as the format does).
    #[getter]
    fn virtual_size(&self) -> u64 {
        self.facts.virtual_size
    }

    /// Length of the file `create` will write, in bytes.
    #[getter]
    fn file_length(&self) -> u64 {
        self.facts.file_length
    }

    /// Bytes of metadata in front of the data.
    #[getter]
    fn metadata_length(&self) -> u64 {
        self.facts.metadata_length
    }

    /// Writes the image at `path`; `nocow` and `extent_size_hint` are the
    /// file's options.
    #[pyo3(signature = (path, *, nocow=false, extent_size_hint=None))]
    fn create(
        &self,
        py: Python<'_>,
        path: PathBuf,
        nocow: bool,
        extent_size_hint: Option<u64>,
    ) -> PyResult<()> {
        let file_opts = FileOptions {
            nocow,
            extent_size_hint,
        };
        let (driver, options) = (self.driver, self.options.clone());
        run_long(py, None, move |_| driver.create(&path, &options, file_opts))?.map_err(to_py)
    }
}

/// What a new `format` image of `virtual_size` bytes with the typed `-o`
/// values `options` would need on disk, holding the data of `source` when
/// one is given.
#[pyfunction]
#[pyo3(signature = (format, options, virtual_size, *, source=None))]
pub fn measure_image(
    py: Python<'_>,
    format: &str,
    options: Vec<(String, PyOptionValue)>,
    virtual_size: u64,
    source: Option<PyRef<'_, Image>>,
) -> PyResult<Measurement> {
    let driver = Registry::standard().lookup(format).map_err(to_py)?;
    let options = options_of(options);
    let source = source.map(|s| std::sync::Arc::clone(&s.node));
    let found = run_long(py, None, move |_| {
        driver.measure(&MeasureRequest {
            virtual_size,
            source: source.as_deref(),
            options: &options,
        })
    })?
    .map_err(to_py)?;
    Ok(found.into())
}
