//! A broker resource alarm (`connection.blocked`). Its own test binary on purpose: the alarm
//! blocks every publisher on the broker, and cargo runs test binaries one after another, so
//! no other test shares the broker while it is raised.

// The support modules are shared with the main test binary; this one uses a part of them.
#[allow(dead_code)]
#[path = "relay/harness.rs"]
mod harness;
#[allow(dead_code)]
#[path = "relay/proxy.rs"]
mod proxy;

use std::process::Command;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use lapin::types::AMQPValue;

use harness::{PATIENCE, TestRelay, message_id, request, webhook};

/// Raises a memory alarm by lowering the high watermark; restores it when dropped, even if
/// the test fails.
struct MemoryAlarm {
    original: String,
}

impl MemoryAlarm {
    fn raise() -> MemoryAlarm {
        let output = Command::new("rabbitmqctl")
            .args(["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."])
            .output()
            .expect("rabbitmqctl runs (it ships with rabbitmq-server)");
        let original = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        assert!(
            original.parse::<f64>().is_ok(),
            "unexpected watermark {original:?}: this test only restores a relative one"
        );
        set_watermark("0.0000001");
        MemoryAlarm { original }
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        set_watermark(&self.original);
    }
}

fn set_watermark(value: &str) {
    let status = Command::new("rabbitmqctl")
        .args(["set_vm_memory_high_watermark", value])
        .status()
        .expect("rabbitmqctl runs");
    assert!(
        status.success(),
        "failed to set the memory watermark to {value}"
    );
}

#[tokio::test]
async fn blocked_broker_webhooks_are_spooled_then_drained() {
    let relay = TestRelay::start_with(&[("RELAY_AMQP__CONFIRM_TIMEOUT_MS", "2000")]).await;
    let mut queue = relay.queue("#").await;
    let readyz = || async { relay.send(request(Method::GET, "/readyz", "")).await };

    let alarm = MemoryAlarm::raise();
    let mut ids = Vec::new();
    // RabbitMQ may announce the block only once the connection publishes: the first webhook
    // can wait out the confirm timeout before it is spooled; it is never lost.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let reply = relay.post(webhook("job.updated")).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
        assert_eq!(reply.json()["status"], "spooled");
        ids.push(reply.message_id());
        if readyz().await.json()["broker"] == "blocked" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the relay never noticed connection.blocked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ready = readyz().await;
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
