//! The format registry as Python sees it: each driver's name and creation
//! option table, from which `qimg.formats` builds its `-o` handling and the
//! CLI its format lists. Read once at import, so it stays cheap.

use pyo3::prelude::*;
use qimg_core::formats::{FormatDriver, OptionSpec, OptionTable, Registry, QEMU_ONLY_FORMATS};

/// One creation option of a format.
#[pyclass(frozen, get_all, module = "qimg._core")]
pub struct FormatOption {
    name: String,
    /// The value's placeholder in `-o help` (`<str>`, `<bool (on/off)>`, `<size>`, `<num>`).
    kind: String,
    help: String,
    /// Echoed in the `Formatting ...` line when the option is not given.
    default: Option<String>,
}

impl FormatOption {
    fn new(py: Python<'_>, o: &OptionSpec) -> PyResult<Py<FormatOption>> {
        Py::new(
            py,
            FormatOption {
                name: o.name.to_string(),
                kind: o.kind.placeholder().to_string(),
                help: o.help.clone(),
                default: o.default.clone(),
            },
        )
    }
}

/// A format driver: its name and creation option table.
#[pyclass(frozen, module = "qimg._core")]
pub struct FormatDriverInfo {
    #[pyo3(get)]
    name: String,
    #[pyo3(get)]
    format_options: Vec<Py<FormatOption>>,
    #[pyo3(get)]
    protocol_options: Vec<Py<FormatOption>>,
    #[pyo3(get)]
    echo_order: Vec<String>,
    #[pyo3(get)]
    prealloc_modes: Vec<String>,
    #[pyo3(get)]
    not_yet: Vec<String>,
    #[pyo3(get)]
    amend_options: Vec<String>,
    #[pyo3(get)]
    amend_not_yet: Vec<String>,
    table: OptionTable,
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[pymethods]
impl FormatDriverInfo {
    /// The `-o help` listing; `with_protocol` when a filename is known.
    fn help_text(&self, with_protocol: bool) -> String {
        self.table.help_text(&self.name, with_protocol)
    }

    /// The `amend -o help` listing, None when the format has no amend.
    fn amend_help_text(&self) -> Option<String> {
        self.table.amend_help_text(&self.name)
    }
}

impl FormatDriverInfo {
    fn new(py: Python<'_>, driver: &dyn FormatDriver) -> PyResult<FormatDriverInfo> {
        let table = driver.options();
        let options = |list: &[OptionSpec]| -> PyResult<Vec<Py<FormatOption>>> {
            list.iter().map(|o| FormatOption::new(py, o)).collect()
        };
        Ok(FormatDriverInfo {
            name: driver.name().to_string(),
            format_options: options(&table.format_options)?,
            protocol_options: options(&table.protocol_options)?,
            echo_order: names(&table.echo_order),
            prealloc_modes: table
                .prealloc_modes
                .iter()
                .map(|m| m.name().to_string())
                .collect(),
            not_yet: names(&table.not_yet),
            amend_options: names(&table.amend_options),
            amend_not_yet: names(&table.amend_not_yet),
            table,
        })
    }
}

/// qimg's format drivers, in probing order.
#[pyfunction]
pub fn format_drivers(py: Python<'_>) -> PyResult<Vec<FormatDriverInfo>> {
    Registry::standard()
        .drivers()
        .iter()
        .map(|d| FormatDriverInfo::new(py, *d))
        .collect()
}

/// Formats QEMU has and qimg does not: (name, whether QEMU can create it).
#[pyfunction]
pub fn qemu_only_formats() -> Vec<(&'static str, bool)> {
    QEMU_ONLY_FORMATS.to_vec()
}
