//! What a 202 means: the broker holds the very bytes that were posted, with the documented
//! routing key, properties and headers.

use std::time::{Duration, SystemTime};

use hyper::{Method, StatusCode};
use lapin::types::AMQPValue;
use sha2::{Digest, Sha256};

use crate::harness::{KEY, TestRelay, raw, request, webhook, webhook_with};

#[tokio::test]
async fn accepted_webhook_arrives_byte_for_byte_with_the_documented_properties() {
    let relay = TestRelay::start().await;
    let mut queue = relay.queue("#").await;
    // Odd spacing, escapes and non-ASCII: re-serializing would change these bytes.
    let body = format!(
        "{{ \"event\" : \"job.status.updated\",\"export_key\":\"{KEY}\",\r\n\
         \"company_id\":1, \"user_id\" : \"7\", \"time\":\"2022-03-29 07:50:42\",\
         \"data\":{{\"JOB_NAME\":\"B\\u00fchne \u{1F3AA}\",\"N\":1.50}},\"changes\":[] }}\n"
    );
    let before = SystemTime::now();
    let reply = relay.post(body.clone()).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
    assert_eq!(reply.json()["status"], "accepted");
    let message_id = reply.message_id();
    assert_eq!(reply.headers["x-request-id"], message_id.as_str());

    let delivery = queue.next().await;
    assert_eq!(delivery.data, body.as_bytes());
    // With history on (the default) the relay publishes to `<exchange>.history`, which passes
    // the message on to the exchange.
    assert_eq!(
        delivery.exchange.as_str(),
        relay.config.amqp.publish_exchange()
    );
    assert_eq!(delivery.routing_key.as_str(), "job.status.updated");
    let props = &delivery.properties;
    assert_eq!(props.delivery_mode(), &Some(2));
    assert_eq!(
        props.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    assert_eq!(props.message_id().as_ref().unwrap().as_str(), message_id);
    assert_eq!(props.app_id().as_ref().unwrap().as_str(), "hirehop-relay");
    assert_eq!(
        props.kind().as_ref().unwrap().as_str(),
        "job.status.updated"
    );
    let timestamp = props.timestamp().expect("timestamp is set");
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        timestamp <= now && timestamp + 60 >= now,
        "{timestamp} vs {now}"
    );

    let headers = props.headers().as_ref().expect("headers are set").inner();
    let string = |name: &str| match headers.get(name) {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        other => panic!("header {name}: {other:?}"),
    };
    assert_eq!(string("event"), "job.status.updated");
    assert_eq!(headers.get("company_id"), Some(&AMQPValue::LongLongInt(1)));
    assert_eq!(headers.get("user_id"), Some(&AMQPValue::LongLongInt(7)));
    assert_eq!(
        string("body_sha256"),
        hex::encode(Sha256::digest(body.as_bytes()))
    );
    let received_at = humantime::parse_rfc3339(&string("received_at")).unwrap();
    assert!(received_at + Duration::from_secs(1) >= before && received_at <= SystemTime::now());
    relay.stop().await;
}

