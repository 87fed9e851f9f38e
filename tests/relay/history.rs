//! The history stream, `replay`, `requeue` and `tail --since`, on real streams: webhooks are
//! posted through a relay, and what the broker holds afterwards is counted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, SystemTime};

use futures_lite::StreamExt;
use hirehop_relay::amqp::history::{self, Entry, Filter, Reader, Start};
use hirehop_relay::amqp::replay::{self, Outcome, REPLAY_HEADER, Target};
use hirehop_relay::amqp::requeue;
use hirehop_relay::config::AmqpConfig;
use hirehop_relay::routing::TopicPattern;
use hyper::{Method, StatusCode};
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
    ConfirmSelectOptions, ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ExchangeKind};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::harness::{
    self, KEY, PATIENCE, RelayProcess, TestRelay, eventually, message_id, webhook, webhook_with,
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

/// Declares a queue of the test's own, named by [`harness::TestExchange::own`] so that it is
/// deleted at the end (not exclusive: replay binds it from its own connection).
async fn declare_queue(channel: &lapin::Channel, name: &str, arguments: FieldTable) {
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

/// Posts one webhook of each of `events` to `relay`, whose exchange has no queue bound, and
/// checks that they all wait in `<exchange>.unrouted`. Returns their ids: those of the `job.`
/// events, then the others', each in the order posted.
async fn post_unrouted(relay: &TestRelay, events: &[&str]) -> (Vec<String>, Vec<String>) {
    let (mut jobs, mut others) = (Vec::new(), Vec::new());
    for event in events {
        let id = post(relay, event, 1).await;
        match event.starts_with("job.") {
            true => jobs.push(id),
            false => others.push(id),
        }
    }
    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();
    let unrouted = relay.config.amqp.unrouted_name();
    let waiting = message_count(&channel, &unrouted).await;
    assert_eq!(usize::try_from(waiting).unwrap(), events.len());
    (jobs, others)
}

/// Takes every message `queue` holds right now (the tools return only once the broker
/// confirmed what they published, so nothing is still on its way).
async fn take_all(channel: &lapin::Channel, queue: &str) -> Vec<lapin::message::Delivery> {
    let count = message_count(channel, queue).await;
    // A consumer, not basic.get: a quorum queue answers a get in a millisecond or two.
    let own = channel.clone();
    let mut consumer = own
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut taken = Vec::new();
    while taken.len() < count as usize {
        let next = tokio::time::timeout(PATIENCE, consumer.next()).await;
        taken.push(next.expect("in time").expect("open").expect("readable"));
    }
    own.basic_cancel(consumer.tag(), BasicCancelOptions::default())
        .await
        .unwrap();
    taken
}

/// Waits until `queue` holds `n` messages: messages a tool took and did not ack go back to
/// their quorum queue a moment after it closed its connection.
async fn wait_count(channel: &lapin::Channel, queue: &str, n: u32) {
    eventually(
        &format!("{queue} to hold {n} messages"),
        PATIENCE,
        || async {
            let count = message_count(channel, queue).await;
            if count == n { Ok(()) } else { Err(count) }
        },
    )
    .await;
}

async fn run_replay(config: &AmqpConfig, request: replay::Request) -> Outcome {
    tokio::time::timeout(
        PATIENCE,
        replay::replay(config, &request, &mut |_| {}, std::future::pending()),
    )
    .await
    .expect("replay ends in time")
    .expect("replay runs")
}

fn to_queue(queue: &str, filter: Filter) -> replay::Request {
    replay::Request {
        start: filter.since.map_or(Start::First, Start::Since),
        filter,
        target: Some(Target::Queue(queue.to_owned())),
        dry_run: false,
    }
}

async fn run_requeue(config: &AmqpConfig, request: requeue::Request) -> requeue::Counts {
    let outcome = tokio::time::timeout(
        PATIENCE,
        requeue::requeue(config, &request, &mut |_| {}, std::future::pending()),
    )
    .await
    .expect("requeue ends in time")
    .expect("requeue runs");
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    outcome.counts
}

/// The relay binary with `args`, for the tools; its output once it exits.
async fn tool(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_hirehop-relay"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(PATIENCE, run)
        .await
        .expect("the tool ends in time")
        .expect("the relay binary runs")
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
    let (unrouted, front, tap, tapx) = (
        format!("{x}.unrouted"),
        x.own("front"),
        x.own("tap"),
        x.own("tapx"),
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
    declare(x.to_string(), ExchangeKind::Topic, ae).await;
    declare(front.clone(), ExchangeKind::Fanout, FieldTable::default()).await;
    for queue in [&unrouted, &tap] {
        declare_queue(&channel, queue, FieldTable::default()).await;
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
    declare(tapx.clone(), ExchangeKind::Fanout, FieldTable::default()).await;
    bind(&channel, &tap, &tapx, "").await;
    e2e(&x, &tapx).await;
    publish(x.to_string()).await;
    assert_eq!(message_count(&channel, &unrouted).await, 0);
    assert_eq!(message_count(&channel, &tap).await, 1);
    channel
        .exchange_delete(tapx.as_str().into(), Default::default())
        .await
        .unwrap();

    // A fanout in front: the tap and the alternate exchange both get it.
    bind(&channel, &tap, &front, "").await;
    e2e(&front, &x).await;
    publish(front.clone()).await;
    assert_eq!(message_count(&channel, &unrouted).await, 1);
    assert_eq!(message_count(&channel, &tap).await, 2);
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
    let relay = TestRelay::builder()
        .env("RELAY_AMQP__ALTERNATE_EXCHANGE", "false")
        .start()
        .await;
    let id = post(&relay, "contact.person.created", 1).await;
    assert_eq!(ids(&history(&relay.config.amqp).await), [id]);
    relay.stop().await;
}

#[tokio::test]
async fn history_off_declares_no_stream_and_publishes_to_the_exchange() {
    let relay = TestRelay::builder()
        .env("RELAY_HISTORY__ENABLED", "false")
        .start()
        .await;
    let mut queue = relay.queue("#").await;
    let id = post(&relay, "job.updated", 1).await;
    let delivery = queue.next().await;
    assert_eq!(message_id(&delivery), id);
    assert_eq!(delivery.exchange.as_str(), relay.exchange.as_str());
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
    let exchange = harness::TestExchange::on_own_broker();
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

/// Ten webhooks posted one after the other; the window is cut at the `received_at` of the
/// fourth and the seventh, as the relay's clock gave them.
#[tokio::test]
async fn replay_by_time_window_returns_exactly_the_webhooks_received_in_it() {
    let relay = TestRelay::start().await;
    let events = [
        "job.updated",
        "invoice.status.updated",
        "contact.person.created",
    ];
    let mut posted = Vec::new();
    for i in 0..10 {
        posted.push(post(&relay, events[i % 3], 1).await);
    }
    let held = history(&relay.config.amqp).await;
    assert_eq!(ids(&held), posted);
    let received: Vec<SystemTime> = held
        .iter()
        .map(|e| history::received_at(&e.message).expect("the relay sets received_at"))
        .collect();
    let (since, until) = (received[3], received[6]);
    let expected = sorted(
        posted
            .iter()
            .zip(&received)
            .filter(|(_, at)| (since..=until).contains(*at))
            .map(|(id, _)| id.clone()),
    );
    assert!(expected.len() >= 4, "{expected:?}");

    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();
    let target = relay.exchange.own("backfill");
    declare_queue(&channel, &target, FieldTable::default()).await;
    let filter = Filter {
        since: Some(since),
        until: Some(until),
        ..Filter::default()
    };
    let outcome = run_replay(&relay.config.amqp, to_queue(&target, filter)).await;
    assert!(outcome.interrupted.is_none(), "{:?}", outcome.interrupted);
    let counts = outcome.counts;
    assert_eq!(counts.matched, expected.len() as u64);
    assert_eq!(counts.confirmed, counts.matched);
    let replayed = take_all(&channel, &target).await;
    assert_eq!(sorted(replayed.iter().map(message_id)), expected);

    relay.stop().await;
}

#[tokio::test]
async fn replay_filters_by_event_pattern_and_company() {
    let relay = TestRelay::start().await;
    let mut wanted = Vec::new();
    for (event, company) in [
        ("job.status.updated", 2),
        ("job.updated", 1),
        ("invoice.status.updated", 2),
        ("job.created", 2),
        ("contact.person.created", 2),
    ] {
        let id = post(&relay, event, company).await;
        if event.starts_with("job.") && company == 2 {
            wanted.push(id);
        }
    }
    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();
    let target = relay.exchange.own("jobs2");
    declare_queue(&channel, &target, FieldTable::default()).await;
    let filter = Filter {
        event: Some(TopicPattern::parse("job.#").unwrap()),
        company: Some(2),
        ..Filter::default()
    };
    let outcome = run_replay(&relay.config.amqp, to_queue(&target, filter)).await;
    assert_eq!(outcome.counts.read, 5);
    assert_eq!(
        outcome.counts.events,
        BTreeMap::from([
            ("job.created".to_owned(), 1),
            ("job.status.updated".to_owned(), 1)
        ])
    );
    let replayed = take_all(&channel, &target).await;
    assert_eq!(sorted(replayed.iter().map(message_id)), sorted(wanted));
    relay.stop().await;
}

/// `--to-queue` backfills one consumer: the other queues bound to the exchange, the unrouted
/// queue and the stream itself get nothing.
#[tokio::test]
async fn replay_to_a_queue_delivers_to_that_queue_only() {
    let relay = TestRelay::start().await;
    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();
    let (other, target) = (relay.exchange.own("other"), relay.exchange.own("target"));
    declare_queue(&channel, &other, FieldTable::default()).await;
    bind(&channel, &other, &relay.exchange, "job.#").await;
    declare_queue(&channel, &target, FieldTable::default()).await;
    bind(&channel, &target, &relay.exchange, "job.#").await;
    let mut posted = Vec::new();
    for event in ["job.updated", "job.updated", "contact.person.created"] {
        posted.push(post(&relay, event, 1).await);
    }
    // Now as after a consumer bug: the target's messages were consumed and lost.
    assert_eq!(take_all(&channel, &target).await.len(), 2);
    let other_before = message_count(&channel, &other).await;
    let unrouted = relay.config.amqp.unrouted_name();
    let unrouted_before = message_count(&channel, &unrouted).await;

    let outcome = run_replay(&relay.config.amqp, to_queue(&target, Filter::default())).await;
    assert_eq!(outcome.counts.confirmed, 3);
    let replayed = take_all(&channel, &target).await;
    assert_eq!(
        sorted(replayed.iter().map(message_id)),
        sorted(posted.clone())
    );
    // The copies keep their routing key, though they came through no binding of theirs.
    assert_eq!(replayed[2].routing_key.as_str(), "contact.person.created");
    assert_eq!(message_count(&channel, &other).await, other_before);
    assert_eq!(message_count(&channel, &unrouted).await, unrouted_before);
    assert_eq!(ids(&history(&relay.config.amqp).await), posted);

    relay.stop().await;
}

/// A replayed copy is the original, body, routing key, properties and headers, plus one
/// header saying when it was replayed.
#[tokio::test]
async fn replayed_copies_are_byte_identical_apart_from_the_replay_header() {
    let relay = TestRelay::start().await;
    let mut consumer = relay.queue("#").await;
    let body = format!(
        "{{ \"event\" : \"job.status.updated\",\"export_key\":\"{KEY}\",\r\n\
         \"company_id\":\"42\", \"user_id\" : 7, \"data\":{{\"N\":1.50,\"S\":\"B\\u00fchne \u{1F3AA}\"}},\"changes\":[] }}\n"
    );
    let mut request = harness::request(Method::POST, &relay.config.http.path, body.clone());
    request.headers_mut().insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap(),
    );
    request
        .headers_mut()
        .insert("tracestate", "vendor=value".parse().unwrap());
    assert_eq!(relay.send(request).await.status, StatusCode::ACCEPTED);
    let original = consumer.next().await;
    assert_eq!(original.data, body.as_bytes());

    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();
    let target = relay.exchange.own("copy");
    declare_queue(&channel, &target, FieldTable::default()).await;
    let before = SystemTime::now();
    run_replay(&relay.config.amqp, to_queue(&target, Filter::default())).await;
    let mut copies = take_all(&channel, &target).await;
    assert_eq!(copies.len(), 1);
    let copy = copies.remove(0);

    assert_eq!(copy.data, original.data);
    assert_eq!(copy.routing_key, original.routing_key);
    let without_headers = |p: &BasicProperties| p.clone().with_headers(FieldTable::default());
    assert_eq!(
        without_headers(&copy.properties),
        without_headers(&original.properties)
    );
    let mut headers = copy.properties.headers().clone().unwrap().inner().clone();
    let Some(AMQPValue::LongString(replayed_at)) = headers.remove(REPLAY_HEADER) else {
        panic!("no {REPLAY_HEADER} string header: {headers:?}");
    };
    let replayed_at = humantime::parse_rfc3339(&replayed_at.to_string()).unwrap();
    assert!(
        replayed_at + Duration::from_secs(1) >= before,
        "{replayed_at:?}"
    );
    assert_eq!(
        &headers,
        original.properties.headers().as_ref().unwrap().inner()
    );

    relay.stop().await;
}

#[tokio::test]
async fn dry_run_counts_per_event_and_publishes_nothing() {
    let relay = TestRelay::start().await;
    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();
    let target = relay.exchange.own("target");
    declare_queue(&channel, &target, FieldTable::default()).await;
    bind(&channel, &target, &relay.exchange, "#").await;
    for event in ["job.updated", "job.updated", "invoice.status.updated"] {
        post(&relay, event, 1).await;
    }
    assert_eq!(take_all(&channel, &target).await.len(), 3);
    let unrouted = relay.config.amqp.unrouted_name();
    for to in [
        Some(Target::Queue(target.clone())),
        Some(Target::Exchange),
        None,
    ] {
        let request = replay::Request {
            start: Start::First,
            filter: Filter::default(),
            target: to,
            dry_run: true,
        };
        let outcome = run_replay(&relay.config.amqp, request).await;
        assert_eq!(
            outcome.counts.events,
            BTreeMap::from([
                ("invoice.status.updated".to_owned(), 1),
                ("job.updated".to_owned(), 2)
            ])
        );
        assert_eq!(outcome.counts.published, 0);
        assert_eq!(message_count(&channel, &target).await, 0);
        assert_eq!(message_count(&channel, &unrouted).await, 0);
    }
    // A target that does not exist is an error, dry run or not.
    let request = replay::Request {
        start: Start::First,
        filter: Filter::default(),
        target: Some(Target::Queue(format!("{}.missing", relay.exchange))),
        dry_run: true,
    };
    let err = replay::replay(
        &relay.config.amqp,
        &request,
        &mut |_| {},
        std::future::pending(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("failed to find queue"), "{err}");

    relay.stop().await;
}

/// Backfilling a new consumer through today's bindings: webhooks from before its queue
/// existed went to the unrouted queue; `--to-exchange` routes them to it now.
#[tokio::test]
async fn replay_to_the_exchange_routes_through_the_bindings_of_now() {
    let relay = TestRelay::start().await;
    let mut posted = Vec::new();
    for event in ["job.updated", "contact.person.created", "job.created"] {
        posted.push((event, post(&relay, event, 1).await));
    }
    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();
    let jobs = relay.exchange.own("jobs");
    declare_queue(&channel, &jobs, FieldTable::default()).await;
    bind(&channel, &jobs, &relay.exchange, "job.#").await;
    let unrouted = relay.config.amqp.unrouted_name();
    assert_eq!(message_count(&channel, &unrouted).await, 3);

    let request = replay::Request {
        start: Start::First,
        filter: Filter {
            event: Some(TopicPattern::parse("job.#").unwrap()),
            ..Filter::default()
        },
        target: Some(Target::Exchange),
        dry_run: false,
    };
    let outcome = run_replay(&relay.config.amqp, request).await;
    assert_eq!(outcome.counts.confirmed, 2);
    let routed = take_all(&channel, &jobs).await;
    let expected = posted
        .iter()
        .filter(|(event, _)| event.starts_with("job."))
        .map(|(_, id)| id.clone());
    assert_eq!(sorted(routed.iter().map(message_id)), sorted(expected));
    assert_eq!(
        message_count(&channel, &unrouted).await,
        3,
        "nothing more went there"
    );
    assert_eq!(
        history(&relay.config.amqp).await.len(),
        3,
        "nor to the stream"
    );

    relay.stop().await;
}

/// A replay stopped half-way reports where everything before was handled; one resumed from
/// there delivers the rest: together, every webhook.
#[tokio::test]
async fn an_interrupted_replay_resumes_from_the_offset_it_reports() {
    let relay = TestRelay::start().await;
    let mut posted = Vec::new();
    for _ in 0..3 {
        let mut posts = tokio::task::JoinSet::new();
        for _ in 0..100 {
            let request = harness::request(
                Method::POST,
                &relay.config.http.path,
                webhook("job.updated"),
            );
            posts.spawn(harness::send(relay.addr, request));
        }
        while let Some(reply) = posts.join_next().await {
            posted.push(reply.unwrap().unwrap().message_id());
        }
    }
    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();
    let target = relay.exchange.own("target");
    declare_queue(&channel, &target, FieldTable::default()).await;

    // Stopped as soon as it reports progress (every 100 webhooks read).
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let mut stop = Some(stop);
    let request = to_queue(&target, Filter::default());
    let outcome = tokio::time::timeout(
        PATIENCE,
        replay::replay(
            &relay.config.amqp,
            &request,
            &mut |_| {
                if let Some(stop) = stop.take() {
                    let _ = stop.send(());
                }
            },
            async {
                let _ = stopped.await;
            },
        ),
    )
    .await
    .unwrap()
    .unwrap();
    let interrupted = outcome.interrupted.expect("the replay was stopped");
    assert!(interrupted.cause.is_none());
    let resume_from = interrupted.resume_from.expect("it had read something");
    let first = take_all(&channel, &target).await;
    assert!((first.len() as u64) < 300, "stopped before the end");
    assert_eq!(first.len() as u64, outcome.counts.confirmed);

    let resumed = replay::Request {
        start: Start::Offset(resume_from),
        ..to_queue(&target, Filter::default())
    };
    let outcome = run_replay(&relay.config.amqp, resumed).await;
    assert!(outcome.interrupted.is_none());
    let second = take_all(&channel, &target).await;
    let all: BTreeSet<String> = first.iter().chain(&second).map(message_id).collect();
    assert_eq!(all, posted.into_iter().collect::<BTreeSet<_>>());

    relay.stop().await;
}

/// The command line: a replay the broker stops half-way (a full `reject-publish` queue nacks)
/// exits non-zero, prints its counts, and prints the command that goes on from where it
/// stopped; that command covers exactly the webhooks not yet delivered.
#[tokio::test]
async fn the_replay_command_says_how_far_it_got_and_how_to_go_on() {
    let relay = TestRelay::start().await;
    let mut posted = Vec::new();
    for _ in 0..30 {
        posted.push(post(&relay, "job.updated", 1).await);
    }
    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();
    let target = relay.exchange.own("small");
    let mut small = FieldTable::default();
    small.insert("x-max-length".into(), AMQPValue::LongLongInt(10));
    small.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    declare_queue(&channel, &target, small).await;

    let url = harness::amqp_url();
    let env = harness::env(&relay.exchange, &url);
    let output = tool(&["replay", "--to-queue", &target, "--event", "job.#"], &env).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.starts_with("read 30, matched 30, published 30, confirmed 10\n"),
        "{stdout}"
    );
    assert!(stderr.contains("refused"), "{stderr}");
    let delivered: Vec<String> = take_all(&channel, &target)
        .await
        .iter()
        .map(message_id)
        .collect();
    assert_eq!(delivered, posted[..10]);

    // The eleventh webhook's offset, and the same options around it.
    let held = history(&relay.config.amqp).await;
    let line = stderr
        .lines()
        .find(|line| line.contains("--from-offset"))
        .unwrap_or_else(|| panic!("no resume command in:\n{stderr}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    assert!(words[0].ends_with("hirehop-relay"), "{line}");
    let at = words.iter().position(|w| *w == "--from-offset").unwrap();
    assert_eq!(words[at + 1], held[10].offset.to_string(), "{line}");
    // Pasted into a shell, as a person would, with --dry-run to see what it would do.
    let run = tokio::process::Command::new("sh")
        .args(["-c", &format!("{} --dry-run", line.trim())])
        .env_clear()
        .envs(env.iter().copied())
        .output();
    let output = tokio::time::timeout(PATIENCE, run).await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.starts_with("dry run, nothing published: read 20, matched 20\n"),
        "{stdout}"
    );
    assert!(stdout.contains("  job.updated: 20\n"), "{stdout}");

    relay.stop().await;
}

/// Webhooks that arrived before anyone bound a queue sit in `<exchange>.unrouted`; once a
/// queue is bound for some, requeue moves exactly those and leaves the others.
#[tokio::test]
async fn requeue_moves_unrouted_webhooks_to_a_newly_bound_queue_and_leaves_the_rest() {
    let relay = TestRelay::start().await;
    let (jobs_posted, contacts_posted) = post_unrouted(
        &relay,
        &[
            "job.updated",
            "contact.person.created",
            "job.created",
            "contact.person.created",
            "job.updated",
        ],
    )
    .await;
    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();
    let unrouted = relay.config.amqp.unrouted_name();
    let jobs = relay.exchange.own("jobs");
    declare_queue(&channel, &jobs, FieldTable::default()).await;
    bind(&channel, &jobs, &relay.exchange, "job.#").await;

    // --limit: one at a time if asked.
    let request = |limit| requeue::Request {
        from: unrouted.clone(),
        event: None,
        limit,
    };
    let counts = run_requeue(&relay.config.amqp, request(Some(1))).await;
    assert_eq!((counts.moved, counts.unroutable), (1, 0));
    let counts = run_requeue(&relay.config.amqp, request(None)).await;
    assert_eq!(counts.in_source, 4);
    assert_eq!(counts.moved, 2);
    assert_eq!(counts.unroutable, 2);
    assert_eq!(
        counts.unroutable_events,
        BTreeMap::from([("contact.person.created".to_owned(), 2)])
    );

    let moved = take_all(&channel, &jobs).await;
    assert_eq!(sorted(moved.iter().map(message_id)), sorted(jobs_posted));
    // The moved copies are the originals: same body and headers, and their routing key.
    assert!(
        moved
            .iter()
            .all(|m| m.routing_key.as_str().starts_with("job."))
    );
    wait_count(&channel, &unrouted, 2).await;
    let left = take_all(&channel, &unrouted).await;
    assert_eq!(sorted(left.iter().map(message_id)), sorted(contacts_posted));

    // --event leaves what it does not match where it is, bound or not.
    let invoice = post(&relay, "invoice.status.updated", 1).await;
    let contact = post(&relay, "contact.person.updated", 1).await;
    let mut all = relay.queue("#").await;
    let counts = run_requeue(
        &relay.config.amqp,
        requeue::Request {
            from: unrouted.clone(),
            event: Some(TopicPattern::parse("contact.#").unwrap()),
            limit: None,
        },
    )
    .await;
    assert_eq!((counts.moved, counts.skipped), (1, 1), "{counts:?}");
    assert_eq!(message_id(&all.next().await), contact);
    wait_count(&channel, &unrouted, 1).await;
    let left = take_all(&channel, &unrouted).await;
    assert_eq!(left.iter().map(message_id).collect::<Vec<_>>(), [invoice]);

    relay.stop().await;
}

/// Without an alternate exchange, a message no queue is bound for is returned to requeue
/// (`mandatory`), and stays in the dead-letter queue it came from, where it was.
#[tokio::test]
async fn requeue_from_a_dead_letter_queue_leaves_what_the_broker_returns() {
    let relay = TestRelay::builder()
        .env("RELAY_AMQP__ALTERNATE_EXCHANGE", "false")
        .start()
        .await;
    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();
    let (consumer, dead) = (relay.exchange.own("consumer"), relay.exchange.own("dead"));
    channel
        .exchange_declare(
            dead.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    declare_queue(&channel, &dead, FieldTable::default()).await;
    bind(&channel, &dead, &dead, "").await;
    let mut dlx = FieldTable::default();
    dlx.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(dead.as_str().into()),
    );
    declare_queue(&channel, &consumer, dlx).await;
    bind(&channel, &consumer, &relay.exchange, "#").await;
    let mut posted = HashMap::new();
    for event in ["job.updated", "contact.person.created", "job.created"] {
        posted.insert(post(&relay, event, 1).await, event);
    }
    // A consumer with a bug rejects them all: they are dead-lettered, routing keys kept.
    while let Some(got) = channel
        .basic_get(consumer.as_str().into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
    {
        got.delivery
            .acker
            .reject(lapin::options::BasicRejectOptions { requeue: false })
            .await
            .unwrap();
    }
    channel
        .queue_delete(consumer.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let jobs = relay.exchange.own("jobs");
    declare_queue(&channel, &jobs, FieldTable::default()).await;
    bind(&channel, &jobs, &relay.exchange, "job.#").await;
    eventually("the three to be dead-lettered", PATIENCE, || async {
        let count = message_count(&channel, &dead).await;
        if count >= 3 { Ok(()) } else { Err(count) }
    })
    .await;

    let counts = run_requeue(
        &relay.config.amqp,
        requeue::Request {
            from: dead.clone(),
            event: None,
            limit: None,
        },
    )
    .await;
    assert_eq!((counts.moved, counts.unroutable), (2, 1), "{counts:?}");
    assert_eq!(counts.sent_to_unrouted, 0);
    let moved = take_all(&channel, &jobs).await;
    assert!(
        moved
            .iter()
            .all(|m| posted[&message_id(m)].starts_with("job."))
    );
    assert_eq!(moved.len(), 2);
    wait_count(&channel, &dead, 1).await;
    let left = take_all(&channel, &dead).await;
    assert_eq!(posted[&message_id(&left[0])], "contact.person.created");

    relay.stop().await;
}

/// Requeue acks a message on its source only once the copy is confirmed: killed at any
/// point, every message is in the source or the destination (some in both).
#[tokio::test]
async fn requeue_killed_half_way_loses_nothing() {
    let relay = TestRelay::start().await;
    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    // Unrouted webhooks, as the relay would have published them (faster than over HTTP).
    let publisher = hirehop_relay::amqp::Publisher::connect(
        relay.config.amqp.clone(),
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap();
    let total = 6000;
    let mut posted = BTreeSet::new();
    let messages: Vec<_> = (0..total)
        .map(|i| hirehop_relay::message::Message {
            routing_key: hirehop_relay::routing::RoutingKey::new("", "job.updated").unwrap(),
            event: "job.updated".into(),
            body: bytes::Bytes::from(webhook("job.updated")),
            message_id: format!("requeue-{i:05}"),
            company_id: Some(1),
            user_id: None,
            received_at: SystemTime::now(),
            replayed: false,
            traceparent: String::new(),
            tracestate: None,
        })
        .collect();
    for chunk in messages.chunks(500) {
        for result in publisher.publish_batch(chunk).await {
            result.expect("the broker confirms");
        }
        posted.extend(chunk.iter().map(|m| m.message_id.clone()));
    }
    publisher.close().await;
    let unrouted = relay.config.amqp.unrouted_name();
    assert_eq!(message_count(&channel, &unrouted).await, total);
    let jobs = relay.exchange.own("jobs");
    declare_queue(&channel, &jobs, FieldTable::default()).await;
    bind(&channel, &jobs, &relay.exchange, "job.#").await;

    let url = harness::amqp_url();
    let env = harness::env(&relay.exchange, &url);
    let mut requeue = tokio::process::Command::new(env!("CARGO_BIN_EXE_hirehop-relay"))
        .args(["requeue"])
        .env_clear()
        .envs(env.iter().copied())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Killed once some have moved, long before all can have.
    eventually("requeue to move 200", PATIENCE, || async {
        let moved = message_count(&channel, &jobs).await;
        if moved >= 200 { Ok(()) } else { Err(moved) }
    })
    .await;
    requeue.start_kill().unwrap();
    let status = requeue.wait().await.unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "requeue had finished before it was killed: give it more messages"
    );
    let moved = message_count(&channel, &jobs).await;
    assert!(moved < total, "{moved} moved: not half-way");

    // Everything is somewhere once the broker has taken back what requeue held.
    let what = format!("the two queues to hold all {total} between them");
    let (in_jobs, in_unrouted) = eventually(&what, PATIENCE, || async {
        let (a, b) = (
            message_count(&channel, &jobs).await,
            message_count(&channel, &unrouted).await,
        );
        if a + b >= total {
            Ok((a, b))
        } else {
            Err((a, b))
        }
    })
    .await;
    let mut held: BTreeSet<String> = take_all(&channel, &jobs)
        .await
        .iter()
        .map(message_id)
        .collect();
    held.extend(take_all(&channel, &unrouted).await.iter().map(message_id));
    assert_eq!(
        held, posted,
        "{in_jobs} in the queue, {in_unrouted} still unrouted"
    );

    relay.stop().await;
}

/// Runs the tool with `args` on `relay`'s exchange with `amqp.per_event_queues` on, per-event
/// queues named `<exchange>.ev.<routing key>` (the test registers those it expects, to delete
/// them). Whether it succeeded, and what it printed on stdout and stderr.
async fn tool_with_per_event_queues(relay: &TestRelay, args: &[&str]) -> (bool, String, String) {
    let url = harness::amqp_url();
    let prefix = format!("{}.ev.", relay.exchange);
    let mut env = harness::env(&relay.exchange, &url);
    env.push(("RELAY_AMQP__PER_EVENT_QUEUES", "true"));
    env.push(("RELAY_AMQP__PER_EVENT_QUEUE_PREFIX", &prefix));
    let output = tool(args, &env).await;
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (
        output.status.success(),
        text(&output.stdout),
        text(&output.stderr),
    )
}

/// The `message_id`s of every message `queue` holds right now, in order; taken.
async fn take_ids(channel: &lapin::Channel, queue: &str) -> Vec<String> {
    take_all(channel, queue)
        .await
        .iter()
        .map(message_id)
        .collect()
}

/// A classic queue named `queue`, where the tools declare a quorum one: the broker refuses
/// their declaration (PRECONDITION_FAILED) for as long as it is there.
async fn take_the_name(channel: &lapin::Channel, queue: &str) {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(queue.into(), durable, FieldTable::default())
        .await
        .unwrap();
}

/// With per-event queues on, a webhook that reached `<exchange>.unrouted` because its queue did
/// not exist yet is moved by requeue into its own queue: requeue declares it first.
#[tokio::test]
async fn requeue_with_per_event_queues_moves_webhooks_into_their_own_queues() {
    // Per-event queues off here, so the webhooks land in unrouted, as before their queue existed.
    let relay = TestRelay::start().await;
    let (jobs, contacts) = post_unrouted(
        &relay,
        &["job.updated", "contact.person.created", "job.updated"],
    )
    .await;
    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();
    let unrouted = relay.config.amqp.unrouted_name();
    let job_queue = relay.exchange.own("ev.job.updated");
    let contact_queue = relay.exchange.own("ev.contact.person.created");

    let (succeeded, stdout, stderr) = tool_with_per_event_queues(&relay, &["requeue"]).await;
    assert!(succeeded, "{stdout}\n{stderr}");
    assert!(stdout.contains(": moved 3 through"), "{stdout}");
    // Each once, in the order they were in unrouted; none left there.
    assert_eq!(take_ids(&channel, &job_queue).await, jobs);
    assert_eq!(take_ids(&channel, &contact_queue).await, contacts);
    wait_count(&channel, &unrouted, 0).await;

    relay.stop().await;
}

/// A per-event queue the broker refuses to declare: requeue leaves that event's webhooks in
/// the source, moves the others, names the queue and why, and exits non-zero.
#[tokio::test]
async fn requeue_leaves_webhooks_whose_per_event_queue_is_refused() {
    let relay = TestRelay::start().await;
    let refused = post(&relay, "invoice.status.updated", 1).await;
    let job = post(&relay, "job.updated", 1).await;
    let also_refused = post(&relay, "invoice.status.updated", 1).await;
    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();
    let unrouted = relay.config.amqp.unrouted_name();
    assert_eq!(message_count(&channel, &unrouted).await, 3);
    let taken = relay.exchange.own("ev.invoice.status.updated");
    take_the_name(&channel, &taken).await;
    let job_queue = relay.exchange.own("ev.job.updated");

    let (succeeded, stdout, stderr) = tool_with_per_event_queues(&relay, &["requeue"]).await;
    assert!(!succeeded, "{stdout}\n{stderr}");
    assert!(stdout.contains(": moved 1 through"), "{stdout}");
    assert!(
        stdout.contains(&format!("per-event queue refused, left in {unrouted}: 2\n")),
        "{stdout}"
    );
    assert!(stdout.contains(&taken), "{stdout}");
    assert!(stdout.contains("PRECONDITION_FAILED"), "{stdout}");
    assert!(stderr.contains("per-event queue"), "{stderr}");
    assert_eq!(take_ids(&channel, &job_queue).await, [job]);
    assert_eq!(message_count(&channel, &taken).await, 0);
    wait_count(&channel, &unrouted, 2).await;
    assert_eq!(take_ids(&channel, &unrouted).await, [refused, also_refused]);

    relay.stop().await;
}

/// With per-event queues on, `replay --to-exchange` declares the queue of each event it
/// replays before publishing it; one the broker refuses stops the replay at that webhook,
/// with the command that goes on from there.
#[tokio::test]
async fn replay_to_the_exchange_declares_per_event_queues() {
    let relay = TestRelay::start().await;
    let mut posted = Vec::new();
    for event in [
        "job.updated",
        "contact.person.created",
        "job.updated",
        "invoice.status.updated",
        "job.created",
    ] {
        posted.push(post(&relay, event, 1).await);
    }
    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();
    let unrouted = relay.config.amqp.unrouted_name();
    assert_eq!(message_count(&channel, &unrouted).await, 5);
    let job_queue = relay.exchange.own("ev.job.updated");
    let contact_queue = relay.exchange.own("ev.contact.person.created");
    let taken = relay.exchange.own("ev.invoice.status.updated");
    take_the_name(&channel, &taken).await;
    let after = relay.exchange.own("ev.job.created");

    let (succeeded, stdout, stderr) =
        tool_with_per_event_queues(&relay, &["replay", "--to-exchange"]).await;
    assert!(!succeeded, "{stdout}\n{stderr}");
    assert!(stdout.contains("published 3, confirmed 3\n"), "{stdout}");
    assert!(stderr.contains(&taken), "{stderr}");
    assert!(stderr.contains("PRECONDITION_FAILED"), "{stderr}");
    assert_eq!(
        take_ids(&channel, &job_queue).await,
        [posted[0].clone(), posted[2].clone()]
    );
    assert_eq!(
        take_ids(&channel, &contact_queue).await,
        [posted[1].clone()]
    );
    assert_eq!(message_count(&channel, &taken).await, 0);
    // Nothing past the refused one was published, nor went to unrouted.
    assert!(harness::queue_counts(&broker, &after).await.is_none());
    assert_eq!(message_count(&channel, &unrouted).await, 5);
    // It goes on from the refused webhook.
    let held = history(&relay.config.amqp).await;
    let line = stderr
        .lines()
        .find(|line| line.contains("--from-offset"))
        .unwrap_or_else(|| panic!("no resume command in:\n{stderr}"));
    assert!(
        line.contains(&format!("--from-offset {}", held[3].offset)),
        "{line}"
    );

    relay.stop().await;
}

/// `tail --since` prints what the relay accepted before it started (routed or not, matching
/// the pattern), then goes on with what arrives.
#[tokio::test]
async fn tail_since_prints_the_past_from_history_then_what_arrives() {
    let relay = TestRelay::start().await;
    let before = post(&relay, "job.updated", 1).await;
    post(&relay, "invoice.status.updated", 1).await;
    let url = harness::amqp_url();
    let env = harness::env(&relay.exchange, &url);
    let mut tail = tokio::process::Command::new(env!("CARGO_BIN_EXE_hirehop-relay"))
        .args(["tail", "--since", "10m", "--pattern", "job.#", "--json"])
        .env_clear()
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(tail.stdout.take().unwrap()).lines();
    let mut next_record = async || {
        let line = tokio::time::timeout(PATIENCE, lines.next_line())
            .await
            .expect("tail prints in time")
            .unwrap()
            .expect("tail runs");
        serde_json::from_str::<serde_json::Value>(&line).unwrap()
    };
    let record = next_record().await;
    assert_eq!(record["properties"]["message_id"], before.as_str());
    assert_eq!(record["body"]["export_key"], "<redacted>");
    let after = post(&relay, "job.status.updated", 1).await;
    let record = next_record().await;
    assert_eq!(record["properties"]["message_id"], after.as_str());
    assert_eq!(record["routing_key"], "job.status.updated");
    tail.kill().await.unwrap();
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut tail.stderr.take().unwrap(), &mut stderr)
        .await
        .unwrap();
    assert!(stderr.starts_with("tailing history stream"), "{stderr}");
    relay.stop().await;
}
