//! The accept loop: TCP connections in, HTTP/1.1 or HTTP/2 (prior knowledge) served with
//! hyper, graceful drain on shutdown. Knows nothing about webhooks: every request goes to
//! the handler it is given.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::config::HttpConfig;

/// Serves `listener` with `handler` until `shutdown` resolves, then stops accepting and gives
/// open connections `http.drain_timeout_ms` to finish their requests.
pub async fn serve<H, F>(
    listener: TcpListener,
    http: &HttpConfig,
    handler: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + 'static,
    F: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Since hyper 1.4 this also bounds how long an idle keep-alive connection may wait
        // for its next request, so slow or silent clients cannot pin connections.
        .header_read_timeout(http.header_read_timeout());
    builder.http2().timer(TokioTimer::new());

    let open = Arc::new(AtomicUsize::new(0));
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
        let guard = ConnectionCount::enter(&open);
        let io = TokioIo::new(stream);
        if guard.count > http.max_connections {
            // Over the cap: one quick 503 and the connection is closed, instead of holding
            // memory for it.
            tracing::warn!(%peer, max = http.max_connections, "too many connections; refusing one");
            let service = service_fn(|_| async { Ok::<_, Infallible>(busy()) });
            let connection = graceful.watch(builder.serve_connection(io, service).into_owned());
            tokio::spawn(finish(connection, peer, guard));
        } else {
            let handler = handler.clone();
            let service = service_fn(move |request| handler(peer, request));
            let connection = graceful.watch(builder.serve_connection(io, service).into_owned());
            tokio::spawn(finish(connection, peer, guard));
        }
    }

    drop(listener);
    let drain = http.drain_timeout();
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

async fn finish<E: std::fmt::Display>(
    connection: impl Future<Output = Result<(), E>>,
    peer: SocketAddr,
    guard: ConnectionCount,
) {
    if let Err(err) = connection.await {
        tracing::debug!(%peer, error = %err, "connection ended with an error");
    }
    drop(guard);
}

/// Counts an open connection for as long as it lives.
struct ConnectionCount {
    open: Arc<AtomicUsize>,
    count: usize,
}

impl ConnectionCount {
    fn enter(open: &Arc<AtomicUsize>) -> ConnectionCount {
        let count = open.fetch_add(1, Ordering::Relaxed) + 1;
        ConnectionCount {
            open: Arc::clone(open),
            count,
        }
    }
}

impl Drop for ConnectionCount {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

fn busy() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(
        br#"{"error":"too many connections, try again later"}"#,
    )));
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        "application/json".parse().expect("valid"),
    );
    headers.insert(header::RETRY_AFTER, 1.into());
    headers.insert(header::CONNECTION, "close".parse().expect("valid"));
    response
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
