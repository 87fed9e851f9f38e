//! The baseline: what the broker can confirm when a plain lapin client publishes the same
//! bodies straight to it, the way the relay does it minus HTTP and the relay's own work.
//!
//! Like the relay: one connection, `channels` confirm-mode channels picked round-robin per
//! message, persistent messages published with `mandatory`, and each publisher waiting for
//! its own message's confirm, so the number of messages in flight equals the number of
//! workers. Unlike the relay, the properties are minimal by default (persistent, content
//! type): the relay's headers are part of the overhead being measured. With
//! `--raw-properties relay` the raw publisher sends the relay's properties and headers too,
//! which separates what the headers cost the broker from what the relay process costs.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use sha2::{Digest, Sha256};

use crate::load::{Client, REQUEST_TIMEOUT};
use crate::payload::Webhook;
use crate::stats::Outcome;

/// Which AMQP properties the raw publisher sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RawProperties {
    /// Persistent and a content type: the least the broker must store.
    Minimal,
    /// What the relay sends: message id, timestamp, app id, type, and its headers.
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
    pub async fn connect(
        url: &str,
        exchange: &str,
        channels: usize,
        properties: RawProperties,
    ) -> anyhow::Result<Self> {
        let connection_properties =
            ConnectionProperties::default().with_connection_name("hirehop-relay bench raw".into());
        let connection = Connection::connect(url, connection_properties)
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
}

fn minimal_properties() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
}

/// The relay's properties and headers for `webhook` (see the relay's README), computed the
/// same way: a fresh message id, the body's SHA-256, the receive time, a trace context.
fn relay_properties(webhook: &Webhook) -> BasicProperties {
    let now = SystemTime::now();
    let text = |s: String| AMQPValue::LongString(s.into());
    let mut headers = FieldTable::default();
    headers.insert("event".into(), text(webhook.event.to_owned()));
    headers.insert("company_id".into(), AMQPValue::LongLongInt(1));
    headers.insert("user_id".into(), AMQPValue::LongLongInt(1));
    headers.insert(
        "received_at".into(),
        text(humantime::format_rfc3339_millis(now).to_string()),
    );
    headers.insert(
        "body_sha256".into(),
        text(hex::encode(Sha256::digest(&webhook.body))),
    );
    headers.insert(
        "traceparent".into(),
        text(format!(
            "00-{:032x}-{:016x}-01",
            fastrand::u128(..),
            fastrand::u64(..)
        )),
    );
    let timestamp = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    minimal_properties()
        .with_message_id(uuid::Uuid::now_v7().to_string().into())
        .with_timestamp(timestamp)
        .with_app_id("hirehop-relay".into())
        .with_type(webhook.event.into())
        .with_headers(headers)
}
