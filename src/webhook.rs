//! One HTTP request in, one response out: routing, the bounded body, the envelope, the key,
//! the event name, the publish, and the mapping of every failure to a status code.
//!
//! Checks run cheapest first, so garbage costs little: the `Host` header, method and path,
//! then the declared `Content-Length` (413 before a body byte is read), then the body under a
//! size limit and a time limit, then the in-flight cap, then the envelope, then the key
//! (with its per-source budget of failures), then the event name, and only then the broker.
//! A 202 is sent only once the broker has confirmed the message (or the spool fsynced it).
//!
//! Rejections are logged through [`RejectionLog`]: the first of each source and reason in
//! full, the rest as one summary line per interval.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, Level};

use crate::access::{AccessPolicy, KeyFailureBudget, Source};
use crate::amqp::PublishError;
use crate::auth::KeyStore;
use crate::completion::RunToCompletion;
use crate::config::{Config, HttpConfig};
use crate::delivery::{Delivery, DeliveryError, Outcome};
use crate::envelope::{Envelope, EnvelopeError};
use crate::health::{Health, Probe};
use crate::message::Message;
use crate::metrics::{self, RejectionReason, Route};
use crate::rejection_log::{RejectionLog, event_at};
use crate::routing::{EventNameError, RoutingTemplate};
use crate::spool::SpoolError;
use crate::tracecontext::TraceContext;

/// What every request handler shares.
pub struct App {
    pub http: HttpConfig,
    /// `amqp.routing_key_prefix` and `amqp.routing_key_template`.
    pub routing: RoutingTemplate,
    pub keys: Arc<KeyStore>,
    pub delivery: Delivery,
    /// Deliveries under way, wherever they run (see [`RunToCompletion`]): shutdown waits
    /// for them.
    pub publishes: TaskTracker,
    /// Permits for webhooks handled at once (`http.max_in_flight`), taken once the body is in.
    pub in_flight: Semaphore,
    /// Whether `/metrics` is served here (not when it has a listener of its own).
    pub metrics_here: bool,
    /// Network rules of the webhook path.
    pub access: AccessPolicy,
    /// Failed key checks left to each source before its wrong keys get 429.
    pub key_failures: KeyFailureBudget,
    /// Where rejections are logged, without letting a flood through.
    pub rejections: Arc<RejectionLog>,
    /// `amqp.redact_export_key`.
    pub redact_export_key: bool,
    /// `auth.max_age_secs`, when on.
    pub max_age: Option<Duration>,
}

impl App {
    /// The handlers' shared state, from the validated `config` and the keys in use.
    pub fn new(
        config: &Config,
        keys: Arc<KeyStore>,
        delivery: Delivery,
        rejections: Arc<RejectionLog>,
    ) -> App {
        let http = &config.http;
        App {
            keys,
            routing: config.routing().clone(),
            http: http.clone(),
            delivery,
            publishes: TaskTracker::new(),
            in_flight: Semaphore::new(http.max_in_flight),
            metrics_here: config.metrics.listen.is_none(),
            access: AccessPolicy::new(
                http.allow_from.clone(),
                http.trusted_proxies.clone(),
                http.forwarded_header,
            ),
            key_failures: KeyFailureBudget::new(
                http.key_failures_per_minute,
                http.key_failure_burst,
            ),
            rejections,
            redact_export_key: config.amqp.redact_export_key,
            max_age: (config.auth.max_age_secs > 0)
                .then(|| Duration::from_secs(config.auth.max_age_secs)),
        }
    }
}

