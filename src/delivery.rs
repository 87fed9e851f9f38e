//! Where an accepted webhook goes: straight to the broker while it confirms, into the spool
//! while it does not; and the replay task that drains the spool back to the broker.
//!
//! Ordering: while the spool holds anything, new webhooks are appended behind it instead of
//! overtaking it, and replay publishes in spool order on one channel. So webhooks reach the
//! broker in arrival order, except around a failure: a webhook whose direct publish fails
//! (e.g. a confirm timeout) is spooled behind ones that arrived after it, and when the broker
//! refuses one webhook of a replay batch, those behind it that it confirmed arrive first.
//! With several relay instances behind a load balancer there is no order across instances at
//! all; consumers that care use the `received_at` header or HireHop's own `time` field.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::amqp::{PublishError, Publisher, backoff};
use crate::message::Message;
use crate::metrics::{Metrics, PublishOutcome};
use crate::spool::{Spool, SpoolError};

/// The most webhooks replayed per batch (and confirms in flight during replay).
const REPLAY_BATCH: usize = 256;
/// The most body bytes read from the spool per replay batch (one webhook at least): replay
/// of large webhooks holds a few MiB, not `REPLAY_BATCH` bodies.
const REPLAY_BATCH_BYTES: u64 = 4 * 1024 * 1024;

/// How a webhook was kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The broker confirmed it.
    Confirmed,
    /// It is fsynced in the local spool and will be replayed.
    Spooled,
}

