//! Publishing: the broker connection, its confirm-mode channels, and what keeps them alive.
//!
//! A [`Publisher`] owns one AMQP connection with a small pool of confirm-mode channels and a
//! supervisor task that keeps them alive. Publishing picks a channel round-robin, sends the
//! message with `mandatory` set and waits for *that* message's confirm; many confirms are in
//! flight per channel at once and no lock is held across an await.
//!
//! The supervisor wakes on a connection event, on a failed publish or once a second, and
//! repairs what it finds: closed channels on a live connection are re-opened, a dead
//! connection is replaced (exponential backoff with jitter, topology declared again).
//! Meanwhile [`Publisher::publish`] fails fast with [`PublishError::Unavailable`] instead of
//! waiting, so a webhook is never held hostage by a broker outage.
//!
//! Topology, declared on every (re)connect before any channel publishes:
//! - the durable topic exchange `amqp.exchange`, with `alternate-exchange` =
//!   `<exchange>.unrouted` when `amqp.alternate_exchange` is on;
//! - the durable fanout exchange `<exchange>.unrouted` and the durable queue of the same
//!   name bound to it, which keep events nobody has bound a queue for yet;
//! - with history on, the history stream and the fanout exchange `<exchange>.history` in
//!   front of the topic exchange: messages are then published there.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, UNIX_EPOCH};

use futures_lite::StreamExt;
use futures_lite::stream::Boxed;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Event};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::amqp::{integer, long_string, topology};
use crate::config::{AmqpConfig, BrokerUrl};
use crate::message::Message;

/// Why a message was not confirmed. Every variant means "not safely stored": the caller must
/// not report the message as delivered.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("no broker connection")]
    Unavailable,
    #[error("broker did not confirm within {0:?}")]
    Timeout(Duration),
    #[error("broker refused the message (nack)")]
    Nacked,
    #[error("broker returned the message as unroutable: {0}")]
    Returned(String),
    /// The per-event queue cannot be declared (it exists with other arguments, or no
    /// permission): declaring it again will not help.
    #[error("broker refused the event's queue: {0}")]
    Refused(String),
    #[error("publish failed: {0}")]
    Failed(lapin::Error),
}

/// Why the broker could not be set up.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectError {
    #[error("failed to connect to {url}: {cause}")]
    Connect { url: String, cause: lapin::Error },
    #[error("timed out after {timeout:?} connecting to {url}")]
    Timeout { url: String, timeout: Duration },
    #[error("failed to declare {what}: {cause}")]
    Topology { what: String, cause: lapin::Error },
    #[error("failed to open a publishing channel: {0}")]
    Channel(lapin::Error),
    #[error("shutdown requested while connecting to the broker")]
    Cancelled,
}

impl PublishError {
    /// The outcome label for metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            PublishError::Unavailable => "unavailable",
            PublishError::Timeout(_) => "timeout",
            PublishError::Nacked => "nack",
            PublishError::Returned(_) => "returned",
            PublishError::Refused(_) => "refused",
            PublishError::Failed(_) => "error",
        }
    }
}

impl PublishError {
    /// Whether publishing the same message again would fail the same way, so it must be
    /// refused now rather than spooled for a replay that can never succeed.
    pub fn is_permanent(&self) -> bool {
        matches!(self, PublishError::Returned(_) | PublishError::Refused(_))
    }
}

impl ConnectError {
    /// A declaration the broker refuses for what it is, not for a passing fault: an existing
    /// exchange or queue with other arguments (PRECONDITION_FAILED), or no permission.
    /// Retrying cannot fix it, so startup stops with the message instead.
    fn is_fatal(&self) -> bool {
        let ConnectError::Topology { cause, .. } = self else {
            return false;
        };
        let lapin::ErrorKind::ProtocolError(err) = cause.kind() else {
            return false;
        };
        match err.kind() {
            AMQPErrorKind::Soft(
                AMQPSoftError::PRECONDITIONFAILED | AMQPSoftError::ACCESSREFUSED,
            ) => true,
            // A queue type whose feature flag is off (streams on a broker upgraded to 3.9 or
            // later without enabling its new feature flags): the broker answers so every time.
            AMQPErrorKind::Hard(AMQPHardError::INTERNALERROR) => {
                err.get_message().as_str().contains("feature flag")
            }
            _ => false,
        }
    }
}

