//! `hirehop-relay requeue`: moves messages from `<exchange>.unrouted`, or a dead-letter queue,
//! back through the exchange once a queue is bound for them.
//!
//! It looks at the messages the source held when it started, no more, taking each with
//! `basic.get`, and republishes it to `amqp.exchange` with its routing key, properties and
//! headers, `mandatory` set. The source's copy is acked only once the broker confirmed the new
//! one: a crash in between leaves both, never neither. Messages `--event` does not match, and
//! those that would be unroutable again, are never acked: they go back to the source, where
//! they were, when the command ends (or dies).
//!
//! Unroutable again: without an alternate exchange the broker returns the copy. With one, it
//! hands the copy to `<exchange>.unrouted` and confirms it, so nothing is returned. To tell,
//! requeue binds a temporary queue of its own to `<exchange>.unrouted` for the run and, after
//! each batch, publishes a sentinel straight to that queue on the publishing channel:
//! RabbitMQ keeps one channel's messages to one queue in order, so once the sentinel arrives,
//! every copy of the batch that went unrouted has arrived before it. Such a copy is in
//! `<exchange>.unrouted` already, so the original is acked (it moved to the end of that queue)
//! and the rest with its routing key stay where they are, not published again.
//!
//! With `amqp.per_event_queues`, requeue declares the queue of each routing key before it
//! publishes the first copy with that key, as the relay does before a webhook's first publish:
//! a webhook often waits in `<exchange>.unrouted` precisely because its queue did not exist
//! yet. A queue the broker refuses to declare leaves that key's messages in the source.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
    ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, Consumer, PublisherConfirm};

use super::topology::{EventQueues, event_queue_name};
use super::{ConnectError, connect_any, history};
use crate::config::AmqpConfig;
use crate::routing::TopicPattern;

/// Messages republished before their confirms are awaited.
const BATCH: usize = 100;

/// What to move.
#[derive(Debug, Clone)]
pub struct Request {
    /// The source queue.
    pub from: String,
    /// Only messages whose event name matches.
    pub event: Option<TopicPattern>,
    /// Republish at most this many.
    pub limit: Option<u64>,
}

/// What a requeue did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Messages in the source when the command started: the most it looks at.
    pub in_source: u64,
    pub examined: u64,
    /// Republished, confirmed, routed to a queue, and acked on the source.
    pub moved: u64,
    /// Left in the source: `--event` did not match.
    pub skipped: u64,
    /// Still no queue bound for them, per event name too. They stay in the source, except
    /// those counted in `sent_to_unrouted`.
    pub unroutable: u64,
    pub unroutable_events: BTreeMap<String, u64>,
    /// Of the unroutable ones, those whose copy the alternate exchange put at the end of
    /// `<exchange>.unrouted` (the source's copy was acked).
    pub sent_to_unrouted: u64,
    /// Left in the source, not published: the broker refused to declare their per-event
    /// queue (`amqp.per_event_queues`). Why, per queue.
    pub queue_refused: u64,
    pub refused_queues: BTreeMap<String, String>,
}

impl Counts {
    /// One line, for a progress display.
    pub fn progress_line(&self) -> String {
        format!(
            "looked at {} of {}, moved {}, still unroutable {}, skipped {}",
            self.examined, self.in_source, self.moved, self.unroutable, self.skipped
        )
    }

