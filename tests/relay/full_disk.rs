//! The spool on a disk that fills up for real (a 2 MiB tmpfs), with the broker out of reach:
//! the relay says so (503, readiness, metrics), restarts on the full disk, recovers by
//! itself once space comes back, and delivers every webhook it answered 202, counted on the
//! broker with its duplicates.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use hyper::{Method, StatusCode};
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};

use crate::harness::{
    self, KEY, PATIENCE, RelayProcess, Reply, eventually, readyz, request, sample, scrape, send,
    wait_sample, webhook_with,
};
use crate::offline::Offline;
use crate::spool::{count, take_all, wait_broker_connected};
use crate::tmpfs::Tmpfs;

/// Most webhooks one replay batch publishes: what a restart may publish twice.
const REPLAY_BATCH: usize = 256;

/// A webhook of about 1 KB, so a 2 MiB disk holds about 1,300.
fn padded_webhook() -> String {
    let mut body = webhook_with("job.updated", KEY, 1);
    body.insert_str(1, &format!("\"pad\":\"{}\",", "x".repeat(700)));
    body
}

/// Posts webhooks from 8 clients at once until the relay refuses one; returns the message
/// ids answered 202 and the first refusal.
async fn post_until_refused(addr: SocketAddr) -> (Vec<String>, Reply) {
    let stop = Arc::new(AtomicBool::new(false));
    let refusal = Arc::new(Mutex::new(None));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (stop, refusal) = (Arc::clone(&stop), Arc::clone(&refusal));
            tokio::spawn(async move {
                let mut ids = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let req = request(Method::POST, "/webhooks/hirehop", padded_webhook());
                    match send(addr, req).await {
                        Ok(reply) if reply.status == StatusCode::ACCEPTED => {
                            assert_eq!(reply.json()["status"], "spooled");
                            ids.push(reply.message_id());
                        }
                        Ok(reply) => {
                            stop.store(true, Ordering::SeqCst);
                            refusal.lock().unwrap().get_or_insert(reply);
                        }
                        Err(err) => panic!("no answer from the relay: {err}"),
                    }
                    assert!(ids.len() < 50_000, "the disk never filled up");
                }
                ids
            })
        })
        .collect();
    let mut accepted = Vec::new();
    for client in clients {
        accepted.extend(client.await.unwrap());
    }
    let refusal = refusal
        .lock()
        .unwrap()
        .take()
        .expect("a client was refused");
    (accepted, refusal)
}

/// The segment files in `dir`.
fn segments(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|entry| {
            let path = entry.as_ref().unwrap().path();
            path.extension().is_some_and(|ext| ext == "seg")
        })
        .count()
}

/// The 503 and the readiness of a spool that cannot write: the reason is in both.
async fn assert_refusing_because_the_disk_is_full(addr: SocketAddr, refusal: &Reply) {
    refusal.assert_unavailable();
    let error = refusal.json()["error"].as_str().unwrap().to_owned();
    assert!(error.contains("spool write failed"), "{error}");
    let ready = readyz(addr).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE, "{ready:?}");
    let spool = &ready.json()["spool"];
    assert_eq!(spool["accepting"], false, "{spool}");
    let reason = spool["error"].as_str().unwrap_or_default();
    assert!(reason.contains("No space left on device"), "{spool}");
    let metrics = scrape(addr).await;
    assert_eq!(sample(&metrics, "hirehop_relay_spool_accepting"), 0.0);
}

#[tokio::test]
async fn a_full_disk_is_refused_honestly_survives_a_restart_and_every_202_arrives_once() {
    let disk = Tmpfs::mount("2m");
    let offline = Offline::start_in(disk.path().join("spool")).await;
    let mut relay_env = offline.env();
    relay_env.extend([
        ("RELAY_AMQP__RECONNECT_MAX_BACKOFF_MS", "500"),
        ("RELAY_SPOOL__SHUTDOWN_REPLAY_TIMEOUT_MS", "0"),
    ]);
    let relay = RelayProcess::spawn(&relay_env).await;

    // The first outage, until the disk is full.
    let (first, refusal) = post_until_refused(relay.addr()).await;
    assert_refusing_because_the_disk_is_full(relay.addr(), &refusal).await;

    // A clean restart on the full disk: opening the spool needs no space.
    let log = relay.terminate().await;
    let left = format!("records={}", first.len());
    assert!(
        log.lines()
            .any(|line| line.contains("webhooks remain in the spool") && line.contains(&left)),
        "no final line with {left}:\n{log}"
    );
    let mut relay = RelayProcess::spawn(&relay_env).await;
    relay.wait_for("will be replayed").await;
    let addr = relay.addr();

    // The broker comes back: everything answered 202 arrives, once.
    offline.proxy.refuse(false);
    wait_broker_connected(addr).await;
    wait_sample(addr, "hirehop_relay_spool_messages", "0", |n| n == 0.0).await;
    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();
    let unrouted = format!("{}.unrouted", offline.exchange);
    let outcome = count(&first, &take_all(&channel, &unrouted).await);
    eprintln!("first outage: {outcome:?}");
    outcome.assert_delivered(0);
    // Replayed to the end, the segment is deleted at once (it held export keys), and the
    // relay is fully ready again.
    eventually("the drained segment to be deleted", PATIENCE, || async {
        match segments(&offline.dir) {
            0 => Ok(()),
            left => Err(format!("{left} segments")),
        }
    })
    .await;
    let ready = readyz(addr).await;
    assert_eq!(ready.status, StatusCode::OK, "{ready:?}");
    assert_eq!(ready.json()["status"], "ok", "{ready:?}");

    // A second outage finds the whole disk again, not a 503 for every webhook.
    offline.proxy.refuse(true);
    offline.proxy.cut();
    harness::wait_readyz(addr, "the broker is gone", |reply| {
        reply.json()["broker"] == "disconnected"
    })
    .await;
    let (second, refusal) = post_until_refused(addr).await;
    assert_refusing_because_the_disk_is_full(addr, &refusal).await;
    assert!(
        second.len() * 10 >= first.len() * 9,
        "{} webhooks fit in the second outage, {} in the first",
        second.len(),
        first.len()
    );
    offline.proxy.refuse(false);
    wait_sample(addr, "hirehop_relay_spool_messages", "0", |n| n == 0.0).await;
    let outcome = count(&second, &take_all(&channel, &unrouted).await);
    eprintln!("second outage: {outcome:?}");
    outcome.assert_delivered(0);
    relay.terminate().await;
}