/// The AMQP properties and headers that make up the consumer contract (see README).
pub fn properties(message: &Message) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert("event".into(), long_string(&message.event));
    if let Some(id) = message.company_id {
        headers.insert("company_id".into(), integer(id));
    }
    if let Some(id) = message.user_id {
        headers.insert("user_id".into(), integer(id));
    }
    // Strings made here are moved in, not copied again.
    let received_at = humantime::format_rfc3339_millis(message.received_at).to_string();
    headers.insert(
        "received_at".into(),
        AMQPValue::LongString(received_at.into()),
    );
    let body_sha256 = hex::encode(Sha256::digest(&message.body));
    headers.insert(
        "body_sha256".into(),
        AMQPValue::LongString(body_sha256.into()),
    );
    if message.replayed {
        headers.insert("replayed".into(), AMQPValue::Boolean(true));
    }
    if !message.traceparent.is_empty() {
        headers.insert("traceparent".into(), long_string(&message.traceparent));
    }
    if let Some(state) = &message.tracestate {
        headers.insert("tracestate".into(), long_string(state));
    }
    let timestamp = message
        .received_at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2) // persistent
        .with_message_id(message.message_id.as_str().into())
        .with_timestamp(timestamp)
        .with_app_id("hirehop-relay".into())
        // The event name fits: it passed the 255-byte routing key check.
        .with_type(message.event.as_str().into())
        .with_headers(headers)
}

/// Handle to the broker; cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    config: AmqpConfig,
    exchange: ShortString,
    session: RwLock<Option<Arc<Session>>>,
    next_channel: AtomicUsize,
    /// Wakes the supervisor early, e.g. after a publish failed on a dead channel.
    trouble: Notify,
    stop: CancellationToken,
    status: watch::Sender<Status>,
    reconnects: AtomicU64,
    /// Routing keys whose per-event queue was declared on the current connection.
    event_queues: Mutex<HashSet<String>>,
}

/// Where the supervisor is, for [`Publisher::wait_connected`].
#[derive(Clone)]
enum Status {
    Connecting,
    Connected,
    /// The first connection found a topology the broker refuses for good.
    Fatal(Arc<ConnectError>),
}

/// One live connection and its publishing channels.
struct Session {
    connection: Arc<Connection>,
    channels: Vec<Channel>,
}

impl Session {
    fn healthy(&self) -> bool {
        self.connection.status().connected() && self.channels.iter().all(|c| c.status().connected())
    }
}

impl Publisher {
    /// Starts connecting in the background and returns at once; publishes fail fast with
    /// [`PublishError::Unavailable`] until the first connection is up.
    pub fn start(config: AmqpConfig) -> Publisher {
        let inner = Arc::new(Inner {
            exchange: config.publish_exchange().into(),
            config,
            session: RwLock::new(None),
            next_channel: AtomicUsize::new(0),
            trouble: Notify::new(),
            stop: CancellationToken::new(),
            status: watch::channel(Status::Connecting).0,
            reconnects: AtomicU64::new(0),
            event_queues: Mutex::new(HashSet::new()),
        });
        tokio::spawn(supervise(Arc::clone(&inner)));
        Publisher { inner }
    }

    /// Connects, declares the topology and opens the channels, retrying with backoff until it
    /// works, `shutdown` fires, or the broker refuses the topology for good.
    pub async fn connect(
        config: AmqpConfig,
        shutdown: CancellationToken,
    ) -> Result<Publisher, ConnectError> {
        let publisher = Publisher::start(config);
        match publisher.wait_connected(shutdown).await {
            Ok(()) => Ok(publisher),
            Err(err) => {
                publisher.close().await;
                Err(err)
            }
        }
    }

