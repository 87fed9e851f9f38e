//! Every bad request gets its precise status, and none of them publishes anything: each test
//! ends by posting a valid marker webhook and checking it is the first thing on the queue.

use hyper::{Method, StatusCode};
use tokio::io::AsyncWriteExt;

use crate::harness::{KEY, TestRelay, raw, read_head, request, webhook_with};

#[tokio::test]
async fn bad_requests_get_their_status_and_publish_nothing() {
    let relay = TestRelay::start().await;
    let mut queue = relay.queue("#").await;
    let post = |body: String| request(Method::POST, "/webhooks/hirehop", body);
    let cases = [
        // 401: the key.
        (
            post(webhook_with("job.updated", "wrong-key", 1)),
            StatusCode::UNAUTHORIZED,
            "export_key is not valid",
        ),
        (
            post(webhook_with("job.updated", "", 1)),
            StatusCode::UNAUTHORIZED,
            "export_key is not valid",
        ),
        (
            post(r#"{"event":"job.updated","company_id":1}"#.into()),
            StatusCode::UNAUTHORIZED,
            "export_key is missing",
        ),
        (
            post(r#"{"event":"job.updated","export_key":123}"#.into()),
            StatusCode::UNAUTHORIZED,
            "export_key is missing",
        ),
        (
            post(format!(
                r#"{{"event":"job.updated","export_key":["{KEY}"]}}"#
            )),
            StatusCode::UNAUTHORIZED,
            "export_key is missing",
        ),
        // 400: the body.
        (
            post("not json".into()),
            StatusCode::BAD_REQUEST,
            "not a JSON object",
        ),
        (
            post(String::new()),
            StatusCode::BAD_REQUEST,
            "not a JSON object",
        ),
        (
            post(format!(r#"["job.updated","{KEY}"]"#)),
            StatusCode::BAD_REQUEST,
            "not a JSON object",
        ),
        (
            post(format!(r#"{{"event":"job.updated","export_key":"{KEY}""#)),
            StatusCode::BAD_REQUEST,
            "not valid JSON",
        ),
        (
            post(format!(
                r#"{{"event":"a","event":"b","export_key":"{KEY}"}}"#
            )),
            StatusCode::BAD_REQUEST,
            "not valid JSON",
        ),
        // 400: JSON that serde_json (and so many consumers) could not read.
        (
            post(format!(
                r#"{{"event":"job.updated","export_key":"{KEY}","data":{{"NAME":"\udc00"}}}}"#
            )),
            StatusCode::BAD_REQUEST,
            "lone leading surrogate in hex escape",
        ),
        (
            post(format!(
                r#"{{"event":"job.updated","export_key":"{KEY}","data":1e999999}}"#
            )),
            StatusCode::BAD_REQUEST,
            "number out of range",
        ),
        (
            post(format!(
                r#"{{"event":"job.updated","export_key":"{KEY}","data":{}}}"#,
                "9".repeat(900_000)
            )),
            StatusCode::BAD_REQUEST,
            "number out of range",
        ),
        (
            post(format!(
                r#"{{"event":"job.updated","export_key":"{KEY}","company_id":"abc"}}"#
            )),
            StatusCode::BAD_REQUEST,
            "company_id",
        ),
        // 400: the event, checked after the key.
        (
            post(webhook_with("job.*", KEY, 1)),
            StatusCode::BAD_REQUEST,
            "wildcard",
        ),
        (
            post(webhook_with("job.#", KEY, 1)),
            StatusCode::BAD_REQUEST,
            "wildcard",
        ),
        (
            post(webhook_with("job..updated", KEY, 1)),
            StatusCode::BAD_REQUEST,
            "empty dot-separated segment",
        ),
        (
            post(webhook_with("", KEY, 1)),
            StatusCode::BAD_REQUEST,
            "event is empty",
        ),
        (
            post(webhook_with("job\nupdated", KEY, 1)),
            StatusCode::BAD_REQUEST,
            "control character",
        ),
        (
            post(webhook_with(&"a".repeat(256), KEY, 1)),
            StatusCode::BAD_REQUEST,
            "longer than 255 bytes",
        ),
        (
            post(format!(r#"{{"export_key":"{KEY}"}}"#)),
            StatusCode::BAD_REQUEST,
            "event is missing",
        ),
        (
            post(format!(r#"{{"event":7,"export_key":"{KEY}"}}"#)),
            StatusCode::BAD_REQUEST,
            "event is missing",
        ),
        // 404 and 405.
        (
            request(
                Method::POST,
                "/webhooks/other",
                webhook_with("job.updated", KEY, 1),
            ),
            StatusCode::NOT_FOUND,
            "not found",
        ),
        (
            request(Method::POST, "/", webhook_with("job.updated", KEY, 1)),
            StatusCode::NOT_FOUND,
            "not found",
        ),
        (
            request(
                Method::PUT,
                "/webhooks/hirehop",
                webhook_with("job.updated", KEY, 1),
            ),
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed",
        ),
        (
            request(Method::DELETE, "/webhooks/hirehop", ""),
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed",
        ),
        (
            request(Method::POST, "/healthz", ""),
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed",
        ),
    ];
    for (req, status, message) in cases {
        let what = format!("{} {}", req.method(), req.uri());
        let reply = relay.send(req).await;
        assert_eq!(reply.status, status, "{what}: {:?}", reply.body);
        let error = reply.json()["error"].as_str().unwrap().to_owned();
        assert!(
            error.contains(message),
            "{what}: {error:?} should contain {message:?}"
        );
        assert!(!error.contains(KEY), "an error body never echoes the key");
        if status == StatusCode::METHOD_NOT_ALLOWED {
            assert!(reply.headers.contains_key("allow"), "{what} has Allow");
        }
    }
    let reply = relay
        .send(request(Method::PATCH, "/webhooks/hirehop", ""))
        .await;
    assert_eq!(reply.headers["allow"], "GET, HEAD, POST");
    relay
        .assert_nothing_published_before_marker(&mut queue, "marker.event")
        .await;
    relay.stop().await;
}

#[tokio::test]
async fn declared_content_length_over_the_limit_is_413_before_any_body_byte() {
    let relay = TestRelay::builder()
        .env("RELAY_HTTP__MAX_BODY_BYTES", "1024")
        .start()
        .await;
    let mut queue = relay.queue("#").await;
    // Only the head is sent: the answer must come without the body.
    let head = raw(
        relay.addr,
        b"POST /webhooks/hirehop HTTP/1.1\r\nHost: x\r\nContent-Length: 1025\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    let head = raw(
        relay.addr,
        b"POST /webhooks/hirehop HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    // At the limit exactly is fine.
    let mut body = webhook_with("job.updated", KEY, 1);
    body.insert_str(
        1,
        &format!("\"pad\":\"{}\",", "x".repeat(1024 - body.len() - 9)),
    );
    assert_eq!(body.len(), 1024);
    assert_eq!(relay.post(body).await.status, StatusCode::ACCEPTED);
    queue.next().await;
    relay
        .assert_nothing_published_before_marker(&mut queue, "marker.event")
        .await;
    relay.stop().await;
}

#[tokio::test]
async fn chunked_body_growing_over_the_limit_is_cut_off_with_413() {
    let relay = TestRelay::builder()
        .env("RELAY_HTTP__MAX_BODY_BYTES", "1024")
        .start()
        .await;
    let mut queue = relay.queue("#").await;
    let mut stream = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    stream
        .write_all(
            b"POST /webhooks/hirehop HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .await
        .unwrap();
    let start = webhook_with("job.updated", KEY, 1);
    let chunk = format!("{:x}\r\n{}\r\n", start.len() - 1, &start[..start.len() - 1]);
    stream.write_all(chunk.as_bytes()).await.unwrap();
    // Keep sending: the relay must answer before the body ends, and never end it for us.
    let filler = format!("{:x}\r\n{}\r\n", 512, " ".repeat(512));
    for _ in 0..4 {
        if stream.write_all(filler.as_bytes()).await.is_err() {
            break;
        }
    }
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    relay
        .assert_nothing_published_before_marker(&mut queue, "marker.event")
        .await;
    relay.stop().await;
}

#[tokio::test]
async fn body_that_never_finishes_gets_408() {
    let relay = TestRelay::builder()
        .env("RELAY_HTTP__REQUEST_TIMEOUT_MS", "300")
        .start()
        .await;
    let mut queue = relay.queue("#").await;
    let body = webhook_with("job.updated", KEY, 1);
    let partial = format!(
        "POST /webhooks/hirehop HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{}",
        body.len(),
        &body[..body.len() / 2]
    );
    let mut stream = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    stream.write_all(partial.as_bytes()).await.unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    relay
        .assert_nothing_published_before_marker(&mut queue, "marker.event")
        .await;
    relay.stop().await;
}

#[tokio::test]
async fn a_missing_or_doubled_host_is_400_on_http_1_1() {
    let relay = TestRelay::start().await;
    let mut queue = relay.queue("#").await;
    let body = webhook_with("job.updated", KEY, 1);
    let post = |host: &str| {
        format!(
            "POST /webhooks/hirehop HTTP/1.1\r\n{host}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    for (host, message) in [
        ("", "HTTP/1.1 request without a Host header"),
        ("Host: a\r\nHost: a\r\n", "more than one Host header"),
        ("Host: a\r\nhost: b\r\n", "more than one Host header"),
        (
            "Host: user@relay.test\r\n",
            "Host header is not a valid host",
        ),
        ("Host: a b\r\n", "Host header is not a valid host"),
    ] {
        let mut stream = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
        stream.write_all(post(host).as_bytes()).await.unwrap();
        let head = read_head(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 400"), "{host:?}: {head}");
        let mut rest = vec![0; 200];
        let n = tokio::io::AsyncReadExt::read(&mut stream, &mut rest)
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&rest[..n]);
        assert!(text.contains(message), "{host:?}: {text}");
    }
    // HTTP/1.0 needs no Host; an empty one is what a client without an authority sends.
    let head = raw(relay.addr, b"GET /healthz HTTP/1.0\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    let head = raw(relay.addr, b"GET /healthz HTTP/1.1\r\nHost:\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // HTTP/2 carries the authority in :authority, without a Host header.
    let stream = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let authority = format!("http://{}", relay.addr);
    assert_eq!(
        crate::harness::post_h2(stream, &authority, "job.updated").await,
        StatusCode::ACCEPTED
    );
    queue.next().await;
    relay
        .assert_nothing_published_before_marker(&mut queue, "marker.event")
        .await;
    relay.stop().await;
}
