//! Publishing: the broker connection, its confirm-mode channels, and what keeps them alive.
//!
//! A [`Publisher`] owns one AMQP connection with a small pool of confirm-mode channels and a
//! supervisor task that keeps them alive. Publishing picks a channel round-robin, sends the
//! message with `mandatory` set and waits for *that* message's confirm; many confirms are in
//! flight per channel at once and no lock is held across an await.
//!
//! The supervisor wakes on a connection event, on a failed publish, on a stall, or once a
//! second, and repairs what it finds: closed channels on a live connection are re-opened; a
//! dead connection is replaced by one to the next node (exponential backoff with jitter); a
//! stalled one (see [`stall`](crate::amqp::stall)) is abandoned at once, without waiting for a
//! close handshake that a hung broker would never answer. Meanwhile [`Publisher::publish`]
//! fails fast with [`PublishError::Unavailable`] instead of waiting, so a webhook is never
//! held hostage by a broker outage, and [`Publisher::outage`] says why for `/readyz`.
//!
//! The topology is declared at the first connection and checked on later ones (see
//! [`connect`](crate::amqp::connect)); a per-event queue is declared once per process, the
//! first time its event is published, by one webhook while the others of that event wait.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, UNIX_EPOCH};

use futures_lite::StreamExt;
use futures_lite::stream::Boxed;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Event};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, OnceCell, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::amqp::connect::{
    ConnectError, Session, Topology, backoff, check_topology, open_session, reopen_channels,
};
use crate::amqp::stall::{Silence, Stall, StallWatch};
use crate::amqp::{integer, long_string, topology};
use crate::config::AmqpConfig;
use crate::message::Message;

/// How often, with history on, the supervisor checks that `amqp.exchange` still exists.
const TOPOLOGY_CHECK: Duration = Duration::from_secs(10);

/// How long closing the connection at shutdown may wait for the broker's answer: a hung
/// broker never gives one, and the process must still exit.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Why a message was not confirmed. Every variant means "not safely stored": the caller must
/// not report the message as delivered.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("no broker connection")]
    Unavailable,
    #[error("broker did not confirm within {0:?}")]
    Timeout(Duration),
    #[error("broker stopped answering (silent for {:?} with publishes waiting)", .0.silent_for)]
    Stalled(Stall),
    #[error("broker blocked publishing (resource alarm)")]
    Blocked,
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

impl PublishError {
    /// The outcome label for metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            PublishError::Unavailable => "unavailable",
            PublishError::Timeout(_) => "timeout",
            PublishError::Stalled(_) => "stalled",
            PublishError::Blocked => "blocked",
            PublishError::Nacked => "nack",
            PublishError::Returned(_) => "returned",
            PublishError::Refused(_) => "refused",
            PublishError::Failed(_) => "error",
        }
    }

    /// Whether publishing the same message again would fail the same way, so it must be
    /// refused now rather than spooled for a replay that can never succeed.
    pub fn is_permanent(&self) -> bool {
        matches!(self, PublishError::Returned(_) | PublishError::Refused(_))
    }
}

/// Why the relay has no broker connection it can publish on, for `/readyz` and the logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outage {
    /// The last connection was abandoned because the broker stopped answering (rather than
    /// failing, closing or refusing), and no new one is up yet.
    pub stalled: bool,
    /// What happened, for a person.
    pub reason: String,
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
    let body_sha256 = crate::tracecontext::lower_hex(&Sha256::digest(&message.body));
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
    stalls: AtomicU64,
    /// Whether the whole topology was declared (or, with `amqp.declare = false`, found)
    /// once: later connections only check the exchange.
    topology_ready: AtomicBool,
    /// Per-event queues by routing key: declared once per process (until the topology has
    /// to be declared again), by one publish while the others of that key wait for it.
    event_queues: Mutex<HashMap<String, Arc<OnceCell<()>>>>,
    /// Why there is no usable connection; `None` while connected.
    outage: Mutex<Option<Outage>>,
}

