//! An open-loop load, as HireHop sends: webhooks at a fixed rate whatever the answers, each
//! on a connection of its own, and what reached the broker counted against the 202s.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use tokio_util::sync::CancellationToken;

use crate::harness::{self, NO_ANSWER, message_id, request, webhook};

/// One request of an open-loop load.
#[derive(Debug)]
pub struct Sent {
    pub started: Instant,
    pub took: Duration,
    pub status: StatusCode,
    pub message_id: Option<String>,
    pub spooled: bool,
}

/// Posts webhooks to `addr` at `rate` per second, each on a connection of its own and
/// whatever the answers, until `stop` fires; then returns every request's outcome. A request
/// that gets no answer in [`harness::PATIENCE`] fails the test.
pub async fn open_loop(addr: SocketAddr, rate: u32, stop: CancellationToken) -> Vec<Sent> {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut requests = Vec::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        requests.push(tokio::spawn(async move {
            let started = Instant::now();
            let req = request(Method::POST, "/webhooks/hirehop", webhook("job.updated"));
            let reply = match harness::send(addr, req).await {
                Ok(reply) => reply,
                Err(err) if err.starts_with(NO_ANSWER) => panic!("{err}"),
                Err(err) => panic!("request failed: {err}"),
            };
            let accepted = reply.status == StatusCode::ACCEPTED;
            Sent {
                started,
                took: started.elapsed(),
                status: reply.status,
                message_id: accepted.then(|| reply.message_id()),
                spooled: accepted && reply.json()["status"] == "spooled",
            }
        }));
    }
    let mut sent = Vec::with_capacity(requests.len());
    for request in requests {
        sent.push(request.await.expect("a request task does not panic"));
    }
    sent
}

/// Every request of `sent` got a 202, none later than `limit`; returns the slowest answer.
pub fn assert_all_accepted_within(sent: &[Sent], limit: Duration) -> Duration {
    let refused: Vec<&Sent> = sent
        .iter()
        .filter(|s| s.status != StatusCode::ACCEPTED)
        .collect();
    assert!(
        refused.is_empty(),
        "{} not accepted: {refused:?}",
        refused.len()
    );
    let slowest = sent.iter().map(|s| s.took).max().unwrap();
    assert!(slowest < limit, "slowest answer {slowest:?}");
    slowest
}

/// Takes messages from `queue` until every 202 of `sent` has arrived, and a second more;
/// returns how many arrived more than once.
pub async fn expect_on_broker(queue: &mut harness::TestQueue, sent: &[Sent]) -> usize {
    let ids: HashSet<&str> = sent
        .iter()
        .filter_map(|s| s.message_id.as_deref())
        .collect();
    let mut seen: HashMap<String, usize> = HashMap::new();
    while !ids.iter().all(|id| seen.contains_key(*id)) {
        *seen.entry(message_id(&queue.next().await)).or_default() += 1;
    }
    // Anything still coming (a duplicate behind the last new id) comes quickly.
    while let Ok(delivery) = tokio::time::timeout(Duration::from_secs(1), queue.next()).await {
        *seen.entry(message_id(&delivery)).or_default() += 1;
    }
    seen.values().map(|n| n - 1).sum()
}
