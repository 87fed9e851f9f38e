//! The history stream, on real streams: webhooks are posted through a relay, and what the
//! broker holds afterwards is counted.

use hirehop_relay::amqp::history::{Entry, Reader, Start};
use hirehop_relay::config::AmqpConfig;
use hyper::{Method, StatusCode};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeBindOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ExchangeKind};

use crate::harness::{
    self, KEY, PATIENCE, RelayProcess, TestRelay, message_id, webhook, webhook_with,
};

/// Everything the history stream of the relay configured by `config` holds, read up to its end.
async fn history(config: &AmqpConfig) -> Vec<Entry> {
    let broker = harness::broker().await;
    let mut reader =
        tokio::time::timeout(PATIENCE, Reader::open(&broker, config, Start::First, true))
            .await
            .expect("the history stream opens in time")
            .expect("the history stream can be read");
    let mut entries = Vec::new();
    loop {
        let next = tokio::time::timeout(PATIENCE, reader.next())
            .await
            .expect("the reader reaches its end marker in time")
            .expect("the history stream can be read");
        match next {
            Some(entry) => entries.push(entry),
            None => return entries,
        }
    }
}

fn ids(entries: &[Entry]) -> Vec<String> {
    entries.iter().map(|e| message_id(&e.message)).collect()
}

/// A queue of the test's own (not exclusive: replay binds it from its own connection).
async fn own_queue(channel: &lapin::Channel, name: &str, arguments: FieldTable) {
    channel
        .queue_declare(name.into(), QueueDeclareOptions::default(), arguments)
        .await
        .unwrap();
}

async fn bind(channel: &lapin::Channel, queue: &str, exchange: &str, pattern: &str) {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            pattern.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
}

async fn message_count(channel: &lapin::Channel, queue: &str) -> u32 {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .message_count()
}

fn sorted(ids: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut ids: Vec<String> = ids.into_iter().collect();
    ids.sort();
    ids
}

/// Posts a webhook for `event` of `company` and returns its `message_id`.
async fn post(relay: &TestRelay, event: &str, company: u64) -> String {
    let reply = relay.post(webhook_with(event, KEY, company)).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
    reply.message_id()
}