/// Where the supervisor is, for [`Publisher::wait_connected`].
#[derive(Clone)]
enum Status {
    Connecting,
    Connected,
    /// The first connection met a refusal that retrying cannot fix.
    Fatal(Arc<ConnectError>),
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
            stalls: AtomicU64::new(0),
            topology_ready: AtomicBool::new(false),
            event_queues: Mutex::new(HashMap::new()),
            outage: Mutex::new(Some(Outage {
                stalled: false,
                reason: "connecting to the broker".to_owned(),
            })),
        });
        tokio::spawn(supervise(Arc::clone(&inner)));
        Publisher { inner }
    }

    /// Connects, declares the topology and opens the channels, retrying with backoff until it
    /// works, `shutdown` fires, or the broker refuses for good.
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

    /// Waits for the first connection. Fails if the broker refuses for good (a wrong login
    /// or vhost, a topology it will not take) or `shutdown` fires first.
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
    /// `amqp.confirm_timeout_ms`, and cut short when the connection stalls). `Ok` means the
    /// broker has taken responsibility for it.
    pub async fn publish(&self, message: &Message) -> Result<(), PublishError> {
        let deadline = Instant::now() + self.inner.config.confirm_timeout();
        let (session, channel) = self.channel().ok_or(PublishError::Unavailable)?;
        if self.inner.config.per_event_queues {
            self.ensure_event_queue(&session, message.routing_key.as_str(), deadline)
                .await?;
        }
        let blocked = || session.connection.status().blocked();
        let since = Instant::now();
        let sent = session
            .stall
            .send(since, deadline, self.send(&channel, message), blocked)
            .await;
        let confirmed = match sent {
            Ok(Ok(confirm)) => {
                session
                    .stall
                    .answer(since, deadline, confirm, blocked)
                    .await
            }
            Ok(Err(err)) => Ok(Err(err)),
            Err(silence) => Err(silence),
        };
        self.outcome(confirmed)
    }

    /// Publishes `messages` in order on one channel (AMQP keeps a channel's order), all
    /// confirms in flight at once; one result per message, in the same order.
    pub async fn publish_batch(&self, messages: &[Message]) -> Vec<Result<(), PublishError>> {
        let Some((session, channel)) = self.channel() else {
            return messages
                .iter()
                .map(|_| Err(PublishError::Unavailable))
                .collect();
        };
        let deadline = Instant::now() + self.inner.config.confirm_timeout();
        let blocked = || session.connection.status().blocked();
        let mut confirms = Vec::with_capacity(messages.len());
        for message in messages {
            let since = Instant::now();
            let sent = session
                .stall
                .send(since, deadline, self.send(&channel, message), blocked)
                .await;
            confirms.push((since, sent));
        }
        let mut results = Vec::with_capacity(messages.len());
        for (since, sent) in confirms {
            let confirmed = match sent {
                Ok(Ok(confirm)) => {
                    session
                        .stall
                        .answer(since, deadline, confirm, blocked)
                        .await
                }
                Ok(Err(err)) => Ok(Err(err)),
                Err(silence) => Err(silence),
            };
            results.push(self.outcome(confirmed));
        }
        results
    }

    async fn send(
        &self,
        channel: &Channel,
        message: &Message,
    ) -> Result<lapin::PublisherConfirm, lapin::Error> {
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
    }

    /// Declares the per-event queue for `routing_key` unless it was declared already, so that
    /// no event is published with nobody to keep it. One publish declares; the others of the
    /// same key wait for it (until `deadline`), and publishes of other keys go on meanwhile.
    async fn ensure_event_queue(
        &self,
        session: &Session,
        routing_key: &str,
        deadline: Instant,
    ) -> Result<(), PublishError> {
        let declared = Arc::clone(
            self.inner
                .event_queues
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(routing_key.to_owned())
                .or_default(),
        );
        if declared.initialized() {
            return Ok(());
        }
        let declaring = declared.get_or_try_init(|| self.declare_event_queue(session, routing_key));
        tokio::select! {
            declared = tokio::time::timeout_at(deadline, declaring) => match declared {
                Ok(declared) => declared.map(drop),
                Err(_) => Err(PublishError::Timeout(self.inner.config.confirm_timeout())),
            },
            stall = session.stall.stalled() => Err(PublishError::Stalled(stall)),
        }
    }

    async fn declare_event_queue(
        &self,
        session: &Session,
        routing_key: &str,
    ) -> Result<(), PublishError> {
        // On a channel of its own: a refused declaration closes its channel, and the
        // publishing channels carry other webhooks' confirms.
        let channel = session
            .connection
            .create_channel()
            .await
            .map_err(PublishError::Failed)?;
        let declared =
            topology::declare_event_queue(&self.inner.config, &channel, routing_key).await;
        let _ = channel.close(200, "declared".into()).await;
        declared.map_err(|err| {
            tracing::error!(error = %err, "failed to declare a per-event queue");
            match err {
                _ if err.is_fatal() => PublishError::Refused(err.to_string()),
                ConnectError::Topology { cause, .. } | ConnectError::Channel(cause) => {
                    PublishError::Failed(cause)
                }
                _ => PublishError::Unavailable,
            }
        })
    }

    fn outcome(
        &self,
        confirmed: Result<Result<Confirmation, lapin::Error>, Silence>,
    ) -> Result<(), PublishError> {
        let result = match confirmed {
            Err(Silence::Deadline) => {
                Err(PublishError::Timeout(self.inner.config.confirm_timeout()))
            }
            Err(Silence::Stalled(stall)) => Err(PublishError::Stalled(stall)),
            Err(Silence::Blocked) => Err(PublishError::Blocked),
            Ok(Err(err)) => Err(PublishError::Failed(err)),
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)))) => {
                Err(PublishError::Returned(returned.reply_text.to_string()))
            }
            Ok(Ok(Confirmation::Nack(None))) => Err(PublishError::Nacked),
            // Every channel is put in confirm mode before it is handed out.
            Ok(Ok(Confirmation::NotRequested)) => Err(PublishError::Nacked),
        };
        if matches!(
            result,
            Err(PublishError::Failed(_) | PublishError::Stalled(_))
        ) {
            self.inner.trouble.notify_one();
        }
        result
    }

    /// Whether the connection and every publishing channel are open right now, and the
    /// broker has not stalled.
    pub fn is_ready(&self) -> bool {
        self.current().is_some_and(|session| session.healthy())
    }

    /// Why there is no connection to publish on right now; `None` while [`Self::is_ready`].
    pub fn outage(&self) -> Option<Outage> {
        if let Some(session) = self.current() {
            if session.healthy() {
                return None;
            }
            // Noticed, and the supervisor not yet woken: say so already.
            if session.stall.is_stalled() {
                return Some(Outage {
                    stalled: true,
                    reason: format!("the broker at {} stopped answering", session.url),
                });
            }
        }
        let outage = self
            .inner
            .outage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Some(outage.unwrap_or_else(|| Outage {
            stalled: false,
            reason: "re-opening publishing channels".to_owned(),
        }))
    }

    /// Connections re-established after a loss, since start.
    pub fn reconnects(&self) -> u64 {
        self.inner.reconnects.load(Ordering::Relaxed)
    }

    /// Connections abandoned because the broker stopped answering, since start.
    pub fn stalls(&self) -> u64 {
        self.inner.stalls.load(Ordering::Relaxed)
    }

    /// Whether the broker has blocked publishing (`connection.blocked`: a memory or disk
    /// alarm). Publishes would then wait for the alarm to clear.
    pub fn is_blocked(&self) -> bool {
        self.current()
            .is_some_and(|session| session.connection.status().blocked())
    }

    /// Stops the supervisor and closes the connection, waiting a little for the broker's
    /// answer.
    pub async fn close(&self) {
        self.inner.stop.cancel();
        let session = self
            .inner
            .session
            .write()
            .map(|mut s| s.take())
            .ok()
            .flatten();
        let Some(session) = session else {
            return;
        };
        match tokio::time::timeout(CLOSE_WAIT, session.connection.close(200, "shutdown".into()))
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "failed to close the broker connection cleanly");
            }
            Err(_) => tracing::warn!(
                url = %session.url,
                "the broker did not answer the connection close in {CLOSE_WAIT:?}; leaving it"
            ),
        }
    }

    fn current(&self) -> Option<Arc<Session>> {
        self.inner.session.read().ok()?.clone()
    }

    /// The session and one of its open channels, round-robin.
    fn channel(&self) -> Option<(Arc<Session>, Channel)> {
        let session = self.current()?;
        if session.stall.is_stalled() {
            return None;
        }
        let n = session.channels.len();
        let start = self.inner.next_channel.fetch_add(1, Ordering::Relaxed);
        // Skip a channel that died; the supervisor is replacing it.
        let channel = (0..n)
            .map(|i| &session.channels[(start + i) % n])
            .find(|c| c.status().connected())
            .cloned()?;
        Some((session, channel))
    }
}

