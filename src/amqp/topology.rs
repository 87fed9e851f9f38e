//! The exchanges, queues and bindings the config describes: declared at the first connection
//! before any channel publishes (with `amqp.declare`), checked passively on every other, declared
//! on demand for per-event queues, and printed by `hirehop-relay topology` and `check-config`.
//!
//! - the durable topic exchange `amqp.exchange`, with `alternate-exchange` =
//!   `<exchange>.unrouted` when `amqp.alternate_exchange` is on;
//! - the durable fanout exchange `<exchange>.unrouted` and the durable queue of the same
//!   name bound to it, which keep events nobody has bound a queue for yet;
//! - every `[[amqp.queues]]` entry, with its arguments and bindings;
//! - with `amqp.per_event_queues`, one queue per routing key, declared the first time it is
//!   published;
//! - with `history.enabled`, the history stream `<exchange>.history` and the fanout exchange
//!   of the same name that the relay then publishes to (why: `declare_history`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};
use tokio::sync::OnceCell;

use crate::amqp::error::{ConnectError, protocol_error};
use crate::amqp::{integer, long_string};
use crate::config::{AmqpConfig, QueueConfig, QueueType};

/// Declares everything the config describes, on a channel of its own (a refused
/// declaration closes the channel it was made on).
pub async fn declare(config: &AmqpConfig, connection: &Connection) -> Result<(), ConnectError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(ConnectError::Channel)?;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    let mut arguments = FieldTable::default();
    if config.alternate_exchange {
        let unrouted = config.unrouted_name();
        channel
            .exchange_declare(
                unrouted.as_str().into(),
                lapin::ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await
            .map_err(failed(format!("exchange {unrouted}")))?;
        declare_queue(&channel, &unrouted, &typed(config.unrouted_queue_type)).await?;
        bind(&channel, &unrouted, &unrouted, "").await?;
        arguments.insert("alternate-exchange".into(), long_string(&unrouted));
    }
    channel
        .exchange_declare(
            config.exchange.as_str().into(),
            lapin::ExchangeKind::Topic,
            durable,
            arguments,
        )
        .await
        .map_err(failed(format!("exchange {}", config.exchange)))?;
    for queue in &config.queues {
        declare_queue(&channel, &queue.name, &queue_arguments(queue)).await?;
        for pattern in &queue.bindings {
            bind(&channel, &queue.name, &config.exchange, pattern).await?;
        }
    }
    if config.history.enabled {
        declare_history(config, &channel).await?;
    }
    // Best effort: the connection stays either way.
    let _ = channel.close(200, "topology declared".into()).await;
    Ok(())
}

/// The history: a stream queue `<exchange>.history` that keeps every accepted webhook, and a
/// durable fanout exchange of the same name, bound to the stream and to `amqp.exchange`,
/// which the relay publishes to (see [`AmqpConfig::publish_exchange`]).
///
/// Why not bind the stream to `amqp.exchange` with `#`: RabbitMQ hands a message to an
/// exchange's alternate exchange only when *that* exchange routes it nowhere, and a
/// catch-all binding routes everything somewhere, so `<exchange>.unrouted` would never see
/// an event again. In front of the topic exchange, the fanout leaves its routing, alternate
/// exchange included, as it was. Publisher confirms cover the stream like any queue.
async fn declare_history(config: &AmqpConfig, channel: &Channel) -> Result<(), ConnectError> {
    let name = config.history_name();
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(name.as_str().into(), options, history_arguments(config))
        .await
        .map_err(failed(format!(
            "history stream {name} (streams need RabbitMQ 3.9 or later with the stream_queue \
             feature flag enabled; an existing queue of that name must be a stream with the same \
             arguments; history.enabled = false runs the relay without history)"
        )))?;
    channel
        .exchange_declare(
            name.as_str().into(),
            lapin::ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(failed(format!("exchange {name}")))?;
    bind(channel, &name, &name, "").await?;
    channel
        .exchange_bind(
            config.exchange.as_str().into(),
            name.as_str().into(),
            "".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(failed(format!(
            "binding of exchange {} to {name}",
            config.exchange
        )))
}

/// The stream's arguments: its type and retention. RabbitMQ compares them with an existing
/// stream's on every declaration.
fn history_arguments(config: &AmqpConfig) -> FieldTable {
    let history = &config.history;
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), long_string("stream"));
    arguments.insert(
        "x-max-age".into(),
        long_string(&max_age_argument(history.max_age)),
    );
    arguments.insert("x-max-length-bytes".into(), integer(history.max_bytes));
    arguments
}

