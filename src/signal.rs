//! The signals that stop the relay.

/// Resolves on the first SIGTERM or SIGINT.
///
/// SIGTERM: Kubernetes, systemd and `docker stop` send this to start a graceful shutdown.
/// SIGINT: Ctrl-C in a terminal; treated the same so a developer sees the drain too.
pub async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler works");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler works");
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "received shutdown signal");
}