impl Inner {
    fn set_outage(&self, outage: Option<Outage>) {
        *self.outage.lock().unwrap_or_else(|p| p.into_inner()) = outage;
    }

    /// Puts `session` in use (or none), and forgets the per-event queues when it had to
    /// declare the whole topology: the broker had lost it.
    fn store(&self, session: Option<Session>) {
        if session.as_ref().is_some_and(|s| s.declared) {
            self.topology_ready.store(true, Ordering::Relaxed);
            self.event_queues
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        }
        if let Ok(mut slot) = self.session.write() {
            // The old session is dropped, not closed: closing waits for the broker's answer,
            // and a hung broker never gives one. lapin closes it when the last handle goes.
            *slot = session.map(Arc::new);
        }
    }
}

/// Why [`keep_healthy`] gave up a connection.
enum Lost {
    /// The publisher is closed.
    Closed,
    /// The broker stopped answering; the reason says how that showed.
    Stalled(String),
    /// The connection failed or was closed.
    Failed(String),
}

/// Connects, then keeps the session healthy, until the publisher is closed.
async fn supervise(inner: Arc<Inner>) {
    let nodes = inner.config.nodes();
    let mut node = 0;
    let mut connected_once = false;
    // Why the last connection was given up, while no new one is up.
    let mut stalled: Option<String> = None;
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
            let topology = if inner.topology_ready.load(Ordering::Relaxed) {
                Topology::Check
            } else {
                Topology::Declare
            };
            match open_session(&inner.config, url, topology).await {
                Ok(session) => break session,
                Err(err) if err.is_fatal() && !connected_once => {
                    inner.set_outage(Some(Outage {
                        stalled: false,
                        reason: err.to_string(),
                    }));
                    inner.status.send_replace(Status::Fatal(Arc::new(err)));
                    return;
                }
                Err(err) => {
                    if connected_once {
                        tracing::error!(error = %err, attempt, "reconnecting to the broker failed");
                    } else {
                        tracing::warn!(error = %err, attempt, "broker not available yet");
                    }
                    let reason = match &stalled {
                        Some(stall) => format!("{stall}; reconnecting failed: {err}"),
                        None => err.to_string(),
                    };
                    inner.set_outage(Some(Outage {
                        stalled: stalled.is_some(),
                        reason,
                    }));
                }
            }
            // Another node of the cluster may be up.
            node += 1;
        };
        tracing::info!(
            url = %session.url,
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
        let url = session.url.clone();
        let heartbeat = session.connection.configuration().heartbeat();
        let watch = Arc::clone(&session.stall);
        inner.store(Some(session));
        inner.set_outage(None);
        inner.status.send_replace(Status::Connected);

        let reason = match keep_healthy(&inner, &watch, heartbeat, &mut events).await {
            Lost::Closed => return,
            Lost::Failed(reason) => {
                tracing::error!(
                    %url,
                    reason,
                    "broker connection lost; publishing fails fast until it is back"
                );
                inner.set_outage(Some(Outage {
                    stalled: false,
                    reason: format!("the connection to {url} was lost: {reason}"),
                }));
                None
            }
            Lost::Stalled(how) => {
                inner.stalls.fetch_add(1, Ordering::Relaxed);
                let reason = format!("the broker at {url} stopped answering: {how}");
                tracing::error!(
                    %url,
                    "{reason}; abandoning the connection for the next node (the webhooks that \
                     waited on it are spooled, or get 503 without a spool)"
                );
                inner.set_outage(Some(Outage {
                    stalled: true,
                    reason: reason.clone(),
                }));
                Some(reason)
            }
        };
        stalled = reason;
        inner.store(None);
        node += 1;
    }
}

