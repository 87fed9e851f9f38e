//! `hirehop-relay tail`: binds a temporary exclusive queue to the exchange with a pattern and
//! prints each message as it arrives. The body's `export_key` is shown as `<redacted>`:
//! terminal output ends up in tickets and chats.

use std::io::Write;

use futures_lite::StreamExt;
use lapin::Connection;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Map, Value, json};

use super::ConnectError;
use crate::config::AmqpConfig;

#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error(transparent)]
    Connect(ConnectError),
    #[error("failed to bind a queue to {exchange} with {pattern:?}: {cause}")]
    Bind {
        exchange: String,
        pattern: String,
        cause: lapin::Error,
    },
    #[error("lost the broker: {0}")]
    Consume(lapin::Error),
    #[error("failed to write: {0}")]
    Write(#[from] std::io::Error),
}

/// Prints messages matching `pattern` to `out` until the connection ends.
pub async fn tail(
    config: &AmqpConfig,
    pattern: &str,
    json_lines: bool,
    out: &mut impl Write,
) -> Result<(), TailError> {
    let connection = connect(config).await?;
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
        let record = Record::from(&delivery);
        if json_lines {
            writeln!(out, "{}", record.to_json())?;
        } else {
            write!(out, "{}", record.pretty())?;
        }
        out.flush()?;
    }
    Ok(())
}

async fn connect(config: &AmqpConfig) -> Result<Connection, TailError> {
    let mut last = None;
    for node in config.nodes() {
        match super::connect(config, node, "hirehop-relay tail".to_owned()).await {
            Ok(connection) => return Ok(connection),
            Err(err) => last = Some(err),
        }
    }
    Err(TailError::Connect(
        last.expect("config has at least one broker URL"),
    ))
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
