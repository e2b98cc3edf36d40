//! What crosses from the core to Python, in one place: core errors become
//! `qimg.errors` exceptions (`to_py`); long calls run with progress reports
//! and cancellation (`run_long`); check reports become Python values (the
//! other results are in `results`).
//!
//! Long calls (convert, compare, scrub, repair): the work runs on a thread
//! of its own while the calling thread waits and, every few milliseconds,
//! lets Python run its signal handlers and hands the progress made so far to
//! the progress callback. So every callback runs on the caller's thread,
//! as Python code expects. Ctrl-C (or any exception a handler raises) and an
//! exception from the progress callback both cancel the work through its
//! `Progress` hook, and the exception is re-raised here.

use pyo3::prelude::*;
use qimg_core::qcow2::check::CheckReport;
use qimg_core::{Error, ErrorKind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

mod errors {
    pyo3::import_exception!(qimg.errors, UsageError);
    pyo3::import_exception!(qimg.errors, InvalidOptionError);
    pyo3::import_exception!(qimg.errors, ImageTooLargeError);
    pyo3::import_exception!(qimg.errors, InvalidImageError);
    pyo3::import_exception!(qimg.errors, ImageIOError);
    pyo3::import_exception!(qimg.errors, ImageNotFoundError);
    pyo3::import_exception!(qimg.errors, ImagePermissionError);
    pyo3::import_exception!(qimg.errors, ImageIsADirectoryError);
    pyo3::import_exception!(qimg.errors, ReadOnlyError);
    pyo3::import_exception!(qimg.errors, NoSpaceError);
    pyo3::import_exception!(qimg.errors, ImageLockedError);
    pyo3::import_exception!(qimg.errors, UnsupportedError);
    pyo3::import_exception!(qimg.errors, CancelledError);
}

/// The single mapping from core errors to Python exceptions.
pub(crate) fn to_py(err: Error) -> PyErr {
    let msg = err.to_string();
    match err {
        Error::Usage(_) => errors::UsageError::new_err(msg),
        Error::InvalidArgument(_) => errors::InvalidOptionError::new_err(msg),
        Error::TooLarge(_) => errors::ImageTooLargeError::new_err(msg),
        Error::InvalidImage(_) => errors::InvalidImageError::new_err(msg),
        Error::Busy(_) => errors::ImageLockedError::new_err(msg),
        Error::Unsupported(_) => errors::UnsupportedError::new_err(msg),
        Error::Cancelled(_) => errors::CancelledError::new_err(msg),
        Error::Io { ref source, .. } => {
            let errno = source.raw_os_error().unwrap_or(0);
            match err.kind() {
                ErrorKind::NotFound => errors::ImageNotFoundError::new_err((msg, errno)),
                ErrorKind::Permission => errors::ImagePermissionError::new_err((msg, errno)),
                ErrorKind::IsADirectory => errors::ImageIsADirectoryError::new_err((msg, errno)),
                ErrorKind::ReadOnly => errors::ReadOnlyError::new_err((msg, errno)),
                ErrorKind::NoSpace => errors::NoSpaceError::new_err((msg, errno)),
                _ => errors::ImageIOError::new_err((msg, errno)),
            }
        }
    }
}

/// How often the waiting thread checks for signals and reports progress.
const SIGNAL_POLL: Duration = Duration::from_millis(50);
/// How long a cancelled call waits for its work to unwind before it
/// returns anyway (a worker can be stuck in a read from a dead server; it
/// writes nothing more once cancelled).
const UNWIND_GRACE: Duration = Duration::from_millis(500);

/// The progress the work reports, written by the work's threads and handed
/// over to the waiting thread, one entry per whole percent reached.
struct Reporter {
    /// The caller's callback (None: nothing is queued).
    callback: Option<Py<PyAny>>,
    last_percent: AtomicU64,
    queue: Mutex<Vec<(u64, u64)>>,
    cancelled: AtomicBool,
}

impl Reporter {
    /// The work's progress hook: queues the position, says "stop" once the
    /// call was cancelled.
    fn report(&self, done: u64, total: u64) -> qimg_core::Result<()> {
        if self.cancelled.load(Ordering::SeqCst) {
            return Err(Error::cancelled());
        }
        if self.callback.is_none() {
            return Ok(());
        }
        let percent = done.saturating_mul(100).checked_div(total).unwrap_or(100);
        if self.last_percent.swap(percent, Ordering::Relaxed) != percent {
            self.queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((done, total));
        }
        Ok(())
    }

    fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }

    /// Calls `callback` on the calling thread with every position queued
    /// since the last call, in order.
    fn deliver(&self, py: Python<'_>) -> PyResult<()> {
        let Some(cb) = &self.callback else {
            return Ok(());
        };
        let queued =
            std::mem::take(&mut *self.queue.lock().unwrap_or_else(PoisonError::into_inner));
        for (done, total) in queued {
            cb.call1(py, (done, total))?;
        }
        Ok(())
    }
}

