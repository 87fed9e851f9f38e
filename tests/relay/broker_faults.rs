//! Broker faults that would disturb every other test on the shared broker (a resource alarm,
//! a frozen node), injected on a RabbitMQ node of each test's own (see `local_cluster`).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper::StatusCode;
use lapin::types::AMQPValue;

use crate::harness::{PATIENCE, TestRelay, eventually, message_id, readyz, wait_readyz, webhook};
use crate::load::{assert_all_accepted_within, expect_on_broker, open_loop};
use crate::local_cluster::LocalCluster;

/// Raises a memory alarm on `node` by lowering its high watermark; the alarm ends when this
/// is dropped (before the node is).
struct MemoryAlarm<'a> {
    node: &'a LocalCluster,
}

impl MemoryAlarm<'_> {
    /// Returns once the alarm is in force: the node raises it at its next memory check, a
    /// moment after the watermark changed, and a webhook published before that is confirmed.
    async fn raise(node: &LocalCluster) -> MemoryAlarm<'_> {
        node.ctl(1, &["set_vm_memory_high_watermark", "0.0000001"]);
        let alarm = MemoryAlarm { node };
        eventually("the node to raise its memory alarm", PATIENCE, || async {
            let alarms = node.ctl(1, &["eval", "rabbit_alarm:get_alarms()."]);
            if alarms.contains("memory") {
                Ok(())
            } else {
                Err(alarms)
            }
        })
        .await;
        alarm
    }
}

impl Drop for MemoryAlarm<'_> {
    fn drop(&mut self) {
        self.node.ctl(1, &["set_vm_memory_high_watermark", "0.4"]);
    }
}

#[tokio::test]
async fn blocked_broker_webhooks_are_spooled_then_drained() {
    let node = LocalCluster::up(1);
    let relay = TestRelay::builder()
        .env("RELAY_AMQP__CONFIRM_TIMEOUT_MS", "2000")
        .on(&node.url(1))
        .start()
        .await;
    let mut queue = relay.queue("#").await;

    let alarm = MemoryAlarm::raise(&node).await;
    // RabbitMQ may announce the block only once the connection publishes: the first webhook
    // can wait out the confirm timeout before it is spooled; it is never lost.
    let ids = Mutex::new(Vec::new());
    let ready = eventually(
        "the relay to notice connection.blocked",
        PATIENCE,
        || async {
            let reply = relay.post(webhook("job.updated")).await;
            assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
            assert_eq!(reply.json()["status"], "spooled");
            ids.lock().unwrap().push(reply.message_id());
            let ready = readyz(relay.addr).await;
            if ready.json()["broker"] == "blocked" {
                Ok(ready)
            } else {
                Err(ready)
            }
        },
    )
    .await;
    let ids = ids.into_inner().unwrap();
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(ready.json()["status"], "degraded");
    // While blocked, webhooks go to the spool at once instead of hanging.
    let mut spooled_while_blocked = std::collections::HashSet::new();
    for _ in 0..5 {
        let started = Instant::now();
        let reply = relay.post(webhook("job.updated")).await;
        assert_eq!(reply.json()["status"], "spooled");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        spooled_while_blocked.insert(reply.message_id());
    }

    drop(alarm);
    // Every webhook arrives. A publish that was waiting when its confirm timed out may also
    // arrive once on its own (at-least-once: consumers dedupe on message_id).
    let mut missing: std::collections::HashSet<String> = ids
        .into_iter()
        .chain(spooled_while_blocked.iter().cloned())
        .collect();
    while !missing.is_empty() {
        let delivery = queue.next().await;
        let id = message_id(&delivery);
        if spooled_while_blocked.contains(&id) {
            let headers = delivery.properties.headers().as_ref().unwrap().inner();
            assert_eq!(headers.get("replayed"), Some(&AMQPValue::Boolean(true)));
        }
        missing.remove(&id);
    }
    relay.stop().await;
}

/// The broker process frozen (SIGSTOP) for 15 s under 200 webhooks/s: its connections stay
/// open and it answers nothing. The relay notices within about a second, answers every
/// webhook from the spool within about a second, and loses none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_node_under_load_costs_a_second_per_webhook_and_loses_none() {
    const RATE: u32 = 200;
    const FROZEN: Duration = Duration::from_secs(15);
    let node = LocalCluster::up(1);
    // An in-flight cap that webhooks waiting out the 5 s confirm timeout would overflow
    // (~1,000 at once at this rate): those would get 503.
    // One address stands in for HireHop's several.
    let relay = TestRelay::builder()
        .env("RELAY_HTTP__MAX_IN_FLIGHT", "500")
        .env("RELAY_HTTP__MAX_CONNECTIONS_PER_IP", "4096")
        .on(&node.url(1))
        .start()
        .await;
    let mut queue = relay.queue("#").await;
    let stop = tokio_util::sync::CancellationToken::new();
    let load = tokio::spawn(open_loop(relay.addr, RATE, stop.clone()));

    tokio::time::sleep(Duration::from_secs(2)).await;
    let frozen_at = Instant::now();
    node.freeze(1);
    wait_readyz(relay.addr, "the broker stalled", |reply| {
        let body = reply.json();
        body["broker"] == "stalled" && body["status"] == "degraded"
    })
    .await;
    let noticed = frozen_at.elapsed();
    tokio::time::sleep(FROZEN.saturating_sub(frozen_at.elapsed())).await;
    node.thaw(1);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    let sent = load.await.unwrap();

    let slowest = assert_all_accepted_within(&sent, Duration::from_millis(2500));
    assert!(
        noticed < Duration::from_secs(3),
        "/readyz said stalled after {noticed:?}"
    );
    let duplicates = expect_on_broker(&mut queue, &sent).await;
    let before_noticed = sent
        .iter()
        .filter(|s| s.spooled && s.started < frozen_at + noticed)
        .count();
    eprintln!(
        "frozen node: {} requests at {RATE}/s, {} spooled, /readyz said stalled after \
         {noticed:?}, slowest answer {slowest:?}, {duplicates} duplicates (bound \
         {before_noticed})",
        sent.len(),
        sent.iter().filter(|s| s.spooled).count(),
    );
    assert!(
        duplicates <= before_noticed,
        "{duplicates} duplicates, more than the {before_noticed} spooled before the stall was noticed"
    );
    relay.stop().await;
}