    /// The summary, naming the source queue, the exchange and `<exchange>.unrouted`.
    pub fn report(&self, from: &str, config: &AmqpConfig) -> String {
        let mut out = format!(
            "looked at {} of the {} messages in {from}: moved {} through {}\n",
            self.examined, self.in_source, self.moved, config.exchange
        );
        if self.unroutable > 0 {
            let unrouted = config.unrouted_name();
            out.push_str(&format!(
                "still unroutable, no queue bound for them: {}",
                self.unroutable
            ));
            if self.sent_to_unrouted > 0 && from != unrouted {
                let stayed = self.unroutable - self.sent_to_unrouted;
                out.push_str(&format!(
                    " ({} went to {unrouted}, {stayed} stayed in {from})",
                    self.sent_to_unrouted
                ));
            } else {
                out.push_str(&format!(", left in {from}"));
            }
            out.push('\n');
            super::replay::push_events(&mut out, &self.unroutable_events);
        }
        if self.queue_refused > 0 {
            out.push_str(&format!(
                "per-event queue refused, left in {from}: {}\n",
                self.queue_refused
            ));
            for why in self.refused_queues.values() {
                out.push_str(&format!("  {why}\n"));
            }
        }
        if self.skipped > 0 {
            out.push_str(&format!(
                "not matching --event, left in {from}: {}\n",
                self.skipped
            ));
        }
        out
    }
}

/// How a requeue ended: its counts, and what stopped it early, if anything.
#[derive(Debug)]
pub struct Outcome {
    pub counts: Counts,
    pub error: Option<RequeueError>,
}

#[derive(Debug, thiserror::Error)]
pub enum RequeueError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("failed to find queue {queue}: {cause}")]
    NoQueue { queue: String, cause: lapin::Error },
    #[error("failed to watch {unrouted} for messages that are still unroutable: {cause}")]
    Watch {
        unrouted: String,
        cause: lapin::Error,
    },
    #[error("lost the broker: {0}")]
    Broker(lapin::Error),
    #[error("the temporary queue watching the unrouted queue was closed")]
    WatchEnded,
    #[error("the broker refused a republished message (nack); it stays in the source")]
    Nacked,
    #[error(
        "the broker did not confirm a republished message within {0:?}; it stays in the source"
    )]
    Timeout(Duration),
}

/// Moves what `request` selects, batch after batch, until the messages the source held at the
/// start were all looked at, the limit is reached, or `stop` fires; `progress` sees the counts
/// after every batch.
pub async fn requeue(
    config: &AmqpConfig,
    request: &Request,
    progress: &mut dyn FnMut(&Counts),
    stop: impl Future<Output = ()>,
) -> Result<Outcome, RequeueError> {
    let connection = connect_any(config, "hirehop-relay requeue").await?;
    let outcome = run(&connection, config, request, progress, stop).await;
    // Closing returns every message taken and not acked to the source.
    let _ = connection.close(200, "requeue done".into()).await;
    outcome
}

async fn run(
    connection: &Connection,
    config: &AmqpConfig,
    request: &Request,
    progress: &mut dyn FnMut(&Counts),
    stop: impl Future<Output = ()>,
) -> Result<Outcome, RequeueError> {
    let source = connection
        .create_channel()
        .await
        .map_err(ConnectError::Channel)?;
    let in_source = source
        .queue_declare(
            request.from.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|cause| RequeueError::NoQueue {
            queue: request.from.clone(),
            cause,
        })?
        .message_count();
    let publishing = connection
        .create_channel()
        .await
        .map_err(ConnectError::Channel)?;
    publishing
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(ConnectError::Channel)?;
    let mut watch = if config.alternate_exchange {
        Some(Watch::open(connection, config).await?)
    } else {
        None
    };
    let mut mover = Mover {
        config,
        connection,
        request,
        source,
        publishing,
        counts: Counts {
            in_source: in_source.into(),
            ..Counts::default()
        },
        published: 0,
        unroutable_keys: HashSet::new(),
        event_queues: EventQueues::default(),
    };
    tokio::pin!(stop);
    let error = loop {
        if mover.done() {
            break None;
        }
        let batch = tokio::select! {
            biased;
            () = &mut stop => break None,
            batch = mover.take_batch() => batch,
        };
        let batch = match batch {
            Ok(batch) => batch,
            Err(err) => break Some(err),
        };
        if let Err(err) = mover.settle(batch, watch.as_mut()).await {
            break Some(err);
        }
        progress(&mover.counts);
    };
    progress(&mover.counts);
    Ok(Outcome {
        counts: mover.counts,
        error,
    })
}