#[tokio::test]
async fn the_cursor_survives_a_full_disk_so_a_restart_publishes_at_most_one_batch_again() {
    let disk = Tmpfs::mount("2m");
    let offline = Offline::start_in(disk.path().join("spool")).await;
    let mut relay_env = offline.env();
    relay_env.extend([
        ("RELAY_AMQP__RECONNECT_MAX_BACKOFF_MS", "500"),
        ("RELAY_SPOOL__SHUTDOWN_REPLAY_TIMEOUT_MS", "200"),
    ]);
    let relay = RelayProcess::spawn(&relay_env).await;
    let (accepted, refusal) = post_until_refused(relay.addr()).await;
    assert_refusing_because_the_disk_is_full(relay.addr(), &refusal).await;

    // Ahead of the relay: its topology, and a queue that takes every webhook until it holds
    // `taken`, then refuses the rest. Replay delivers that many and stalls with the disk
    // still full: the cursor must be saved with no space left.
    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();
    let config = harness::config(&relay_env, None);
    hirehop_relay::amqp::topology::declare(&config.amqp, &broker)
        .await
        .unwrap();
    let taken = REPLAY_BATCH + 44;
    assert!(accepted.len() > taken + REPLAY_BATCH, "{}", accepted.len());
    let stopper = format!("{}.stopper", offline.exchange);
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongInt(taken as i32));
    arguments.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    };
    channel
        .queue_declare(stopper.as_str().into(), exclusive, arguments)
        .await
        .unwrap();
    channel
        .queue_bind(
            stopper.as_str().into(),
            offline.exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    offline.proxy.refuse(false);
    wait_sample(
        relay.addr(),
        "hirehop_relay_spool_replayed_total",
        &taken.to_string(),
        |n| n == taken as f64,
    )
    .await;
    wait_sample(
        relay.addr(),
        "hirehop_relay_spool_replay_failures_total",
        "at least 1 (the stopper refused)",
        |n| n >= 1.0,
    )
    .await;

    // A clean restart, still on the full disk; then the stopper steps aside.
    relay.terminate().await;
    let relay = RelayProcess::spawn(&relay_env).await;
    channel
        .queue_unbind(
            stopper.as_str().into(),
            offline.exchange.as_str().into(),
            "#".into(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    wait_sample(relay.addr(), "hirehop_relay_spool_messages", "0", |n| {
        n == 0.0
    })
    .await;
    let unrouted = format!("{}.unrouted", offline.exchange);
    let mut on_broker = take_all(&channel, &stopper).await;
    assert_eq!(on_broker.len(), taken);
    on_broker.extend(take_all(&channel, &unrouted).await);
    let outcome = count(&accepted, &on_broker);
    eprintln!("replay stopped at {taken} on a full disk, then restarted: {outcome:?}");
    outcome.assert_delivered(REPLAY_BATCH);
    relay.terminate().await;
}

#[tokio::test]
async fn a_spool_that_cannot_write_is_unready_until_space_comes_back_without_a_webhook() {
    let disk = Tmpfs::mount("2m");
    let offline = Offline::start_in(disk.path().join("spool")).await;
    let mut relay_env = offline.env();
    relay_env.push(("RELAY_SPOOL__SHUTDOWN_REPLAY_TIMEOUT_MS", "0"));
    let relay = RelayProcess::spawn(&relay_env).await;
    let addr = relay.addr();
    // Something else takes the disk.
    let filler = disk.fill();
    let req = request(Method::POST, "/webhooks/hirehop", padded_webhook());
    let refusal = send(addr, req).await.unwrap();
    assert_refusing_because_the_disk_is_full(addr, &refusal).await;

    // Space comes back. No webhook is sent: a readiness-gated load balancer would send none.
    std::fs::remove_file(filler).unwrap();
    harness::wait_readyz(addr, "the spool accepts again", |reply| {
        reply.status == StatusCode::OK
    })
    .await;
    let ready = readyz(addr).await.json();
    assert_eq!(ready["spool"]["accepting"], true, "{ready}");
    assert!(ready["spool"].get("error").is_none(), "{ready}");
    let req = request(Method::POST, "/webhooks/hirehop", padded_webhook());
    let reply = send(addr, req).await.unwrap();
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    relay.terminate().await;
}
