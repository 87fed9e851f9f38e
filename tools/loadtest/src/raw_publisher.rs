//! The baseline: what the broker can confirm when a plain lapin client publishes the same
//! bodies straight to it, the way the relay does it minus HTTP and the relay's own work.
//!
//! Like the relay: one connection with the relay's default frame size and heartbeat,
//! `channels` confirm-mode channels picked round-robin per message, persistent
//! messages published with `mandatory`, and each publisher waiting for its own message's
//! confirm, so the number of messages in flight equals the number of workers. Unlike the
//! relay, the properties are minimal by default (persistent, content type): the relay's
//! headers are part of the overhead being measured. With
//! `--raw-properties relay` the raw publisher sends the relay's properties and headers too,
//! built per message as the relay builds them (see [`relay_properties`]), which separates what the headers
//! cost the broker from what the relay process costs.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use sha2::{Digest, Sha256};

use crate::load::{Client, REQUEST_TIMEOUT};
use crate::payload::Webhook;
use crate::stats::Outcome;

/// The relay's default `amqp.frame_max_bytes`.
const RELAY_FRAME_MAX: u32 = 8192;
/// The heartbeat the relay asks for unless its URL sets one.
const RELAY_HEARTBEAT_SECS: u16 = 5;

/// Which AMQP properties the raw publisher sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RawProperties {
    /// Persistent and a content type: the least the broker must store.
    Minimal,
    /// What the relay sends (message id, timestamp, app id, type, and its headers).
    Relay,
}

struct Shared {
    connection: Connection,
    channels: Vec<Channel>,
    next: AtomicUsize,
    exchange: ShortString,
    properties: RawProperties,
}

/// A publisher handle; each worker holds a clone.
#[derive(Clone)]
pub struct RawPublisher {
    shared: Arc<Shared>,
}

impl RawPublisher {
    /// Connects to `url` as the relay does by default (its frame size, which sizes lapin's
    /// buffers, and its heartbeat; either in `url` wins), naming the connection `name` on the
    /// broker.
    pub async fn connect(
        name: &str,
        url: &str,
        exchange: &str,
        channels: usize,
        properties: RawProperties,
    ) -> anyhow::Result<Self> {
        let mut uri: AMQPUri = url
            .parse()
            .map_err(|err| anyhow::anyhow!("invalid AMQP URL {url}: {err}"))?;
        uri.query.frame_max.get_or_insert(RELAY_FRAME_MAX);
        uri.query.heartbeat.get_or_insert(RELAY_HEARTBEAT_SECS);
        let properties_of_connection =
            ConnectionProperties::default().with_connection_name(name.into());
        let connection = Connection::connect_uri(uri, properties_of_connection)
            .await
            .with_context(|| format!("raw publisher: cannot connect to {url}"))?;
        let mut opened = Vec::with_capacity(channels);
        for _ in 0..channels {
            let channel = connection
                .create_channel()
                .await
                .context("raw publisher: failed to open a channel")?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .context("raw publisher: failed to enable confirms")?;
            opened.push(channel);
        }
        Ok(RawPublisher {
            shared: Arc::new(Shared {
                connection,
                channels: opened,
                next: AtomicUsize::new(0),
                exchange: exchange.into(),
                properties,
            }),
        })
    }

    /// `count` worker handles.
    pub fn clients(&self, count: usize) -> Vec<RawPublisher> {
        vec![self.clone(); count]
    }

    pub async fn close(&self) {
        if let Err(err) = self.shared.connection.close(200, "bench done".into()).await {
            eprintln!("warning: raw publisher did not close cleanly: {err}");
        }
    }

    /// Publishes `webhook` and waits for its confirm (the bare relay's whole work too).
    pub async fn publish_confirmed(&self, webhook: &Webhook) -> Outcome {
        match tokio::time::timeout(REQUEST_TIMEOUT, self.publish(webhook)).await {
            Ok(Ok(Confirmation::Ack(None))) => Outcome::Accepted,
            Ok(Ok(Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)))) => {
                Outcome::Rejected("returned".to_owned())
            }
            Ok(Ok(Confirmation::Nack(None))) => Outcome::Rejected("nack".to_owned()),
            Ok(Ok(Confirmation::NotRequested)) => Outcome::Rejected("no confirm".to_owned()),
            Ok(Err(err)) => Outcome::Failed(err.to_string()),
            Err(_) => Outcome::Failed(format!("no confirm within {REQUEST_TIMEOUT:?}")),
        }
    }

    async fn publish(&self, webhook: &Webhook) -> Result<Confirmation, lapin::Error> {
        let shared = &self.shared;
        let n = shared.next.fetch_add(1, Ordering::Relaxed) % shared.channels.len();
        shared.channels[n]
            .basic_publish(
                shared.exchange.clone(),
                webhook.event.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &webhook.body,
                match shared.properties {
                    RawProperties::Minimal => minimal_properties(),
                    RawProperties::Relay => relay_properties(webhook),
                },
            )
            .await?
            .await
    }
}

impl Client for RawPublisher {
    async fn send(&mut self, webhook: &Webhook) -> Outcome {
        self.publish_confirmed(webhook).await
    }
}

fn minimal_properties() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
}

/// The relay's properties and headers for `webhook`, as the relay builds them (its consumer
/// contract, docs/consumers.md): a fresh UUIDv7 id, received now, the webhook's event, company
/// and user, the body's SHA-256, and a new trace (the bench's requests carry no
/// `traceparent`, so the relay starts one too).
fn relay_properties(webhook: &Webhook) -> BasicProperties {
    let long = |s: String| AMQPValue::LongString(s.into());
    let received_at = SystemTime::now();
    let mut headers = FieldTable::default();
    headers.insert("event".into(), long(webhook.event.to_owned()));
    let integer = |n: u64| AMQPValue::LongLongInt(i64::try_from(n).unwrap_or(i64::MAX));
    headers.insert("company_id".into(), integer(webhook.company_id));
    headers.insert("user_id".into(), integer(webhook.user_id));
    let rfc3339 = humantime::format_rfc3339_millis(received_at).to_string();
    headers.insert("received_at".into(), long(rfc3339));
    let sha256 = hex::encode(Sha256::digest(&webhook.body));
    headers.insert("body_sha256".into(), long(sha256));
    let (trace, span) = (fastrand::u128(1..), fastrand::u64(1..));
    let traceparent = format!("00-{trace:032x}-{span:016x}-01");
    headers.insert("traceparent".into(), long(traceparent));
    let timestamp = received_at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(uuid::Uuid::now_v7().to_string().into())
        .with_timestamp(timestamp)
        .with_app_id("hirehop-relay".into())
        .with_type(webhook.event.into())
        .with_headers(headers)
}