/// `x-max-age` in RabbitMQ's notation, in the largest unit that divides it (`7D`, `36h`):
/// the same age always gives the same text, as the broker compares it as text. `M` and `Y`
/// (months, years) are never used.
fn max_age_argument(age: std::time::Duration) -> String {
    let secs = age.as_secs();
    [(86_400, "D"), (3_600, "h"), (60, "m")]
        .into_iter()
        .find(|(unit, _)| secs.is_multiple_of(*unit))
        .map_or_else(
            || format!("{secs}s"),
            |(unit, suffix)| format!("{}{suffix}", secs / unit),
        )
}

/// The first exchange the relay publishes through that does not exist, asked passively (a
/// declaration that creates nothing and compares nothing): `amqp.exchange`, and with history
/// on the fanout `<exchange>.history` in front of it. `None` when both are there.
pub async fn missing_exchange(
    config: &AmqpConfig,
    connection: &Connection,
) -> Result<Option<String>, ConnectError> {
    let mut names = vec![config.exchange.clone()];
    if config.history.enabled {
        names.push(config.history_name());
    }
    for name in names {
        if !exchange_exists(&name, connection).await? {
            return Ok(Some(name));
        }
    }
    Ok(None)
}

/// Whether exchange `name` exists, on a channel of its own: the broker closes the channel
/// when it does not.
async fn exchange_exists(name: &str, connection: &Connection) -> Result<bool, ConnectError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(ConnectError::Channel)?;
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..ExchangeDeclareOptions::default()
    };
    let checked = channel
        .exchange_declare(
            name.into(),
            lapin::ExchangeKind::Topic,
            passive,
            FieldTable::default(),
        )
        .await;
    match checked {
        Ok(()) => {
            let _ = channel.close(200, "exchange checked".into()).await;
            Ok(true)
        }
        Err(cause) => match protocol_error(&cause) {
            Some(AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)) => Ok(false),
            _ => Err(ConnectError::Topology {
                what: format!("exchange {name} (passive check)"),
                cause,
            }),
        },
    }
}

/// The per-event queue for `routing_key`: `<per_event_queue_prefix><routing key>`, bound to
/// exactly that key.
pub fn event_queue_name(config: &AmqpConfig, routing_key: &str) -> String {
    format!("{}{routing_key}", config.per_event_queue_prefix)
}

/// The per-event queues declared so far (`amqp.per_event_queues`), by routing key. Each is
/// declared once per process, the first time its event is published, by one publish while
/// the others of that key wait for it; publishes of other keys go on meanwhile. They are
/// forgotten when the whole topology had to be declared again: the broker had lost it.
#[derive(Default)]
pub(crate) struct EventQueues {
    declared: Mutex<HashMap<String, Arc<OnceCell<()>>>>,
}

impl EventQueues {
    /// The declaration of the queue for `routing_key`, to await (a failed one is tried again
    /// by the next publish of that key); `None` when it was declared already.
    pub fn declaration<'a>(
        &self,
        config: &'a AmqpConfig,
        connection: &'a Connection,
        routing_key: &'a str,
    ) -> Option<impl Future<Output = Result<(), ConnectError>> + use<'a>> {
        let declared = Arc::clone(
            self.declared
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(routing_key.to_owned())
                .or_default(),
        );
        if declared.initialized() {
            return None;
        }
        Some(async move {
            declared
                .get_or_try_init(|| declare_event_queue(config, connection, routing_key))
                .await
                .map(drop)
        })
    }

    /// Forgets every queue declared so far, so each is declared again when next needed.
    pub fn forget(&self) {
        self.declared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

/// Declares the per-event queue for `routing_key` and binds it, on a channel of its own: a
/// refused declaration closes its channel, and the publishing channels carry other webhooks'
/// confirms.
async fn declare_event_queue(
    config: &AmqpConfig,
    connection: &Connection,
    routing_key: &str,
) -> Result<(), ConnectError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(ConnectError::Channel)?;
    let name = event_queue_name(config, routing_key);
    let declared = async {
        declare_queue(&channel, &name, &typed(config.per_event_queue_type)).await?;
        bind(&channel, &name, &config.exchange, routing_key).await
    }
    .await;
    let _ = channel.close(200, "declared".into()).await;
    declared
}