/// The fact the history topology rests on, checked on this broker: an alternate exchange
/// acts per exchange. A catch-all binding on the topic exchange itself silences its alternate
/// exchange; a fanout in front of it, bound to the stream and to the exchange, does not.
#[tokio::test]
async fn rabbitmq_applies_an_alternate_exchange_per_exchange_along_exchange_bindings() {
    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let x = harness::unique_exchange();
    let (unrouted, front, tap) = (
        format!("{x}.unrouted"),
        format!("{x}.front"),
        format!("{x}.tap"),
    );
    let declare = |name: String, kind: ExchangeKind, arguments: FieldTable| {
        let channel = channel.clone();
        async move {
            channel
                .exchange_declare(
                    name.as_str().into(),
                    kind,
                    ExchangeDeclareOptions::default(),
                    arguments,
                )
                .await
                .unwrap();
        }
    };
    let mut ae = FieldTable::default();
    ae.insert(
        "alternate-exchange".into(),
        AMQPValue::LongString(unrouted.as_str().into()),
    );
    declare(
        unrouted.clone(),
        ExchangeKind::Fanout,
        FieldTable::default(),
    )
    .await;
    declare(x.clone(), ExchangeKind::Topic, ae).await;
    declare(front.clone(), ExchangeKind::Fanout, FieldTable::default()).await;
    for queue in [&unrouted, &tap] {
        own_queue(&channel, queue, FieldTable::default()).await;
    }
    bind(&channel, &unrouted, &unrouted, "").await;
    let publish = |exchange: String| {
        let channel = channel.clone();
        async move {
            channel
                .basic_publish(
                    exchange.as_str().into(),
                    "nobody.bound".into(),
                    BasicPublishOptions::default(),
                    b"{}",
                    BasicProperties::default(),
                )
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };

    // A catch-all tap on the exchange itself: the alternate exchange never sees a message.
    let e2e = |source: &str, destination: &str| {
        let (channel, source, destination) =
            (channel.clone(), source.to_owned(), destination.to_owned());
        async move {
            channel
                .exchange_bind(
                    destination.as_str().into(),
                    source.as_str().into(),
                    "#".into(),
                    ExchangeBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
        }
    };
    declare(
        format!("{x}.tapx"),
        ExchangeKind::Fanout,
        FieldTable::default(),
    )
    .await;
    bind(&channel, &tap, &format!("{x}.tapx"), "").await;
    e2e(&x, &format!("{x}.tapx")).await;
    publish(x.clone()).await;
    assert_eq!(message_count(&channel, &unrouted).await, 0);
    assert_eq!(message_count(&channel, &tap).await, 1);
    channel
        .exchange_delete(format!("{x}.tapx").as_str().into(), Default::default())
        .await
        .unwrap();

    // A fanout in front: the tap and the alternate exchange both get it.
    bind(&channel, &tap, &front, "").await;
    e2e(&front, &x).await;
    publish(front.clone()).await;
    assert_eq!(message_count(&channel, &unrouted).await, 1);
    assert_eq!(message_count(&channel, &tap).await, 2);

    for queue in [&unrouted, &tap] {
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for exchange in [&x, &unrouted, &front] {
        let _ = channel
            .exchange_delete(exchange.as_str().into(), Default::default())
            .await;
    }
}

#[tokio::test]
async fn with_history_on_an_unbound_event_still_reaches_the_unrouted_queue() {
    let relay = TestRelay::start().await;
    let mut jobs = relay.queue("job.#").await;
    let mut unrouted = relay.unrouted().await;
    let routed = post(&relay, "job.updated", 1).await;
    let unbound = post(&relay, "contact.person.created", 1).await;
    assert_eq!(message_id(&jobs.next().await), routed);
    let delivery = unrouted.next().await;
    assert_eq!(message_id(&delivery), unbound);
    assert_eq!(delivery.routing_key.as_str(), "contact.person.created");
    // Only the unbound one went to the unrouted queue; the stream holds both.
    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();
    assert_eq!(
        message_count(&channel, &relay.config.amqp.unrouted_name()).await,
        0
    );
    assert_eq!(ids(&history(&relay.config.amqp).await), [routed, unbound]);
    relay.stop().await;
}

/// Publisher confirms cover the stream: every webhook answered 202 is in it, none twice.
#[tokio::test]
async fn every_webhook_answered_202_is_in_the_history_stream() {
    let relay = TestRelay::start().await;
    let mut posts = tokio::task::JoinSet::new();
    for i in 0..60 {
        let event = [
            "job.updated",
            "invoice.status.updated",
            "contact.person.created",
        ][i % 3];
        let request = harness::request(Method::POST, &relay.config.http.path, webhook(event));
        posts.spawn(harness::send(relay.addr, request));
    }
    let mut accepted = Vec::new();
    while let Some(reply) = posts.join_next().await {
        let reply = reply.unwrap().expect("the relay answers");
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
        accepted.push(reply.message_id());
    }
    let held = ids(&history(&relay.config.amqp).await);
    assert_eq!(held.len(), accepted.len(), "nothing twice, nothing missing");
    assert_eq!(sorted(held), sorted(accepted));
    relay.stop().await;
}

/// Without an alternate exchange, history keeps an event no queue is bound for: the broker
/// confirms it (the stream took it), so the relay answers 202 instead of losing it with a 503.
#[tokio::test]
async fn without_an_alternate_exchange_history_keeps_an_unbound_event() {
    let relay = TestRelay::start_with(&[("RELAY_AMQP__ALTERNATE_EXCHANGE", "false")]).await;
    let id = post(&relay, "contact.person.created", 1).await;
    assert_eq!(ids(&history(&relay.config.amqp).await), [id]);
    relay.stop().await;
}

#[tokio::test]
async fn history_off_declares_no_stream_and_publishes_to_the_exchange() {
    let relay = TestRelay::start_with(&[("RELAY_HISTORY__ENABLED", "false")]).await;
    let mut queue = relay.queue("#").await;
    let id = post(&relay, "job.updated", 1).await;
    let delivery = queue.next().await;
    assert_eq!(message_id(&delivery), id);
    assert_eq!(delivery.exchange.as_str(), relay.exchange);
    let broker = harness::broker().await;
    let history = relay.config.amqp.history_name();
    let err = broker
        .create_channel()
        .await
        .unwrap()
        .queue_declare(
            history.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("NOT_FOUND"), "{err}");
    let err = broker
        .create_channel()
        .await
        .unwrap()
        .exchange_declare(
            history.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("NOT_FOUND"), "{err}");
    relay.stop().await;
}

/// `<exchange>.history` exists, but is a classic queue: the relay does not start, and says
/// how to run without history.
#[tokio::test]
async fn an_existing_non_stream_history_queue_stops_startup_with_a_clear_message() {
    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();
    let exchange = harness::unique_exchange();
    let history = format!("{exchange}.history");
    channel
        .queue_declare(
            history.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let url = harness::amqp_url();
    let relay = RelayProcess::start(&[], &harness::env(&exchange, &url));
    let (status, log) = relay.exit().await;
    assert!(!status.success(), "{log}");
    assert!(log.contains(&format!("history stream {history}")), "{log}");
    assert!(log.contains("history.enabled = false"), "{log}");
    assert!(log.contains("PRECONDITION_FAILED"), "{log}");
    harness::delete_topology(&channel, &exchange).await;
}

/// A broker that cannot create streams (here RabbitMQ 3.10 with the `stream_queue` feature
/// flag off, as after an upgrade from 3.8 that did not enable the new flags): the relay does
/// not start, and says why and how to run without history.
#[tokio::test]
async fn a_broker_without_streams_stops_startup_with_a_clear_message() {
    let node = crate::local_cluster::LocalCluster::up_with(
        1,
        &[(
            "RABBITMQ_FEATURE_FLAGS",
            "quorum_queue,implicit_default_bindings,virtual_host_metadata,\
             maintenance_mode_status,user_limits",
        )],
    );
    let flags = node.ctl(1, &["list_feature_flags", "-q", "name", "state"]);
    assert!(
        flags
            .lines()
            .any(|l| l.split_whitespace().eq(["stream_queue", "disabled"])),
        "this RabbitMQ enables streams whatever RABBITMQ_FEATURE_FLAGS says:\n{flags}"
    );
    let url = node.url(1);
    let exchange = harness::unique_exchange();
    let relay = RelayProcess::start(&[], &harness::env(&exchange, &url));
    let (status, log) = relay.exit().await;
    assert!(!status.success(), "{log}");
    assert!(log.contains("history stream"), "{log}");
    assert!(log.contains("feature flag"), "{log}");
    assert!(log.contains("history.enabled = false"), "{log}");
    // And without history it runs there.
    let mut env = harness::env(&exchange, &url);
    env.push(("RELAY_HISTORY__ENABLED", "false"));
    let relay = RelayProcess::spawn(&env).await;
    relay.terminate().await;
}
