//! A broker that stops answering instead of failing: the proxy holds every byte both ways
//! (the TCP connection stays open, as with a frozen broker process or a network that drops
//! packets), under an open-loop load. The relay notices within `amqp.stall_timeout_ms`,
//! spools, says so on `/readyz`, and loses nothing.

use std::time::{Duration, Instant};

use hyper::StatusCode;
use tokio_util::sync::CancellationToken;

use crate::harness::{TestRelay, broker_addr, sample, scrape, wait_readyz};
use crate::load::{assert_all_accepted_within, expect_on_broker, open_loop};
use crate::proxy::Proxy;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_broker_under_load_costs_a_second_not_a_webhook() {
    const RATE: u32 = 200;
    let proxy = Proxy::start(broker_addr()).await;
    // An in-flight cap that 5 s waits at this rate (the old behaviour: ~1,000 held at once)
    // would overflow, so a relay that waits out the confirm timeout gets 503s here.
    let relay = TestRelay::builder()
        .env("RELAY_HTTP__MAX_IN_FLIGHT", "500")
        .env("RELAY_AMQP__STALL_TIMEOUT_MS", "1000")
        // One address stands in for HireHop's several.
        .env("RELAY_HTTP__MAX_CONNECTIONS_PER_IP", "4096")
        .via(&proxy)
        .start()
        .await;
    let mut queue = relay.queue("#").await;
    let stop = CancellationToken::new();
    let load = tokio::spawn(open_loop(relay.addr, RATE, stop.clone()));

    tokio::time::sleep(Duration::from_secs(2)).await;
    let stalled_at = Instant::now();
    proxy.stall(true);
    let stalled = wait_readyz(relay.addr, "the broker stalled", |reply| {
        let body = reply.json();
        body["broker"] == "stalled" && body["status"] == "degraded"
    })
    .await;
    let noticed = stalled_at.elapsed();
    assert_eq!(stalled.status, StatusCode::OK, "{stalled:?}");
    let reason = stalled.json()["broker_error"]
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

    // One threshold, then the spool's fsync: far from the 5 s confirm timeout.
    let slowest = assert_all_accepted_within(&sent, Duration::from_millis(2500));
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