    /// Waits for the first connection. Fails if the broker refuses the topology (fatal) or
    /// `shutdown` fires first.
    pub async fn wait_connected(&self, shutdown: CancellationToken) -> Result<(), ConnectError> {
        let mut status = self.inner.status.subscribe();
        let outcome = tokio::select! {
            outcome = status.wait_for(|s| !matches!(s, Status::Connecting)) => outcome.map(|s| s.clone()),
            () = shutdown.cancelled() => return Err(ConnectError::Cancelled),
        };
        match outcome {
            Ok(Status::Fatal(err)) => Err(ConnectError::clone(&err)),
            Ok(_) => Ok(()),
            Err(_) => Err(ConnectError::Cancelled),
        }
    }

    /// Publishes `message` and waits for the broker's confirm (bounded by
    /// `amqp.confirm_timeout_ms`). `Ok` means the broker has taken responsibility for it.
    pub async fn publish(&self, message: &Message) -> Result<(), PublishError> {
        let channel = self.channel().ok_or(PublishError::Unavailable)?;
        let timeout = self.inner.config.confirm_timeout();
        let confirmed = tokio::time::timeout(timeout, async {
            let confirm = self.send(&channel, message).await?;
            confirm.await.map_err(PublishError::Failed)
        })
        .await;
        self.outcome(confirmed)
    }

    /// Publishes `messages` in order on one channel (AMQP keeps a channel's order), all
    /// confirms in flight at once; one result per message, in the same order.
    pub async fn publish_batch(&self, messages: &[Message]) -> Vec<Result<(), PublishError>> {
        let Some(channel) = self.channel() else {
            return messages
                .iter()
                .map(|_| Err(PublishError::Unavailable))
                .collect();
        };
        let timeout = self.inner.config.confirm_timeout();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut confirms = Vec::with_capacity(messages.len());
        for message in messages {
            let sent = tokio::time::timeout_at(deadline, self.send(&channel, message)).await;
            confirms.push(sent);
        }
        let mut results = Vec::with_capacity(messages.len());
        for sent in confirms {
            let confirmed = match sent {
                Ok(Ok(confirm)) => tokio::time::timeout_at(deadline, confirm)
                    .await
                    .map(|confirmed| confirmed.map_err(PublishError::Failed)),
                Ok(Err(err)) => Ok(Err(err)),
                Err(elapsed) => Err(elapsed),
            };
            results.push(self.outcome(confirmed));
        }
        results
    }

    async fn send(
        &self,
        channel: &Channel,
        message: &Message,
    ) -> Result<lapin::PublisherConfirm, PublishError> {
        if self.inner.config.per_event_queues {
            self.ensure_event_queue(message.routing_key.as_str())
                .await?;
        }
        channel
            .basic_publish(
                self.inner.exchange.clone(),
                message.routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &message.body,
                properties(message),
            )
            .await
            .map_err(PublishError::Failed)
    }

    /// Declares the per-event queue for `routing_key` unless done on this connection already,
    /// so that no event is published with nobody to keep it.
    async fn ensure_event_queue(&self, routing_key: &str) -> Result<(), PublishError> {
        let known = |inner: &Inner| {
            inner
                .event_queues
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(routing_key)
        };
        if known(&self.inner) {
            return Ok(());
        }
        // On a channel of its own: a refused declaration closes its channel, and the
        // publishing channel carries other webhooks' confirms.
        let Some(session) = self.current() else {
            return Err(PublishError::Unavailable);
        };
        let declaring = session
            .connection
            .create_channel()
            .await
            .map_err(PublishError::Failed)?;
        let declared =
            topology::declare_event_queue(&self.inner.config, &declaring, routing_key).await;
        let _ = declaring.close(200, "declared".into()).await;
        match declared {
            Ok(()) => {
                self.inner
                    .event_queues
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(routing_key.to_owned());
                Ok(())
            }
            Err(err) => {
                tracing::error!(error = %err, "failed to declare a per-event queue");
                match err {
                    _ if err.is_fatal() => Err(PublishError::Refused(err.to_string())),
                    ConnectError::Topology { cause, .. } | ConnectError::Channel(cause) => {
                        Err(PublishError::Failed(cause))
                    }
                    _ => Err(PublishError::Unavailable),
                }
            }
        }
    }

