//! The accept loop: TCP connections in (TLS-terminated if configured), HTTP/1.1 or HTTP/2
//! served with hyper, graceful drain on shutdown. Knows nothing about webhooks: every
//! request goes to the handler it is given.
//!
//! Connection-level limits live here: the header read timeout (which also bounds idle
//! keep-alive connections), the header count and size, the TLS handshake time, and the cap
//! on open connections.

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
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use crate::config::HttpConfig;
use crate::metrics::Metrics;
use crate::tls::Tls;

/// Serves `listener` with `handler` until `shutdown` resolves, then stops accepting and gives
/// open connections `http.drain_timeout_ms` to finish their requests.
pub async fn serve<H, F>(
    listener: TcpListener,
    http: &HttpConfig,
    tls: Option<Arc<Tls>>,
    metrics: Arc<Metrics>,
    handler: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Since hyper 1.4 this also bounds how long an idle keep-alive connection may wait
        // for its next request, so slow or silent clients cannot pin connections.
        .header_read_timeout(http.header_read_timeout())
        .max_headers(http.max_headers)
        .max_buf_size(http.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(http.max_header_bytes).unwrap_or(u32::MAX));
    let builder = Arc::new(builder);

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
        let connection = Connection {
            guard: ConnectionCount::enter(&open),
            peer,
            builder: Arc::clone(&builder),
            watcher: graceful.watcher(),
            metrics: Arc::clone(&metrics),
        };
        if connection.guard.count > http.max_connections {
            // Over the cap: one quick 503 and the connection is closed, instead of holding
            // memory for it.
            tracing::warn!(%peer, max = http.max_connections, "too many connections; refusing one");
            metrics.connection_error("over_limit");
            let busy = |_, _| async { Ok::<_, Infallible>(busy()) };
            tokio::spawn(connection.run(stream, tls.clone(), http.header_read_timeout(), busy));
        } else {
            let handler = handler.clone();
            tokio::spawn(connection.run(stream, tls.clone(), http.header_read_timeout(), handler));
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

/// One accepted connection, served on its own task.
struct Connection {
    guard: ConnectionCount,
    peer: SocketAddr,
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: Watcher,
    metrics: Arc<Metrics>,
}

impl Connection {
    async fn run<H, F>(
        self,
        stream: TcpStream,
        tls: Option<Arc<Tls>>,
        handshake_timeout: Duration,
        handler: H,
    ) where
        H: Fn(SocketAddr, Request<Incoming>) -> F + Send + Sync + 'static,
        F: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
    {
        let Some(tls) = tls else {
            return self.serve(stream, handler).await;
        };
        // The handshake runs here, not in the accept loop, and is bounded like a header read.
        match tokio::time::timeout(handshake_timeout, tls.acceptor.accept(stream)).await {
            Ok(Ok(stream)) => self.serve(stream, handler).await,
            Ok(Err(err)) => {
                self.metrics.connection_error("tls_handshake");
                tracing::debug!(peer = %self.peer, error = %err, "TLS handshake failed");
            }
            Err(_) => {
                self.metrics.connection_error("tls_handshake");
                tracing::debug!(peer = %self.peer, "TLS handshake timed out");
            }
        }
    }

    async fn serve<IO, H, F>(self, io: IO, handler: H)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        H: Fn(SocketAddr, Request<Incoming>) -> F + Send + Sync + 'static,
        F: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
    {
        let peer = self.peer;
        let service = service_fn(move |request| handler(peer, request));
        let connection = self
            .builder
            .serve_connection(TokioIo::new(io), service)
            .into_owned();
        if let Err(err) = self.watcher.watch(connection).await {
            let kind = match err.downcast_ref::<hyper::Error>() {
                // Slow-loris: headers not sent in time (or an idle keep-alive connection).
                Some(err) if err.is_timeout() => "header_timeout",
                Some(err) if err.is_parse_too_large() => "headers_too_large",
                Some(err) if err.is_parse() => "bad_request",
                _ => "io",
            };
            self.metrics.connection_error(kind);
            tracing::debug!(%peer, error = %err, kind, "connection ended with an error");
        }
        drop(self.guard);
    }
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
