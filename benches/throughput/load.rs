//! The two load shapes, independent of what is loaded (the relay or the floor over HTTP, or
//! the broker through the raw publisher).
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

/// Runs one worker per client until the window ends; returns the merged tally.
pub async fn closed_loop<C: Client>(
    clients: Vec<C>,
    webhooks: Arc<[Webhook]>,
    window: Window,
) -> Tally {
    let workers = clients.len();
    let tasks = clients.into_iter().enumerate().map(|(k, mut client)| {
        let webhooks = Arc::clone(&webhooks);
        tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut i = k;
            while Instant::now() < window.end {
                let webhook = &webhooks[i % webhooks.len()];
                i += workers;
                let sent = Instant::now();
                let outcome = client.send(webhook).await;
                let done = Instant::now();
                let in_window = window.contains(done);
                tally.record(in_window, in_window, sent, sent, done, outcome);
            }
            tally
        })
    });
    join(tasks.collect()).await
}

/// Runs `clients.len()` workers that together send `rate` requests per second from
/// `window.begin` until `window.end` (intended times), then waits for the last answers.
pub async fn open_loop<C: Client>(
    clients: Vec<C>,
    webhooks: Arc<[Webhook]>,
    rate: f64,
    window: Window,
) -> Tally {
    let workers = clients.len();
    let tasks = clients.into_iter().enumerate().map(|(k, mut client)| {
        let webhooks = Arc::clone(&webhooks);
        tokio::spawn(async move {
            let mut tally = Tally::default();
            for i in (k..).step_by(workers) {
                let intended = window.begin + Duration::from_secs_f64(i as f64 / rate);
                if intended >= window.end {
                    break;
                }
                tokio::time::sleep_until(intended.into()).await;
                let sent = Instant::now();
                let outcome = client.send(&webhooks[i % webhooks.len()]).await;
                let done = Instant::now();
                // Throughput counts answers within the window, as in the closed loop (counting
                // by intended time would show any system that answers at all at full rate);
                // latency is for the requests intended within it.
                let (answered, timed) = (window.contains(done), window.contains(intended));
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
