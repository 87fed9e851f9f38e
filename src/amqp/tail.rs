//! `hirehop-relay tail`: binds a temporary exclusive queue to the exchange with a pattern and
//! prints each message as it arrives; with `--since`, reads the history stream from that time
//! on instead, the past first, then what arrives. The body's `export_key` is shown as
//! `<redacted>`: terminal output ends up in tickets and chats.

use std::io::Write;
use std::time::SystemTime;

use futures_lite::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Map, Value, json};

use super::history::{Filter, HistoryError, Reader, Start};
use super::{ConnectError, connect_any};
use crate::config::AmqpConfig;
use crate::routing::{EventNameError, TopicPattern};

#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("failed to bind a queue to {exchange} with {pattern:?}: {cause}")]
    Bind {
        exchange: String,
        pattern: String,
        cause: lapin::Error,
    },
    #[error("invalid pattern {pattern:?}: {cause}")]
    Pattern {
        pattern: String,
        cause: EventNameError,
    },
    #[error(transparent)]
    History(#[from] HistoryError),
    #[error("lost the broker: {0}")]
    Consume(lapin::Error),
    #[error("failed to write: {0}")]
    Write(#[from] std::io::Error),
}

/// Prints messages matching `pattern` to `out` until the connection ends: those published
/// from now on, or with `since`, those the history stream holds from then on, and on.
pub async fn tail(
    config: &AmqpConfig,
    pattern: &str,
    since: Option<SystemTime>,
    json_lines: bool,
    out: &mut impl Write,
) -> Result<(), TailError> {
    // The history is matched here against each routing key, so its pattern is checked here,
    // before connecting; a live tail hands the pattern to the broker's binding.
    let history = match since {
        Some(since) => {
            let parsed = TopicPattern::parse(pattern).map_err(|cause| TailError::Pattern {
                pattern: pattern.to_owned(),
                cause,
            })?;
            Some((parsed, since))
        }
        None => None,
    };
    let connection = connect_any(config, "hirehop-relay tail").await?;
    if let Some((pattern, since)) = history {
        return tail_history(&connection, config, &pattern, since, json_lines, out).await;
    }
    let channel = connection
        .create_channel()
        .await
        .map_err(TailError::Consume)?;
    let bind_error = |cause| TailError::Bind {
        exchange: config.exchange.clone(),
        pattern: pattern.to_owned(),
        cause,
    };
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
        .map_err(bind_error)?;
    channel
        .queue_bind(
            queue.name().clone(),
            config.exchange.as_str().into(),
            pattern.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(bind_error)?;
    let mut deliveries = channel
        .basic_consume(
            queue.name().clone(),
            "hirehop-relay-tail".into(),
            BasicConsumeOptions {
                no_ack: true,
                exclusive: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(TailError::Consume)?;
    eprintln!(
        "tailing exchange {} with pattern {pattern} (Ctrl-C to stop)",
        config.exchange
    );
    while let Some(delivery) = deliveries.next().await {
        let delivery = delivery.map_err(TailError::Consume)?;
        print(&delivery, json_lines, out)?;
    }
    Ok(())
}

/// `tail --since`: the history stream from `since` on. It holds every webhook, routed or
/// not, so `pattern` is matched here against each routing key, as a binding would.
async fn tail_history(
    connection: &lapin::Connection,
    config: &AmqpConfig,
    pattern: &TopicPattern,
    since: SystemTime,
    json_lines: bool,
    out: &mut impl Write,
) -> Result<(), TailError> {
    let filter = Filter {
        since: Some(since),
        ..Filter::default()
    };
    let mut reader = Reader::open(connection, config, Start::Since(since), false).await?;
    eprintln!(
        "tailing history stream {} from {} with pattern {pattern}, then what arrives (Ctrl-C to \
         stop)",
        config.history_name(),
        humantime::format_rfc3339_seconds(since)
    );
    while let Some(entry) = reader.next().await? {
        if filter.matches(&entry.message) && pattern.matches(entry.message.routing_key.as_str()) {
            print(&entry.message, json_lines, out)?;
        }
    }
    Ok(())
}

fn print(
    delivery: &lapin::message::Delivery,
    json_lines: bool,
    out: &mut impl Write,
) -> std::io::Result<()> {
    let record = Record::from(delivery);
    if json_lines {
        writeln!(out, "{}", record.to_json())?;
    } else {
        write!(out, "{}", record.pretty())?;
    }
    out.flush()?;
    Ok(())
}

/// One message, in the shape both output formats share.
struct Record {
    routing_key: String,
    properties: Map<String, Value>,
    headers: Map<String, Value>,
    body: Value,
}

impl From<&lapin::message::Delivery> for Record {
    fn from(delivery: &lapin::message::Delivery) -> Record {
        let p = &delivery.properties;
        let mut properties = Map::new();
        let mut put = |name: &str, value: Option<Value>| {
            if let Some(value) = value {
                properties.insert(name.to_owned(), value);
            }
        };
        put(
            "message_id",
            p.message_id().as_ref().map(|v| json!(v.as_str())),
        );
        put("type", p.kind().as_ref().map(|v| json!(v.as_str())));
        put("app_id", p.app_id().as_ref().map(|v| json!(v.as_str())));
        put(
            "content_type",
            p.content_type().as_ref().map(|v| json!(v.as_str())),
        );
        put("delivery_mode", p.delivery_mode().map(|v| json!(v)));
        put("timestamp", p.timestamp().map(|v| json!(v)));
        let headers = p
            .headers()
            .as_ref()
            .map(|h| {
                h.inner()
                    .iter()
                    .map(|(k, v)| (k.to_string(), header_value(v)))
                    .collect()
            })
            .unwrap_or_default();
        let body = match serde_json::from_slice::<Value>(&delivery.data) {
            Ok(mut body) => {
                if let Some(key) = body.get_mut("export_key") {
                    *key = json!("<redacted>");
                }
                body
            }
            Err(_) => json!(String::from_utf8_lossy(&delivery.data)),
        };
        Record {
            routing_key: delivery.routing_key.to_string(),
            properties,
            headers,
            body,
        }
    }
}

impl Record {
    fn to_json(&self) -> Value {
        json!({
            "routing_key": self.routing_key,
            "properties": self.properties,
            "headers": self.headers,
            "body": self.body,
        })
    }

    fn pretty(&self) -> String {
        let mut out = format!("── {}\n", self.routing_key);
        for (name, value) in self.properties.iter().chain(&self.headers) {
            let value = value
                .as_str()
                .map_or_else(|| value.to_string(), str::to_owned);
            out.push_str(&format!("   {name}: {value}\n"));
        }
        let body = serde_json::to_string_pretty(&self.body).unwrap_or_default();
        out.push_str(&body);
        out.push_str("\n\n");
        out
    }
}

fn header_value(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::Timestamp(n) => json!(n),
        other => json!(format!("{other:?}")),
    }
}
