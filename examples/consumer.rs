//! A consumer of the messages hirehop-relay publishes: the pattern a real integration follows.
//!
//! It declares a durable queue bound to the relay's exchange, takes messages with manual
//! acknowledgements and a bounded prefetch, skips duplicates by `message_id` (delivery is
//! at-least-once), and rejects a message it cannot handle without requeueing it, so a queue
//! with a dead-letter exchange keeps it for inspection instead of looping on it.
//!
//! ```text
//! cargo run --example consumer -- [QUEUE] [BINDING]     # defaults: hirehop.jobs job.#
//! AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f EXCHANGE=hirehop
//! ```

use std::collections::{HashSet, VecDeque};

use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};

/// Remembers the last `capacity` message ids.
struct Dedupe {
    seen: HashSet<String>,
    order: VecDeque<String>,
    capacity: usize,
}

impl Dedupe {
    fn new(capacity: usize) -> Self {
        Dedupe {
            seen: HashSet::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    /// True the first time `id` is seen.
    fn first_time(&mut self, id: &str) -> bool {
        if self.seen.contains(id) {
            return false;
        }
        if self.order.len() == self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.seen.remove(&oldest);
        }
        self.seen.insert(id.to_owned());
        self.order.push_back(id.to_owned());
        true
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let exchange = std::env::var("EXCHANGE").unwrap_or_else(|_| "hirehop".to_owned());
    let mut args = std::env::args().skip(1);
    let queue = args.next().unwrap_or_else(|| "hirehop.jobs".to_owned());
    let binding = args.next().unwrap_or_else(|| "job.#".to_owned());

    let connection = Connection::connect(&url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    // A small prefetch bounds the work in progress if this consumer dies.
    channel.basic_qos(32, BasicQosOptions::default()).await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(queue.as_str().into(), durable, FieldTable::default())
        .await?;
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            binding.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut deliveries = channel
        .basic_consume(
            queue.as_str().into(),
            "example-consumer".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    println!("consuming {queue} (bound to {exchange} with {binding})");

    let mut dedupe = Dedupe::new(10_000);
    while let Some(delivery) = deliveries.next().await {
        let delivery = delivery?;
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.to_string())
            .unwrap_or_default();
        if !dedupe.first_time(&id) {
            println!("{id}: duplicate, skipped");
            delivery.acker.ack(BasicAckOptions::default()).await?;
            continue;
        }
        match serde_json::from_slice::<serde_json::Value>(&delivery.data) {
            Ok(webhook) => {
                println!(
                    "{id}: {} company={} data.ID={}",
                    delivery.routing_key, webhook["company_id"], webhook["data"]["ID"]
                );
                delivery.acker.ack(BasicAckOptions::default()).await?;
            }
            Err(err) => {
                eprintln!("{id}: cannot handle the message: {err}");
                let reject = BasicRejectOptions { requeue: false };
                delivery.acker.reject(reject).await?;
            }
        }
    }
    Ok(())
}
