//! The exchange, its alternate exchange, and what happens when a message has nowhere to go or
//! the broker already holds a different topology.

use std::time::Duration;

use hyper::StatusCode;
use lapin::options::ExchangeDeclareOptions;
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;

use crate::harness::{self, TestRelay, eventually, message_id, webhook};

#[tokio::test]
async fn event_nobody_is_bound_to_is_kept_in_the_unrouted_queue() {
    let relay = TestRelay::start().await;
    let mut jobs = relay.queue("job.#").await;
    let mut unrouted = relay.unrouted().await;
    let reply = relay.post(webhook("contact.person.created")).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    let delivery = unrouted.next().await;
    assert_eq!(message_id(&delivery), reply.message_id());
    assert_eq!(delivery.routing_key.as_str(), "contact.person.created");
    // A bound event does not also go to the unrouted queue.
    let reply = relay.post(webhook("job.updated")).await;
    assert_eq!(message_id(&jobs.next().await), reply.message_id());
    let reply = relay.post(webhook("contact.person.updated")).await;
    assert_eq!(message_id(&unrouted.next().await), reply.message_id());
    relay.stop().await;
}

#[tokio::test]
async fn returned_message_is_503_never_202() {
    // Without history too: the history stream would keep (and confirm) every message.
    let relay = TestRelay::builder()
        .env("RELAY_AMQP__ALTERNATE_EXCHANGE", "false")
        .env("RELAY_HISTORY__ENABLED", "false")
        .start()
        .await;
    let reply = relay.post(webhook("job.updated")).await;
    reply.assert_unavailable();
    // Once a consumer binds, the same event is accepted.
    let mut queue = relay.queue("job.updated").await;
    let reply = relay.post(webhook("job.updated")).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(message_id(&queue.next().await), reply.message_id());
    relay.stop().await;
}

/// An exchange someone created by hand, without the alternate exchange the relay declares.
async fn exchange_made_by_hand(channel: &lapin::Channel) -> harness::TestExchange {
    let exchange = harness::unique_exchange();
    declare_plain_topic(channel, &exchange).await;
    exchange
}

