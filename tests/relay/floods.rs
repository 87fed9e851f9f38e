//! Floods from one source, real ones: thousands of wrong keys (directly and through a
//! trusted proxy's header), a slowhttptest slow-body attack. Meanwhile a legitimate sender
//! keeps getting 202s, and the log stays a few lines long.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;

use crate::harness::{
    self, KEY, PATIENCE, RelayProcess, TestRelay, catch_all, env, request, unique_exchange,
    webhook_with,
};

/// A keep-alive HTTP/1.1 client whose connections come from `from` (any 127.0.0.0/8
/// address is this machine's), optionally claiming `forwarded_for` in `X-Forwarded-For`.
pub struct Client {
    relay: SocketAddr,
    from: IpAddr,
    forwarded_for: Option<&'static str>,
    sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
}

impl Client {
    pub fn new(relay: SocketAddr, from: &str, forwarded_for: Option<&'static str>) -> Client {
        Client {
            relay,
            from: from.parse().unwrap(),
            forwarded_for,
            sender: None,
        }
    }

    /// Posts `body` and returns the status and the `Retry-After` header, reconnecting when
    /// the relay closed the connection.
    pub async fn post(&mut self, body: String) -> (StatusCode, Option<String>) {
        for _ in 0..3 {
            let sender = match &mut self.sender {
                Some(sender) if !sender.is_closed() => sender,
                _ => self.sender.insert(self.connect().await),
            };
            let mut req = request(Method::POST, "/webhooks/hirehop", body.clone());
            if let Some(client) = self.forwarded_for {
                req.headers_mut()
                    .insert("x-forwarded-for", client.parse().unwrap());
            }
            let answer = tokio::time::timeout(PATIENCE, async {
                let response = sender.send_request(req).await?;
                let (parts, body) = response.into_parts();
                body.collect().await?;
                Ok::<_, hyper::Error>(parts)
            })
            .await
            .expect("the relay answers in time");
            match answer {
                Ok(parts) => {
                    let retry_after = parts
                        .headers
                        .get("retry-after")
                        .map(|v| v.to_str().unwrap().to_owned());
                    return (parts.status, retry_after);
                }
                // Closed between two requests: try on a new connection.
                Err(_) => self.sender = None,
            }
        }
        panic!("three connections in a row failed");
    }

    async fn connect(&self) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
        let stream = harness::connect_from(self.relay, &self.from.to_string()).await;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        sender
    }
}

/// `workers` clients like `client` posting `each` wrong keys; counts the answers by status.
async fn wrong_key_flood(
    relay: SocketAddr,
    from: &'static str,
    forwarded_for: Option<&'static str>,
    workers: usize,
    each: usize,
) -> HashMap<StatusCode, usize> {
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            tokio::spawn(async move {
                let mut client = Client::new(relay, from, forwarded_for);
                let mut seen = HashMap::new();
                for i in 0..each {
                    let body = webhook_with("job.updated", &format!("guess-{w}-{i}"), 1);
                    let (status, retry_after) = client.post(body).await;
                    if status == StatusCode::TOO_MANY_REQUESTS {
                        let secs: u64 = retry_after.expect("429 has Retry-After").parse().unwrap();
                        assert!((1..=60).contains(&secs), "Retry-After: {secs}");
                    }
                    *seen.entry(status).or_insert(0) += 1;
                }
                seen
            })
        })
        .collect();
    let mut total = HashMap::new();
    for task in tasks {
        for (status, n) in task.await.unwrap() {
            *total.entry(status).or_insert(0) += n;
        }
    }
    total
}