/// The arguments of a queue the relay declares with only its type set.
fn typed(kind: QueueType) -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), long_string(kind.as_str()));
    arguments
}

fn queue_arguments(queue: &QueueConfig) -> FieldTable {
    let mut arguments = typed(queue.kind);
    if let Some(dlx) = &queue.dead_letter_exchange {
        arguments.insert("x-dead-letter-exchange".into(), long_string(dlx));
    }
    if let Some(size) = queue.initial_group_size {
        arguments.insert(
            "x-quorum-initial-group-size".into(),
            AMQPValue::LongLongInt(size.into()),
        );
    }
    if let Some(limit) = queue.delivery_limit {
        arguments.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(limit.into()),
        );
    }
    if let Some(ttl) = queue.message_ttl_ms {
        arguments.insert("x-message-ttl".into(), integer(ttl));
    }
    if let Some(max) = queue.max_length {
        arguments.insert("x-max-length".into(), integer(max));
        arguments.insert("x-overflow".into(), long_string(queue.overflow.as_str()));
    }
    arguments
}

async fn declare_queue(
    channel: &Channel,
    name: &str,
    arguments: &FieldTable,
) -> Result<(), ConnectError> {
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(name.into(), options, arguments.clone())
        .await
        .map(drop)
        .map_err(failed(format!("queue {name}")))
}

async fn bind(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    pattern: &str,
) -> Result<(), ConnectError> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            pattern.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(failed(format!(
            "binding of queue {queue} to {exchange} with {pattern:?}"
        )))
}

fn failed(what: String) -> impl FnOnce(lapin::Error) -> ConnectError {
    move |cause| ConnectError::Topology { what, cause }
}

/// The topology as text, for people: the same names and arguments that [`declare`] sends.
pub fn describe(config: &AmqpConfig) -> String {
    let mut out = String::new();
    let ae = if config.alternate_exchange {
        format!(", alternate-exchange={}", config.unrouted_name())
    } else {
        String::new()
    };
    if !config.declare {
        let _ = writeln!(
            out,
            "(amqp.declare = false: the broker's definitions create these; the relay only checks \
             that the exchange exists)"
        );
    }
    let _ = writeln!(out, "exchange {} (topic, durable{ae})", config.exchange);
    if config.alternate_exchange {
        let unrouted = config.unrouted_name();
        let _ = writeln!(out, "exchange {unrouted} (fanout, durable)");
        let arguments = show(&typed(config.unrouted_queue_type));
        let _ = writeln!(out, "queue {unrouted} (durable, {arguments})");
        let _ = writeln!(out, "  bound to {unrouted}");
    }
    for queue in &config.queues {
        let arguments = show(&queue_arguments(queue));
        let _ = writeln!(out, "queue {} (durable, {arguments})", queue.name);
        for pattern in &queue.bindings {
            let _ = writeln!(out, "  bound to {} with {pattern}", config.exchange);
        }
    }
    if config.per_event_queues {
        let arguments = show(&typed(config.per_event_queue_type));
        let _ = writeln!(
            out,
            "queue {}<routing key> (durable, {arguments}), one per event, declared when first seen",
            config.per_event_queue_prefix
        );
        let _ = writeln!(out, "  bound to {} with <routing key>", config.exchange);
    }
    if config.history.enabled {
        let name = config.history_name();
        let _ = writeln!(
            out,
            "exchange {name} (fanout, durable): the relay publishes here"
        );
        let arguments = show(&history_arguments(config));
        let _ = writeln!(out, "queue {name} (durable, {arguments})");
        let _ = writeln!(out, "  bound to {name}");
        let _ = writeln!(out, "exchange {}", config.exchange);
        let _ = writeln!(out, "  bound to {name}");
    }
    out
}