/// A webhook that was not kept.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error(transparent)]
    Broker(#[from] PublishError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

/// The broker, and the spool if enabled; cheap to clone.
#[derive(Clone)]
pub struct Delivery {
    publisher: Publisher,
    spool: Option<Spool>,
    metrics: Arc<Metrics>,
}

impl Delivery {
    pub fn new(publisher: Publisher, spool: Option<Spool>, metrics: Arc<Metrics>) -> Delivery {
        Delivery {
            publisher,
            spool,
            metrics,
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    pub fn spool(&self) -> Option<&Spool> {
        self.spool.as_ref()
    }

    /// Keeps `message`: confirmed by the broker, or else fsynced in the spool.
    pub async fn deliver(&self, message: &Message) -> Result<Outcome, DeliveryError> {
        let Some(spool) = &self.spool else {
            self.publish(message).await?;
            return Ok(Outcome::Confirmed);
        };
        // Behind a non-empty spool, or while the broker cannot confirm, spool at once: this
        // keeps arrival order and answers without waiting out a timeout.
        let broker_up = self.publisher.is_ready() && !self.publisher.is_blocked();
        if broker_up && spool.is_drained() {
            match self.publish(message).await {
                Ok(()) => return Ok(Outcome::Confirmed),
                // Unroutable would be unroutable again on replay: refuse it now instead.
                Err(err) if err.is_permanent() => return Err(err.into()),
                // The supervisor logs a stall or an outage once; a line per webhook would
                // flood the log at the webhook rate.
                Err(
                    err @ (PublishError::Stalled(_)
                    | PublishError::Blocked
                    | PublishError::Unavailable),
                ) => {
                    tracing::debug!(error = %err, "broker did not confirm; spooling");
                }
                Err(err) => tracing::warn!(error = %err, "broker did not confirm; spooling"),
            }
        }
        let record = message.encode().map_err(SpoolError::Io)?;
        match spool.append(record).await {
            Ok(()) => {
                self.metrics.publish(PublishOutcome::spooled);
                Ok(Outcome::Spooled)
            }
            Err(err) => {
                let outcome = match err {
                    SpoolError::Full { .. } => PublishOutcome::spool_full,
                    _ => PublishOutcome::spool_error,
                };
                self.metrics.publish(outcome);
                Err(err.into())
            }
        }
    }

    async fn publish(&self, message: &Message) -> Result<(), PublishError> {
        let started = Instant::now();
        let result = self.publisher.publish(message).await;
        match &result {
            Ok(()) => {
                self.metrics.confirm_latency(started.elapsed());
                self.metrics.publish(PublishOutcome::ack);
            }
            Err(err) => self.metrics.publish(outcome(err)),
        }
        result
    }
}

/// How a publish that was not confirmed counts in `hirehop_relay_publishes_total`.
fn outcome(err: &PublishError) -> PublishOutcome {
    match err {
        PublishError::Unavailable => PublishOutcome::unavailable,
        PublishError::Timeout(_) => PublishOutcome::timeout,
        PublishError::Stalled(_) => PublishOutcome::stalled,
        PublishError::Blocked => PublishOutcome::blocked,
        PublishError::Nacked => PublishOutcome::nack,
        PublishError::Returned(_) => PublishOutcome::returned,
        PublishError::Refused(_) => PublishOutcome::refused,
        PublishError::Failed(_) => PublishOutcome::error,
    }
}

/// Drains the spool to the broker, oldest first, until `stop` fires, or once `finish` has
/// fired, until the spool is empty (at shutdown: see [`crate::run`]). A record leaves the
/// spool only once the broker confirmed it (or everything before it in its batch).
pub async fn replay(delivery: Delivery, stop: CancellationToken, finish: CancellationToken) {
    let Some(spool) = delivery.spool.clone() else {
        return;
    };
    let publisher = &delivery.publisher;
    let mut failures = 0;
    // Slow start: the first batch after a reconnect or a failure is one webhook, and each
    // batch the broker confirms doubles the next. Webhooks are pipelined within a batch, so
    // when one is refused, those after it that were confirmed reach the broker ahead of it
    // (and again when it is retried); probing with one keeps a broker that still refuses the
    // head from seeing anything behind it.
    let mut window = 1;
    let mut draining = false;
    loop {
        if finish.is_cancelled() && spool.is_drained() {
            return;
        }
        tokio::select! {
            () = stop.cancelled() => return,
            // Look again at the top: the spool may already be empty.
            () = finish.cancelled(), if !finish.is_cancelled() => continue,
            () = spool.wait_for_records() => {}
        }
        if !publisher.is_ready() || publisher.is_blocked() {
            window = 1;
            // Woken by the supervisor's state only indirectly: look again shortly.
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(100)) => continue,
            }
        }
        if !draining {
            let depth = spool.depth();
            tracing::info!(
                records = depth.records,
                bytes = depth.bytes,
                "replaying spooled webhooks"
            );
            draining = true;
        }
        let delivered = match replay_batch(publisher, &spool, &delivery.metrics, window).await {
            Ok(delivered) => delivered,
            Err(err) => {
                tracing::error!(error = %err, "spool replay stalled");
                false
            }
        };
        if delivered {
            failures = 0;
            window = (window * 2).min(REPLAY_BATCH);
            if spool.depth().records == 0 {
                tracing::info!("spool drained");
                draining = false;
                window = 1;
            }
        } else {
            delivery.metrics.replay_failed();
            window = 1;
            let delay = backoff(failures, Duration::from_secs(5));
            failures += 1;
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }
}

/// Publishes one batch; true if all of it was confirmed.
async fn replay_batch(
    publisher: &Publisher,
    spool: &Spool,
    metrics: &Metrics,
    size: usize,
) -> Result<bool, std::io::Error> {
    let batch = spool.read_batch(size, REPLAY_BATCH_BYTES)?;
    if batch.is_empty() {
        // Not expected: the spool publishes its committed end under the lock that counts its
        // records. Should it happen, it is not a delivery, and calling it one would spin.
        return Ok(false);
    }
    // Unreadable records count as done; `positions[k]` is where `messages[k]` sits.
    let mut ok = vec![false; batch.len()];
    let mut positions = Vec::with_capacity(batch.len());
    let mut messages = Vec::with_capacity(batch.len());
    for (i, (record, _)) in batch.iter().enumerate() {
        match Message::decode(record.clone()) {
            Ok(mut message) => {
                message.replayed = true;
                positions.push(i);
                messages.push(message);
            }
            Err(err) => {
                // It passed its checksum, so this is a format problem, not a torn write; it
                // can never be published, and must not block everything behind it.
                tracing::error!(error = %err, "dropping an unreadable spool record");
                ok[i] = true;
            }
        }
    }
    // Fewer results than messages: those past the last result were not published (their
    // per-event queue, or an earlier one's, could not be declared), and stay.
    let results = publisher.publish_batch(&messages).await;
    let mut first_error = None;
    for ((i, message), result) in positions.into_iter().zip(&messages).zip(results) {
        match result {
            Ok(()) => {
                ok[i] = true;
                metrics.replayed(1);
            }
            Err(err) => {
                first_error.get_or_insert((message.event.clone(), err));
            }
        }
    }
    let prefix = ok.iter().take_while(|ok| **ok).count();
    if let Some((_, position)) = prefix.checked_sub(1).map(|last| &batch[last]) {
        spool.consume_through(*position, prefix as u64);
    }
    if let Some((event, err)) = first_error {
        tracing::error!(%event, error = %err, "replay of a spooled webhook failed; will retry");
    }
    Ok(prefix == batch.len())
}
