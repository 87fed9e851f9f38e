//! The baseline: what the broker can confirm when a plain lapin client publishes the same
//! bodies straight to it, the way the relay does it minus HTTP and the relay's own work.
//!
//! Like the relay: one connection made by the relay's own `amqp::connect` (its default frame
//! size), `channels` confirm-mode channels picked round-robin per message, persistent
//! messages published with `mandatory`, and each publisher waiting for its own message's
//! confirm, so the number of messages in flight equals the number of workers. Unlike the
//! relay, the properties are minimal by default (persistent, content type): the relay's
//! headers are part of the overhead being measured. With
//! `--raw-properties relay` the raw publisher sends the relay's properties and headers too,
//! built per message by the relay's own `amqp::properties`, which separates what the headers
//! cost the broker from what the relay process costs.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use anyhow::Context;
use hirehop_relay::config::{AmqpConfig, BrokerUrl};
use hirehop_relay::message::Message;
use hirehop_relay::routing::RoutingKey;
use hirehop_relay::tracecontext::TraceContext;
use hyper::HeaderMap;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation, Connection};

use crate::load::{Client, REQUEST_TIMEOUT};
use crate::payload::Webhook;
use crate::stats::Outcome;

/// Which AMQP properties the raw publisher sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RawProperties {
    /// Persistent and a content type: the least the broker must store.
    Minimal,
    /// What the relay sends (message id, timestamp, app id, type, and its headers), built by
    /// the relay's own `amqp::properties`.
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
    /// Connects to `url` exactly as the relay does with `amqp` (its frame size and connect
    /// timeout; a `frame_max` in `url` wins), naming the connection `name` on the broker.
    pub async fn connect(
        name: &str,
        amqp: &AmqpConfig,
        url: &str,
        exchange: &str,
        channels: usize,
        properties: RawProperties,
    ) -> anyhow::Result<Self> {
        let connection = hirehop_relay::amqp::connect(amqp, &BrokerUrl::new(url), name.into())
            .await
            .context("raw publisher")?;
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

/// The relay's properties and headers for `webhook`, built by the relay's own
/// [`hirehop_relay::amqp::properties`] from the message the relay would build for it: a fresh
/// UUIDv7 id, received now, the webhook's event, company and user, and a new trace (the
/// bench's requests carry no `traceparent`, so the relay starts one too).
fn relay_properties(webhook: &Webhook) -> BasicProperties {
    let trace = TraceContext::from_headers(&HeaderMap::new());
    let message = Message {
        routing_key: RoutingKey::new("", webhook.event)
            .expect("the bench's event names are valid routing keys"),
        event: webhook.event.to_owned(),
        body: webhook.body.clone(),
        message_id: uuid::Uuid::now_v7().to_string(),
        company_id: Some(webhook.company_id),
        user_id: Some(webhook.user_id),
        received_at: SystemTime::now(),
        replayed: false,
        traceparent: trace.to_string(),
        tracestate: trace.tracestate,
    };
    hirehop_relay::amqp::properties(&message)
}
