//! Waiting for what ends the process: SIGINT, SIGTERM, or [`request`] from inside (a drained
//! node stopping itself).

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

static REQUESTED: AtomicBool = AtomicBool::new(false);
static NOTIFY: Notify = Notify::const_new();

/// Ends the process as a signal would: every [`signal`] waiter resolves.
pub(crate) fn request() {
    REQUESTED.store(true, Ordering::SeqCst);
    NOTIFY.notify_waiters();
}

async fn requested() {
    loop {
        // Registered before the flag is read, so a request in between is not missed.
        let notified = NOTIFY.notified();
        if REQUESTED.load(Ordering::SeqCst) {
            return;
        }
        notified.await;
    }
}

/// Resolves on SIGINT, SIGTERM or [`request`].
pub(crate) async fn signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
        () = requested() => {},
    }
}
