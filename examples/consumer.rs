//! A consumer of the messages hirehop-relay publishes: the pattern a real integration follows.
//!
//! It declares a quorum queue bound to the relay's exchange and a dead-letter queue
//! `<QUEUE>.dead` beside it, takes messages with manual acknowledgements and a bounded
//! prefetch, and skips duplicates by `message_id` (delivery is at-least-once). A message its
//! handler fails on is rejected without requeue, and the broker moves it to the dead-letter
//! queue (at-least-once dead-lettering: it is not dropped on the way), where it stays until
//! someone looks at it. The README's Python and Node.js consumers do the same.
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
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};

/// Your work goes here. An error sends the message to the dead-letter queue; this placeholder
/// prints the webhook and refuses one without `data.ID`, to show that path.
fn handle(event: &str, webhook: &serde_json::Value) -> Result<(), String> {
    let id = &webhook["data"]["ID"];
    if id.is_null() {
        return Err("no data.ID".to_owned());
    }
    println!("{event}: data.ID={id} company={}", webhook["company_id"]);
    Ok(())
}

/// Remembers the last `capacity` message ids. A real consumer keeps them where its work goes
/// (a unique key in its database, written in the same transaction).
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

    fn contains(&self, id: &str) -> bool {
        self.seen.contains(id)
    }

    fn insert(&mut self, id: &str) {
        if self.order.len() == self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.seen.remove(&oldest);
        }
        self.seen.insert(id.to_owned());
        self.order.push_back(id.to_owned());
    }
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(value.into())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let exchange = std::env::var("EXCHANGE").unwrap_or_else(|_| "hirehop".to_owned());
    let mut args = std::env::args().skip(1);
    let queue = args.next().unwrap_or_else(|| "hirehop.jobs".to_owned());
    let binding = args.next().unwrap_or_else(|| "job.#".to_owned());
    let dead = format!("{queue}.dead");

    let connection = Connection::connect(&url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    // A small prefetch bounds the work in progress if this consumer dies.
    channel.basic_qos(32, BasicQosOptions::default()).await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    // Quorum queues, as the relay's own queues: a message is stored on a majority of nodes.
    let mut dead_arguments = FieldTable::default();
    dead_arguments.insert("x-queue-type".into(), text("quorum"));
    channel
        .queue_declare(dead.as_str().into(), durable, dead_arguments)
        .await?;
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), text("quorum"));
    // Rejected messages go through the default exchange ("") to the queue named `dead`,
    // which confirms them before this queue lets go of them (needs reject-publish).
    arguments.insert("x-dead-letter-exchange".into(), text(""));
    arguments.insert("x-dead-letter-routing-key".into(), text(&dead));
    arguments.insert("x-dead-letter-strategy".into(), text("at-least-once"));
    arguments.insert("x-overflow".into(), text("reject-publish"));
    // A message that keeps killing the consumer goes to `dead` after 5 deliveries.
    arguments.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(5));
    channel
        .queue_declare(queue.as_str().into(), durable, arguments)
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
    println!("consuming {queue} (bound to {exchange} with {binding}; dead letters in {dead})");

    let mut handled = Dedupe::new(10_000);
    while let Some(delivery) = deliveries.next().await {
        let delivery = delivery?;
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.to_string())
            .unwrap_or_default();
        if handled.contains(&id) {
            println!("{id}: duplicate, skipped");
            delivery.acker.ack(BasicAckOptions::default()).await?;
            continue;
        }
        // The `type` property is the event name, without the routing key's prefix or template.
        let event = delivery
            .properties
            .kind()
            .as_ref()
            .map(|kind| kind.to_string())
            .unwrap_or_default();
        let outcome = serde_json::from_slice::<serde_json::Value>(&delivery.data)
            .map_err(|err| format!("not JSON: {err}"))
            .and_then(|webhook| handle(&event, &webhook));
        match outcome {
            Ok(()) => {
                handled.insert(&id);
                delivery.acker.ack(BasicAckOptions::default()).await?;
            }
            Err(err) => {
                println!("{id}: dead-lettered: {err}");
                let reject = BasicRejectOptions { requeue: false };
                delivery.acker.reject(reject).await?;
            }
        }
    }
    Ok(())
}
