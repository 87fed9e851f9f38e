//! The accept loop: TCP connections in (TLS-terminated if configured), HTTP/1.1 or HTTP/2
//! served with hyper, graceful drain on shutdown. Knows nothing about webhooks: every
//! request goes to the handler it is given.
//!
//! Connection-level limits live here: the header read timeout (which also bounds the wait for
//! a client's first byte and idle connections of either HTTP version), the TLS handshake
//! timeout, the header count and size, and the caps on open connections, overall and per
//! source address. Under TLS, a client that speaks plain HTTP gets a 400 saying so.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Version, header};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Level;

use crate::access::Source;
use crate::config::HttpConfig;
use crate::metrics::{ConnectionErrorKind as Kind, Metrics, TlsFailure};
use crate::rejection_log::RejectionLog;
use crate::tls::Tls;

/// Requests at once on one HTTP/2 connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 100;

/// Serves `listener` with `handler` until `shutdown` resolves, then stops accepting and gives
/// open connections `http.drain_timeout_ms` to finish their requests.
pub async fn serve<H, F>(
    listener: TcpListener,
    http: &HttpConfig,
    tls: Option<Arc<Tls>>,
    metrics: Arc<Metrics>,
    rejections: Arc<RejectionLog>,
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
        // for its next request. It starts only once hyper knows the connection is HTTP/1:
        // the wait for the first byte is bounded in `Connection::run`.
        .header_read_timeout(http.header_read_timeout())
        .max_headers(http.max_headers)
        .max_buf_size(http.max_header_bytes);
    // hyper has no idle timeout for HTTP/2. Keep-alive pings are no substitute: they only
    // catch peers that stopped answering, and a client that sends nothing still answers
    // them. Idle connections of both versions are closed in `Connection::serve` instead.
    builder
        .http2()
        .timer(TokioTimer::new())
        // Each stream may hold a body being read: say how many, for the memory bound the
        // docs give (RFC 9113 recommends allowing at least 100; hyper's default is 200).
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .max_header_list_size(u32::try_from(http.max_header_bytes).unwrap_or(u32::MAX));
    let builder = Arc::new(builder);

    let timeout = http.header_read_timeout();
    let retry_after_secs = http.retry_after_secs;
    let open = Arc::new(AtomicUsize::new(0));
    let per_source = Arc::new(PerSource::default());
    let stop = CancellationToken::new();
    let connections = TaskTracker::new();
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
        // The real TCP peer: a client cannot claim another address here. Load balancers
        // (`http.trusted_proxies`) carry many clients on their connections and are not capped.
        let source = Source::of(peer.ip());
        let trusted = http
            .trusted_proxies
            .iter()
            .any(|net| net.contains(&peer.ip().to_canonical()));
        let Some(source_count) = per_source.enter(source, http.max_connections_per_ip, trusted)
        else {
            // One client may not take the whole table: closed at once, before any TLS or
            // HTTP work, so it costs no more than the accept.
            metrics.connection_error(Kind::over_ip_limit);
            let reason = Kind::over_ip_limit.as_str();
            if rejections.first(source, reason, Level::WARN, "connections") {
                tracing::warn!(
                    %peer,
                    max = http.max_connections_per_ip,
                    "too many connections from one address; closing new ones"
                );
            }
            continue;
        };
        // Responses are small and sent in one write: don't let Nagle hold them back.
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %err, "failed to set TCP_NODELAY");
        }
        let connection = Connection {
            guard: ConnectionCount::enter(&open),
            _source_count: source_count,
            peer,
            builder: Arc::clone(&builder),
            stop: stop.clone(),
            metrics: Arc::clone(&metrics),
            rejections: Arc::clone(&rejections),
            timeout,
        };
        if connection.guard.count > http.max_connections {
            // Over the cap: one quick 503 and the connection is closed, instead of holding
            // memory for it. The whole connection gets one header read timeout, since on
            // HTTP/2 a client could otherwise keep asking on it.
            let reason = Kind::over_limit.as_str();
            if rejections.first(source, reason, Level::WARN, "connections") {
                tracing::warn!(%peer, max = http.max_connections, "too many connections; refusing new ones");
            }
            metrics.connection_error(Kind::over_limit);
            let refuse = move |_, request: Request<Incoming>| async move {
                Ok::<_, Infallible>(busy(request.version(), retry_after_secs))
            };
            let run = connection.run(stream, tls.clone(), refuse);
            connections.spawn(async move {
                let _ = tokio::time::timeout(timeout, run).await;
            });
        } else {
            connections.spawn(connection.run(stream, tls.clone(), handler.clone()));
        }
    }

    drop(listener);
    let drain = http.drain_timeout();
    tracing::info!(
        ?drain,
        "shutdown requested: no longer accepting, draining connections"
    );
    stop.cancel();
    connections.close();
    tokio::select! {
        () = connections.wait() => tracing::info!("all connections drained"),
        () = tokio::time::sleep(drain) => {
            tracing::warn!(?drain, "drain timeout reached, closing remaining connections");
        }
    }
}

