//! The bench's own broker work: queue layouts, counting what arrived, purging between phases
//! and deleting everything at the end.
//!
//! Every exchange and queue is named `bench-<run id>-...`. The queues declared here also carry
//! `x-expires`, so an interrupted run leaves none of them behind for longer than an hour; the
//! exchanges and `<exchange>.unrouted`, declared by the relay's own code, stay until deleted.

use std::fmt;

use anyhow::Context;
use lapin::options::{
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties};

use crate::payload::EVENTS;

/// Unused bench queues disappear after this long (an interrupted run's leftovers).
const QUEUE_EXPIRES_MS: i64 = 60 * 60 * 1000;

/// How the queues are bound to the topic exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One queue bound with `#`: every event in one queue.
    OneQueue,
    /// One queue per event name, bound with the exact name.
    FourQueues,
}

impl Layout {
    pub const ALL: [Layout; 2] = [Layout::OneQueue, Layout::FourQueues];

    /// `(queue name suffix, binding key)` pairs.
    fn bindings(self) -> Vec<(String, String)> {
        match self {
            Layout::OneQueue => vec![("all".to_owned(), "#".to_owned())],
            Layout::FourQueues => EVENTS
                .iter()
                .map(|event| ((*event).to_owned(), (*event).to_owned()))
                .collect(),
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Layout::OneQueue => "1q",
            Layout::FourQueues => "4q",
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layout::OneQueue => "1 queue (#)",
            Layout::FourQueues => "4 queues (per event)",
        })
    }
}

/// The queues of one exchange: the layout's queues plus `<exchange>.unrouted`.
#[derive(Debug, Clone)]
pub struct Queues {
    pub exchange: String,
    /// Whether a relay with the history stream publishes here: `<exchange>.history`, a
    /// stream and a fanout exchange, is deleted with the rest (never counted or purged: it
    /// keeps a copy of everything, and streams cannot be purged).
    pub history: bool,
    /// `(queue, binding key)` pairs.
    bindings: Vec<(String, String)>,
}

impl Queues {
    /// The names for `layout` on `exchange` (nothing is declared yet).
    pub fn new(exchange: &str, layout: Layout) -> Queues {
        let bindings = layout
            .bindings()
            .into_iter()
            .map(|(suffix, pattern)| (format!("{exchange}.q.{suffix}"), pattern))
            .collect();
        Queues {
            exchange: exchange.to_owned(),
            history: false,
            bindings,
        }
    }

    /// Every queue a message published to the exchange can end up in.
    fn all(&self) -> impl Iterator<Item = String> + '_ {
        self.bindings
            .iter()
            .map(|(queue, _)| queue.clone())
            .chain([unrouted(&self.exchange)])
    }
}

fn unrouted(exchange: &str) -> String {
    format!("{exchange}.unrouted")
}

/// Type of the layouts' queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QueueType {
    Classic,
    /// Replicated over the nodes of a cluster (one member on a single node).
    Quorum,
}

impl QueueType {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

/// The bench's own connection to the broker, for declarations and counts.
pub struct Broker {
    connection: Connection,
    channel: Channel,
    queue_type: QueueType,
}

impl Broker {
    pub async fn connect(url: &str, queue_type: QueueType) -> anyhow::Result<Broker> {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .with_context(|| {
                format!(
                    "cannot reach RabbitMQ at {url}: the benchmark needs a real broker (start \
                     one with `rabbitmq-server -detached`, or pass --amqp-url)"
                )
            })?;
        let channel = connection
            .create_channel()
            .await
            .context("failed to open a channel")?;
        Ok(Broker {
            connection,
            channel,
            queue_type,
        })
    }

    /// Declares the layout's queues and binds them to the exchange (which must exist).
    pub async fn declare_queues(&self, queues: &Queues) -> anyhow::Result<()> {
        for (queue, pattern) in &queues.bindings {
            let mut arguments = FieldTable::default();
            arguments.insert("x-expires".into(), AMQPValue::LongLongInt(QUEUE_EXPIRES_MS));
            let kind = AMQPValue::LongString(self.queue_type.as_str().into());
            arguments.insert("x-queue-type".into(), kind);
            self.declare_queue(queue, arguments).await?;
            self.bind(queue, &queues.exchange, pattern).await?;
        }
        Ok(())
    }

    async fn declare_queue(&self, name: &str, arguments: FieldTable) -> anyhow::Result<()> {
        let options = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        self.channel
            .queue_declare(name.into(), options, arguments)
            .await
            .with_context(|| format!("failed to declare queue {name}"))?;
        Ok(())
    }

    async fn bind(&self, queue: &str, exchange: &str, pattern: &str) -> anyhow::Result<()> {
        self.channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                pattern.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("failed to bind queue {queue} to {exchange}"))
    }

    /// Messages in the layout's queues and the unrouted queue. Exact once every confirm is in:
    /// nothing consumes these queues.
    pub async fn count(&self, queues: &Queues) -> anyhow::Result<u64> {
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let mut total = 0;
        for name in queues.all() {
            let queue = self
                .channel
                .queue_declare(name.as_str().into(), passive, FieldTable::default())
                .await
                .with_context(|| format!("failed to count the messages in queue {name}"))?;
            total += u64::from(queue.message_count());
        }
        Ok(total)
    }

    /// Empties the queues, so every phase starts from the same broker state.
    pub async fn purge(&self, queues: &Queues) -> anyhow::Result<()> {
        for name in queues.all() {
            self.channel
                .queue_purge(name.as_str().into(), QueuePurgeOptions::default())
                .await
                .with_context(|| format!("failed to purge queue {name}"))?;
        }
        Ok(())
    }

    /// Deletes the queues, the exchange and its `.unrouted` exchange. Best effort: reports
    /// what could not be deleted instead of stopping.
    pub async fn delete(&self, queues: &Queues) {
        // A fresh channel: the main one is closed if the run stopped on a channel error.
        let channel = match self.connection.create_channel().await {
            Ok(channel) => channel,
            Err(err) => {
                eprintln!("warning: cannot delete {}: {err}", queues.exchange);
                return;
            }
        };
        let history = queues
            .history
            .then(|| format!("{}.history", queues.exchange));
        for name in queues.all().chain(history.clone()) {
            if let Err(err) = channel
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await
            {
                eprintln!("warning: failed to delete queue {name}: {err}");
            }
        }
        let exchanges = [queues.exchange.clone(), unrouted(&queues.exchange)];
        for name in exchanges.into_iter().chain(history) {
            if let Err(err) = channel
                .exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default())
                .await
            {
                eprintln!("warning: failed to delete exchange {name}: {err}");
            }
        }
    }
}
