//! What the relay does while the broker is slow to confirm: a broker that stops confirming,
//! and many confirms waiting at once on one channel.

use std::time::{Duration, Instant};

use hyper::StatusCode;
use lapin::types::AMQPValue;

use crate::harness::{
    self, PATIENCE, TestRelay, broker_addr, eventually, message_id, scrape, wait_readyz, webhook,
};
use crate::proxy::Proxy;

#[tokio::test]
async fn a_broker_that_stops_confirming_gives_503_or_goes_to_the_spool_at_the_stall_threshold() {
    for spool in ["false", "true"] {
        let proxy = Proxy::start(broker_addr()).await;
        let relay = TestRelay::builder()
            .env("RELAY_AMQP__STALL_TIMEOUT_MS", "500")
            .env("RELAY_SPOOL__ENABLED", spool)
            .via(&proxy)
            .start()
            .await;
        let mut queue = relay.queue("#").await;
        // The publish leaves the relay, but neither it nor its confirm gets through.
        proxy.stall(true);
        let started = Instant::now();
        let reply = relay.post(webhook("job.updated")).await;
        let waited = started.elapsed();
        // The stall threshold, not the 5 s confirm timeout.
        assert!(
            waited >= Duration::from_millis(500) && waited < Duration::from_secs(3),
            "{waited:?}"
        );
        let metrics = scrape(relay.addr).await;
        assert_eq!(
            harness::sample(
                &metrics,
                r#"hirehop_relay_publishes_total{outcome="stalled"}"#
            ),
            1.0,
            "{metrics}"
        );
        if spool == "false" {
            reply.assert_unavailable();
            // The stalled connection is replaced once the broker answers again.
            proxy.cut();
            proxy.stall(false);
            wait_readyz(relay.addr, "the relay reconnected", |reply| {
                reply.status == StatusCode::OK
            })
            .await;
            let next = relay.post(webhook("job.updated")).await;
            assert_eq!(next.status, StatusCode::ACCEPTED, "{next:?}");
            assert_eq!(next.json()["status"], "accepted");
        } else {
            assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
            assert_eq!(reply.json()["status"], "spooled");
            // The publish held by the proxy dies with the connection, so only the spool can
            // bring it: replay does, once the relay has reconnected.
            proxy.cut();
            proxy.stall(false);
            let delivery = queue.next().await;
            assert_eq!(message_id(&delivery), reply.message_id());
            let headers = delivery.properties.headers().as_ref().unwrap().inner();
            assert_eq!(
                headers.get("replayed"),
                Some(&AMQPValue::Boolean(true)),
                "the first publish went through the cut?"
            );
        }
        relay.stop().await;
    }
}

#[tokio::test]
async fn one_channel_carries_many_confirms_at_once() {
    const WEBHOOKS: usize = 8;
    let proxy = Proxy::start(broker_addr()).await;
    let relay = TestRelay::builder()
        .env("RELAY_AMQP__CHANNELS", "1")
        .env("RELAY_AMQP__CONFIRM_TIMEOUT_MS", "15000")
        .env("RELAY_AMQP__STALL_TIMEOUT_MS", "15000")
        .env("RELAY_SPOOL__ENABLED", "false")
        .via(&proxy)
        .start()
        .await;
    let mut queue = relay.queue("#").await;
    let body = webhook("job.updated");
    // What one publish (method, header and body frames) sends the broker.
    let before = proxy.bytes_from_client();
    let first = relay.post(body.clone()).await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{first:?}");
    let one_publish = proxy.bytes_from_client() - before;
    proxy.stall(true);
    let before = proxy.bytes_from_client();
    let addr = relay.addr;
    let posts: Vec<_> = (0..WEBHOOKS)
        .map(|_| {
            let body = body.clone();
            tokio::spawn(async move {
                harness::send(
                    addr,
                    harness::request(hyper::Method::POST, "/webhooks/hirehop", body),
                )
                .await
            })
        })
        .collect();
    // Every publish reaches the (stalled) broker side before any confirm can come back: the
    // channel is not held while a confirm is awaited. (Half a publish of slack, for a
    // heartbeat frame.)
    let all_sent = WEBHOOKS as u64 * one_publish - one_publish / 2;
    let what = format!("{all_sent} bytes of {WEBHOOKS} publishes to leave on one channel");
    eventually(&what, PATIENCE, || async {
        let sent = proxy.bytes_from_client() - before;
        if sent >= all_sent { Ok(()) } else { Err(sent) }
    })
    .await;
    proxy.stall(false);
    let mut ids = vec![first.message_id()];
    for post in posts {
        let reply = post.await.unwrap().unwrap();
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
        ids.push(reply.message_id());
    }
    queue.expect_all(ids).await;
    relay.stop().await;
}
