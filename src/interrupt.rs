//! Stopping a training run cleanly on SIGINT or SIGTERM: the first signal
//! asks the loop to finish its current step, write `last/` and return
//! [`crate::Error::Interrupted`]; a second signal ends the process at once
//! (the default action, restored by the first). Nothing is installed unless
//! a program calls [`install`] (the `tunefuse` binary does); a library user
//! may call [`request`] from their own handler instead.
use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Whether a stop was asked for.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::Relaxed)
}

/// Forgets a request, for a program that goes on after an interrupted run.
pub fn clear() {
    REQUESTED.store(false, Ordering::Relaxed);
}

/// Asks the training loop to stop after its current step.
pub fn request() {
    REQUESTED.store(true, Ordering::Relaxed);
}

extern "C" fn on_signal(sig: libc::c_int) {
    // Async-signal-safe: an atomic store and signal(2).
    REQUESTED.store(true, Ordering::Relaxed);
    // SAFETY: restoring the default disposition of the signal being handled.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
    }
}

/// Installs the handlers for SIGINT and SIGTERM.
pub fn install() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores an atomic and resets its signal's
    // disposition, both async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}
