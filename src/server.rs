//! The accept loop: TCP connections in, HTTP/1.1 or HTTP/2 (prior knowledge) served with
//! hyper, graceful drain on shutdown. Knows nothing about webhooks; every request goes to
//! [`webhook::handle`].

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::webhook::{self, App};

/// Serves `listener` until `shutdown` resolves, then stops accepting and gives open
/// connections `http.drain_timeout_ms` to finish their requests.
pub async fn serve(listener: TcpListener, app: Arc<App>, shutdown: impl Future<Output = ()>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Since hyper 1.4 this also bounds how long an idle keep-alive connection may wait
        // for its next request, so slow or silent clients cannot pin connections.
        .header_read_timeout(app.http.header_read_timeout());
    builder.http2().timer(TokioTimer::new());

    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    survive_accept_error(err).await;
                    continue;
                }
            },
            () = shutdown.as_mut() => break,
        };
        // Responses are small and sent in one write: don't let Nagle hold them back.
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %err, "failed to set TCP_NODELAY");
        }
        let app = Arc::clone(&app);
        let service = service_fn(move |request| webhook::handle(Arc::clone(&app), peer, request));
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection.into_owned());
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(%peer, error = %err, "connection ended with an error");
            }
        });
    }

    drop(listener);
    let drain = app.http.drain_timeout();
    tracing::info!(
        ?drain,
        "shutdown requested: no longer accepting, draining connections"
    );
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections drained"),
        () = tokio::time::sleep(drain) => {
            tracing::warn!(?drain, "drain timeout reached, closing remaining connections");
        }
    }
}

/// An accept error must never end the server. Errors about one connection (it was reset
/// before we got to it) are skipped; anything else, such as running out of file descriptors,
/// is logged and followed by a short pause so the loop does not spin.
async fn survive_accept_error(err: io::Error) {
    if matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %err, "failed to accept a connection; pausing accepts for 1s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