/// A message republished, awaiting its confirm.
struct Sent {
    original: Delivery,
    event: String,
    confirm: PublisherConfirm,
}

struct Mover<'a> {
    config: &'a AmqpConfig,
    connection: &'a Connection,
    request: &'a Request,
    source: Channel,
    publishing: Channel,
    counts: Counts,
    published: u64,
    /// Routing keys found still unroutable during this run.
    unroutable_keys: HashSet<String>,
    /// The per-event queues declared during this run (`amqp.per_event_queues`).
    event_queues: EventQueues,
}

impl Mover<'_> {
    fn done(&self) -> bool {
        self.counts.examined >= self.counts.in_source
            || self
                .request
                .limit
                .is_some_and(|limit| self.published >= limit)
    }

    /// Takes up to [`BATCH`] messages from the source and republishes those to move.
    async fn take_batch(&mut self) -> Result<Vec<Sent>, RequeueError> {
        let mut batch = Vec::new();
        while batch.len() < BATCH && !self.done() {
            let got = self
                .source
                .basic_get(
                    self.request.from.as_str().into(),
                    BasicGetOptions { no_ack: false },
                )
                .await
                .map_err(RequeueError::Broker)?;
            let Some(got) = got else {
                // Emptied by someone else meanwhile.
                self.counts.in_source = self.counts.examined;
                break;
            };
            self.counts.examined += 1;
            let original = got.delivery;
            let event = history::event(&original);
            // Not acked: back to the source at the end.
            if let Some(pattern) = &self.request.event
                && !pattern.matches(&event)
            {
                self.counts.skipped += 1;
                continue;
            }
            if self.unroutable_keys.contains(original.routing_key.as_str()) {
                self.count_unroutable(event);
                continue;
            }
            if !self
                .ensure_event_queue(original.routing_key.as_str())
                .await?
            {
                continue;
            }
            let confirm = self
                .publishing
                .basic_publish(
                    self.config.exchange.as_str().into(),
                    original.routing_key.clone(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    &original.data,
                    original.properties.clone(),
                )
                .await
                .map_err(RequeueError::Broker)?;
            self.published += 1;
            batch.push(Sent {
                original,
                event,
                confirm,
            });
        }
        Ok(batch)
    }

    /// Waits for the batch's confirms, finds which copies went unrouted, and acks on the
    /// source every original whose copy the broker keeps.
    async fn settle(
        &mut self,
        batch: Vec<Sent>,
        watch: Option<&mut Watch>,
    ) -> Result<(), RequeueError> {
        if batch.is_empty() {
            return Ok(());
        }
        let timeout = self.config.confirm_timeout();
        let back = match watch {
            Some(watch) => watch.sentinel(&self.publishing, timeout).await?,
            None => HashSet::new(),
        };
        let mut failure = None;
        for Sent {
            original,
            event,
            confirm,
        } in batch
        {
            let confirmed = tokio::time::timeout(timeout, confirm).await;
            let kept = match confirmed {
                Ok(Ok(Confirmation::Ack(None))) => true,
                // Returned (no alternate exchange): nothing kept it; the original stays.
                Ok(Ok(Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)))) => {
                    self.unroutable_keys
                        .insert(original.routing_key.to_string());
                    self.count_unroutable(event.clone());
                    false
                }
                Ok(Ok(Confirmation::Nack(None) | Confirmation::NotRequested)) => {
                    failure.get_or_insert(RequeueError::Nacked);
                    false
                }
                Ok(Err(cause)) => {
                    failure.get_or_insert(RequeueError::Broker(cause));
                    false
                }
                Err(_) => {
                    failure.get_or_insert(RequeueError::Timeout(timeout));
                    false
                }
            };
            if !kept {
                continue;
            }
            let id = original.properties.message_id().as_ref();
            if id.is_some_and(|id| back.contains(id.as_str())) {
                self.unroutable_keys
                    .insert(original.routing_key.to_string());
                self.count_unroutable(event);
                self.counts.sent_to_unrouted += 1;
            } else {
                self.counts.moved += 1;
            }
            original
                .acker
                .ack(BasicAckOptions::default())
                .await
                .map_err(RequeueError::Broker)?;
        }
        failure.map_or(Ok(()), Err)
    }

    /// With `amqp.per_event_queues`, declares the queue of `routing_key` unless this run did
    /// already: the message may be in the source only because that queue did not exist, and
    /// published without it, it would be unroutable again. False when the broker refuses the
    /// queue (other arguments, no permission): the message is not published and stays in the
    /// source, as do the later ones with that key, and the summary says why. Any other failure
    /// (a lost connection) ends the run.
    async fn ensure_event_queue(&mut self, routing_key: &str) -> Result<bool, RequeueError> {
        if !self.config.per_event_queues {
            return Ok(true);
        }
        let queue = event_queue_name(self.config, routing_key);
        if !self.counts.refused_queues.contains_key(&queue) {
            let Some(declaring) =
                self.event_queues
                    .declaration(self.config, self.connection, routing_key)
            else {
                return Ok(true);
            };
            match declaring.await {
                Ok(()) => return Ok(true),
                Err(err) if err.is_fatal() => {
                    self.counts.refused_queues.insert(queue, err.to_string());
                }
                Err(err) => return Err(err.into()),
            }
        }
        self.counts.queue_refused += 1;
        Ok(false)
    }

    fn count_unroutable(&mut self, event: String) {
        self.counts.unroutable += 1;
        *self.counts.unroutable_events.entry(event).or_default() += 1;
    }
}