    fn outcome(
        &self,
        confirmed: Result<Result<Confirmation, PublishError>, tokio::time::error::Elapsed>,
    ) -> Result<(), PublishError> {
        let timeout = self.inner.config.confirm_timeout();
        let result = match confirmed {
            Err(_) => Err(PublishError::Timeout(timeout)),
            Ok(Err(err)) => Err(err),
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)))) => {
                Err(PublishError::Returned(returned.reply_text.to_string()))
            }
            Ok(Ok(Confirmation::Nack(None))) => Err(PublishError::Nacked),
            // Every channel is put in confirm mode before it is handed out.
            Ok(Ok(Confirmation::NotRequested)) => Err(PublishError::Nacked),
        };
        if matches!(result, Err(PublishError::Failed(_))) {
            self.inner.trouble.notify_one();
        }
        result
    }

    /// Whether the connection and every publishing channel are open right now.
    pub fn is_ready(&self) -> bool {
        self.current().is_some_and(|session| session.healthy())
    }

    /// Connections re-established after a loss, since start.
    pub fn reconnects(&self) -> u64 {
        self.inner.reconnects.load(Ordering::Relaxed)
    }

    /// Whether the broker has blocked publishing (`connection.blocked`: a memory or disk
    /// alarm). Publishes would then wait for the alarm to clear.
    pub fn is_blocked(&self) -> bool {
        self.current()
            .is_some_and(|session| session.connection.status().blocked())
    }

    /// Stops the supervisor and closes the connection cleanly.
    pub async fn close(&self) {
        self.inner.stop.cancel();
        let session = self
            .inner
            .session
            .write()
            .map(|mut s| s.take())
            .ok()
            .flatten();
        if let Some(session) = session
            && let Err(err) = session.connection.close(200, "shutdown".into()).await
        {
            tracing::warn!(error = %err, "failed to close the broker connection cleanly");
        }
    }

    fn current(&self) -> Option<Arc<Session>> {
        self.inner.session.read().ok()?.clone()
    }

    fn channel(&self) -> Option<Channel> {
        let session = self.current()?;
        let n = session.channels.len();
        let start = self.inner.next_channel.fetch_add(1, Ordering::Relaxed);
        // Skip a channel that died; the supervisor is replacing it.
        (0..n)
            .map(|i| &session.channels[(start + i) % n])
            .find(|c| c.status().connected())
            .cloned()
    }
}

/// Connects, then keeps the session healthy, until the publisher is closed.
async fn supervise(inner: Arc<Inner>) {
    let nodes = inner.config.nodes();
    let mut node = 0;
    let mut connected_once = false;
    loop {
        let mut attempt = 0;
        let session = loop {
            // The very first attempt goes at once; every other waits its backoff.
            if attempt > 0 || connected_once {
                let delay = backoff(attempt, inner.config.reconnect_max_backoff());
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = inner.stop.cancelled() => return,
                }
            }
            attempt += 1;
            let url = nodes[node % nodes.len()];
            match open_session(&inner.config, url).await {
                Ok(session) => break session,
                Err(err) if err.is_fatal() && !connected_once => {
                    inner.status.send_replace(Status::Fatal(Arc::new(err)));
                    return;
                }
                Err(err) if connected_once => {
                    tracing::error!(error = %err, attempt, "reconnecting to the broker failed");
                }
                Err(err) => tracing::warn!(error = %err, attempt, "broker not available yet"),
            }
            // Another node of the cluster may be up.
            node += 1;
        };
        tracing::info!(
            url = %nodes[node % nodes.len()],
            exchange = %inner.config.exchange,
            channels = session.channels.len(),
            "{}",
            if connected_once { "reconnected to the broker" } else { "connected to the broker" }
        );
        if connected_once {
            inner.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        connected_once = true;
        let mut events = Some(session.connection.events_listener().boxed());
        store(&inner, Some(session));
        inner.status.send_replace(Status::Connected);

        if !keep_healthy(&inner, &mut events).await {
            return;
        }
        tracing::error!("broker connection lost; publishing fails fast until it is back");
        store(&inner, None);
        node += 1;
    }
}

