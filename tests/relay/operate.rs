//! What an operator relies on: metrics that move as they should and never carry a secret,
//! trace context handed on, overload answered fast, keys reloaded without a restart.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use lapin::types::AMQPValue;

use crate::harness::{
    KEY, PATIENCE, RelayProcess, TestRelay, addr_in, broker_addr, env, eventually, message_id,
    request, sample, scrape, send, unique_exchange, wait_sample, webhook, webhook_with,
};
use crate::proxy::Proxy;

#[tokio::test]
async fn metrics_move_with_accepted_rejected_and_failed_requests() {
    let relay = TestRelay::start().await;
    let mut queue = relay.queue("#").await;
    for _ in 0..2 {
        assert_eq!(
            relay.post(webhook("job.updated")).await.status,
            StatusCode::ACCEPTED
        );
        queue.next().await;
    }
    let wrong = relay
        .post(webhook_with("job.updated", "wrong-key-m3", 1))
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert_eq!(relay.post("nope").await.status, StatusCode::BAD_REQUEST);

    let text = scrape(relay.addr).await;
    let counter = |series: &str| sample(&text, series);
    assert_eq!(
        counter(r#"hirehop_relay_http_requests_total{route="webhook",status="202"}"#),
        2.0
    );
    assert_eq!(
        counter(r#"hirehop_relay_http_requests_total{route="webhook",status="401"}"#),
        1.0
    );
    assert_eq!(
        counter(r#"hirehop_relay_http_requests_total{route="webhook",status="400"}"#),
        1.0
    );
    assert_eq!(
        counter(r#"hirehop_relay_rejections_total{reason="bad_key"}"#),
        1.0
    );
    assert_eq!(
        counter(r#"hirehop_relay_rejections_total{reason="bad_json"}"#),
        1.0
    );
    assert_eq!(
        counter(r#"hirehop_relay_publishes_total{outcome="ack"}"#),
        2.0
    );
    assert_eq!(
        counter(r#"hirehop_relay_webhooks_total{event="job.updated"}"#),
        2.0
    );
    assert_eq!(counter("hirehop_relay_confirm_duration_seconds_count"), 2.0);
    assert_eq!(counter("hirehop_relay_broker_connected"), 1.0);
    assert_eq!(counter("hirehop_relay_broker_blocked"), 0.0);
    assert_eq!(counter("hirehop_relay_http_requests_in_flight"), 0.0);
    assert_eq!(counter("hirehop_relay_spool_messages"), 0.0);
    assert!(text.contains("hirehop_relay_build_info{version="), "{text}");
    for secret in [KEY, "wrong-key-m3", "John Smith"] {
        assert!(!text.contains(secret), "{secret:?} in metrics");
    }
    relay.stop().await;

    // A failed delivery: nothing bound, no alternate exchange, no history stream.
    let relay = TestRelay::builder()
        .env("RELAY_AMQP__ALTERNATE_EXCHANGE", "false")
        .env("RELAY_HISTORY__ENABLED", "false")
        .start()
        .await;
    let reply = relay.post(webhook("job.updated")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    let text = scrape(relay.addr).await;
    assert_eq!(
        sample(
            &text,
            r#"hirehop_relay_publishes_total{outcome="returned"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            r#"hirehop_relay_rejections_total{reason="unroutable"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            r#"hirehop_relay_http_requests_total{route="webhook",status="503"}"#
        ),
        1.0
    );
    relay.stop().await;
}

#[tokio::test]
async fn event_labels_stay_bounded_whatever_names_arrive() {
    let relay = Arc::new(
        TestRelay::builder()
            .env("RELAY_METRICS__MAX_EVENT_LABELS", "20")
            .start()
            .await,
    );
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let relay = Arc::clone(&relay);
            tokio::spawn(async move {
                for i in 0..40 {
                    let reply = relay.post(webhook(&format!("invented.w{w}.n{i}"))).await;
                    assert_eq!(reply.status, StatusCode::ACCEPTED);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    // Unauthenticated names never become labels at all.
    let stranger = relay.post(webhook_with("stranger.event", "bad", 1)).await;
    assert_eq!(stranger.status, StatusCode::UNAUTHORIZED);
    let text = scrape(relay.addr).await;
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("hirehop_relay_webhooks_total{"))
        .collect();
    assert_eq!(series.len(), 21, "20 names and other: {series:#?}");
    assert_eq!(
        sample(&text, r#"hirehop_relay_webhooks_total{event="other"}"#),
        300.0
    );
    assert!(!text.contains("stranger.event"));
    Arc::into_inner(relay).unwrap().stop().await;
}

#[tokio::test]
async fn metrics_can_move_off_the_webhook_port() {
    let exchange = unique_exchange();
    let url = crate::harness::amqp_url();
    let mut relay_env = env(&exchange, &url);
    relay_env.push(("RELAY_METRICS__LISTEN", "127.0.0.1:0"));
    let mut relay = RelayProcess::spawn(&relay_env).await;
    let line = relay.wait_for("serving /metrics").await;
    let metrics_addr = crate::harness::addr_in(&line);
    relay.wait_for("connected to the broker").await;
    let get = |addr, path: &'static str| send(addr, request(Method::GET, path, ""));
    // The webhook port no longer shows metrics.
    assert_eq!(
        get(relay.addr(), "/metrics").await.unwrap().status,
        StatusCode::NOT_FOUND
    );
    // The metrics port shows them, and health for probes, and nothing else.
    let metrics = get(metrics_addr, "/metrics").await.unwrap();
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&metrics.body).contains("hirehop_relay_build_info"));
    // The probes answer there as on the webhook port, bodies included.
    for path in ["/healthz", "/readyz"] {
        let there = get(metrics_addr, path).await.unwrap();
        let here = get(relay.addr(), path).await.unwrap();
        assert_eq!(there.status, StatusCode::OK, "{path}");
        assert_eq!(there.headers["content-type"], "application/json", "{path}");
        assert_eq!(there.json(), here.json(), "{path}");
    }
    let webhook_there = get(metrics_addr, "/webhooks/hirehop").await.unwrap();
    assert_eq!(webhook_there.status, StatusCode::NOT_FOUND);
    // Only reads: anything else is 405 with the methods that are allowed.
    for path in ["/metrics", "/healthz", "/readyz"] {
        let reply = send(metrics_addr, request(Method::POST, path, "x"))
            .await
            .unwrap();
        assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED, "{path}");
        assert_eq!(reply.headers["allow"], "GET, HEAD", "{path}");
    }
    let head = crate::harness::raw(metrics_addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    relay.terminate().await;
}

#[tokio::test]
async fn the_relay_asks_the_broker_for_small_frames() {
    let relay = TestRelay::builder()
        .env("RELAY_AMQP__FRAME_MAX_BYTES", "16384")
        .start()
        .await;
    // As the broker sees the relay's connection.
    let frame_max = crate::harness::relay_connections(&relay.exchange, "frame_max");
    assert_eq!(frame_max, ["16384"]);
    relay.stop().await;
}

#[tokio::test]
async fn trace_context_is_carried_into_the_message() {
    let relay = TestRelay::start().await;
    let mut queue = relay.queue("#").await;
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut req = request(Method::POST, "/webhooks/hirehop", webhook("job.updated"));
    req.headers_mut()
        .insert("traceparent", parent.parse().unwrap());
    req.headers_mut()
        .insert("tracestate", "vendor=1".parse().unwrap());
    assert_eq!(relay.send(req).await.status, StatusCode::ACCEPTED);
    let delivery = queue.next().await;
    let headers = delivery.properties.headers().as_ref().unwrap().inner();
    let Some(AMQPValue::LongString(traceparent)) = headers.get("traceparent") else {
        panic!("no traceparent header: {headers:?}");
    };
    let traceparent = traceparent.to_string();
    assert!(
        traceparent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{traceparent}"
    );
    assert_ne!(traceparent, parent);
    assert!(headers.contains_key("tracestate"));

    // Without one, the relay starts a trace.
    assert_eq!(
        relay.post(webhook("job.updated")).await.status,
        StatusCode::ACCEPTED
    );
    let delivery = queue.next().await;
    let headers = delivery.properties.headers().as_ref().unwrap().inner();
    let Some(AMQPValue::LongString(traceparent)) = headers.get("traceparent") else {
        panic!("no traceparent header: {headers:?}");
    };
    assert_eq!(traceparent.to_string().len(), 55);
    relay.stop().await;
}

#[tokio::test]
async fn overload_is_answered_fast_while_accepted_requests_complete() {
    let proxy = Proxy::start(broker_addr()).await;
    let relay = Arc::new(
        TestRelay::builder()
            .env("RELAY_HTTP__MAX_IN_FLIGHT", "2")
            .env("RELAY_AMQP__CONFIRM_TIMEOUT_MS", "10000")
            .env("RELAY_AMQP__STALL_TIMEOUT_MS", "10000")
            .env("RELAY_SPOOL__ENABLED", "false")
            .via(&proxy)
            .start()
            .await,
    );
    let mut queue = relay.queue("#").await;
    proxy.stall(true);
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let relay = Arc::clone(&relay);
            tokio::spawn(async move { relay.post(webhook("job.updated")).await })
        })
        .collect();
    wait_sample(
        relay.addr,
        "hirehop_relay_http_requests_in_flight",
        "2",
        |n| n >= 2.0,
    )
    .await;
    let started = Instant::now();
    let refused = relay.post(webhook("job.updated")).await;
    refused.assert_unavailable();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    proxy.stall(false);
    let mut ids = HashSet::new();
    for request in slow {
        let reply = request.await.unwrap();
        assert_eq!(reply.status, StatusCode::ACCEPTED);
        ids.insert(reply.message_id());
    }
    while !ids.is_empty() {
        ids.remove(&message_id(&queue.next().await));
    }
    let text = scrape(relay.addr).await;
    assert_eq!(
        sample(
            &text,
            r#"hirehop_relay_rejections_total{reason="overloaded"}"#
        ),
        1.0
    );
    Arc::into_inner(relay).unwrap().stop().await;
}

#[tokio::test]
async fn connections_beyond_the_cap_get_503_and_are_closed() {
    let relay = TestRelay::builder()
        .env("RELAY_HTTP__MAX_CONNECTIONS", "2")
        .start()
        .await;
    let first = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let second = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let head = crate::harness::raw(relay.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    drop((first, second));
    // Once the idle ones are gone, requests are served again.
    eventually("the connection count to go down", PATIENCE, || async {
        let reply = relay.send(request(Method::GET, "/healthz", "")).await;
        if reply.status == StatusCode::OK {
            Ok(())
        } else {
            Err(reply.status)
        }
    })
    .await;
    relay.stop().await;
}

/// Replaces `path`'s contents in one step (a rename), as a Secret update does: a reload never
/// sees the file half written.
fn replace_file(path: &std::path::Path, contents: &str) {
    let staged = path.with_extension("staged");
    std::fs::write(&staged, contents).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

/// Without a spool the port opens only once the broker answers, which can be long after the
/// configuration was loaded: the relay serves with the keys it read at load, whatever became
/// of the keys file meanwhile (it used to read the file again there, and panic).
#[tokio::test]
async fn keys_read_at_load_serve_even_if_the_keys_file_goes_while_the_broker_is_away() {
    let exchange = unique_exchange();
    let keys = std::env::temp_dir().join(format!("{exchange}.keys"));
    std::fs::write(&keys, "key-from-file\n").unwrap();
    let keys_str = keys.to_string_lossy().into_owned();
    let proxy = Proxy::start(broker_addr()).await;
    proxy.refuse(true);
    let url = crate::harness::via(&proxy);
    let mut relay_env: Vec<(&str, &str)> = env(&exchange, &url)
        .into_iter()
        .filter(|(k, _)| *k != "RELAY_AUTH__EXPORT_KEYS")
        .collect();
    relay_env.push(("RELAY_AUTH__EXPORT_KEYS_FILE", &keys_str));
    relay_env.push(("RELAY_SPOOL__ENABLED", "false"));
    let mut relay = RelayProcess::start(&[], &relay_env);
    relay.wait_for("broker not available yet").await;
    std::fs::remove_file(&keys).unwrap();
    proxy.refuse(false);
    let addr = addr_in(&relay.wait_for("listening").await);
    let req = request(
        Method::POST,
        "/webhooks/hirehop",
        webhook_with("job.updated", "key-from-file", 1),
    );
    let reply = send(addr, req).await.expect("the relay answers");
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    relay.terminate().await;
}

#[tokio::test]
async fn keys_file_reloads_on_change_and_on_sighup_without_dropping_requests() {
    let exchange = unique_exchange();
    let keys = std::env::temp_dir().join(format!("{exchange}.keys"));
    std::fs::write(&keys, "# before\nkey-always\nkey-old\n").unwrap();
    let url = crate::harness::amqp_url();
    let keys_str = keys.to_string_lossy().into_owned();
    let mut relay_env: Vec<(&str, &str)> = env(&exchange, &url)
        .into_iter()
        .filter(|(k, _)| *k != "RELAY_AUTH__EXPORT_KEYS")
        .collect();
    relay_env.push(("RELAY_AUTH__EXPORT_KEYS_FILE", &keys_str));
    let mut relay = RelayProcess::spawn(&relay_env).await;
    relay.wait_for("connected to the broker").await;
    let addr = relay.addr();
    let post = move |key: &'static str| async move {
        let req = request(
            Method::POST,
            "/webhooks/hirehop",
            webhook_with("job.updated", key, 1),
        );
        send(addr, req).await.unwrap().status
    };
    assert_eq!(post("key-old").await, StatusCode::ACCEPTED);
    assert_eq!(post("key-new").await, StatusCode::UNAUTHORIZED);

    // Requests with a key present before and after keep flowing through both reloads.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let steady_count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let steady = {
        let (stop, count) = (Arc::clone(&stop), Arc::clone(&steady_count));
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                assert_eq!(post("key-always").await, StatusCode::ACCEPTED);
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        })
    };
    let steady_so_far = || steady_count.load(std::sync::atomic::Ordering::SeqCst);
    crate::harness::wait_count(&steady_count, 1).await;

    // A changed file is picked up without any signal: the relay watches it (a mounted
    // Secret changes under a running pod, and nobody sends it a SIGHUP).
    replace_file(&keys, "# after\nkey-always\nkey-new\n");
    relay.wait_for("export keys reloaded").await;
    assert_eq!(post("key-new").await, StatusCode::ACCEPTED);
    assert_eq!(post("key-old").await, StatusCode::UNAUTHORIZED);

    // SIGHUP reloads even a file that did not change (watching alone would skip it): the
    // operator's way to say "read it again now".
    let before_hup = steady_so_far();
    relay.signal("HUP");
    relay.wait_for("received SIGHUP").await;
    relay.wait_for("export keys reloaded").await;
    crate::harness::wait_count(&steady_count, before_hup + 1).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    steady.await.unwrap();
    assert_eq!(post("key-new").await, StatusCode::ACCEPTED);
    assert_eq!(post("key-old").await, StatusCode::UNAUTHORIZED);

    // A broken file keeps the keys in use.
    replace_file(&keys, "1 2 3\n");
    relay.wait_for("reload failed").await;
    assert_eq!(post("key-new").await, StatusCode::ACCEPTED);

    let log = relay.terminate().await;
    for secret in ["key-always", "key-new", "key-old"] {
        assert!(!log.contains(secret), "{secret} leaked into the log");
    }
    let _ = std::fs::remove_file(keys);
}
