//! How long a broker goes without confirming anything while publishes wait on it: the number
//! to compare with `amqp.stall_timeout_ms` before lowering it (the relay calls a connection
//! stalled after that long a silence).
//!
//! Publishes persistent 700-byte messages with confirms to a temporary queue of its own,
//! from `CONCURRENCY` tasks on 4 channels, at `RATE` per second (0: each task as fast as its
//! confirms come back), for `SECONDS`; then prints the confirm latency and the longest time
//! no confirm arrived while at least one publish waited. Deletes its queue at the end.
//!
//! ```text
//! cargo run --release --example confirm_silence -- [RATE] [CONCURRENCY] [SECONDS] [quorum|classic]
//! AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f     # the default
//! ```

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

/// What the confirms showed so far.
struct Seen {
    waiting: usize,
    /// The later of: the last confirm, the moment a publish began waiting on an idle link.
    quiet_since: Instant,
    longest_silence: Duration,
    latencies: Vec<Duration>,
}

impl Seen {
    fn sent(&mut self, now: Instant) {
        if self.waiting == 0 {
            self.quiet_since = now;
        }
        self.waiting += 1;
    }

    fn confirmed(&mut self, sent: Instant, now: Instant) {
        self.longest_silence = self.longest_silence.max(now - self.quiet_since);
        self.quiet_since = now;
        self.waiting -= 1;
        self.latencies.push(now - sent);
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let number = |i: usize, default: u64| -> anyhow::Result<u64> {
        args.get(i).map_or(Ok(default), |arg| {
            arg.parse().with_context(|| format!("not a number: {arg}"))
        })
    };
    let rate = number(0, 200)?;
    let concurrency = usize::try_from(number(1, 32)?)?.max(1);
    let seconds = number(2, 15)?;
    let kind = args.get(3).map_or("quorum", String::as_str);
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());

    let connection = Connection::connect(&url, ConnectionProperties::default())
        .await
        .context("failed to connect (set AMQP_URL)")?;
    let queue = format!("confirm-silence-{}", std::process::id());
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString(kind.into()));
    let setup = connection.create_channel().await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    setup
        .queue_declare(queue.as_str().into(), durable, arguments)
        .await
        .with_context(|| format!("failed to declare the {kind} queue {queue}"))?;
    let mut channels = Vec::new();
    for _ in 0..4 {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        channels.push(channel);
    }

    let seen = Arc::new(Mutex::new(Seen {
        waiting: 0,
        quiet_since: Instant::now(),
        longest_silence: Duration::ZERO,
        latencies: Vec::new(),
    }));
    let end = Instant::now() + Duration::from_secs(seconds);
    let per_task = (rate > 0).then(|| Duration::from_secs_f64(concurrency as f64 / rate as f64));
    let mut tasks = Vec::new();
    for i in 0..concurrency {
        let channel = channels[i % channels.len()].clone();
        let (seen, queue) = (Arc::clone(&seen), queue.clone());
        tasks.push(tokio::spawn(async move {
            let mut tick = per_task.map(tokio::time::interval);
            let mut waits = Vec::new();
            while Instant::now() < end {
                match &mut tick {
                    Some(tick) => {
                        tick.tick().await;
                        let (channel, seen, queue) =
                            (channel.clone(), Arc::clone(&seen), queue.clone());
                        waits.push(tokio::spawn(async move {
                            publish(&channel, &queue, &seen).await
                        }));
                    }
                    None => publish(&channel, &queue, &seen).await?,
                }
            }
            for wait in waits {
                wait.await??;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let _ = setup
        .queue_delete(queue.as_str().into(), Default::default())
        .await;

    let mut seen = seen
        .lock()
        .map_err(|_| anyhow::anyhow!("a task panicked"))?;
    seen.latencies.sort();
    let n = seen.latencies.len();
    anyhow::ensure!(n > 0, "nothing was confirmed");
    let at = |q: f64| seen.latencies[((n as f64 * q) as usize).min(n - 1)];
    println!(
        "{kind} queue, {n} confirmed in {seconds} s ({:.0}/s), {concurrency} at once: confirm \
         latency p50 {:.1?} p99 {:.1?} p99.9 {:.1?} max {:.1?}; longest silence with \
         publishes waiting {:.1?}",
        n as f64 / seconds as f64,
        at(0.5),
        at(0.99),
        at(0.999),
        seen.latencies[n - 1],
        seen.longest_silence,
    );
    Ok(())
}

async fn publish(channel: &Channel, queue: &str, seen: &Mutex<Seen>) -> anyhow::Result<()> {
    let sent = Instant::now();
    if let Ok(mut seen) = seen.lock() {
        seen.sent(sent);
    }
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            &[b'x'; 700],
            BasicProperties::default().with_delivery_mode(2),
        )
        .await?;
    confirm.await?;
    if let Ok(mut seen) = seen.lock() {
        seen.confirmed(sent, Instant::now());
    }
    Ok(())
}