/// One accepted connection, served on its own task.
struct Connection {
    guard: ConnectionCount,
    _source_count: SourceCount,
    peer: SocketAddr,
    builder: Arc<auto::Builder<TokioExecutor>>,
    /// Cancelled when the server drains.
    stop: CancellationToken,
    metrics: Arc<Metrics>,
    rejections: Arc<RejectionLog>,
    /// `http.header_read_timeout_ms`.
    timeout: Duration,
}

impl Connection {
    async fn run<H, F>(self, stream: TcpStream, tls: Option<Arc<Tls>>, handler: H)
    where
        H: Fn(SocketAddr, Request<Incoming>) -> F + Send + Sync + 'static,
        F: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
    {
        let metrics = Arc::clone(&self.metrics);
        let _open = metrics.connection();
        // A client must send its first byte within a header read timeout before hyper gets
        // the connection (hyper-util's protocol detection has no timer of its own); until
        // then it costs no more than its socket. Under TLS, the handshake timeout covers it.
        let Some(tls) = tls else {
            // `peek`, not `readable()`: tokio reports a fresh socket readable at once.
            let mut byte = [0];
            let first_byte = tokio::select! {
                peeked = tokio::time::timeout(self.timeout, stream.peek(&mut byte)) => peeked,
                // Draining: a client that has not asked anything has nothing to finish.
                () = self.stop.cancelled() => return,
            };
            match first_byte {
                Ok(Ok(0)) => {} // Closed without a word.
                Ok(Ok(_)) => self.serve(stream, handler).await,
                Ok(Err(err)) => {
                    self.metrics.connection_error(Kind::io);
                    tracing::debug!(peer = %self.peer, error = %err, "connection failed");
                }
                Err(_) => {
                    self.metrics.connection_error(Kind::header_timeout);
                    tracing::debug!(peer = %self.peer, "client sent nothing in time");
                }
            }
            return;
        };
        // The handshake runs here, not in the accept loop, with a short deadline of its own
        // from the first byte on: a client that stalls it holds a connection slot meanwhile.
        let deadline = tokio::time::Instant::now() + tls.handshake_timeout;
        let hello = tokio::select! {
            hello = tokio::time::timeout_at(deadline, first_byte(&stream)) => hello,
            () = self.stop.cancelled() => return,
        };
        let (failure, error) = match hello {
            Err(_) => (TlsFailure::timeout, None),
            Ok(Err(err)) => (TlsFailure::io, Some(err)),
            Ok(Ok(None)) => return, // Closed without a word.
            // A TLS record of type handshake.
            Ok(Ok(Some(0x16))) => {
                match tokio::time::timeout_at(deadline, tls.acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => return self.serve(stream, handler).await,
                    Ok(Err(err)) => (handshake_failure(&err), Some(err)),
                    Err(_) => (TlsFailure::timeout, None),
                }
            }
            // A request line (`GET /`, `POST /`, ...): someone forgot the s in https.
            Ok(Ok(Some(byte))) if byte.is_ascii_uppercase() => {
                self.handshake_failed(TlsFailure::plain_http, None);
                return answer_plain_http(stream, deadline).await;
            }
            Ok(Ok(Some(_))) => (TlsFailure::not_tls, None),
        };
        self.handshake_failed(failure, error);
    }

