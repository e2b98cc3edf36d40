//! The life-cycle commands that change an image chain in place: commit and
//! the copying half of a safe rebase. Both are long and report progress.

use crate::convey::run_long;
use crate::convey::to_py;
use crate::image::Image;
use pyo3::prelude::*;
use qimg_core::commit::{self, CommitOptions};
use qimg_core::convert::Workers;
use qimg_core::qcow2::bitmap_ops::BitmapOp;
use qimg_core::qcow2::reader::Qcow2Node;
use qimg_core::qcow2::snapshot_ops::SnapshotRef;
use qimg_core::rebase::{self, RebaseOptions};
use qimg_core::Error;
use std::sync::Arc;

/// Commits `image` into the backing file `base_depth` layers below it (which
/// must be open for writing), then empties `image` when `empty_top`.
#[pyfunction]
#[pyo3(signature = (image, *, base_depth=1, empty_top=true, progress=None))]
pub fn commit_image(
    py: Python<'_>,
    image: PyRef<'_, Image>,
    base_depth: u32,
    empty_top: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<()> {
    let top = Arc::clone(&image.node);
    let opts = CommitOptions {
        base_depth,
        empty_top,
        workers: Workers::default_for(std::slice::from_ref(&top)),
    };
    run_long(py, progress, move |p| commit::commit(&top, &opts, p))?.map_err(to_py)
}

/// Writes into `image` (open for writing, with its old backing chain) what
/// it must hold to read the same over `new_backing` (None: no backing file).
/// Returns the bytes written.
#[pyfunction]
#[pyo3(signature = (image, new_backing, *, compress=false, progress=None))]
pub fn rebase_copy(
    py: Python<'_>,
    image: PyRef<'_, Image>,
    new_backing: Option<PyRef<'_, Image>>,
    compress: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<u64> {
    let top = Arc::clone(&image.node);
    let new = new_backing.map(|b| Arc::clone(&b.node));
    let opts = RebaseOptions { compress };
    run_long(py, progress, move |p| {
        rebase::copy_differences(&top, new.as_ref(), &opts, p)
    })?
    .map_err(to_py)
}

/// Runs one snapshot or bitmap command on the qcow2 `image` (open for
/// writing) and returns the handle to use from now on (the header changed;
/// this one is retired). Other formats have neither.
fn change_header_tables(
    py: Python<'_>,
    image: &Image,
    change: impl FnOnce(&Qcow2Node) -> qimg_core::Result<()> + Send + 'static,
) -> PyResult<Image> {
    if image.node.as_qcow2().is_none() {
        return Err(to_py(Error::Unsupported("Operation not supported".into())));
    }
    let node = Arc::clone(&image.node);
    let fresh = run_long(py, None, move |_| match node.as_qcow2() {
        Some(q) => change(q).and_then(|()| q.reopen()),
        None => Err(Error::Unsupported("Operation not supported".into())),
    })?
    .map_err(to_py)?;
    Ok(Image {
        node: Arc::new(fresh),
        events: image.events.clone(),
    })
}

/// Saves the guest content of `image` as snapshot `name`, dated
/// `date_sec`.`date_nsec` (seconds since the epoch).
#[pyfunction]
pub fn create_snapshot(
    py: Python<'_>,
    image: PyRef<'_, Image>,
    name: String,
    date_sec: u32,
    date_nsec: u32,
) -> PyResult<Image> {
    change_header_tables(py, &image, move |q| {
        q.create_snapshot(&name, date_sec, date_nsec)
    })
}

/// Reverts `image` to the snapshot with ID or name `which`.
#[pyfunction]
pub fn apply_snapshot(py: Python<'_>, image: PyRef<'_, Image>, which: String) -> PyResult<Image> {
    change_header_tables(py, &image, move |q| q.apply_snapshot(&which))
}

/// Deletes the first snapshot of `image` called `name`.
#[pyfunction]
pub fn delete_snapshot(py: Python<'_>, image: PyRef<'_, Image>, name: String) -> PyResult<Image> {
    change_header_tables(py, &image, move |q| q.delete_snapshot(&name))
}

/// Applies `ops` in order to bitmap `name` of `image` (open for writing), as
/// `qemu-img bitmap` does. Each op is (kind, granularity, source bitmap,
/// source image): kind is add, remove, clear, enable, disable or merge;
/// granularity goes with add; a merge takes the source bitmap from
/// `source image` (None: this image). Returns the handle to use from now on.
#[pyfunction]
#[allow(clippy::type_complexity)]
pub fn change_bitmap(
    py: Python<'_>,
    image: PyRef<'_, Image>,
    name: String,
    ops: Vec<(
        String,
        Option<u64>,
        Option<String>,
        Option<PyRef<'_, Image>>,
    )>,
) -> PyResult<Image> {
    let Some(q) = image.node.as_qcow2() else {
        return Err(to_py(Error::Unsupported(format!(
            "Operation {} on bitmap {name} failed: Operation not supported",
            ops.first().map_or("add", |o| o.0.as_str())
        ))));
    };
    let mut core_ops = Vec::with_capacity(ops.len());
    for (kind, granularity, source, source_image) in ops {
        core_ops.push(match kind.as_str() {
            "add" => BitmapOp::Add { granularity },
            "remove" => BitmapOp::Remove,
            "clear" => BitmapOp::Clear,
            "enable" => BitmapOp::Enable,
            "disable" => BitmapOp::Disable,
            "merge" => {
                let source = source.unwrap_or_default();
                let from = match &source_image {
                    Some(img) => img.node.as_qcow2().ok_or_else(|| {
                        to_py(Error::Unsupported(format!(
                            "Operation merge on bitmap {name} failed: '{}' has no bitmaps (it is not qcow2)",
                            img.node.filename()
                        )))
                    })?,
                    None => q,
                };
                let bits = from.bitmap_bits(&source).map_err(|e| {
                    to_py(Error::invalid(format!(
                        "Operation merge on bitmap {name} failed: {e}"
                    )))
                })?;
                BitmapOp::Merge(bits)
            }
            other => {
                return Err(to_py(Error::invalid(format!(
                    "Unknown bitmap operation '{other}'"
                ))))
            }
        });
    }
    change_header_tables(py, &image, move |q| q.change_bitmap(&name, &core_ops))
}

/// A read-only view of one internal snapshot of `image`: by `id_or_name`
/// (an ID, else a name), or by `id` and/or `name` (each given must match).
#[pyfunction]
#[pyo3(signature = (image, *, id_or_name=None, id=None, name=None))]
pub fn open_snapshot(
    py: Python<'_>,
    image: PyRef<'_, Image>,
    id_or_name: Option<String>,
    id: Option<String>,
    name: Option<String>,
) -> PyResult<Image> {
    let which = match (id_or_name, id, name) {
        (Some(key), None, None) => SnapshotRef::IdOrName(key),
        (None, id, name) if id.is_some() || name.is_some() => SnapshotRef::Fields { id, name },
        _ => {
            return Err(to_py(Error::invalid(
                "Name the snapshot by ID or name, or by snapshot.id and/or snapshot.name",
            )))
        }
    };
    let node = Arc::clone(&image.node);
    let view = run_long(py, None, move |_| match node.as_qcow2() {
        Some(q) => q.snapshot_view(&which),
        None => Err(Error::invalid(
            "Failed to load snapshot: Can't find snapshot",
        )),
    })?
    .map_err(to_py)?;
    Ok(Image {
        node: Arc::new(view),
        events: image.events.clone(),
    })
}