/// Watches the live session and repairs closed channels; returns `true` when the connection
/// is lost, `false` when the publisher is closed.
async fn keep_healthy(inner: &Inner, events: &mut Option<Boxed<Event>>) -> bool {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = inner.stop.cancelled() => return false,
            () = inner.trouble.notified() => {}
            _ = tick.tick() => {}
            event = next_event(events) => log_event(event),
        }
        let Some(session) = inner.session.read().ok().and_then(|s| s.clone()) else {
            return true;
        };
        if session.healthy() {
            continue;
        }
        if !session.connection.status().connected() {
            return true;
        }
        match reopen_channels(&inner.config, &session).await {
            Ok(repaired) => {
                tracing::info!("re-opened closed publishing channels");
                store(inner, Some(repaired));
            }
            Err(err) => {
                tracing::error!(error = %err, "failed to re-open publishing channels");
                let _ = session.connection.close(320, "reconnecting".into()).await;
                return true;
            }
        }
    }
}

async fn next_event(events: &mut Option<Boxed<Event>>) -> Option<Event> {
    match events {
        Some(stream) => match stream.next().await {
            Some(event) => Some(event),
            None => {
                *events = None;
                None
            }
        },
        None => std::future::pending().await,
    }
}

fn log_event(event: Option<Event>) {
    match event {
        Some(Event::Error(err)) => tracing::error!(error = %err, "broker connection error"),
        Some(Event::ConnectionBlocked(reason)) => {
            tracing::warn!(%reason, "broker blocked publishing (resource alarm)");
        }
        Some(Event::ConnectionUnblocked) => tracing::info!("broker unblocked publishing"),
        Some(_) => {}
        None => tracing::debug!("broker connection event stream ended"),
    }
}

fn store(inner: &Inner, session: Option<Session>) {
    // A new connection may meet a broker that lost non-replicated queues: declare again.
    inner
        .event_queues
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clear();
    if let Ok(mut slot) = inner.session.write() {
        *slot = session.map(Arc::new);
    }
}

/// A connection to `node` named `name` (shown in the management UI and `rabbitmqctl
/// list_connections`), within `amqp.connect_timeout_ms`, with the relay's frame size.
pub async fn connect(
    config: &AmqpConfig,
    node: &BrokerUrl,
    name: String,
) -> Result<Connection, ConnectError> {
    let url = node.to_string();
    let timeout = config.connect_timeout();
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let connecting = async {
        match node.expose().parse::<lapin::uri::AMQPUri>() {
            Ok(mut uri) => {
                // lapin sizes its buffers by the frame size: RabbitMQ's 128 KiB default costs
                // memory a webhook never uses. A `frame_max` in the URL wins.
                uri.query.frame_max.get_or_insert(config.frame_max_bytes);
                Connection::connect_uri(uri, properties).await
            }
            // Validated at load; let lapin report it if it still does not parse.
            Err(_) => Connection::connect(node.expose(), properties).await,
        }
    };
    match tokio::time::timeout(timeout, connecting).await {
        Ok(connected) => connected.map_err(|cause| ConnectError::Connect { url, cause }),
        Err(_) => Err(ConnectError::Timeout { url, timeout }),
    }
}

/// Connection, topology and channels, all within `amqp.connect_timeout_ms`.
async fn open_session(config: &AmqpConfig, node: &BrokerUrl) -> Result<Session, ConnectError> {
    let url = node.to_string();
    let timeout = config.connect_timeout();
    tokio::time::timeout(timeout, async {
        let name = format!(
            "hirehop-relay exchange={} pid={}",
            config.exchange,
            std::process::id()
        );
        let connection = connect(config, node, name).await?;
        topology::declare(config, &connection).await?;
        let mut channels = Vec::with_capacity(config.channels);
        for _ in 0..config.channels {
            channels.push(open_channel(&connection).await?);
        }
        Ok(Session {
            connection: Arc::new(connection),
            channels,
        })
    })
    .await
    .unwrap_or(Err(ConnectError::Timeout { url, timeout }))
}