/// A durable topic exchange with no arguments, as a broker's definitions or a person make it.
async fn declare_plain_topic(channel: &lapin::Channel, exchange: &str) {
    channel
        .exchange_declare(
            exchange.into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn topology_mismatch_stops_startup_with_a_clear_message() {
    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();
    let exchange = exchange_made_by_hand(&channel).await;
    let url = harness::amqp_url();
    let config = harness::config(&harness::env(&exchange, &url), None);
    let result = tokio::time::timeout(
        harness::PATIENCE,
        hirehop_relay::amqp::Publisher::connect(config.amqp, CancellationToken::new()),
    )
    .await
    .expect("a mismatch fails at once instead of retrying");
    let message = match result {
        Ok(_) => panic!("startup must fail on a topology mismatch"),
        Err(err) => err.to_string(),
    };
    assert!(
        message.contains(&format!("exchange {exchange}")),
        "{message}"
    );
    assert!(message.contains("PRECONDITION"), "{message}");
}

/// The refusal stops the relay as `main` runs it: with a spool the port opens first and the
/// relay stops once the broker refuses; without one it stops before opening the port.
#[tokio::test]
async fn a_topology_the_broker_refuses_stops_the_relay_with_or_without_a_spool() {
    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();
    let exchange = exchange_made_by_hand(&channel).await;
    let spool_dir = harness::spool_dir(&exchange);
    for spool in ["true", "false"] {
        let env = [
            ("RELAY_HTTP__LISTEN", "127.0.0.1:0".to_owned()),
            ("RELAY_AMQP__URL", harness::amqp_url()),
            ("RELAY_AMQP__EXCHANGE", exchange.to_string()),
            ("RELAY_AUTH__EXPORT_KEYS", "k".to_owned()),
            ("RELAY_SPOOL__ENABLED", spool.to_owned()),
            ("RELAY_SPOOL__DIR", spool_dir.to_string_lossy().into_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let config = hirehop_relay::config::Config::load_from(None, Some(env)).unwrap();
        let stopped = tokio::time::timeout(
            harness::PATIENCE,
            hirehop_relay::run(config, CancellationToken::new()),
        )
        .await
        .expect("a refusal stops the relay instead of retrying");
        let err = stopped.expect_err("the relay must not run on a topology the broker refuses");
        assert_eq!(err.to_string(), "cannot set up the broker", "spool {spool}");
        let cause = std::error::Error::source(&err)
            .expect("the refusal")
            .to_string();
        assert!(
            cause.contains(&format!("exchange {exchange}")) && cause.contains("PRECONDITION"),
            "spool {spool}: {cause}"
        );
    }
    let _ = std::fs::remove_dir_all(spool_dir);
}

/// Whether `exchange` exists, asked passively on a channel of its own.
async fn exchange_exists(broker: &lapin::Connection, exchange: &str) -> bool {
    let channel = broker.create_channel().await.unwrap();
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            exchange.into(),
            lapin::ExchangeKind::Topic,
            passive,
            FieldTable::default(),
        )
        .await
        .is_ok()
}

#[tokio::test]
async fn a_publish_to_an_exchange_deleted_meanwhile_declares_the_topology_again() {
    let exchange = harness::unique_exchange();
    let kept = exchange.own("kept");
    let file =
        format!("[[amqp.queues]]\nname = \"{kept}\"\ntype = \"classic\"\nbindings = [\"#\"]\n");
    // Without the history's fanout in front, a publish to the missing exchange fails.
    let relay = TestRelay::builder()
        .env("RELAY_HISTORY__ENABLED", "false")
        .file(&file)
        .exchange(exchange)
        .start()
        .await;
    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();
    let mut queue = harness::TestQueue::consume(&broker, &kept).await;
    channel
        .exchange_delete(relay.exchange.as_str().into(), Default::default())
        .await
        .unwrap();
    // The broker closes the publishing channel (no such exchange): the webhook is spooled,
    // the relay finds the exchange gone, declares everything again, and replays.
    let reply = relay.post(webhook("job.updated")).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    assert_eq!(message_id(&queue.next().await), reply.message_id());
    assert!(exchange_exists(&broker, &relay.exchange).await);
    relay.stop().await;
}

/// With history on, every publish reaches the stream through the fanout in front of the
/// exchange, so none fails when the exchange is deleted: the relay looks for it every 10 s.
#[tokio::test]
async fn with_history_on_a_deleted_exchange_is_found_and_declared_again() {
    let exchange = harness::unique_exchange();
    let kept = exchange.own("kept");
    let file =
        format!("[[amqp.queues]]\nname = \"{kept}\"\ntype = \"classic\"\nbindings = [\"#\"]\n");
    let relay = TestRelay::builder()
        .file(&file)
        .exchange(exchange)
        .start()
        .await;
    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();
    channel
        .exchange_delete(relay.exchange.as_str().into(), Default::default())
        .await
        .unwrap();
    let what = "the relay to declare the deleted exchange again";
    eventually(what, Duration::from_secs(25), || async {
        exchange_exists(&broker, &relay.exchange)
            .await
            .then_some(())
    })
    .await;
    // The queue's binding comes back a moment after the exchange: until then a webhook goes to
    // the unrouted queue, after it to the queue, which held none before.
    let what = "a webhook to reach the queue bound to the declared exchange";
    let reply = eventually(what, harness::PATIENCE, || async {
        let reply = relay.post(webhook("job.updated")).await;
        assert_eq!(reply.json()["status"], "accepted", "{reply:?}");
        match harness::queue_counts(&broker, &kept).await {
            Some((0, _)) | None => Err(reply),
            Some(_) => Ok(reply),
        }
    })
    .await;
    let mut queue = harness::TestQueue::consume(&broker, &kept).await;
    assert_eq!(message_id(&queue.next().await), reply.message_id());
    relay.stop().await;
}

#[tokio::test]
async fn with_declare_off_the_relay_needs_the_exchange_and_declares_nothing() {
    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();
    let exchange = harness::unique_exchange();
    let url = harness::amqp_url();
    let mut with_history = harness::env(&exchange, &url);
    with_history.push(("RELAY_AMQP__DECLARE", "false"));
    let mut settings = with_history.clone();
    settings.push(("RELAY_HISTORY__ENABLED", "false"));
    // No exchange yet: a configuration error, said at once.
    let config = harness::config(&settings, None);
    let result = tokio::time::timeout(
        harness::PATIENCE,
        hirehop_relay::amqp::Publisher::connect(config.amqp, CancellationToken::new()),
    )
    .await
    .expect("a missing exchange fails at once instead of retrying");
    let Err(err) = result else {
        panic!("startup must fail without the exchange");
    };
    let message = err.to_string();
    assert!(
        message.contains(&format!("exchange {exchange} does not exist"))
            && message.contains("amqp.declare"),
        "{message}"
    );

    // The broker's definitions made it (here: the test, as a plain topic exchange, which
    // the relay would have declared otherwise): the relay publishes to it and declares
    // nothing of its own.
    declare_plain_topic(&channel, &exchange).await;
    let mut queue = harness::catch_all(&broker, &exchange).await;
    // With history on, the history's fanout is needed too, and named.
    let config = harness::config(&with_history, None);
    let err = hirehop_relay::amqp::Publisher::connect(config.amqp, CancellationToken::new())
        .await
        .err()
        .expect("startup fails without the history's exchange");
    assert!(
        err.to_string()
            .contains(&format!("exchange {exchange}.history does not exist")),
        "{err}"
    );

    let relay = TestRelay::builder()
        .env("RELAY_AMQP__DECLARE", "false")
        .env("RELAY_HISTORY__ENABLED", "false")
        .exchange(exchange)
        .start()
        .await;
    let reply = relay.post(webhook("job.updated")).await;
    assert_eq!(reply.json()["status"], "accepted", "{reply:?}");
    assert_eq!(message_id(&queue.next().await), reply.message_id());
    let unrouted = format!("{}.unrouted", relay.exchange);
    assert!(!exchange_exists(&broker, &unrouted).await);
    relay.stop().await;
}
