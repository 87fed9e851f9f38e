//! `hirehop-relay replay`: republishes webhooks from the history stream, with publisher
//! confirms, into one queue (`--to-queue`) or through the exchange's bindings
//! (`--to-exchange`). Each copy keeps the body, the routing key, the properties and the
//! headers, plus [`REPLAY_HEADER`]; consumers deduplicate on `message_id`, as they already
//! must.
//!
//! Reading starts at `--from-offset`, a few minutes before `--since`, or at the oldest message,
//! and ends at the end marker appended at the start ([`super::history`]): the stream's end as
//! it was then, so a replay never waits for webhooks still to come. `--since` and `--until`
//! filter on the relay's own `received_at`: a point in time finds a chunk of the stream, which
//! may begin earlier, and a webhook that waited in a relay's spool reaches the stream after
//! later ones, so `--until` cannot end the reading early.
//!
//! With `--to-exchange` and `amqp.per_event_queues`, replay declares the queue of each routing
//! key before it publishes the first copy with that key, as the relay does before a webhook's
//! first publish. A queue the broker refuses to declare stops the replay at that webhook.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::time::{Duration, SystemTime};

use lapin::message::Delivery;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, PublisherConfirm};

use super::history::{self, Filter, HistoryError, Reader, Start};
use super::topology::EventQueues;
use super::{ConnectError, connect_any};
use crate::config::AmqpConfig;

/// The header a replayed copy gets: when the replay ran, RFC 3339 UTC with milliseconds.
pub const REPLAY_HEADER: &str = "history_replayed_at";

/// Publishes awaiting their confirm at once.
const WINDOW: usize = 256;

/// Where replayed webhooks go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Into this queue only, through a temporary exchange bound to it alone, so the copies
    /// keep their routing key.
    Queue(String),
    /// Through `amqp.exchange` and its bindings (and its alternate exchange).
    Exchange,
}

/// What to replay, and where.
#[derive(Debug, Clone)]
pub struct Request {
    pub start: Start,
    pub filter: Filter,
    /// `None` only with `dry_run`.
    pub target: Option<Target>,
    /// Count what would be sent, per event; publish nothing.
    pub dry_run: bool,
}

/// What a replay did so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Webhooks read from the stream (end markers not counted).
    pub read: u64,
    /// Of those, the ones the filters kept, per event name too.
    pub matched: u64,
    pub events: BTreeMap<String, u64>,
    pub published: u64,
    /// Published and confirmed by the broker.
    pub confirmed: u64,
    /// Confirmed but returned: no queue was bound for them (`--to-exchange` without an
    /// alternate exchange), per event name too. Counted in `confirmed` as well.
    pub unroutable: u64,
    pub unroutable_events: BTreeMap<String, u64>,
}

impl Counts {
    /// One line, for a progress display.
    pub fn progress_line(&self) -> String {
        format!(
            "read {}, matched {}, published {}, confirmed {}",
            self.read, self.matched, self.published, self.confirmed
        )
    }

    /// The summary: the totals, then the matched webhooks per event, then those no queue
    /// was bound for.
    pub fn report(&self, dry_run: bool) -> String {
        let mut out = if dry_run {
            format!(
                "dry run, nothing published: read {}, matched {}\n",
                self.read, self.matched
            )
        } else {
            format!("{}\n", self.progress_line())
        };
        push_events(&mut out, &self.events);
        if self.unroutable > 0 {
            out.push_str(&format!(
                "returned, no queue bound for them: {}\n",
                self.unroutable
            ));
            push_events(&mut out, &self.unroutable_events);
        }
        out
    }
}

/// `  job.updated: 12` lines.
pub(crate) fn push_events(out: &mut String, events: &BTreeMap<String, u64>) {
    for (event, n) in events {
        out.push_str(&format!("  {event}: {n}\n"));
    }
}

/// How a replay ended.
#[derive(Debug)]
pub struct Outcome {
    pub counts: Counts,
    /// `None` when it read up to the end and every publish was confirmed.
    pub interrupted: Option<Interruption>,
}

/// A replay that stopped before its end: asked to, or failed.
#[derive(Debug)]
pub struct Interruption {
    /// Every webhook before this offset was handled (published and confirmed, or filtered
    /// out): `--from-offset` for a replay that goes on from there. `None`: nothing was read.
    pub resume_from: Option<u64>,
    /// `None` when it was asked to stop.
    pub cause: Option<ReplayError>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    History(#[from] HistoryError),
    #[error("failed to find queue {queue}: {cause}")]
    NoQueue { queue: String, cause: lapin::Error },
    #[error("failed to find exchange {exchange}: {cause}")]
    NoExchange {
        exchange: String,
        cause: lapin::Error,
    },
    #[error("failed to set up publishing to {target}: {cause}")]
    Setup { target: String, cause: lapin::Error },
    #[error("failed to publish the webhook at offset {offset}: {cause}")]
    Publish { offset: u64, cause: lapin::Error },
    #[error("the broker refused the webhook at offset {offset} (nack)")]
    Nacked { offset: u64 },
    #[error("the broker did not confirm the webhook at offset {offset} within {timeout:?}")]
    Timeout { offset: u64, timeout: Duration },
    #[error(
        "failed to declare the per-event queue of the webhook at offset {offset}, not \
         published: {cause}"
    )]
    EventQueue { offset: u64, cause: ConnectError },
}