/// `x-max-length=1000, x-queue-type=quorum`, as RabbitMQ lists them.
fn show(arguments: &FieldTable) -> String {
    let shown: Vec<String> = arguments
        .inner()
        .iter()
        .map(|(name, value)| match value {
            AMQPValue::LongString(text) => format!("{name}={text}"),
            AMQPValue::LongLongInt(n) => format!("{name}={n}"),
            other => format!("{name}={other:?}"),
        })
        .collect();
    shown.join(", ")
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use serde_json::{Value, json};

    use super::*;
    use crate::config::Config;

    /// `arguments` as RabbitMQ's definitions file writes them.
    fn as_json(arguments: &FieldTable) -> Value {
        let members = arguments.inner().iter().map(|(name, value)| {
            let value = match value {
                AMQPValue::LongString(text) => json!(text.to_string()),
                AMQPValue::LongLongInt(n) => json!(n),
                other => panic!("{name}: no JSON form for {other:?} here"),
            };
            (name.to_string(), value)
        });
        Value::Object(members.collect())
    }

    #[test]
    fn max_age_is_written_in_the_largest_unit_that_divides_it() {
        let days = |n: u64| std::time::Duration::from_secs(n * 86_400);
        assert_eq!(max_age_argument(days(7)), "7D");
        assert_eq!(max_age_argument(days(1)), "1D");
        let secs = std::time::Duration::from_secs;
        assert_eq!(max_age_argument(secs(36 * 3600)), "36h");
        assert_eq!(max_age_argument(secs(90 * 60)), "90m");
        assert_eq!(max_age_argument(secs(61)), "61s");
    }

    /// `deploy/rabbitmq/definitions.json` declares what the relay declares with
    /// `deploy/rabbitmq/relay-queues.toml`, so an operator who imports it first gets no
    /// PRECONDITION_FAILED. Expected values come from the same functions [`declare`] uses.
    #[test]
    fn the_deploy_definitions_match_what_the_relay_declares() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/rabbitmq");
        let config = Config::load_from(
            Some(&dir.join("relay-queues.toml")),
            Some(HashMap::from([(
                "RELAY_AUTH__EXPORT_KEYS".to_owned(),
                "k".to_owned(),
            )])),
        )
        .unwrap()
        .amqp;
        let text = std::fs::read_to_string(dir.join("definitions.json")).unwrap();
        let definitions: Value = serde_json::from_str(&text).unwrap();
        let named = |kind: &str, name: &str| {
            definitions[kind]
                .as_array()
                .unwrap()
                .iter()
                .find(|object| object["name"] == name)
                .unwrap_or_else(|| panic!("{kind}: no {name}"))
                .clone()
        };
        let bound = |source: &str, queue: &str, pattern: &str| {
            definitions["bindings"].as_array().unwrap().iter().any(|b| {
                b["source"] == source && b["destination"] == queue && b["routing_key"] == pattern
            })
        };
        let durable_queue = |name: &str, arguments: &FieldTable| {
            let queue = named("queues", name);
            assert_eq!(queue["durable"], true, "{name}");
            assert_eq!(queue["auto_delete"], false, "{name}");
            assert_eq!(queue["arguments"], as_json(arguments), "{name}");
        };

        let vhosts: Vec<&Value> = definitions["vhosts"].as_array().unwrap().iter().collect();
        for kind in ["exchanges", "queues"] {
            for object in definitions[kind].as_array().unwrap() {
                let vhost = &object["vhost"];
                assert!(vhosts.iter().any(|v| v["name"] == *vhost), "{object}");
            }
        }

        assert!(config.alternate_exchange);
        let unrouted = config.unrouted_name();
        let exchange = named("exchanges", &config.exchange);
        assert_eq!(exchange["type"], "topic");
        assert_eq!(exchange["durable"], true);
        assert_eq!(
            exchange["arguments"],
            json!({ "alternate-exchange": unrouted })
        );
        let fanout = named("exchanges", &unrouted);
        assert_eq!(fanout["type"], "fanout");
        assert_eq!(fanout["arguments"], json!({}));
        durable_queue(&unrouted, &typed(config.unrouted_queue_type));
        assert!(bound(&unrouted, &unrouted, ""));
        assert!(config.history.enabled);
        let history = config.history_name();
        let front = named("exchanges", &history);
        assert_eq!(front["type"], "fanout");
        assert_eq!(front["durable"], true);
        assert_eq!(front["arguments"], json!({}));
        durable_queue(&history, &history_arguments(&config));
        assert!(bound(&history, &history, ""));
        assert!(definitions["bindings"].as_array().unwrap().iter().any(|b| {
            b["source"] == history
                && b["destination"] == config.exchange
                && b["destination_type"] == "exchange"
        }));
        for queue in &config.queues {
            durable_queue(&queue.name, &queue_arguments(queue));
            for pattern in &queue.bindings {
                assert!(bound(&config.exchange, &queue.name, pattern), "{pattern}");
            }
            if let Some(dlx) = &queue.dead_letter_exchange {
                named("exchanges", dlx);
            }
        }
    }
}
