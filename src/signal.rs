//! The signals that stop the relay.

/// Installs the SIGTERM and SIGINT handlers now, and returns a future that resolves on the
/// first of them, with the signal's name.
///
/// SIGTERM: Kubernetes, systemd and `docker stop` send this to start a graceful shutdown.
/// SIGINT: Ctrl-C in a terminal; treated the same so a developer sees the drain too.
///
/// The handlers are in place when this returns, not when the future is first polled: a
/// SIGTERM that comes the moment the port opens must find them, or its default action ends
/// the process undrained.
pub fn shutdown() -> impl Future<Output = &'static str> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler works");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler works");
    async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    }
}

/// Replaces SIGHUP's default action (terminate) for the rest of the process's life, before
/// anything listens for it.
pub fn install_hangup_handler() {
    use tokio::signal::unix::{SignalKind, signal};
    // tokio keeps its handler installed once registered, even after this stream is dropped.
    drop(signal(SignalKind::hangup()).expect("installing a SIGHUP handler works"));
}

/// A future per SIGHUP: "reload your keys and certificate", as for nginx or HAProxy. Each
/// call gets every SIGHUP. Installed whether or not there is a keys file: SIGHUP's default
/// action would end the process undrained.
pub fn hangups() -> Hangups {
    use tokio::signal::unix::{SignalKind, signal};
    Hangups(signal(SignalKind::hangup()).expect("installing a SIGHUP handler works"))
}

/// The SIGHUPs the process receives.
pub struct Hangups(tokio::signal::unix::Signal);

impl Hangups {
    /// Resolves on the next SIGHUP. Each listener says what it does about it.
    pub async fn next(&mut self) {
        if self.0.recv().await.is_none() {
            // The signal driver is gone: no more SIGHUPs will come.
            std::future::pending::<()>().await;
        }
    }
}