/// Runs `request` against the broker of `config` until the end, an error, or `stop`;
/// `progress` sees the counts every 100 webhooks read and at the end.
pub async fn replay(
    config: &AmqpConfig,
    request: &Request,
    progress: &mut dyn FnMut(&Counts),
    stop: impl Future<Output = ()>,
) -> Result<Outcome, ReplayError> {
    let connection = connect_any(config, "hirehop-relay replay").await?;
    let outcome = run(&connection, config, request, progress, stop).await;
    let _ = connection.close(200, "replay done".into()).await;
    outcome
}

async fn run(
    connection: &Connection,
    config: &AmqpConfig,
    request: &Request,
    progress: &mut dyn FnMut(&Counts),
    stop: impl Future<Output = ()>,
) -> Result<Outcome, ReplayError> {
    let sink = match &request.target {
        Some(target) => Some(Sink::open(connection, config, target, request.dry_run).await?),
        None => None,
    };
    let publishing = sink.as_ref().filter(|_| !request.dry_run);
    let mut reader = Reader::open(connection, config, request.start, true).await?;
    let replayed_at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    let timeout = config.confirm_timeout();
    let mut counts = Counts::default();
    let mut in_flight = VecDeque::new();
    // The offset after the last one read: where a resumed replay would go on.
    let mut next_offset = None;
    tokio::pin!(stop);
    let stopped = loop {
        let entry = tokio::select! {
            biased;
            () = &mut stop => break Some((None, next_offset)),
            entry = reader.next() => entry,
        };
        let entry = match entry {
            Ok(Some(entry)) => entry,
            Ok(None) => break None,
            Err(err) => break Some((Some(err.into()), next_offset)),
        };
        counts.read += 1;
        next_offset = Some(entry.offset + 1);
        if request.filter.matches(&entry.message) {
            let event = history::event(&entry.message);
            counts.matched += 1;
            *counts.events.entry(event.clone()).or_default() += 1;
            if let Some(sink) = publishing {
                // A queue that cannot be declared stops the replay before this webhook, as a
                // refused publish does: the command that goes on from here starts with it.
                let routing_key = entry.message.routing_key.as_str();
                if let Err(cause) = sink
                    .ensure_event_queue(connection, config, routing_key)
                    .await
                {
                    let err = ReplayError::EventQueue {
                        offset: entry.offset,
                        cause,
                    };
                    break Some((Some(err), Some(entry.offset)));
                }
                match sink.publish(&entry.message, &replayed_at).await {
                    Ok(confirm) => {
                        counts.published += 1;
                        in_flight.push_back(InFlight {
                            offset: entry.offset,
                            event,
                            confirm,
                        });
                    }
                    Err(cause) => {
                        let err = ReplayError::Publish {
                            offset: entry.offset,
                            cause,
                        };
                        break Some((Some(err), Some(entry.offset)));
                    }
                }
            }
        }
        if in_flight.len() >= WINDOW
            && let Some(oldest) = in_flight.pop_front()
        {
            let offset = oldest.offset;
            if let Err(err) = oldest.settle(&mut counts, timeout).await {
                break Some((Some(err), Some(offset)));
            }
        }
        if counts.read % 100 == 0 {
            progress(&counts);
        }
    };
    // Whatever happened, settle what is in flight: a confirm still coming is progress made.
    let mut interrupted = stopped.map(|(cause, resume_from)| Interruption { resume_from, cause });
    while let Some(publish) = in_flight.pop_front() {
        let offset = publish.offset;
        if let Err(err) = publish.settle(&mut counts, timeout).await {
            // Everything from the oldest publish not confirmed on is in doubt.
            interrupted = Some(match interrupted {
                Some(Interruption { resume_from, cause }) => Interruption {
                    resume_from: Some(resume_from.map_or(offset, |from| from.min(offset))),
                    cause: cause.or(Some(err)),
                },
                None => Interruption {
                    resume_from: Some(offset),
                    cause: Some(err),
                },
            });
            break;
        }
    }
    progress(&counts);
    if let Some(sink) = sink {
        sink.close().await;
    }
    Ok(Outcome {
        counts,
        interrupted,
    })
}

/// A published copy awaiting its confirm.
struct InFlight {
    offset: u64,
    event: String,
    confirm: PublisherConfirm,
}

impl InFlight {
    async fn settle(self, counts: &mut Counts, timeout: Duration) -> Result<(), ReplayError> {
        let offset = self.offset;
        match tokio::time::timeout(timeout, self.confirm).await {
            Ok(Ok(Confirmation::Ack(None))) => counts.confirmed += 1,
            Ok(Ok(Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)))) => {
                counts.confirmed += 1;
                counts.unroutable += 1;
                *counts.unroutable_events.entry(self.event).or_default() += 1;
            }
            Ok(Ok(Confirmation::Nack(None) | Confirmation::NotRequested)) => {
                return Err(ReplayError::Nacked { offset });
            }
            Ok(Err(cause)) => return Err(ReplayError::Publish { offset, cause }),
            Err(_) => return Err(ReplayError::Timeout { offset, timeout }),
        }
        Ok(())
    }
}