async fn open_channel(connection: &Connection) -> Result<Channel, ConnectError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(ConnectError::Channel)?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(ConnectError::Channel)?;
    Ok(channel)
}

async fn reopen_channels(config: &AmqpConfig, old: &Session) -> Result<Session, ConnectError> {
    // A channel dies of a channel-level error, e.g. the exchange was deleted: declare again.
    topology::declare(config, &old.connection).await?;
    let mut channels = Vec::with_capacity(old.channels.len());
    for channel in &old.channels {
        if channel.status().connected() {
            channels.push(channel.clone());
        } else {
            channels.push(open_channel(&old.connection).await?);
        }
    }
    Ok(Session {
        connection: Arc::clone(&old.connection),
        channels,
    })
}

/// Connects to the first node that answers, declares the topology, and disconnects: for
/// `hirehop-relay topology --apply`.
pub async fn declare_topology_once(config: &AmqpConfig) -> Result<(), ConnectError> {
    let mut last = None;
    for node in config.nodes() {
        match open_session(config, node).await {
            Ok(session) => {
                let _ = session
                    .connection
                    .close(200, "topology declared".into())
                    .await;
                return Ok(());
            }
            Err(err) if err.is_fatal() => return Err(err),
            Err(err) => last = Some(err),
        }
    }
    Err(last.unwrap_or(ConnectError::Cancelled))
}

/// Exponential backoff from 100 ms up to `max`, with jitter between half and all of the
/// step, so many relays losing the same broker do not reconnect in lockstep.
pub fn backoff(attempt: u32, max: Duration) -> Duration {
    let step = Duration::from_millis(100)
        .saturating_mul(2u32.saturating_pow(attempt.min(20)))
        .min(max);
    let half = step / 2;
    half + half.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::RoutingKey;
    use bytes::Bytes;

    #[test]
    fn backoff_grows_exponentially_within_jitter_and_is_capped() {
        let max = Duration::from_secs(30);
        for attempt in 0..40 {
            let nominal = Duration::from_millis(100)
                .saturating_mul(2u32.saturating_pow(attempt.min(20)))
                .min(max);
            for _ in 0..20 {
                let delay = backoff(attempt, max);
                assert!(
                    delay >= nominal / 2 && delay <= nominal,
                    "{attempt}: {delay:?}"
                );
            }
        }
        assert!(backoff(100, max) <= max);
        assert!(backoff(0, max) <= Duration::from_millis(100));
    }

    #[test]
    fn properties_carry_the_consumer_contract() {
        let received_at = UNIX_EPOCH + Duration::from_millis(1_648_540_242_123);
        let message = Message {
            routing_key: RoutingKey::new("", "job.updated").unwrap(),
            event: "job.updated".into(),
            body: Bytes::from_static(b"{}"),
            message_id: "id-1".into(),
            company_id: Some(1),
            user_id: None,
            received_at,
            replayed: false,
            traceparent: String::new(),
            tracestate: None,
        };
        let props = properties(&message);
        assert_eq!(props.delivery_mode(), &Some(2));
        assert_eq!(props.timestamp(), &Some(1_648_540_242));
        assert_eq!(
            props.kind().as_ref().map(|s| s.as_str()),
            Some("job.updated")
        );
        let headers = props.headers().as_ref().unwrap().inner();
        assert_eq!(
            headers.get("received_at"),
            Some(&long_string("2022-03-29T07:50:42.123Z"))
        );
        assert_eq!(headers.get("company_id"), Some(&AMQPValue::LongLongInt(1)));
        assert!(!headers.contains_key("user_id"));
        assert_eq!(
            headers.get("body_sha256"),
            Some(&long_string(
                "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
            ))
        );
    }
}
