//! A broker that stops answering instead of failing: the proxy holds every byte both ways
//! (the TCP connection stays open, as with a frozen broker process or a network that drops
//! packets), under an open-loop load. The relay notices within `amqp.stall_timeout_ms`,
//! spools, says so on `/readyz`, and loses nothing.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use tokio_util::sync::CancellationToken;

use crate::harness::{
    self, NO_ANSWER, PATIENCE, TestRelay, broker_addr, message_id, request, sample, scrape, webhook,
};
use crate::proxy::Proxy;

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
/// that gets no answer in [`PATIENCE`] fails the test.
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

/// Polls `/readyz` until `check` passes on its body; returns when it did.
pub async fn wait_readyz(addr: SocketAddr, what: &str, check: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let reply = harness::send(addr, request(Method::GET, "/readyz", ""))
            .await
            .expect("/readyz answers");
        let body = reply.json();
        if check(&body) {
            return;
        }
        assert!(Instant::now() < deadline, "/readyz never {what}: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_broker_under_load_costs_a_second_not_a_webhook() {
    const RATE: u32 = 200;
    let proxy = Proxy::start(broker_addr()).await;
    // An in-flight cap that 5 s waits at this rate (the old behaviour: ~1,000 held at once)
    // would overflow, so a relay that waits out the confirm timeout gets 503s here.
    let relay = TestRelay::start_via(
        &proxy,
        &[
            ("RELAY_HTTP__MAX_IN_FLIGHT", "500"),
            ("RELAY_AMQP__STALL_TIMEOUT_MS", "1000"),
            // One address stands in for HireHop's several.
            ("RELAY_HTTP__MAX_CONNECTIONS_PER_IP", "4096"),
        ],
    )
    .await;
    let mut queue = relay.queue("#").await;
    let stop = CancellationToken::new();
    let load = tokio::spawn(open_loop(relay.addr, RATE, stop.clone()));

    tokio::time::sleep(Duration::from_secs(2)).await;
    let stalled_at = Instant::now();
    proxy.stall(true);
    wait_readyz(relay.addr, "said the broker stalled", |body| {
        body["broker"] == "stalled" && body["status"] == "degraded"
    })
    .await;
    let noticed = stalled_at.elapsed();
    let readyz = harness::send(relay.addr, request(Method::GET, "/readyz", ""))
        .await
        .unwrap();
    assert_eq!(readyz.status, StatusCode::OK, "{readyz:?}");
    let reason = readyz.json()["broker_error"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(reason.contains("stopped answering"), "{reason}");

    // Frozen for 6 s in all; then everything held goes through, publishes included.
    tokio::time::sleep(Duration::from_secs(6).saturating_sub(stalled_at.elapsed())).await;
    proxy.stall(false);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let sent = load.await.unwrap();

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
    // One threshold, then the spool's fsync: far from the 5 s confirm timeout.
    assert!(
        slowest < Duration::from_millis(2500),
        "slowest answer {slowest:?}"
    );
    assert!(
        noticed < Duration::from_secs(3),
        "/readyz said stalled after {noticed:?}"
    );
    let metrics = scrape(relay.addr).await;
    assert!(
        sample(&metrics, "hirehop_relay_broker_stalls_total") >= 1.0,
        "{metrics}"
    );

    // Every 202 reaches the broker; some twice: those handed to the broker before the stall
    // was noticed, which were spooled too.
    let duplicates = expect_on_broker(&mut queue, &sent).await;
    // Only webhooks whose publish began before the stall was noticed can be duplicates.
    let before_noticed = sent
        .iter()
        .filter(|s| s.spooled && s.started < stalled_at + noticed)
        .count();
    eprintln!(
        "stall: {} requests, {} spooled, noticed on /readyz after {noticed:?}, slowest answer \
         {slowest:?}, {duplicates} duplicates (bound {before_noticed})",
        sent.len(),
        sent.iter().filter(|s| s.spooled).count(),
    );
    assert!(
        duplicates <= before_noticed,
        "{duplicates} duplicates, more than the {before_noticed} spooled before the stall was noticed"
    );
    relay.stop().await;
}
