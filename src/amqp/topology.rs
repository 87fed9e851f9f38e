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
//!   published.

use std::fmt::Write as _;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};

use crate::amqp::connect::protocol_error;
use crate::amqp::{ConnectError, integer, long_string};
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
    // Best effort: the connection stays either way.
    let _ = channel.close(200, "topology declared".into()).await;
    Ok(())
}

/// Whether `amqp.exchange` exists, asked passively (a declaration that creates nothing and
/// compares nothing), on a channel of its own: the broker closes the channel when it does not.
pub async fn exchange_exists(
    config: &AmqpConfig,
    connection: &Connection,
) -> Result<bool, ConnectError> {
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
            config.exchange.as_str().into(),
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
                what: format!("exchange {} (passive check)", config.exchange),
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

/// Declares the per-event queue for `routing_key` and binds it.
pub async fn declare_event_queue(
    config: &AmqpConfig,
    channel: &Channel,
    routing_key: &str,
) -> Result<(), ConnectError> {
    let name = event_queue_name(config, routing_key);
    declare_queue(channel, &name, &typed(config.per_event_queue_type)).await?;
    bind(channel, &name, &config.exchange, routing_key).await
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
