//! The webhook port faces the internet: slow clients, floods of headers, garbage, forged
//! forwarding headers. After each abuse the relay still accepts a normal webhook.

use std::time::{Duration, Instant, SystemTime};

use hyper::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{
    self, KEY, PATIENCE, RelayProcess, TestRelay, env, eventually, message_id, raw, read_head,
    request, send, unique_exchange, webhook, webhook_with,
};

async fn still_accepts(relay: &TestRelay) {
    let reply = relay.post(webhook("job.updated")).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
}

/// Connections the relay closed for taking too long to send (or start) a request.
async fn header_timeouts(relay: &TestRelay) -> f64 {
    harness::sample(
        &harness::scrape(relay.addr).await,
        r#"hirehop_relay_connection_errors_total{kind="header_timeout"}"#,
    )
}

/// Writes `bytes` one at a time, `pause` apart, until the relay closes the connection;
/// returns what it answered, if anything.
async fn dribble(stream: &mut tokio::net::TcpStream, bytes: &[u8], pause: Duration) -> String {
    let deadline = Instant::now() + PATIENCE;
    for byte in bytes {
        if stream.write_all(&[*byte]).await.is_err() {
            break;
        }
        let mut buf = [0u8; 512];
        match tokio::time::timeout(pause, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return String::new(),
            Ok(Ok(n)) => return String::from_utf8_lossy(&buf[..n]).into_owned(),
            Err(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "the relay never cut the slow client off"
        );
    }
    read_head(stream).await
}

#[tokio::test]
async fn slow_headers_are_cut_off_and_counted() {
    let relay = TestRelay::builder()
        .env("RELAY_HTTP__HEADER_READ_TIMEOUT_MS", "300")
        .start()
        .await;
    let mut stream = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let head =
        "POST /webhooks/hirehop HTTP/1.1\r\nHost: x\r\nX-Slow: ".to_owned() + &"a".repeat(500);
    let answer = dribble(&mut stream, head.as_bytes(), Duration::from_millis(50)).await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    assert!(header_timeouts(&relay).await >= 1.0);
    still_accepts(&relay).await;
    relay.stop().await;
}

#[tokio::test]
async fn slow_bodies_get_408() {
    let relay = TestRelay::builder()
        .env("RELAY_HTTP__BODY_IDLE_TIMEOUT_MS", "300")
        .env("RELAY_HTTP__REQUEST_TIMEOUT_MS", "1500")
        .start()
        .await;
    let body = webhook("job.updated");
    let head = format!(
        "POST /webhooks/hirehop HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    // A byte every 100 ms never pauses long, but never finishes in time either.
    let mut stream = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let answer = dribble(&mut stream, body.as_bytes(), Duration::from_millis(100)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    // A pause longer than the idle timeout is cut off sooner.
    let mut stream = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body.as_bytes()[..10]).await.unwrap();
    let started = Instant::now();
    let answer = read_head(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_millis(1400),
        "{:?}",
        started.elapsed()
    );
    still_accepts(&relay).await;
    relay.stop().await;
}

#[tokio::test]
async fn header_floods_invalid_utf8_and_json_bombs_are_refused() {
    let relay = TestRelay::start().await;
    let mut flood = String::from("POST /webhooks/hirehop HTTP/1.1\r\nHost: x\r\n");
    for i in 0..10_000 {
        flood.push_str(&format!("X-H{i}: v\r\n"));
    }
    flood.push_str("Content-Length: 2\r\n\r\n{}");
    let head = raw(relay.addr, flood.as_bytes()).await;
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");

    let mut bad = webhook("job.updated").into_bytes();
    let at = bad.len() - 2;
    bad.splice(at..at, b",\"x\":\"\xff\xfe\"".iter().copied());
    let reply = relay.post(bad).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(reply.json()["error"].as_str().unwrap().contains("UTF-8"));

    let depth = 200_000;
    let bomb = format!(
        r#"{{"event":"job.updated","export_key":"{KEY}","data":{}{}}}"#,
        "[".repeat(depth),
        "]".repeat(depth)
    );
    let reply = relay.post(bomb).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let error = reply.json()["error"].as_str().unwrap().to_owned();
    assert!(error.contains("recursion limit exceeded"), "{error}");
    still_accepts(&relay).await;
    relay.stop().await;
}

#[tokio::test]
async fn many_idle_connections_do_not_stop_service() {
    let relay = TestRelay::builder()
        .env("RELAY_HTTP__HEADER_READ_TIMEOUT_MS", "2000")
        .start()
        .await;
    // From another address than the webhook's: one address gets http.max_connections_per_ip.
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(harness::connect_from(relay.addr, "127.0.0.2").await);
    }
    still_accepts(&relay).await;
    drop(idle);
    relay.stop().await;
}

#[tokio::test]
async fn allow_from_is_checked_before_the_body_and_only_trusted_proxies_are_believed() {
    let relay = TestRelay::builder()
        .env("RELAY_HTTP__ALLOW_FROM", "203.0.113.0/24")
        .env("RELAY_HTTP__TRUSTED_PROXIES", "127.0.0.1")
        .start()
        .await;
    // From the proxy itself, or for a client outside the list: 403, without sending a body.
    for xff in [
        "",
        "X-Forwarded-For: 198.51.100.1\r\n",
        "X-Forwarded-For: 203.0.113.7, 198.51.100.1\r\n",
    ] {
        let head = raw(
            relay.addr,
            format!(
                "POST /webhooks/hirehop HTTP/1.1\r\nHost: x\r\n{xff}Content-Length: 500\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        assert!(head.starts_with("HTTP/1.1 403"), "{xff:?}: {head}");
    }
    let mut req = request(Method::POST, "/webhooks/hirehop", webhook("job.updated"));
    req.headers_mut()
        .insert("x-forwarded-for", "203.0.113.7".parse().unwrap());
    assert_eq!(relay.send(req).await.status, StatusCode::ACCEPTED);
    // Only X-Forwarded-For is read: a Forwarded header the proxy passed through as the
    // client wrote it opens nothing.
    let mut req = request(Method::POST, "/webhooks/hirehop", webhook("job.updated"));
    req.headers_mut()
        .insert("forwarded", "for=203.0.113.8;proto=https".parse().unwrap());
    assert_eq!(relay.send(req).await.status, StatusCode::FORBIDDEN);
    // Health stays reachable for probes from anywhere.
    assert_eq!(
        relay
            .send(request(Method::GET, "/healthz", ""))
            .await
            .status,
        StatusCode::OK
    );
    relay.stop().await;

    // Without trusted proxies, a forged header opens nothing.
    let relay = TestRelay::builder()
        .env("RELAY_HTTP__ALLOW_FROM", "203.0.113.0/24")
        .start()
        .await;
    let mut req = request(Method::POST, "/webhooks/hirehop", webhook("job.updated"));
    req.headers_mut()
        .insert("x-forwarded-for", "203.0.113.7".parse().unwrap());
    assert_eq!(relay.send(req).await.status, StatusCode::FORBIDDEN);
    relay.stop().await;
}

#[tokio::test]
async fn redaction_changes_only_the_key_value() {
    let relay = TestRelay::builder()
        .env("RELAY_AMQP__REDACT_EXPORT_KEY", "true")
        .start()
        .await;
    let mut queue = relay.queue("#").await;
    let body = format!(
        "{{ \"event\":\"job.updated\" , \"export_key\" :  \"{KEY}\",\"data\":{{\"n\":1.50}} }}"
    );
    let reply = relay.post(body.clone()).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    let delivery = queue.next().await;
    let expected = body.replace(&format!("\"{KEY}\""), "\"<redacted>\"");
    assert_eq!(String::from_utf8(delivery.data.clone()).unwrap(), expected);
    let headers = delivery.properties.headers().as_ref().unwrap().inner();
    let Some(lapin::types::AMQPValue::LongString(sha)) = headers.get("body_sha256") else {
        panic!("no body_sha256");
    };
    use sha2::Digest;
    assert_eq!(
        sha.to_string(),
        hex::encode(sha2::Sha256::digest(expected.as_bytes()))
    );
    relay.stop().await;
}

#[tokio::test]
async fn the_replay_window_refuses_old_webhooks_when_on() {
    let relay = TestRelay::builder()
        .env("RELAY_AUTH__MAX_AGE_SECS", "300")
        .start()
        .await;
    let mut queue = relay.queue("#").await;
    let now = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let now = now.trim_end_matches('Z').replace('T', " ");
    let with_time = |time: &str| {
        let mut body: serde_json::Value = serde_json::from_str(&webhook("job.updated")).unwrap();
        body["time"] = time.into();
        body.to_string()
    };
    let reply = relay.post(with_time(&now)).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(message_id(&queue.next().await), reply.message_id());
    for time in ["2022-03-29 07:50:42", "not a time", "2099-01-01 00:00:00"] {
        let reply = relay.post(with_time(time)).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{time}");
    }
    let reply = relay.post(webhook_with("job.updated", "wrong", 1)).await;
    assert_eq!(
        reply.json()["error"],
        "export_key is not valid",
        "the key is checked first"
    );
    // None of the refused ones was published: the next message is a fresh one.
    let reply = relay.post(with_time(&now)).await;
    assert_eq!(message_id(&queue.next().await), reply.message_id());
    relay.stop().await;
}

#[tokio::test]
async fn memory_stays_bounded_under_abuse() {
    let exchange = unique_exchange();
    let url = crate::harness::amqp_url();
    let mut relay_env = env(&exchange, &url);
    relay_env.push(("RELAY_HTTP__HEADER_READ_TIMEOUT_MS", "1000"));
    let mut relay = RelayProcess::spawn(&relay_env).await;
    relay.wait_for("connected to the broker").await;
    let addr = relay.addr();
    let pid = relay.child.id().unwrap();
    // Idle connections, oversized declarations, endless chunks and big bodies, at once.
    let mut idle = Vec::new();
    for _ in 0..500 {
        idle.push(harness::connect_from(addr, "127.0.0.2").await);
    }
    let big = format!(
        r#"{{"event":"job.updated","export_key":"{KEY}","data":"{}"}}"#,
        "x".repeat(1_000_000)
    );
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let big = big.clone();
        tasks.push(tokio::spawn(async move {
            let req = request(Method::POST, "/webhooks/hirehop", big);
            send(addr, req).await.map(|r| r.status)
        }));
    }
    for task in tasks {
        let status = task.await.unwrap().unwrap();
        assert_eq!(status, StatusCode::ACCEPTED);
    }
    let head = raw(
        addr,
        b"POST /webhooks/hirehop HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    drop(idle);
    let req = request(Method::POST, "/webhooks/hirehop", webhook("job.updated"));
    assert_eq!(send(addr, req).await.unwrap().status, StatusCode::ACCEPTED);

    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    // 32 bodies of 1 MB in flight at most, plus the runtime: far below this ceiling.
    assert!(peak_kib < 256 * 1024, "peak RSS {peak_kib} KiB");
    relay.terminate().await;
}

/// Waits (at most five seconds) for the relay to close `stream` without having sent
/// anything; returns how long that took.
async fn closed_by_relay(stream: &mut tokio::net::TcpStream) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => started.elapsed(),
        Ok(Ok(n)) => panic!(
            "unexpected answer: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(_) => panic!("the relay kept a silent connection open for 5 s"),
    }
}

#[tokio::test]
async fn a_connection_that_never_sends_a_byte_is_closed_and_counted() {
    let relay = TestRelay::builder()
        .env("RELAY_HTTP__HEADER_READ_TIMEOUT_MS", "300")
        .start()
        .await;
    let mut stream = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let waited = closed_by_relay(&mut stream).await;
    assert!(waited >= Duration::from_millis(250), "{waited:?}");
    assert!(header_timeouts(&relay).await >= 1.0);
    still_accepts(&relay).await;
    relay.stop().await;
}

#[tokio::test]
async fn silent_connections_at_the_cap_lock_others_out_for_one_header_timeout_at_most() {
    let relay = TestRelay::builder()
        .env("RELAY_HTTP__MAX_CONNECTIONS", "2")
        .env("RELAY_HTTP__HEADER_READ_TIMEOUT_MS", "1000")
        .env("RELAY_HTTP__RETRY_AFTER_SECS", "7")
        .start()
        .await;
    // Held open, silent, for the whole test.
    let _silent = [
        tokio::net::TcpStream::connect(relay.addr).await.unwrap(),
        tokio::net::TcpStream::connect(relay.addr).await.unwrap(),
    ];
    let refused = relay.send(request(Method::GET, "/healthz", "")).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.headers["retry-after"], "7");
    assert_eq!(refused.headers["connection"], "close");
    let what = "the two silent connections to stop locking everyone out";
    eventually(what, Duration::from_secs(5), || async {
        let reply = relay.send(request(Method::GET, "/healthz", "")).await;
        match reply.status {
            StatusCode::OK => Ok(()),
            StatusCode::SERVICE_UNAVAILABLE => Err(reply.status),
            other => panic!("{other}: {reply:?}"),
        }
    })
    .await;
    relay.stop().await;
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed() {
    let relay = TestRelay::builder()
        .env("RELAY_HTTP__HEADER_READ_TIMEOUT_MS", "300")
        .start()
        .await;
    let stream = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let (mut sender, connection) = harness::h2_connect(stream).await;
    let authority = format!("http://{}", relay.addr);
    let req = harness::h2_request(Method::GET, &authority, "/healthz", "");
    let reply = sender.send_request(req).await.unwrap();
    assert_eq!(reply.status(), StatusCode::OK);
    // Nothing more is asked: the relay ends the connection (hyper's client would keep it
    // open, answering pings, for as long as the server lets it).
    tokio::time::timeout(Duration::from_secs(5), connection)
        .await
        .expect("the relay kept an idle HTTP/2 connection open for 5 s")
        .unwrap()
        .expect("the relay closes it cleanly, with a GOAWAY");
    assert!(header_timeouts(&relay).await >= 1.0);
    still_accepts(&relay).await;
    relay.stop().await;
}

#[tokio::test]
async fn an_http2_client_over_the_cap_is_cut_off_even_if_it_keeps_asking() {
    let relay = TestRelay::builder()
        .env("RELAY_HTTP__MAX_CONNECTIONS", "1")
        .env("RELAY_HTTP__HEADER_READ_TIMEOUT_MS", "500")
        .env("RELAY_HTTP__RETRY_AFTER_SECS", "7")
        .start()
        .await;
    let _silent = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let stream = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let (mut sender, connection) = harness::h2_connect(stream).await;
    let authority = format!("http://{}", relay.addr);
    let started = Instant::now();
    let mut refused = 0;
    // Asking every 50 ms never leaves the connection idle.
    while !connection.is_finished() {
        let req = harness::h2_request(Method::GET, &authority, "/healthz", "");
        let Ok(reply) = sender.send_request(req).await else {
            break;
        };
        assert_eq!(reply.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(reply.headers()["retry-after"], "7");
        assert!(!reply.headers().contains_key("connection"));
        refused += 1;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a connection over the cap was kept for 5 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused >= 1);
    relay.stop().await;
}

#[tokio::test]
async fn draining_does_not_wait_for_connections_that_never_asked() {
    // Defaults: ten seconds for the first byte, ten to drain.
    let relay = TestRelay::start().await;
    let _silent = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    still_accepts(&relay).await;
    let started = Instant::now();
    relay.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}
