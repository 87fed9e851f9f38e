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

/// A future per SIGHUP: "reload your keys", as for nginx or HAProxy.
pub fn hangups() -> impl FnMut() -> futures_lite::future::Boxed<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let hangup = std::sync::Arc::new(tokio::sync::Mutex::new(
        signal(SignalKind::hangup()).expect("installing a SIGHUP handler works"),
    ));
    move || {
        let hangup = std::sync::Arc::clone(&hangup);
        Box::pin(async move {
            let received = hangup.lock().await.recv().await;
            if received.is_none() {
                std::future::pending::<()>().await;
            }
            tracing::info!("received SIGHUP: reloading export keys");
        })
    }
}