/// A temporary queue bound to `<exchange>.unrouted`: it sees every message the alternate
/// exchange takes while requeue runs.
struct Watch {
    queue: String,
    deliveries: Consumer,
    _channel: Channel,
}

impl Watch {
    async fn open(connection: &Connection, config: &AmqpConfig) -> Result<Watch, RequeueError> {
        let unrouted = config.unrouted_name();
        let failed = |cause| RequeueError::Watch {
            unrouted: unrouted.clone(),
            cause,
        };
        let channel = connection.create_channel().await.map_err(failed)?;
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(failed)?
            .name()
            .to_string();
        channel
            .queue_bind(
                queue.as_str().into(),
                unrouted.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(failed)?;
        let deliveries = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    exclusive: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(failed)?;
        Ok(Watch {
            queue,
            deliveries,
            _channel: channel,
        })
    }

    /// Publishes a sentinel on `publishing` (after the batch) and returns the `message_id`s of
    /// everything that reached `<exchange>.unrouted` before it.
    async fn sentinel(
        &mut self,
        publishing: &Channel,
        timeout: Duration,
    ) -> Result<HashSet<String>, RequeueError> {
        let id = uuid::Uuid::now_v7().to_string();
        publishing
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                BasicPublishOptions::default(),
                &[],
                BasicProperties::default().with_message_id(id.as_str().into()),
            )
            .await
            .map_err(RequeueError::Broker)?;
        let mut back = HashSet::new();
        let collected = tokio::time::timeout(timeout, async {
            while let Some(delivery) = self.deliveries.next().await {
                let delivery = delivery.map_err(RequeueError::Broker)?;
                let Some(message_id) = delivery.properties.message_id().as_ref() else {
                    continue;
                };
                if message_id.as_str() == id {
                    return Ok(());
                }
                back.insert(message_id.to_string());
            }
            Err(RequeueError::WatchEnded)
        })
        .await;
        match collected {
            Ok(Ok(())) => Ok(back),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(RequeueError::Timeout(timeout)),
        }
    }
}
