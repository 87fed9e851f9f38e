//! The exchange, its alternate exchange, and what happens when a message has nowhere to go or
//! the broker already holds a different topology.

use hyper::StatusCode;
use lapin::options::ExchangeDeclareOptions;
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;

use crate::harness::{self, TestRelay, message_id, webhook};

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
    let relay = TestRelay::start_with(&[
        ("RELAY_AMQP__ALTERNATE_EXCHANGE", "false"),
        ("RELAY_HISTORY__ENABLED", "false"),
    ])
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

#[tokio::test]
async fn topology_mismatch_stops_startup_with_a_clear_message() {
    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();
    let exchange = format!("relay-test-mismatch-{}", uuid::Uuid::now_v7().simple());
    // Someone created the exchange by hand, without the alternate exchange.
    channel
        .exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let env: std::collections::HashMap<String, String> = [
        ("RELAY_AMQP__URL", harness::amqp_url()),
        ("RELAY_AMQP__EXCHANGE", exchange.clone()),
        ("RELAY_AUTH__EXPORT_KEYS", "k".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let config = hirehop_relay::config::Config::load_from(None, Some(env)).unwrap();
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
    harness::delete_topology(&channel, &exchange).await;
}