#[tokio::test]
async fn a_wrong_key_flood_gets_429_while_valid_keys_from_everywhere_get_202_and_the_log_stays_short()
 {
    let exchange = unique_exchange();
    let url = harness::amqp_url();
    let mut relay_env = env(&exchange, &url);
    // The proxy is this machine's 127.0.0.1; 127.0.0.2 is a client that reaches the relay
    // directly.
    relay_env.push(("RELAY_HTTP__TRUSTED_PROXIES", "127.0.0.1/32"));
    relay_env.push(("RELAY_HTTP__KEY_FAILURE_BURST", "20"));
    relay_env.push(("RELAY_HTTP__KEY_FAILURES_PER_MINUTE", "30"));
    let mut relay = RelayProcess::spawn(&relay_env).await;
    relay.wait_for("connected to the broker").await;
    let addr = relay.addr();
    let broker = harness::broker().await;
    let mut queue = catch_all(&broker, &exchange).await;

    // Legitimate senders, all the while: from another address behind the proxy, from the
    // flooding address behind the proxy, and from the flooding address directly.
    let stop = Arc::new(AtomicBool::new(false));
    let legit: Vec<_> = [
        ("127.0.0.1", Some("198.51.100.7")),
        ("127.0.0.1", Some("203.0.113.9")),
        ("127.0.0.2", None),
    ]
    .into_iter()
    .map(|(from, forwarded_for)| {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut client = Client::new(addr, from, forwarded_for);
            let mut accepted = 0;
            while !stop.load(Ordering::SeqCst) || accepted < 5 {
                let (status, _) = client.post(webhook_with("job.updated", KEY, 1)).await;
                assert_eq!(status, StatusCode::ACCEPTED, "{from} as {forwarded_for:?}");
                accepted += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            accepted
        })
    })
    .collect();

    let started = Instant::now();
    let (through_proxy, direct) = tokio::join!(
        wrong_key_flood(addr, "127.0.0.1", Some("203.0.113.9"), 8, 400),
        wrong_key_flood(addr, "127.0.0.2", None, 8, 400),
    );
    let elapsed = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let mut accepted = 0;
    for sender in legit {
        accepted += sender.await.unwrap();
    }

    // Per source: the burst, then one more every 2 s, as 401; everything else 429.
    let allowed = 20 + 1 + usize::try_from(elapsed.as_secs() / 2).unwrap();
    for (what, seen) in [("through the proxy", &through_proxy), ("direct", &direct)] {
        let unauthorized = seen.get(&StatusCode::UNAUTHORIZED).copied().unwrap_or(0);
        let limited = seen
            .get(&StatusCode::TOO_MANY_REQUESTS)
            .copied()
            .unwrap_or(0);
        assert_eq!(unauthorized + limited, 3200, "{what}: {seen:?}");
        assert!(
            (20..=allowed).contains(&unauthorized),
            "{what}: {unauthorized} 401s in {elapsed:?}"
        );
    }
    let limited =
        through_proxy[&StatusCode::TOO_MANY_REQUESTS] + direct[&StatusCode::TOO_MANY_REQUESTS];
    let metrics = harness::scrape(addr).await;
    assert_eq!(
        harness::sample(
            &metrics,
            r#"hirehop_relay_rejections_total{reason="rate_limited"}"#
        ),
        limited as f64
    );
    // Every 202 reached the broker.
    let mut ids = 0;
    while ids < accepted {
        queue.next().await;
        ids += 1;
    }

    let log = relay.terminate().await;
    // The legitimate webhooks' own lines aside.
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| !l.contains("webhook accepted"))
        .collect();
    let about = |needle: &str| lines.iter().filter(|l| l.contains(needle)).count();
    // Per source and reason, one full line and one summary per 10 s interval.
    let intervals = usize::try_from(elapsed.as_secs() / 10).unwrap() + 2;
    for source in ["203.0.113.9", "127.0.0.2"] {
        let n = about(source);
        assert!(n <= 4 * intervals, "{n} lines about {source}:\n{log}");
        assert!(
            lines.iter().any(
                |l| l.contains(&format!("requests from {source} in the last"))
                    && l.contains("rate_limited")
            ),
            "no summary of {source}'s 429s:\n{log}"
        );
    }
    assert!(
        lines.len() < 40,
        "{} log lines for a flood of 6,400 requests:\n{}",
        lines.len(),
        lines.join("\n")
    );
    for secret in [KEY, "guess-0-"] {
        assert!(!log.contains(secret), "{secret} in the log");
    }
}

/// Runs slowhttptest (Debian package slowhttptest) with `args` against `url` until dropped.
fn slowhttptest(args: &[&str], url: &str) -> tokio::process::Child {
    tokio::process::Command::new("slowhttptest")
        .args(args)
        .args(["-u", url])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("slowhttptest runs (apt-get install slowhttptest)")
}

#[tokio::test]
async fn slow_bodies_hold_no_in_flight_slot_so_webhooks_keep_getting_202() {
    let relay = TestRelay::builder()
        .env("RELAY_HTTP__MAX_IN_FLIGHT", "16")
        .start()
        .await;
    let mut queue = relay.queue("#").await;
    let url = format!("http://{}/webhooks/hirehop", relay.addr);
    // 200 connections that announce 64 KiB bodies and send a few bytes a second: never idle
    // long enough for the body idle timeout, never done before the request timeout.
    let mut attack = slowhttptest(
        &[
            "-B", "-c", "200", "-r", "200", "-i", "1", "-x", "10", "-s", "65536", "-l", "60",
        ],
        &url,
    );
    // Under way (not more than the 16 in-flight slots: the old relay refused the rest).
    harness::wait_sample(
        relay.addr,
        "hirehop_relay_http_connections",
        "10 or more",
        |open| open >= 10.0,
    )
    .await;
    // HireHop, meanwhile: 100 webhooks at about 20 a second, every one a 202.
    let mut ids = Vec::new();
    for _ in 0..100 {
        let reply = relay.post(harness::webhook("job.updated")).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
        ids.push(reply.message_id());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The slow bodies were all open, still being sent, by the end.
    assert!(
        attack.try_wait().unwrap().is_none(),
        "slowhttptest ended early"
    );
    let open = harness::sample(
        &harness::scrape(relay.addr).await,
        "hirehop_relay_http_connections",
    );
    assert!(open >= 150.0, "only {open} connections open at the end");
    queue.expect_all(ids).await;
    attack.kill().await.unwrap();
    relay.stop().await;
}