/// Watches the live session and repairs closed channels, until the connection is lost or
/// stalls, or the publisher is closed.
async fn keep_healthy(
    inner: &Inner,
    watch: &StallWatch,
    heartbeat_secs: u16,
    events: &mut Option<Boxed<Event>>,
) -> Lost {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // With history on, every publish reaches the stream through the fanout in front of the
    // exchange, so a deleted `amqp.exchange` fails no publish: look for it now and then.
    let mut topology_check = tokio::time::interval(TOPOLOGY_CHECK);
    topology_check.reset();
    let mut last_error = None;
    loop {
        tokio::select! {
            () = inner.stop.cancelled() => return Lost::Closed,
            _ = topology_check.tick(), if inner.config.history.enabled => {
                check_topology_now(inner).await;
                continue;
            }
            stall = watch.stalled() => return Lost::Stalled(format!(
                "no confirm for {:.1?}, publishes waiting: {}",
                stall.silent_for, stall.waiting
            )),
            () = inner.trouble.notified() => {}
            _ = tick.tick() => {}
            event = next_event(events) => {
                if let Some(Event::Error(err)) = &event {
                    if matches!(err.kind(), lapin::ErrorKind::MissingHeartbeatError) {
                        return Lost::Stalled(format!(
                            "nothing heard for two heartbeat intervals ({heartbeat_secs} s each)"
                        ));
                    }
                    last_error = Some(err.to_string());
                }
                log_event(event);
            }
        }
        let Some(session) = inner.session.read().ok().and_then(|s| s.clone()) else {
            return Lost::Failed("the connection was dropped".to_owned());
        };
        if session.healthy() || session.stall.is_stalled() {
            // A stall is taken at the top of the loop.
            continue;
        }
        if !session.connection.status().connected() {
            return Lost::Failed(last_error.unwrap_or_else(|| "the connection closed".to_owned()));
        }
        let timeout = inner.config.connect_timeout();
        match tokio::time::timeout(timeout, reopen_channels(&inner.config, &session)).await {
            Ok(Ok(repaired)) => {
                tracing::info!("re-opened closed publishing channels");
                inner.store(Some(repaired));
            }
            Ok(Err(err)) => {
                return Lost::Failed(format!("failed to re-open publishing channels: {err}"));
            }
            Err(_) => {
                return Lost::Failed(format!(
                    "re-opening publishing channels took longer than {timeout:?}"
                ));
            }
        }
    }
}

/// See [`keep_healthy`]. Bounded like a connection attempt: a hung node must not hold the
/// supervisor, which has a stall to notice.
async fn check_topology_now(inner: &Inner) {
    let Some(session) = inner.session.read().ok().and_then(|s| s.clone()) else {
        return;
    };
    let timeout = inner.config.connect_timeout();
    match tokio::time::timeout(timeout, check_topology(&inner.config, &session)).await {
        Ok(Ok(_)) => {}
        Ok(Err(err)) => tracing::warn!(error = %err, "failed to check the broker's topology"),
        Err(_) => tracing::warn!(?timeout, "checking the broker's topology timed out"),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::RoutingKey;
    use bytes::Bytes;

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