    /// Counts a failed handshake, and logs it through the rejection log.
    fn handshake_failed(&self, failure: TlsFailure, error: Option<io::Error>) {
        self.metrics.connection_error(Kind::tls_handshake);
        self.metrics.tls_handshake_failure(failure);
        let source = Source::of(self.peer.ip());
        // Clients that refuse the certificate are the operator's business (an expired or
        // wrong certificate); every other failure is the client's, and logs at debug.
        let level = if failure == TlsFailure::certificate_rejected {
            Level::WARN
        } else {
            Level::DEBUG
        };
        let reason = failure.as_str();
        if self
            .rejections
            .first(source, reason, level, "TLS handshakes")
        {
            let error = error.map(|err| err.to_string());
            crate::rejection_log::event_at!(level, peer = %self.peer, reason, error, "TLS handshake failed");
        }
    }

    async fn serve<IO, H, F>(self, io: IO, handler: H)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        H: Fn(SocketAddr, Request<Incoming>) -> F + Send + Sync + 'static,
        F: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
    {
        let peer = self.peer;
        let activity = Arc::new(Activity::new());
        let service = {
            let activity = Arc::clone(&activity);
            service_fn(move |request| {
                let answering = InFlight::enter(&activity);
                let response = handler(peer, request);
                async move {
                    let response = response.await;
                    drop(answering);
                    response
                }
            })
        };
        let connection = self.builder.serve_connection(TokioIo::new(io), service);
        let mut connection = std::pin::pin!(connection);
        let result = tokio::select! {
            result = connection.as_mut() => result,
            () = self.stop.cancelled() => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
            () = idle(&activity, self.timeout) => {
                // hyper closes an idle HTTP/1 connection itself at about this time, but not
                // an HTTP/2 one, nor one whose protocol it is still detecting.
                self.metrics.connection_error(Kind::header_timeout);
                tracing::debug!(%peer, "connection idle for the header read timeout; closing it");
                connection.as_mut().graceful_shutdown();
                // A client that ignores the GOAWAY is cut off one timeout later.
                let _ = tokio::time::timeout(self.timeout, connection).await;
                return;
            }
        };
        if let Err(err) = result {
            let kind = match err.downcast_ref::<hyper::Error>() {
                // Slow-loris: headers not sent in time (or an idle keep-alive connection).
                Some(err) if err.is_timeout() => Kind::header_timeout,
                Some(err) if err.is_parse_too_large() => Kind::headers_too_large,
                Some(err) if err.is_parse() => Kind::bad_request,
                _ => Kind::io,
            };
            self.metrics.connection_error(kind);
            tracing::debug!(%peer, error = %err, kind = kind.as_str(), "connection ended with an error");
        }
    }
}

/// The connection's first byte, once it arrives, without taking it from the stream; `None`
/// if the client closed without sending one.
async fn first_byte(stream: &TcpStream) -> io::Result<Option<u8>> {
    // `peek`, not `readable()`: tokio reports a fresh socket readable at once.
    let mut byte = [0];
    Ok((stream.peek(&mut byte).await? > 0).then_some(byte[0]))
}

/// Tells a client that sent plain HTTP to the TLS port what went wrong, in the protocol it
/// speaks, then closes the connection gracefully (what it sent is read and dropped, until
/// `deadline`, so closing does not reset the connection under the answer).
async fn answer_plain_http(mut stream: TcpStream, deadline: tokio::time::Instant) {
    const BODY: &str = r#"{"error":"this port speaks TLS: use https://"}"#;
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let exchange = async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut left: usize = 64 * 1024;
        while left > 0 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => left = left.saturating_sub(n),
            }
        }
        Ok::<_, io::Error>(())
    };
    let _ = tokio::time::timeout_at(deadline, exchange).await;
}