/// The channel replayed webhooks are published on, and where to.
struct Sink {
    channel: Channel,
    exchange: ShortString,
    /// The temporary exchange of a `--to-queue` replay, deleted at the end.
    temporary: Option<String>,
    /// The per-event queues declared so far, for a `--to-exchange` replay with
    /// `amqp.per_event_queues`.
    event_queues: Option<EventQueues>,
}

impl Sink {
    /// Checks that the target exists; unless `dry_run`, gets ready to publish to it.
    async fn open(
        connection: &Connection,
        config: &AmqpConfig,
        target: &Target,
        dry_run: bool,
    ) -> Result<Sink, ReplayError> {
        // A failed passive declaration closes its channel: a throwaway one.
        let probe = connection
            .create_channel()
            .await
            .map_err(ConnectError::Channel)?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        match target {
            Target::Queue(queue) => probe
                .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                .await
                .map(drop)
                .map_err(|cause| ReplayError::NoQueue {
                    queue: queue.clone(),
                    cause,
                })?,
            Target::Exchange => probe
                .exchange_declare(
                    config.exchange.as_str().into(),
                    lapin::ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        passive: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|cause| ReplayError::NoExchange {
                    exchange: config.exchange.clone(),
                    cause,
                })?,
        }
        let _ = probe.close(200, "checked".into()).await;

        let described = match target {
            Target::Queue(queue) => format!("queue {queue}"),
            Target::Exchange => format!("exchange {}", config.exchange),
        };
        let setup = |cause| ReplayError::Setup {
            target: described.clone(),
            cause,
        };
        let channel = connection.create_channel().await.map_err(setup)?;
        let (exchange, temporary) = match target {
            Target::Queue(_) if dry_run => (String::new(), None),
            Target::Queue(queue) => {
                // The default exchange would deliver with the queue's name as routing key.
                let temporary = format!(
                    "{}.replay-{}",
                    config.exchange,
                    uuid::Uuid::now_v7().simple()
                );
                channel
                    .exchange_declare(
                        temporary.as_str().into(),
                        lapin::ExchangeKind::Fanout,
                        ExchangeDeclareOptions {
                            // Gone with its binding, should the replay be killed.
                            auto_delete: true,
                            ..ExchangeDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .map_err(setup)?;
                channel
                    .queue_bind(
                        queue.as_str().into(),
                        temporary.as_str().into(),
                        "".into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(setup)?;
                (temporary.clone(), Some(temporary))
            }
            Target::Exchange => (config.exchange.clone(), None),
        };
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(setup)?;
        let event_queues =
            (config.per_event_queues && *target == Target::Exchange).then(EventQueues::default);
        Ok(Sink {
            channel,
            exchange: exchange.into(),
            temporary,
            event_queues,
        })
    }

    /// For a `--to-exchange` replay with `amqp.per_event_queues`: declares the queue of
    /// `routing_key` unless this replay did already. A webhook in the history may never have
    /// had its queue (per-event queues were off when it came, or the queue was deleted since),
    /// and published without it, it would go to `<exchange>.unrouted`.
    async fn ensure_event_queue(
        &self,
        connection: &Connection,
        config: &AmqpConfig,
        routing_key: &str,
    ) -> Result<(), ConnectError> {
        let declaring = self
            .event_queues
            .as_ref()
            .and_then(|queues| queues.declaration(config, connection, routing_key));
        match declaring {
            Some(declaring) => declaring.await,
            None => Ok(()),
        }
    }

    async fn publish(
        &self,
        message: &Delivery,
        replayed_at: &str,
    ) -> Result<PublisherConfirm, lapin::Error> {
        self.channel
            .basic_publish(
                self.exchange.clone(),
                message.routing_key.clone(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &message.data,
                replay_properties(message, replayed_at),
            )
            .await
    }

    async fn close(self) {
        if let Some(temporary) = &self.temporary {
            let _ = self
                .channel
                .exchange_delete(temporary.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = self.channel.close(200, "replay done".into()).await;
    }
}

/// The message's own properties and headers, without the `x-stream-offset` the stream adds
/// on delivery, with [`REPLAY_HEADER`].
fn replay_properties(message: &Delivery, replayed_at: &str) -> BasicProperties {
    let mut headers: BTreeMap<ShortString, AMQPValue> = message
        .properties
        .headers()
        .as_ref()
        .map(|headers| {
            headers
                .inner()
                .iter()
                .filter(|(name, _)| name.as_str() != "x-stream-offset")
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect()
        })
        .unwrap_or_default();
    headers.insert(
        REPLAY_HEADER.into(),
        AMQPValue::LongString(replayed_at.into()),
    );
    message
        .properties
        .clone()
        .with_headers(FieldTable::from(headers))
}
