//! The real binary: graceful shutdown under load, fail-closed startup, waiting for the broker,
//! and logs that never carry a secret.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hyper::{Method, StatusCode};
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;

use crate::harness::{
    self, KEY, PATIENCE, RelayProcess, broker_addr, request, send, webhook, webhook_with,
};
use crate::proxy::Proxy;

pub fn env<'a>(exchange: &'a str, url: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("RELAY_HTTP__LISTEN", "127.0.0.1:0"),
        ("RELAY_AMQP__URL", url),
        ("RELAY_AMQP__EXCHANGE", exchange),
        ("RELAY_AUTH__EXPORT_KEYS", KEY),
    ]
}

pub fn unique_exchange() -> String {
    format!("relay-test-{}", uuid::Uuid::now_v7().simple())
}

#[tokio::test]
async fn sigterm_under_load_loses_no_accepted_webhook_and_exits_0() {
    let exchange = unique_exchange();
    let url = harness::amqp_url();
    let mut relay = RelayProcess::spawn(&env(&exchange, &url)).await;
    relay.wait_for("connected to the broker").await;
    let addr = relay.addr();

    // Our own durable-enough queue, bound before the load starts.
    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();
    let queue = format!("{exchange}.all");
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    };
    channel
        .queue_declare(queue.as_str().into(), exclusive, FieldTable::default())
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let accepted_count = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let accepted_count = Arc::clone(&accepted_count);
            tokio::spawn(async move {
                let mut accepted = Vec::new();
                // Until the relay stops answering (the listener is closed).
                for _ in 0..500 {
                    let req = request(Method::POST, "/webhooks/hirehop", webhook("job.updated"));
                    match send(addr, req).await {
                        Ok(reply) if reply.status == StatusCode::ACCEPTED => {
                            accepted.push(reply.message_id());
                            accepted_count.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(reply) => panic!("unexpected {}: {:?}", reply.status, reply.body),
                        Err(_) => break,
                    }
                }
                accepted
            })
        })
        .collect();

    while accepted_count.load(Ordering::SeqCst) < 100 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    relay.signal("TERM");
    let mut accepted = HashSet::new();
    for client in clients {
        accepted.extend(client.await.unwrap());
    }
    let (status, log) = relay.exit().await;
    assert!(status.success(), "exit status {status:?}; log:\n{log}");
    assert!(log.contains("received shutdown signal"), "{log}");
    assert!(accepted.len() >= 100);

    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "sigterm-test".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut missing = accepted;
    while !missing.is_empty() {
        use futures_lite::StreamExt;
        let delivery = tokio::time::timeout(PATIENCE, consumer.next())
            .await
            .unwrap_or_else(|_| panic!("{} accepted webhooks never arrived", missing.len()))
            .unwrap()
            .unwrap();
        missing.remove(&harness::message_id(&delivery));
    }
    harness::delete_topology(&channel, &exchange).await;
}

#[tokio::test]
async fn logs_never_contain_keys_or_bodies() {
    let exchange = unique_exchange();
    let url = harness::amqp_url();
    let mut relay_env = env(&exchange, &url);
    relay_env.push(("RUST_LOG", "trace"));
    let mut relay = RelayProcess::spawn(&relay_env).await;
    relay.wait_for("connected to the broker").await;
    let post = |body: String| {
        send(
            relay.addr(),
            request(Method::POST, "/webhooks/hirehop", body),
        )
    };
    let unrouted_ok = post(webhook("job.updated")).await.unwrap();
    assert_eq!(unrouted_ok.status, StatusCode::ACCEPTED);
    let wrong = post(webhook_with("job.updated", "wrong-key-zz9", 1))
        .await
        .unwrap();
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    let garbage = post("body-marker-q7 not json".into()).await.unwrap();
    assert_eq!(garbage.status, StatusCode::BAD_REQUEST);

    relay.signal("TERM");
    let (status, log) = relay.exit().await;
    assert!(status.success(), "{log}");
    assert!(
        log.contains("webhook accepted") && log.contains("bad_key"),
        "{log}"
    );
    for secret in [
        KEY,
        "wrong-key-zz9",
        "body-marker-q7",
        "Summer festival",
        "guest:guest",
    ] {
        assert!(
            !log.contains(secret),
            "{secret:?} leaked into the log:\n{log}"
        );
    }
    let broker = harness::broker().await;
    harness::delete_topology(&broker.create_channel().await.unwrap(), &exchange).await;
}

#[tokio::test]
async fn startup_waits_for_the_broker_and_says_why() {
    let proxy = Proxy::start(broker_addr()).await;
    proxy.refuse(true);
    let exchange = unique_exchange();
    let url = harness::via(&proxy);
    let mut relay_env = env(&exchange, &url);
    relay_env.push(("RELAY_SPOOL__ENABLED", "false"));
    let mut relay = RelayProcess::start(&[], &relay_env);
    relay.wait_for("broker not available yet").await;
    relay.wait_for("broker not available yet").await;
    proxy.refuse(false);
    relay.wait_for("listening").await;
    relay.signal("TERM");
    let (status, log) = relay.exit().await;
    assert!(status.success(), "{log}");
    assert!(
        !log.contains("guest:guest"),
        "the URL password is redacted:\n{log}"
    );
    let broker = harness::broker().await;
    harness::delete_topology(&broker.create_channel().await.unwrap(), &exchange).await;
}

#[tokio::test]
async fn sigterm_while_waiting_for_the_broker_exits_0() {
    let proxy = Proxy::start(broker_addr()).await;
    proxy.refuse(true);
    let url = harness::via(&proxy);
    let exchange = unique_exchange();
    let mut relay_env = env(&exchange, &url);
    relay_env.push(("RELAY_SPOOL__ENABLED", "false"));
    let mut relay = RelayProcess::start(&[], &relay_env);
    relay.wait_for("broker not available yet").await;
    relay.signal("TERM");
    let (status, log) = relay.exit().await;
    assert!(status.success(), "{log}");
}

#[tokio::test]
async fn no_export_key_refuses_to_start_and_says_how_to_set_one() {
    let relay = RelayProcess::start(&[], &[("RELAY_HTTP__LISTEN", "127.0.0.1:0")]);
    let (status, log) = relay.exit().await;
    assert!(!status.success());
    assert!(log.contains("no export key configured"), "{log}");
    assert!(log.contains("RELAY_AUTH__EXPORT_KEYS"), "{log}");
}

#[tokio::test]
async fn check_config_prints_the_effective_config_without_secrets() {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_hirehop-relay"))
        .arg("check-config")
        .env_clear()
        .env("RELAY_AUTH__EXPORT_KEYS", KEY)
        .env("RELAY_AMQP__URL", "amqp://relay:s3cr3t-pw@rabbit:5672/%2f")
        .env("RELAY_HTTP__MAX_BODY_BYTES", "2048")
        .output()
        .await
        .unwrap();
    assert!(output.status.success());
    let printed = String::from_utf8(output.stdout).unwrap();
    assert!(printed.contains("max_body_bytes = 2048"), "{printed}");
    assert!(
        printed.contains("amqp://relay:***@rabbit:5672/%2f"),
        "{printed}"
    );
    assert!(
        !printed.contains(KEY) && !printed.contains("s3cr3t-pw"),
        "{printed}"
    );

    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_hirehop-relay"))
        .arg("check-config")
        .env_clear()
        .env("RELAY_AUTH__EXPORT_KEYS", KEY)
        .env("RELAY_HTTP__LISTEN", "nowhere")
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let error = String::from_utf8(output.stderr).unwrap();
    assert!(error.contains("listen"), "{error}");
}