/// Every way a request can fail, and the status it gets. Messages are sent to the client:
/// short, lowercase, and never echoing the body or the key.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    /// RFC 9112 §3.2: an HTTP/1.1 request has exactly one valid `Host` header.
    #[error("{0}")]
    BadHost(&'static str),
    #[error("not found")]
    NotFound,
    #[error("forbidden")]
    Forbidden,
    #[error("method not allowed")]
    MethodNotAllowed { allow: &'static str },
    #[error("too many requests in flight, try again later")]
    Overloaded,
    #[error("body is larger than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("body not received in time")]
    BodyTimeout,
    #[error("failed to read body: {0}")]
    BodyRead(String),
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    #[error("export_key is missing or not a string")]
    MissingKey,
    #[error("export_key is not valid")]
    WrongKey,
    #[error("too many requests with a wrong export_key from this address, try again later")]
    KeyFailuresLimited { retry_after_secs: u64 },
    #[error("time is missing or outside the accepted window")]
    Stale,
    #[error("event is missing or not a string")]
    MissingEvent,
    #[error(transparent)]
    BadEvent(#[from] EventNameError),
    #[error("broker unavailable, webhook not accepted")]
    Unavailable(#[source] PublishError),
    #[error("event is not routed to any queue, webhook not accepted")]
    Unroutable(#[source] PublishError),
    #[error("the broker refuses this event's queue, webhook not accepted")]
    QueueRefused(#[source] PublishError),
    #[error("spool full, webhook not accepted")]
    SpoolFull(#[source] SpoolError),
    #[error("spool write failed, webhook not accepted")]
    SpoolFailed(#[source] SpoolError),
    /// The delivery panicked (a bug).
    #[error("delivery ended abnormally, webhook not accepted")]
    DeliveryAborted(String),
}

impl From<DeliveryError> for Rejection {
    fn from(err: DeliveryError) -> Rejection {
        match err {
            DeliveryError::Broker(err @ PublishError::Refused(_)) => Rejection::QueueRefused(err),
            DeliveryError::Broker(err) if err.is_permanent() => Rejection::Unroutable(err),
            DeliveryError::Broker(err) => Rejection::Unavailable(err),
            DeliveryError::Spool(err @ SpoolError::Full { .. }) => Rejection::SpoolFull(err),
            DeliveryError::Spool(err) => Rejection::SpoolFailed(err),
        }
    }
}

impl Rejection {
    pub fn status(&self) -> StatusCode {
        match self {
            Rejection::NotFound => StatusCode::NOT_FOUND,
            Rejection::Forbidden => StatusCode::FORBIDDEN,
            Rejection::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Rejection::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Rejection::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Rejection::BadHost(_)
            | Rejection::BodyRead(_)
            | Rejection::Envelope(_)
            | Rejection::MissingEvent
            | Rejection::BadEvent(_) => StatusCode::BAD_REQUEST,
            Rejection::MissingKey | Rejection::WrongKey | Rejection::Stale => {
                StatusCode::UNAUTHORIZED
            }
            Rejection::KeyFailuresLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Rejection::Overloaded
            | Rejection::Unavailable(_)
            | Rejection::Unroutable(_)
            | Rejection::QueueRefused(_)
            | Rejection::SpoolFull(_)
            | Rejection::SpoolFailed(_)
            | Rejection::DeliveryAborted(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// A stable, low-cardinality name for logs and metrics.
    pub fn reason(&self) -> RejectionReason {
        use RejectionReason as R;
        match self {
            Rejection::BadHost(_) => R::bad_host,
            Rejection::NotFound => R::not_found,
            Rejection::Forbidden => R::forbidden,
            Rejection::MethodNotAllowed { .. } => R::method_not_allowed,
            Rejection::Overloaded => R::overloaded,
            Rejection::TooLarge { .. } => R::too_large,
            Rejection::BodyTimeout => R::body_timeout,
            Rejection::BodyRead(_) => R::body_read,
            Rejection::Envelope(_) => R::bad_json,
            Rejection::MissingKey | Rejection::WrongKey => R::bad_key,
            Rejection::KeyFailuresLimited { .. } => R::rate_limited,
            Rejection::Stale => R::stale,
            Rejection::MissingEvent | Rejection::BadEvent(_) => R::bad_event,
            Rejection::Unavailable(_) => R::broker_unavailable,
            Rejection::Unroutable(_) => R::unroutable,
            Rejection::QueueRefused(_) => R::queue_refused,
            Rejection::SpoolFull(_) => R::spool_full,
            Rejection::SpoolFailed(_) => R::spool_failed,
            Rejection::DeliveryAborted(_) => R::delivery_aborted,
        }
    }

    fn is_server_side(&self) -> bool {
        self.status() == StatusCode::SERVICE_UNAVAILABLE
    }

    /// How loud its log line is. Error: a webhook that may be HireHop's was not kept. Warn:
    /// something on the webhook path an operator may have to act on (a rotated key, a new
    /// sender address, a flood, the in-flight cap). Debug: scanners and broken clients, which
    /// HireHop never is (unknown paths, methods it does not use, a missing `Host`).
    pub fn level(&self) -> Level {
        match self {
            Rejection::BadHost(_) | Rejection::NotFound | Rejection::MethodNotAllowed { .. } => {
                Level::DEBUG
            }
            Rejection::Overloaded => Level::WARN,
            _ if self.is_server_side() => Level::ERROR,
            _ => Level::WARN,
        }
    }
}

/// RFC 9112 §3.2: a request with more than one `Host` header, or one whose value is not a
/// host, is refused; so is an HTTP/1.1 request without one. HTTP/2 carries the authority in
/// `:authority` instead, and HTTP/1.0 needs no `Host`.
fn check_host(request: &Request<Incoming>) -> Result<(), Rejection> {
    let mut hosts = request.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (_, Some(_)) => Err(Rejection::BadHost("more than one Host header")),
        (None, _) if request.version() == Version::HTTP_11 => {
            Err(Rejection::BadHost("HTTP/1.1 request without a Host header"))
        }
        (None, _) => Ok(()),
        // Empty is allowed: it is what a client sends when the URI has no authority.
        (Some(host), _) if host.is_empty() => Ok(()),
        (Some(host), _) => match host
            .to_str()
            .ok()
            .map(str::parse::<hyper::http::uri::Authority>)
        {
            Some(Ok(authority)) if authority.as_str().find('@').is_none() => Ok(()),
            _ => Err(Rejection::BadHost("Host header is not a valid host")),
        },
    }
}

/// The hyper service: never fails, every outcome is a response.
pub async fn handle(
    app: Arc<App>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let started = Instant::now();
    // Time-ordered, so message ids sort by arrival; doubles as the request id in logs.
    let mut id_text = uuid::Uuid::encode_buffer();
    let request_id: &str = uuid::Uuid::now_v7().hyphenated().encode_lower(&mut id_text);
    let trace = TraceContext::from_headers(request.headers());
    let route = route_of(&app, request.uri().path());
    let client = app.access.client_ip(peer.ip(), request.headers());
    let span = tracing::info_span!(
        "request",
        %request_id,
        trace_id = trace.trace_id(),
        %peer,
        %client,
        method = %request.method(),
        path = request.uri().path(),
        event = tracing::field::Empty,
        company_id = tracing::field::Empty,
    );
    let answer = match check_host(&request) {
        Ok(()) => {
            dispatch(&app, request, request_id, trace, client)
                .instrument(span.clone())
                .await
        }
        Err(rejection) => Err(rejection),
    };
    let mut response = answer.unwrap_or_else(|rejection| {
        let (reason, level) = (rejection.reason(), rejection.level());
        if app
            .rejections
            .first(Source::of(client), reason.as_str(), level, "requests")
        {
            span.in_scope(|| log_rejection(&rejection, level));
        }
        app.delivery.metrics().rejection(reason);
        rejection_response(&rejection, app.http.retry_after_secs)
    });
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    app.delivery
        .metrics()
        .request(route, response.status().as_u16(), started.elapsed());
    Ok(response)
}

/// The `route` label: a fixed set, whatever path a client invents.
fn route_of(app: &App, path: &str) -> Route {
    if path == app.http.path {
        return Route::webhook;
    }
    Endpoint::at(path, app.metrics_here).map_or(Route::other, Endpoint::route)
}

/// What both listeners serve besides webhooks: the health probes, and `/metrics` where it
/// is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Probe(Probe),
    Metrics,
}

impl Endpoint {
    fn at(path: &str, metrics_here: bool) -> Option<Endpoint> {
        match path {
            "/metrics" if metrics_here => Some(Endpoint::Metrics),
            _ => Probe::at(path).map(Endpoint::Probe),
        }
    }

    fn route(self) -> Route {
        match self {
            Endpoint::Probe(Probe::Liveness) => Route::healthz,
            Endpoint::Probe(Probe::Readiness) => Route::readyz,
            Endpoint::Metrics => Route::metrics,
        }
    }
}

/// Any path but the webhook's, answered alike on both listeners: an [`Endpoint`] to `GET`
/// and `HEAD`, anything else a rejection.
fn endpoint<B>(
    request: &Request<B>,
    delivery: &Delivery,
    metrics_here: bool,
) -> Result<Response<Full<Bytes>>, Rejection> {
    let endpoint = Endpoint::at(request.uri().path(), metrics_here).ok_or(Rejection::NotFound)?;
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        return Err(Rejection::MethodNotAllowed { allow: "GET, HEAD" });
    }
    Ok(match endpoint {
        Endpoint::Probe(probe) => {
            let (status, body) = probe.answer(|| health(delivery));
            json_response(status, body)
        }
        Endpoint::Metrics => metrics(delivery, request),
    })
}

/// The broker connection and the spool, as they are now.
fn health(delivery: &Delivery) -> Health {
    Health::of(delivery.publisher(), delivery.spool())
}

async fn dispatch(
    app: &App,
    request: Request<Incoming>,
    request_id: &str,
    trace: TraceContext,
    client: std::net::IpAddr,
) -> Result<Response<Full<Bytes>>, Rejection> {
    let path = request.uri().path();
    let method = request.method();
    if path == app.http.path {
        // Before anything is read from the body.
        if !app.access.allows(client) {
            return Err(Rejection::Forbidden);
        }
        return match *method {
            Method::POST => accept(app, request, request_id, trace, client).await,
            Method::GET | Method::HEAD => Ok(text(
                StatusCode::OK,
                "hirehop-relay: POST HireHop webhooks to this URL\n",
            )),
            _ => Err(Rejection::MethodNotAllowed {
                allow: "GET, HEAD, POST",
            }),
        };
    }
    endpoint(&request, &app.delivery, app.metrics_here)
}

/// The service of the `metrics.listen` listener: `/metrics` and the health endpoints (for
/// probes that cannot speak the webhook port's TLS), nothing else.
pub async fn handle_metrics_listener(
    delivery: Delivery,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let answer = check_host(&request).and_then(|()| endpoint(&request, &delivery, true));
    Ok(answer.unwrap_or_else(|rejection| rejection_response(&rejection, 0)))
}

/// `GET /metrics` (on whichever listener serves it), in the format the scraper asks for.
fn metrics<B>(delivery: &Delivery, request: &Request<B>) -> Response<Full<Bytes>> {
    let accept = request
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok());
    let format = metrics::Format::negotiate(accept);
    let text = delivery.metrics().render(
        &health(delivery),
        metrics::BrokerCounts {
            reconnects: delivery.publisher().reconnects(),
            stalls: delivery.publisher().stalls(),
        },
        format,
    );
    with_type(StatusCode::OK, text, format.content_type())
}

/// The webhook itself: read, verify, publish, confirm.
async fn accept(
    app: &App,
    request: Request<Incoming>,
    request_id: &str,
    trace: TraceContext,
    client: std::net::IpAddr,
) -> Result<Response<Full<Bytes>>, Rejection> {
    let received_at = SystemTime::now();
    let body = read_body(&app.http, request).await?;
    // The in-flight permit is taken only now: a client that has not delivered its body holds
    // no slot, so slow clients cannot starve HireHop. Bodies still being read are bounded by
    // the connection caps, `http.max_body_bytes` and the body timeouts instead. Beyond the
    // cap, answer at once instead of queueing without bound.
    let _permit = app
        .in_flight
        .try_acquire()
        .map_err(|_| Rejection::Overloaded)?;
    let _counted = app.delivery.metrics().in_flight();
    let envelope = Envelope::parse(&body)?;
    let span = tracing::Span::current();
    if let Some(id) = envelope.company_id {
        span.record("company_id", id);
    }
    let verified = match envelope.export_key.as_deref() {
        None => Err(Rejection::MissingKey),
        Some(key) if !app.keys.current().verify(key, envelope.company_id) => {
            Err(Rejection::WrongKey)
        }
        Some(_) => Ok(()),
    };
    if let Err(failure) = verified {
        // Decided here, not before the body is read: the key is in the body, and a valid key
        // must never be refused for what others behind the same address (a load balancer's)
        // did. The budget cannot stop a guesser who ignores 429s; with keys of 12 letters and
        // digits it does not need to. It keeps a flood cheap, visible and out of the log.
        return Err(match app.key_failures.spend(Source::of(client)) {
            Ok(()) => failure,
            Err(wait) => Rejection::KeyFailuresLimited {
                retry_after_secs: (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1),
            },
        });
    }
    if let Some(window) = app.max_age
        && !fresh(envelope.time.as_deref(), received_at, window)
    {
        return Err(Rejection::Stale);
    }
    let event = envelope.event.as_deref().ok_or(Rejection::MissingEvent)?;
    span.record("event", event);
    let routing_key = app.routing.routing_key(event, envelope.company_id)?;

    let message = Message {
        routing_key,
        event: event.to_owned(),
        message_id: request_id.to_owned(),
        company_id: envelope.company_id,
        user_id: envelope.user_id,
        received_at,
        body: match (&envelope.export_key_span, app.redact_export_key) {
            (Some(span), true) => redact(&body, span.clone()),
            _ => body.clone(),
        },
        replayed: false,
        traceparent: trace.traceparent(),
        tracestate: trace.tracestate,
    };
    let delivery = app.delivery.clone();
    // Run to its end even if the client disconnects (hyper then drops this future): a publish
    // or spool write cut off halfway would lose the webhook.
    let deliver = RunToCompletion::new(
        &app.publishes,
        async move { delivery.deliver(&message).await },
    );
    let outcome = match deliver.await {
        Ok(result) => result?,
        Err(panicked) => return Err(Rejection::DeliveryAborted(panicked.to_string())),
    };
    let status = match outcome {
        Outcome::Confirmed => "accepted",
        Outcome::Spooled => "spooled",
    };
    app.delivery.metrics().webhook(event);
    tracing::info!(body_len = body.len(), status, "webhook accepted");
    // Concatenated rather than `format!`ed: this runs for every webhook.
    let json = [
        r#"{"status":""#,
        status,
        r#"","message_id":""#,
        request_id,
        r#""}"#,
    ]
    .concat();
    Ok(json_response(StatusCode::ACCEPTED, json))
}

/// Whether HireHop's `time` (UTC, `YYYY-MM-DD HH:MM:SS`) is within `window` of `now`, either
/// way (clocks drift).
fn fresh(time: Option<&str>, now: SystemTime, window: Duration) -> bool {
    let Some(sent) = time.and_then(|t| humantime::parse_rfc3339_weak(t).ok()) else {
        return false;
    };
    let skew = now
        .duration_since(sent)
        .or_else(|_| sent.duration_since(now))
        .unwrap_or(Duration::MAX);
    skew <= window
}

/// The body with the JSON value at `span` (the export key, quotes included) replaced by
/// `"<redacted>"`; every other byte as it was.
fn redact(body: &Bytes, span: std::ops::Range<usize>) -> Bytes {
    let mut out = Vec::with_capacity(body.len());
    out.extend_from_slice(&body[..span.start]);
    out.extend_from_slice(b"\"<redacted>\"");
    out.extend_from_slice(&body[span.end..]);
    Bytes::from(out)
}

async fn read_body(http: &HttpConfig, request: Request<Incoming>) -> Result<Bytes, Rejection> {
    let limit = http.max_body_bytes;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(Rejection::TooLarge { limit });
    }
    let mut body = Limited::new(
        request.into_body(),
        usize::try_from(limit).unwrap_or(usize::MAX),
    );
    // Two clocks: the whole body within request_timeout, and no pause between two pieces
    // longer than body_idle_timeout (a client dribbling a byte at a time is cut off early).
    let deadline = tokio::time::Instant::now() + http.request_timeout();
    // Most bodies come in one piece: the list is made only for a second.
    let mut first: Option<Bytes> = None;
    let mut rest: Vec<Bytes> = Vec::new();
    loop {
        let pause = (tokio::time::Instant::now() + http.body_idle_timeout()).min(deadline);
        let frame = match tokio::time::timeout_at(pause, body.frame()).await {
            Err(_) => return Err(Rejection::BodyTimeout),
            Ok(None) => return Ok(join(first, rest)),
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(err))) if err.is::<LengthLimitError>() => {
                return Err(Rejection::TooLarge { limit });
            }
            Ok(Some(Err(err))) => return Err(Rejection::BodyRead(err.to_string())),
        };
        // Trailers, if any, are not part of the webhook.
        if let Ok(data) = frame.into_data() {
            match first {
                None => first = Some(data),
                Some(_) => rest.push(data),
            }
        }
    }
}

/// One `Bytes` for the whole body; without a copy when it came in one piece.
fn join(first: Option<Bytes>, rest: Vec<Bytes>) -> Bytes {
    match first {
        None => Bytes::new(),
        Some(first) if rest.is_empty() => first,
        Some(first) => {
            let mut body = first.to_vec();
            for chunk in rest {
                body.extend_from_slice(&chunk);
            }
            Bytes::from(body)
        }
    }
}

fn log_rejection(rejection: &Rejection, level: Level) {
    let status = rejection.status().as_u16();
    let reason = rejection.reason().as_str();
    if rejection.is_server_side() {
        let source = std::error::Error::source(rejection).map(ToString::to_string);
        event_at!(level, status, reason, error = %rejection, cause = source, "webhook not accepted");
    } else {
        event_at!(level, status, reason, error = %rejection, "request rejected");
    }
}

fn rejection_response(rejection: &Rejection, retry_after_secs: u64) -> Response<Full<Bytes>> {
    let message = serde_json::json!({ "error": rejection.to_string() }).to_string();
    let mut response = json_response(rejection.status(), message);
    let headers = response.headers_mut();
    match rejection {
        Rejection::MethodNotAllowed { allow } => {
            headers.insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        Rejection::KeyFailuresLimited { retry_after_secs } => {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
        }
        _ if rejection.is_server_side() => {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        _ => {}
    }
    response
}

fn json_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    with_type(status, body, "application/json")
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    with_type(status, body.to_owned(), "text/plain; charset=utf-8")
}

fn with_type(
    status: StatusCode,
    body: String,
    content_type: &'static str,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn log_levels_follow_what_an_operator_must_do() {
        // Scanners and broken clients: nothing to do.
        for rejection in [
            Rejection::NotFound,
            Rejection::MethodNotAllowed { allow: "GET" },
            Rejection::BadHost("more than one Host header"),
        ] {
            assert_eq!(rejection.level(), Level::DEBUG, "{rejection:?}");
        }
        // The webhook path: perhaps a rotated key or a new sender; the in-flight cap.
        for rejection in [
            Rejection::WrongKey,
            Rejection::KeyFailuresLimited {
                retry_after_secs: 2,
            },
            Rejection::Forbidden,
            Rejection::BodyTimeout,
            Rejection::Overloaded,
        ] {
            assert_eq!(rejection.level(), Level::WARN, "{rejection:?}");
        }
        // A webhook that was not kept.
        let lost = Rejection::DeliveryAborted("panicked".into());
        assert_eq!(lost.level(), Level::ERROR);
        assert_eq!(
            Rejection::Overloaded.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    /// One rejection of every kind. The `match` has no wildcard, so a new variant does not
    /// compile until it is added here, and so to the checks below.
    fn every_rejection() -> Vec<Rejection> {
        let all = vec![
            Rejection::BadHost("no host"),
            Rejection::NotFound,
            Rejection::Forbidden,
            Rejection::MethodNotAllowed { allow: "GET" },
            Rejection::Overloaded,
            Rejection::TooLarge { limit: 1 },
            Rejection::BodyTimeout,
            Rejection::BodyRead("reset".into()),
            Rejection::Envelope(EnvelopeError::NotAnObject),
            Rejection::MissingKey,
            Rejection::WrongKey,
            Rejection::KeyFailuresLimited {
                retry_after_secs: 1,
            },
            Rejection::Stale,
            Rejection::MissingEvent,
            Rejection::BadEvent(EventNameError::Empty),
            Rejection::Unavailable(PublishError::Unavailable),
            Rejection::Unroutable(PublishError::Returned("NO_ROUTE".into())),
            Rejection::QueueRefused(PublishError::Refused("no".into())),
            Rejection::SpoolFull(SpoolError::Full { max_bytes: 1 }),
            Rejection::SpoolFailed(SpoolError::Closed),
            Rejection::DeliveryAborted("panic".into()),
        ];
        for rejection in &all {
            match rejection {
                Rejection::BadHost(_)
                | Rejection::NotFound
                | Rejection::Forbidden
                | Rejection::MethodNotAllowed { .. }
                | Rejection::Overloaded
                | Rejection::TooLarge { .. }
                | Rejection::BodyTimeout
                | Rejection::BodyRead(_)
                | Rejection::Envelope(_)
                | Rejection::MissingKey
                | Rejection::WrongKey
                | Rejection::KeyFailuresLimited { .. }
                | Rejection::Stale
                | Rejection::MissingEvent
                | Rejection::BadEvent(_)
                | Rejection::Unavailable(_)
                | Rejection::Unroutable(_)
                | Rejection::QueueRefused(_)
                | Rejection::SpoolFull(_)
                | Rejection::SpoolFailed(_)
                | Rejection::DeliveryAborted(_) => {}
            }
        }
        all
    }

    #[test]
    fn every_reason_is_a_rejections_and_refusals_are_the_503s() {
        let all = every_rejection();
        let reasons: HashSet<RejectionReason> = all.iter().map(Rejection::reason).collect();
        let listed: HashSet<RejectionReason> = RejectionReason::ALL.iter().copied().collect();
        assert_eq!(reasons, listed, "a reason no rejection gives");
        for rejection in &all {
            assert_eq!(
                rejection.reason().is_refusal(),
                rejection.status() == StatusCode::SERVICE_UNAVAILABLE,
                "{rejection:?}"
            );
        }
    }
}