/// The work's result, handed from its thread to the waiting one.
struct Outcome<R> {
    result: Mutex<Option<std::thread::Result<R>>>,
    ready: Condvar,
}

impl<R> Outcome<R> {
    /// The result, once the work finished within `limit`.
    fn wait(&self, limit: Duration) -> Option<std::thread::Result<R>> {
        let deadline = Instant::now() + limit;
        let mut slot = self.result.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(r) = slot.take() {
                return Some(r);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            slot = self
                .ready
                .wait_timeout(slot, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// Runs `work` with a progress hook; `callback(done, total)` is called on
/// this (the caller's) thread as the work advances. The work stops once
/// Python raises (a signal handler, the callback). Returns the work's own
/// result, or the exception that stopped it.
pub(crate) fn run_long<R, F>(py: Python<'_>, callback: Option<Py<PyAny>>, work: F) -> PyResult<R>
where
    R: Send + 'static,
    F: FnOnce(qimg_core::progress::Progress<'_>) -> R + Send + 'static,
{
    let reporter = Arc::new(Reporter {
        callback,
        last_percent: AtomicU64::new(u64::MAX),
        queue: Mutex::new(Vec::new()),
        cancelled: AtomicBool::new(false),
    });
    let outcome = Arc::new(Outcome {
        result: Mutex::new(None),
        ready: Condvar::new(),
    });
    let (rep, out) = (Arc::clone(&reporter), Arc::clone(&outcome));
    let spawned = std::thread::Builder::new()
        .name("qimg-work".into())
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                work(&|d, t| rep.report(d, t))
            }));
            *out.result.lock().unwrap_or_else(PoisonError::into_inner) = Some(r);
            out.ready.notify_all();
        });
    if let Err(e) = spawned {
        return Err(pyo3::exceptions::PyOSError::new_err(format!(
            "Could not start a worker thread: {e}"
        )));
    }
    loop {
        if let Some(r) = py.detach(|| outcome.wait(SIGNAL_POLL)) {
            let value = r.map_err(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                pyo3::panic::PanicException::new_err(what)
            })?;
            // What the work reported last (100% of a finished job) reaches
            // the callback too.
            reporter.deliver(py)?;
            return Ok(value);
        }
        let raised = py.check_signals().and_then(|()| reporter.deliver(py));
        if let Err(e) = raised {
            reporter.cancel();
            // Give the work the time to unwind (and the caller's clean-up
            // a file no thread still writes to).
            let _ = py.detach(|| outcome.wait(UNWIND_GRACE));
            return Err(e);
        }
    }
}

/// The counts and lines of one check, as `qimg.consistency.CheckReport` is
/// built from them.
#[pyclass(frozen, get_all, module = "qimg._core")]
pub struct CheckCounts {
    corruptions: u64,
    leaks: u64,
    check_errors: u64,
    image_end_offset: u64,
    total_clusters: u64,
    allocated_clusters: u64,
    fragmented_clusters: u64,
    compressed_clusters: u64,
    messages: Vec<String>,
}

impl From<CheckReport> for CheckCounts {
    fn from(report: CheckReport) -> CheckCounts {
        CheckCounts {
            corruptions: report.corruptions,
            leaks: report.leaks,
            check_errors: report.check_errors,
            image_end_offset: report.image_end_offset,
            total_clusters: report.total_clusters,
            allocated_clusters: report.allocated_clusters,
            fragmented_clusters: report.fragmented_clusters,
            compressed_clusters: report.compressed_clusters,
            messages: report.messages,
        }
    }
}