/// The `tls_handshake_failures_total` reason of a failed handshake.
fn handshake_failure(err: &io::Error) -> TlsFailure {
    use tokio_rustls::rustls::{AlertDescription, Error};
    match err.get_ref().and_then(|e| e.downcast_ref::<Error>()) {
        Some(Error::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnknownCA,
        )) => TlsFailure::certificate_rejected,
        Some(Error::AlertReceived(_)) => TlsFailure::client_alert,
        Some(Error::PeerIncompatible(_) | Error::NoApplicationProtocol) => TlsFailure::incompatible,
        Some(_) => TlsFailure::protocol,
        None if err.kind() == io::ErrorKind::UnexpectedEof => TlsFailure::closed,
        None => TlsFailure::io,
    }
}

/// What one connection is doing, for [`idle`]. Each request costs two atomic updates; the
/// state is read only when an idle deadline passes, so a busy connection pays no wake-ups
/// and no timers per request.
struct Activity {
    born: Instant,
    in_flight: AtomicUsize,
    /// When the last request was answered, in milliseconds after `born`.
    last_answer_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            born: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_answer_ms: AtomicU64::new(0),
        }
    }

    /// When the connection became quiet, if it is now.
    fn quiet_since(&self) -> Option<Instant> {
        (self.in_flight.load(Ordering::Acquire) == 0)
            .then(|| self.born + Duration::from_millis(self.last_answer_ms.load(Ordering::Acquire)))
    }
}

/// Resolves once the connection has had no request in flight for `timeout`.
async fn idle(activity: &Activity, timeout: Duration) {
    let mut deadline = Instant::now() + timeout;
    loop {
        tokio::time::sleep_until(deadline.into()).await;
        let now = Instant::now();
        deadline = match activity.quiet_since() {
            Some(since) if since + timeout <= now => return,
            Some(since) => since + timeout,
            None => now + timeout,
        };
    }
}

/// Counts a request in flight on its connection until it is answered.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn enter(activity: &Arc<Activity>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(activity))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        let answered = u64::try_from(activity.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        activity
            .last_answer_ms
            .fetch_max(answered, Ordering::AcqRel);
        activity.in_flight.fetch_sub(1, Ordering::AcqRel);
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

/// Open connections per source address, for `http.max_connections_per_ip`; an entry lives
/// only while its source has a connection open, so the table is no bigger than the
/// connections themselves.
#[derive(Default)]
struct PerSource(Mutex<HashMap<Source, usize>>);

impl PerSource {
    /// Counts a new connection from `source`, or `None` if it already has `max` open.
    /// `exempt` sources (trusted proxies) are counted too, but never refused.
    fn enter(self: &Arc<Self>, source: Source, max: usize, exempt: bool) -> Option<SourceCount> {
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(source).or_insert(0);
        if *count >= max && !exempt {
            return None;
        }
        *count += 1;
        Some(SourceCount {
            table: Arc::clone(self),
            source,
        })
    }
}

/// One connection counted in [`PerSource`] until dropped.
struct SourceCount {
    table: Arc<PerSource>,
    source: Source,
}

impl Drop for SourceCount {
    fn drop(&mut self) {
        let mut open = self.table.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.source);
            }
        }
    }
}

/// The answer beyond `http.max_connections`. `Connection: close` ends an HTTP/1 connection;
/// HTTP/2 has no such header (hyper would drop it with a warning): there the connection's
/// own deadline ends it.
fn busy(version: Version, retry_after_secs: u64) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(
        br#"{"error":"too many connections, try again later"}"#,
    )));
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        "application/json".parse().expect("valid"),
    );
    headers.insert(header::RETRY_AFTER, retry_after_secs.into());
    if version <= Version::HTTP_11 {
        headers.insert(header::CONNECTION, "close".parse().expect("valid"));
    }
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
