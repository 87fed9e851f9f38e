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
//! What it leaves to others: opening a connection to a node, and which node is next
//! ([`connect`](mod@crate::amqp::connect), which also declares the topology at the first
//! connection and checks it on later ones); the message's properties
//! ([`properties`](mod@crate::amqp::properties)); per-event queues, which a publish waits for
//! ([`topology`](crate::amqp::topology)); telling a stall from a slow broker
//! ([`stall`](crate::amqp::stall)).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures_lite::StreamExt;
use futures_lite::stream::Boxed;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{Channel, Confirmation, Event};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::amqp::connect::{
    CLOSE_WAIT, ConnectError, Nodes, Session, Topology, backoff, check_topology, open_session,
    reopen_channels,
};
use crate::amqp::properties::properties;
use crate::amqp::stall::{Patience, Silence, Stall, StallWatch};
use crate::amqp::topology::EventQueues;
use crate::config::AmqpConfig;
use crate::message::Message;

/// How often, with history on, the supervisor checks that `amqp.exchange` still exists.
const TOPOLOGY_CHECK: Duration = Duration::from_secs(10);

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

/// Handle to the broker; cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
    /// The supervisor task, until [`Publisher::close`] has waited for it to end.
    supervisor: Arc<tokio::sync::Mutex<Option<JoinHandle<()>>>>,
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
    /// The per-event queues declared so far.
    event_queues: EventQueues,
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
            event_queues: EventQueues::default(),
            outage: Mutex::new(Some(Outage {
                stalled: false,
                reason: "connecting to the broker".to_owned(),
            })),
        });
        let supervisor = tokio::spawn(supervise(Arc::clone(&inner)));
        Publisher {
            inner,
            supervisor: Arc::new(tokio::sync::Mutex::new(Some(supervisor))),
        }
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
        // Its client waits for the answer: a short silence is enough to give up on the broker
        // and spool instead.
        let patience = Patience {
            stall: self.inner.config.stall_timeout(),
            deadline: Some(deadline),
        };
        let blocked = || session.connection.status().blocked();
        let since = Instant::now();
        let published = async { self.send(&channel, message).await?.await };
        let confirmed = session
            .stall
            .publish(since, patience, published, blocked)
            .await;
        self.outcome(confirmed)
    }

    /// Publishes `messages` in order on one channel (AMQP keeps a channel's order), all
    /// confirms in flight at once; one result per message, in the same order. For replay of
    /// the spool.
    ///
    /// With `amqp.per_event_queues`, the queue of every routing key in the batch is declared
    /// first (see [`Self::ensure_event_queues`]). When one cannot be, neither its message nor
    /// any after it is published, and the results stop at that message's, which says why.
    ///
    /// Patient, unlike [`Self::publish`]: no client waits for these, and giving up on a message
    /// the broker already has means publishing it again, a duplicate. So a wait here calls the
    /// connection stalled only after the broker has answered nothing on it for the confirm
    /// timeout (`amqp.stall_timeout_ms` if that is longer), which a broker that is slow rather
    /// than hung, pausing its confirms for a second or two, never reaches. Nor does the batch
    /// have a deadline: confirms come as the broker gets to them, and one that keeps
    /// confirming, however slowly, gets to confirm the whole batch. What still ends these waits
    /// at once: a stall a webhook's own publish noticed (with its shorter threshold), and a
    /// lost connection or a missed heartbeat, which fail every confirm under way.
    ///
    /// Webhooks do not wait any longer for it: while the spool holds records, new webhooks
    /// are spooled rather than published (see `Delivery::deliver`), so replay is alone on the
    /// connection but for publishes that began before the spool did, which keep their own
    /// threshold. `/readyz` goes on saying the broker is connected while replay waits.
    pub async fn publish_batch(&self, messages: &[Message]) -> Vec<Result<(), PublishError>> {
        let Some((session, channel)) = self.channel() else {
            return messages
                .iter()
                .map(|_| Err(PublishError::Unavailable))
                .collect();
        };
        let config = &self.inner.config;
        let patience = Patience {
            stall: config.confirm_timeout().max(config.stall_timeout()),
            deadline: None,
        };
        let (ready, undeclared) = self.ensure_event_queues(&session, messages, patience).await;
        let blocked = || session.connection.status().blocked();
        let mut confirms = Vec::with_capacity(ready);
        for message in &messages[..ready] {
            let since = Instant::now();
            let sent = session
                .stall
                .send(since, patience, self.send(&channel, message), blocked)
                .await;
            confirms.push((since, sent));
        }
        let mut results = Vec::with_capacity(ready + 1);
        for (since, sent) in confirms {
            results.push(self.settle(&session, since, patience, sent).await);
        }
        results.extend(undeclared.map(Err));
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
    /// no event is published with nobody to keep it; waits at most until `deadline`, and not
    /// past a stall.
    async fn ensure_event_queue(
        &self,
        session: &Session,
        routing_key: &str,
        deadline: Instant,
    ) -> Result<(), PublishError> {
        let Inner {
            config,
            event_queues,
            ..
        } = &*self.inner;
        let Some(declaring) = event_queues.declaration(config, &session.connection, routing_key)
        else {
            return Ok(());
        };
        tokio::select! {
            declared = tokio::time::timeout_at(deadline, declaring) => match declared {
                Ok(declared) => declared.map_err(refused_event_queue),
                Err(_) => Err(PublishError::Timeout(config.confirm_timeout())),
            },
            stall = session.stall.stalled() => Err(PublishError::Stalled(stall)),
        }
    }

    /// For [`Self::publish_batch`]: declares the per-event queue of each routing key in
    /// `messages` that has none yet, in the order the keys first appear, before any of them is
    /// published. Spooled webhooks include events never published before (the broker was away
    /// when they first came) and events whose queues a broker that lost its topology no longer
    /// has; published without their queue, they would be unroutable.
    ///
    /// The broker's answer to a declaration is an answer like a confirm, waited for with the
    /// batch's `patience`: for as long as the broker is not silent for that long, and no
    /// longer than a stall or a lost connection. Returns how many messages, from the first,
    /// have their queue, and why the next one has none. Replay keeps only the confirmed prefix
    /// of a batch, so the messages after that one are not published either: they would reach
    /// the broker ahead of it, and again when it is retried.
    async fn ensure_event_queues(
        &self,
        session: &Session,
        messages: &[Message],
        patience: Patience,
    ) -> (usize, Option<PublishError>) {
        let Inner {
            config,
            event_queues,
            ..
        } = &*self.inner;
        if !config.per_event_queues {
            return (messages.len(), None);
        }
        let blocked = || session.connection.status().blocked();
        for (n, message) in messages.iter().enumerate() {
            let routing_key = message.routing_key.as_str();
            // `None` for a key declared already, by this batch or before it.
            let Some(declaring) =
                event_queues.declaration(config, &session.connection, routing_key)
            else {
                continue;
            };
            let declared = session
                .stall
                .answer(Instant::now(), patience, declaring, blocked)
                .await;
            let err = match declared {
                Ok(Ok(())) => continue,
                Ok(Err(err)) => refused_event_queue(err),
                Err(silence) => silent(config, silence),
            };
            return (n, Some(err));
        }
        (messages.len(), None)
    }

    /// Waits for the broker's answer to a publish handed over at `since` (unless handing it
    /// over already failed), and turns it into the publish's result.
    async fn settle(
        &self,
        session: &Session,
        since: Instant,
        patience: Patience,
        sent: Result<Result<lapin::PublisherConfirm, lapin::Error>, Silence>,
    ) -> Result<(), PublishError> {
        let blocked = || session.connection.status().blocked();
        let confirmed = match sent {
            Ok(Ok(confirm)) => {
                session
                    .stall
                    .answer(since, patience, confirm, blocked)
                    .await
            }
            Ok(Err(err)) => Ok(Err(err)),
            Err(silence) => Err(silence),
        };
        self.outcome(confirmed)
    }

    fn outcome(
        &self,
        confirmed: Result<Result<Confirmation, lapin::Error>, Silence>,
    ) -> Result<(), PublishError> {
        let result = match confirmed {
            Err(silence) => Err(silent(&self.inner.config, silence)),
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
    /// answer; returns once the publisher holds no connection any more.
    ///
    /// Why it waits for the supervisor: lapin runs each connection on a thread of its own that
    /// borrows the tokio runtime. A connection still open, or still being opened, when the
    /// runtime goes away makes that thread panic, which prints over the relay's last words
    /// on stderr (the reason it could not start, say). So a connection attempt under way is
    /// not cut short, which would leave a half-open connection behind: the supervisor lets it
    /// finish (within `amqp.connect_timeout_ms`), closes what it got and ends.
    pub async fn close(&self) {
        self.inner.stop.cancel();
        // Held until the supervisor has ended, so that every caller returns only then.
        let mut supervisor = self.supervisor.lock().await;
        if let Some(task) = supervisor.take() {
            let ceiling = self.inner.config.connect_timeout() + CLOSE_WAIT;
            match tokio::time::timeout(ceiling, task).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    tracing::error!(error = %err, "the broker connection's supervisor failed")
                }
                Err(_) => tracing::warn!(
                    "the broker connection's supervisor did not stop within {ceiling:?}; leaving it"
                ),
            }
        }
        // The supervisor closed its session as it ended, unless it failed or ran late.
        if let Some(session) = self.inner.take_session() {
            session.close("shutdown").await;
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

/// What a wait for the broker that ended without its answer means for the publish.
fn silent(config: &AmqpConfig, silence: Silence) -> PublishError {
    match silence {
        Silence::Deadline => PublishError::Timeout(config.confirm_timeout()),
        Silence::Stalled(stall) => PublishError::Stalled(stall),
        Silence::Blocked => PublishError::Blocked,
    }
}

/// What a per-event queue that could not be declared means for the publish that needs it.
fn refused_event_queue(err: ConnectError) -> PublishError {
    tracing::error!(error = %err, "failed to declare a per-event queue");
    match err {
        _ if err.is_fatal() => PublishError::Refused(err.to_string()),
        ConnectError::Topology { cause, .. } | ConnectError::Channel(cause) => {
            PublishError::Failed(cause)
        }
        _ => PublishError::Unavailable,
    }
}

impl Inner {
    fn set_outage(&self, outage: Option<Outage>) {
        *self.outage.lock().unwrap_or_else(|p| p.into_inner()) = outage;
    }

    /// Takes the session out of use, to close it.
    fn take_session(&self) -> Option<Arc<Session>> {
        self.session.write().ok()?.take()
    }

    /// Puts `session` in use (or none), and forgets the per-event queues when it had to
    /// declare the whole topology: the broker had lost it.
    fn store(&self, session: Option<Session>) {
        if session.as_ref().is_some_and(|s| s.declared) {
            self.topology_ready.store(true, Ordering::Relaxed);
            self.event_queues.forget();
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

/// Connects, then keeps the session healthy, until the publisher is closed; then closes the
/// session, or the one an attempt under way opens (see [`Publisher::close`]).
async fn supervise(inner: Arc<Inner>) {
    let mut nodes = Nodes::new(&inner.config);
    let mut connected_once = false;
    // Why the last connection was given up, while no new one is up.
    let mut stalled: Option<String> = None;
    loop {
        let mut attempt = 0;
        let session = loop {
            if inner.stop.is_cancelled() {
                return;
            }
            // The very first attempt goes at once; every other waits its backoff.
            if attempt > 0 || connected_once {
                let delay = backoff(attempt, inner.config.reconnect_max_backoff());
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = inner.stop.cancelled() => return,
                }
            }
            attempt += 1;
            // Each attempt goes to the node after the last one tried: another node of the
            // cluster may be up.
            let url = nodes.next();
            let topology = if inner.topology_ready.load(Ordering::Relaxed) {
                Topology::Check
            } else {
                Topology::Declare
            };
            // Not raced against `stop`: dropping the attempt would leave a half-open
            // connection to lapin's thread. It takes `amqp.connect_timeout_ms` at most.
            match open_session(&inner.config, url, topology).await {
                Ok(session) if inner.stop.is_cancelled() => {
                    session.close("shutdown").await;
                    return;
                }
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
            Lost::Closed => {
                if let Some(session) = inner.take_session() {
                    session.close("shutdown").await;
                }
                return;
            }
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
    // The check under way runs beside the watches below, not in their place: on a hung node
    // it waits up to `amqp.connect_timeout_ms`, and the missed heartbeat must be taken
    // meanwhile. Dropped with the loop (by `stop`, say): the connection stays in place, for
    // the supervisor to close.
    let mut checking: Option<Pin<Box<dyn Future<Output = ()> + Send + '_>>> = None;
    let mut last_error = None;
    loop {
        tokio::select! {
            () = inner.stop.cancelled() => return Lost::Closed,
            _ = topology_check.tick(), if inner.config.history.enabled && checking.is_none() => {
                checking = Some(Box::pin(check_topology_now(inner)));
                continue;
            }
            () = async { checking.as_mut().expect("a check is under way").await }, if checking.is_some() => {
                checking = None;
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
        let reopened = tokio::select! {
            reopened = tokio::time::timeout(timeout, reopen_channels(&inner.config, &session)) => reopened,
            () = inner.stop.cancelled() => return Lost::Closed,
        };
        match reopened {
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
