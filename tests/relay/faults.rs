//! Real network faults between relay and broker: the broker closing the connection, the
//! network cut, traffic stalled. Requests get 503 quickly (never a hang, never a 202 that
//! the broker did not confirm), and the relay recovers on its own.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::StatusCode;
use tokio::io::AsyncWriteExt;

use crate::harness::{
    PATIENCE, TestRelay, broker_addr, eventually, sample, scrape, wait_count, wait_readyz,
    wait_sample, webhook,
};
use crate::proxy::Proxy;

/// Waits until `/readyz` answers `status` ([`PATIENCE`] at most).
async fn wait_ready(relay: &TestRelay, status: StatusCode) {
    wait_readyz(relay.addr, &status.to_string(), |reply| {
        reply.status == status
    })
    .await;
}

/// Closes the relay's connection from the broker side, as an operator or a broker restart
/// would, found by the connection name the relay gives itself.
fn close_from_broker(exchange: &str) {
    let pids = crate::harness::relay_connections(exchange, "pid");
    assert_eq!(pids.len(), 1, "one relay connection expected: {pids:?}");
    let status = std::process::Command::new("rabbitmqctl")
        .args(["close_connection", &pids[0], "closed by the test suite"])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn broker_closing_the_connection_gives_fast_503s_until_the_relay_reconnects() {
    let proxy = Proxy::start(broker_addr()).await;
    let relay = TestRelay::builder()
        .env("RELAY_AMQP__CONFIRM_TIMEOUT_MS", "10000")
        .env("RELAY_SPOOL__ENABLED", "false")
        .via(&proxy)
        .start()
        .await;
    let mut queue = relay.queue("#").await;

    // Reconnects fail until the test allows them, so the outage lasts as long as needed.
    proxy.refuse(true);
    close_from_broker(&relay.exchange);
    wait_ready(&relay, StatusCode::SERVICE_UNAVAILABLE).await;
    for _ in 0..5 {
        let started = Instant::now();
        let reply = relay.post(webhook("job.updated")).await;
        reply.assert_unavailable();
        // Fails fast: far below the 10 s confirm timeout.
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    proxy.refuse(false);
    wait_ready(&relay, StatusCode::OK).await;
    let reply = relay.post(webhook("job.updated")).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    // None of the 503s was published: the first message is the one accepted now.
    assert_eq!(
        crate::harness::message_id(&queue.next().await),
        reply.message_id()
    );
    relay.stop().await;
}

/// Eight clients post 40 webhooks each while the network to the broker is cut three
/// times; returns the message ids that got a 202 and the number of requests. Checks that
/// every request got 202 or 503 in time, and that every 202 reached the broker.
async fn cuts_under_load(overrides: &[(&str, &str)]) -> (usize, usize) {
    let proxy = Arc::new(Proxy::start(broker_addr()).await);
    let relay = TestRelay::builder()
        .env("RELAY_AMQP__CONFIRM_TIMEOUT_MS", "2000")
        .envs(overrides)
        .via(&proxy)
        .start()
        .await;
    let relay = Arc::new(relay);
    let mut queue = relay.queue("#").await;
    let answered = Arc::new(AtomicUsize::new(0));

    let clients: Vec<_> = (0..8)
        .map(|_| {
            let relay = Arc::clone(&relay);
            let answered = Arc::clone(&answered);
            tokio::spawn(async move {
                let mut accepted = Vec::new();
                for _ in 0..40 {
                    // No request hangs: the harness fails one that takes longer than PATIENCE.
                    let reply = relay.post(webhook("job.updated")).await;
                    match reply.status {
                        StatusCode::ACCEPTED => accepted.push(reply.message_id()),
                        StatusCode::SERVICE_UNAVAILABLE => {}
                        other => panic!("unexpected {other}: {:?}", reply.body),
                    }
                    answered.fetch_add(1, Ordering::SeqCst);
                }
                accepted
            })
        })
        .collect();

    for threshold in [60, 150, 240] {
        wait_count(&answered, threshold).await;
        proxy.cut();
    }
    let mut accepted = HashSet::new();
    for client in clients {
        accepted.extend(client.await.unwrap());
    }
    let count = accepted.len();

    // After the load, the relay is back: one more must be confirmed straight away.
    wait_ready(&relay, StatusCode::OK).await;
    // Behind the spool while it drains, then straight to the broker.
    let what = "the relay to go back to publishing directly";
    let accepted = Mutex::new(accepted);
    eventually(what, PATIENCE, || async {
        let last = relay.post(webhook("job.updated")).await;
        assert_eq!(last.status, StatusCode::ACCEPTED);
        accepted.lock().unwrap().insert(last.message_id());
        let status = last.json()["status"].clone();
        if status == "accepted" {
            Ok(())
        } else {
            Err(status)
        }
    })
    .await;
    let accepted = accepted.into_inner().unwrap();

    // The cuts were real: the relay lost its connection and came back.
    let metrics = scrape(relay.addr).await;
    assert!(
        sample(&metrics, "hirehop_relay_broker_reconnects_total") >= 1.0,
        "no reconnect after three cuts:\n{metrics}"
    );

    // Every 202 is on the broker (messages that got a 503 may be there too: at-least-once).
    let mut missing = accepted;
    while !missing.is_empty() {
        let id = crate::harness::message_id(&queue.next().await);
        missing.remove(&id);
    }
    Arc::into_inner(relay)
        .expect("clients are done")
        .stop()
        .await;
    (count, 8 * 40)
}

#[tokio::test]
async fn network_cuts_under_load_without_spool_give_503s_and_every_202_reaches_the_broker() {
    let (accepted, total) = cuts_under_load(&[("RELAY_SPOOL__ENABLED", "false")]).await;
    assert!(accepted > 0, "none of {total} accepted");
}

#[tokio::test]
async fn network_cuts_under_load_with_spool_accept_99_percent_and_lose_nothing() {
    let (accepted, total) = cuts_under_load(&[]).await;
    assert!(
        accepted * 100 >= total * 99,
        "{accepted} of {total} accepted"
    );
}

#[tokio::test]
async fn client_hanging_up_does_not_cancel_a_delivery_already_begun() {
    let proxy = Proxy::start(broker_addr()).await;
    let relay = TestRelay::builder()
        .env("RELAY_AMQP__CONFIRM_TIMEOUT_MS", "3000")
        .via(&proxy)
        .start()
        .await;
    let mut queue = relay.queue("#").await;
    let body = webhook("job.updated");

    proxy.stall(true);
    let sent_before = proxy.bytes_from_client();
    let mut client = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let request = format!(
        "POST /webhooks/hirehop HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    client.write_all(request.as_bytes()).await.unwrap();
    // The publish has begun once its frames reached the (stalled) network.
    eventually("the relay to start publishing", PATIENCE, || async {
        let sent = proxy.bytes_from_client() - sent_before;
        if sent >= body.len() as u64 {
            Ok(())
        } else {
            Err(sent)
        }
    })
    .await;
    drop(client);
    // The server saw the hang-up and dropped the request's handler (and its in-flight count).
    wait_sample(
        relay.addr,
        "hirehop_relay_http_requests_in_flight",
        "0",
        |n| n == 0.0,
    )
    .await;
    // The frames held by the stalled proxy die with the connection: that publish can never be
    // confirmed. Only a delivery still running after the hang-up can keep the webhook now, by
    // spooling it once the publish fails; replay brings it after the reconnect.
    proxy.cut();
    proxy.stall(false);

    let delivery = queue.next().await;
    assert_eq!(delivery.data, body.as_bytes());
    let headers = delivery.properties.headers().as_ref().unwrap().inner();
    assert_eq!(
        headers.get("replayed"),
        Some(&lapin::types::AMQPValue::Boolean(true)),
        "the first publish went through the cut?"
    );
    relay.stop().await;
}