#[tokio::test]
async fn every_shape_hirehop_may_send_is_accepted() {
    let relay = TestRelay::start().await;
    let mut queue = relay.queue("#").await;
    let bodies = [
        format!(
            r#"{{"event":"job.updated","export_key":"{KEY}","company_id":"1","changes":{{}}}}"#
        ),
        format!(r#"{{"event":"job.updated","export_key":"{KEY}","company_id":1,"changes":[]}}"#),
        format!(r#"{{"event":"job.created","export_key":"{KEY}","company_id":1}}"#),
        format!(
            r#"{{"event":"invoice.status.updated","export_key":"{KEY}","job":{{"ID":1}},"x":[1,null,true]}}"#
        ),
        format!(
            r#"{{"event":"contact.person.updated","export_key":"{KEY}","user_name":"","data":{{"NAME":"Zoë 東京"}}}}"#
        ),
        format!(
            r#"{{"event":"brand.new.event.nobody.knows","export_key":"{KEY}","user_id":null}}"#
        ),
    ];
    for body in &bodies {
        let reply = relay.post(body.clone()).await;
        assert_eq!(
            reply.status,
            StatusCode::ACCEPTED,
            "{body}: {:?}",
            reply.body
        );
        assert_eq!(queue.next().await.data, body.as_bytes());
    }

    // Whatever the Content-Type says, the body is read as JSON.
    for content_type in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "nonsense",
    ] {
        let mut req = request(Method::POST, "/webhooks/hirehop", webhook("job.updated"));
        req.headers_mut()
            .insert("content-type", content_type.parse().unwrap());
        assert_eq!(
            relay.send(req).await.status,
            StatusCode::ACCEPTED,
            "{content_type}"
        );
        queue.next().await;
    }

    // A chunked body without Content-Length.
    let body = webhook("job.updated");
    let chunked = format!(
        "POST /webhooks/hirehop HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
         {:x}\r\n{}\r\n{:x}\r\n{}\r\n0\r\n\r\n",
        10,
        &body[..10],
        body.len() - 10,
        &body[10..]
    );
    let head = raw(relay.addr, chunked.as_bytes()).await;
    assert!(head.starts_with("HTTP/1.1 202"), "{head}");
    assert_eq!(queue.next().await.data, body.as_bytes());
    relay.stop().await;
}

#[tokio::test]
async fn company_keys_open_only_their_company_and_rotation_accepts_old_and_new() {
    let file = r#"
        [auth]
        export_keys = []
        [[auth.companies]]
        company_id = 10
        export_keys = ["old-key-10", "new-key-10"]
        [[auth.companies]]
        company_id = 20
        export_keys = ["key-20"]
    "#;
    let relay = TestRelay::builder()
        .env("RELAY_AUTH__EXPORT_KEYS", "")
        .file(file)
        .start()
        .await;
    let mut queue = relay.queue("#").await;
    for (key, company, expected) in [
        ("old-key-10", 10, StatusCode::ACCEPTED),
        ("new-key-10", 10, StatusCode::ACCEPTED),
        ("key-20", 20, StatusCode::ACCEPTED),
        ("key-20", 10, StatusCode::UNAUTHORIZED),
        ("new-key-10", 20, StatusCode::UNAUTHORIZED),
        (KEY, 10, StatusCode::UNAUTHORIZED),
    ] {
        let reply = relay.post(webhook_with("job.updated", key, company)).await;
        assert_eq!(reply.status, expected, "{key} for company {company}");
        if expected == StatusCode::ACCEPTED {
            assert_eq!(
                crate::harness::message_id(&queue.next().await),
                reply.message_id()
            );
        }
    }
    // A company key without company_id in the body opens nothing.
    let body = r#"{"event":"job.updated","export_key":"key-20"}"#;
    assert_eq!(relay.post(body).await.status, StatusCode::UNAUTHORIZED);
    relay.stop().await;
}

#[tokio::test]
async fn routing_key_prefix_is_prepended_and_type_keeps_the_event() {
    let relay = TestRelay::builder()
        .env("RELAY_AMQP__ROUTING_KEY_PREFIX", "hirehop.")
        .start()
        .await;
    let mut queue = relay.queue("hirehop.job.#").await;
    let reply = relay.post(webhook("job.status.updated")).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    let delivery = queue.next().await;
    assert_eq!(delivery.routing_key.as_str(), "hirehop.job.status.updated");
    assert_eq!(
        delivery.properties.kind().as_ref().unwrap().as_str(),
        "job.status.updated"
    );
    relay.stop().await;
}

#[tokio::test]
async fn url_checks_and_health_endpoints_answer() {
    let relay = TestRelay::start().await;
    for (method, path, status) in [
        (Method::GET, "/webhooks/hirehop", StatusCode::OK),
        (Method::HEAD, "/webhooks/hirehop", StatusCode::OK),
        (Method::GET, "/healthz", StatusCode::OK),
        (Method::GET, "/readyz", StatusCode::OK),
        (Method::HEAD, "/readyz", StatusCode::OK),
    ] {
        let reply = relay.send(request(method.clone(), path, "")).await;
        assert_eq!(reply.status, status, "{method} {path}");
    }
    let reply = relay.send(request(Method::GET, "/readyz", "")).await;
    assert_eq!(reply.json()["status"], "ok");
    relay.stop().await;
}

#[tokio::test]
async fn http2_prior_knowledge_is_served() {
    let relay = TestRelay::start().await;
    let mut queue = relay.queue("#").await;
    let stream = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let authority = format!("http://{}", relay.addr);
    let status = crate::harness::post_h2(stream, &authority, "job.updated").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(queue.next().await.routing_key.as_str(), "job.updated");
    relay.stop().await;
}
