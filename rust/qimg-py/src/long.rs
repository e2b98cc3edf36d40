//! Long calls (convert, compare, scrub, repair): the work runs on a thread
//! of its own while the calling thread waits and, every few milliseconds,
//! lets Python run its signal handlers. Ctrl-C (or any exception a handler
//! raises) and an exception from the progress callback both cancel the
//! work through its `Progress` hook, and the exception is re-raised here.

use pyo3::prelude::*;
use qimg_core::Error;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How often the waiting thread checks for signals.
const SIGNAL_POLL: Duration = Duration::from_millis(50);
/// How long a cancelled call waits for its work to unwind before it
/// returns anyway (a worker can be stuck in a read from a dead server; it
/// writes nothing more once cancelled).
const UNWIND_GRACE: Duration = Duration::from_millis(500);

/// The progress hook handed to the core: calls the Python callback once
/// per whole percent and says "stop" once the call was cancelled.
struct Reporter {
    callback: Option<Py<PyAny>>,
    last_percent: AtomicU64,
    cancelled: AtomicBool,
    /// The exception that cancelled the work.
    raised: Mutex<Option<PyErr>>,
}

impl Reporter {
    fn report(&self, done: u64, total: u64) -> qimg_core::Result<()> {
        if self.cancelled.load(Ordering::SeqCst) {
            return Err(Error::cancelled());
        }
        let Some(cb) = &self.callback else {
            return Ok(());
        };
        let percent = done.saturating_mul(100).checked_div(total).unwrap_or(100);
        if self.last_percent.swap(percent, Ordering::Relaxed) == percent {
            return Ok(());
        }
        match Python::attach(|py| cb.call1(py, (done, total)).map(drop)) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.cancel(e);
                Err(Error::cancelled())
            }
        }
    }

    /// Records the first exception that cancels the work.
    fn cancel(&self, err: PyErr) {
        let mut slot = self.raised.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(err);
        }
        self.cancelled.store(true, Ordering::SeqCst);
    }

    fn take_raised(&self) -> Option<PyErr> {
        self.raised
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

/// The work's result, handed from its thread to the waiting one.
struct Outcome<R> {
    result: Mutex<Option<std::thread::Result<R>>>,
    ready: Condvar,
}

/// Runs `work` with a progress hook that calls `callback(done, total)` and
/// stops the work once Python raises (a signal handler, the callback).
/// Returns the work's own result, or the exception that stopped it.
pub(crate) fn run_long<R, F>(py: Python<'_>, callback: Option<Py<PyAny>>, work: F) -> PyResult<R>
where
    R: Send + 'static,
    F: FnOnce(qimg_core::progress::Progress<'_>) -> R + Send + 'static,
{
    let reporter = Arc::new(Reporter {
        callback,
        last_percent: AtomicU64::new(u64::MAX),
        cancelled: AtomicBool::new(false),
        raised: Mutex::new(None),
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
    let wait = |limit: Duration| -> Option<std::thread::Result<R>> {
        let deadline = Instant::now() + limit;
        let mut slot = outcome
            .result
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(r) = slot.take() {
                return Some(r);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            slot = outcome
                .ready
                .wait_timeout(slot, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    };
    loop {
        if let Some(r) = py.detach(|| wait(SIGNAL_POLL)) {
            if let Some(raised) = reporter.take_raised() {
                return Err(raised);
            }
            return r.map_err(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                pyo3::panic::PanicException::new_err(what)
            });
        }
        if let Err(e) = py.check_signals() {
            reporter.cancel(e);
            // Give the work the time to unwind (and the caller's clean-up
            // a file no thread still writes to).
            let _ = py.detach(|| wait(UNWIND_GRACE));
            return Err(reporter
                .take_raised()
                .unwrap_or_else(|| pyo3::exceptions::PyKeyboardInterrupt::new_err(())));
        }
    }
}
