//! The two load shapes, one worker loop, independent of what is loaded (the relay, the floor or
//! the bare relay over HTTP, or the broker through the raw publisher).
//!
//! - **Closed loop**: N workers, each sending its next request as soon as the previous one
//!   was answered. Measures the ceiling at a fixed number of requests in flight.
//! - **Open loop**: N workers sharing a fixed rate; worker `k` sends request `i` at
//!   `begin + (k + i·N) / rate`. A late answer does not delay the schedule: latency is taken
//!   from the *intended* send time, so a stall shows in the percentiles instead of being
//!   hidden by the load generator slowing down (no coordinated omission). Throughput (achieved
//!   per second) counts the answers that arrive within the window, as in the closed loop, so a
//!   system that falls behind the rate shows it there too.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::payload::Webhook;
use crate::stats::{Outcome, Tally, Window};

/// A request that gets no answer in this time is counted as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Something that can deliver one webhook and say how it went. One per worker.
pub trait Client: Send + 'static {
    fn send(&mut self, webhook: &Webhook) -> impl Future<Output = Outcome> + Send;
}

/// Runs one worker per client, from `window.begin` until `window.end`, then waits for the
/// last answers; returns the merged tally. Without a `rate` it is a closed loop; with one, the
/// workers together send `rate` requests per second (intended times), an open loop.
pub async fn run<C: Client>(
    clients: Vec<C>,
    webhooks: Arc<[Webhook]>,
    rate: Option<f64>,
    window: Window,
) -> Tally {
    let workers = clients.len();
    let tasks = clients.into_iter().enumerate().map(|(k, mut client)| {
        let webhooks = Arc::clone(&webhooks);
        tokio::spawn(async move {
            let mut tally = Tally::default();
            for i in (k..).step_by(workers) {
                // Closed: now, the previous answer being in. Open: the schedule's time.
                let intended = match rate {
                    None => Instant::now(),
                    Some(rate) => window.begin + Duration::from_secs_f64(i as f64 / rate),
                };
                if intended >= window.end {
                    break;
                }
                if rate.is_some() {
                    tokio::time::sleep_until(intended.into()).await;
                }
                let sent = Instant::now();
                let outcome = client.send(&webhooks[i % webhooks.len()]).await;
                let done = Instant::now();
                // Throughput counts the answers within the window in both loops (counting by
                // intended time would show any system that answers at all at full rate).
                // Latency: of those answers in a closed loop; of the requests intended within
                // the window in an open one.
                let answered = window.contains(done);
                let timed = match rate {
                    None => answered,
                    Some(_) => window.contains(intended),
                };
                tally.record(answered, timed, intended, sent, done, outcome);
            }
            tally
        })
    });
    join(tasks.collect()).await
}

async fn join(tasks: Vec<tokio::task::JoinHandle<Tally>>) -> Tally {
    let mut total = Tally::default();
    for task in tasks {
        match task.await {
            Ok(tally) => total.merge(tally),
            Err(err) => total.record(
                false,
                false,
                Instant::now(),
                Instant::now(),
                Instant::now(),
                Outcome::Failed(format!("worker ended abnormally: {err}")),
            ),
        }
    }
    total
}
