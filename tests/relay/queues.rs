//! Declared queues, per-event queues, routing templates, and the `send`, `tail` and
//! `topology` subcommands.

use std::time::{Duration, Instant};

use hyper::StatusCode;
use lapin::options::{BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::harness::{
    self, KEY, PATIENCE, RelayProcess, TestExchange, TestRelay, broker_addr, env, eventually,
    message_id, readyz, sample, scrape, unique_exchange, wait_sample, webhook, webhook_with,
};
use crate::proxy::Proxy;
use crate::spool::take_all;

/// Whether the broker has `queue`.
async fn exists(broker: &lapin::Connection, queue: &str) -> bool {
    harness::queue_counts(broker, queue).await.is_some()
}

/// The arguments RabbitMQ holds for `queue`, as `rabbitmqctl list_queues` prints them.
fn queue_arguments(queue: &str) -> String {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "arguments",
        ])
        .output()
        .expect("rabbitmqctl runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| {
            line.strip_prefix(queue)?
                .strip_prefix('\t')
                .map(str::to_owned)
        })
        .unwrap_or_else(|| panic!("rabbitmqctl does not list {queue}"))
}

/// Takes one message from `queue`, waiting for it (at most [`PATIENCE`]).
async fn get(channel: &lapin::Channel, queue: &str) -> lapin::message::Delivery {
    let no_ack = BasicGetOptions { no_ack: true };
    let got = eventually(&format!("a message in {queue}"), PATIENCE, || async {
        channel.basic_get(queue.into(), no_ack).await.unwrap()
    })
    .await;
    got.delivery
}

/// The per-event queue prefix for a relay on `exchange`: its queues are deleted with it.
fn per_event_prefix(exchange: &TestExchange) -> String {
    format!("{exchange}.ev.")
}

/// A relay with per-event queues that reaches the broker through `proxy` and serves before it
/// has (so webhooks are spooled while the proxy refuses), reconnecting quickly once let through.
async fn spooling_with_per_event_queues(proxy: &Proxy, exchange: TestExchange) -> TestRelay {
    TestRelay::builder()
        .env("RELAY_AMQP__PER_EVENT_QUEUES", "true")
        .env(
            "RELAY_AMQP__PER_EVENT_QUEUE_PREFIX",
            &per_event_prefix(&exchange),
        )
        .env("RELAY_AMQP__RECONNECT_MAX_BACKOFF_MS", "500")
        .via(proxy)
        .exchange(exchange)
        .without_waiting_for_the_broker()
        .start()
        .await
}

#[tokio::test]
async fn declared_queues_exist_with_their_arguments_and_come_back_with_the_exchange() {
    let proxy = Proxy::start(broker_addr()).await;
    let exchange = unique_exchange();
    let (accounting, crm) = (exchange.own("accounting"), exchange.own("crm"));
    let file = format!(
        r#"
        [[amqp.queues]]
        name = "{accounting}"
        bindings = ["invoice.#", "job.status.updated"]
        max_length = 1000
        delivery_limit = 5
        [[amqp.queues]]
        name = "{crm}"
        type = "classic"
        bindings = ["contact.#"]
        message_ttl_ms = 600000
        "#
    );
    let relay = TestRelay::builder()
        .file(&file)
        .via(&proxy)
        .exchange(exchange)
        .start()
        .await;
    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();

    // The arguments are what the config says: declaring them again is accepted as
    // equivalent, declaring anything else is refused.
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(1000));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(5));
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(accounting.as_str().into(), durable, args.clone())
        .await
        .expect("same arguments as declared by the relay");
    let other = broker.create_channel().await.unwrap();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(5));
    assert!(
        other
            .queue_declare(accounting.as_str().into(), durable, args)
            .await
            .is_err()
    );

    // Bindings route: invoice events to accounting, contacts to crm.
    let invoice = relay.post(webhook("invoice.status.updated")).await;
    let contact = relay.post(webhook("contact.person.created")).await;
    assert_eq!(
        message_id(&get(&channel, &accounting).await),
        invoice.message_id()
    );
    assert_eq!(message_id(&get(&channel, &crm).await), contact.message_id());

    // Someone deletes a queue. A reconnect only checks that the exchange is there (a full
    // declaration would wait on every cluster member), so the queue stays deleted...
    let crm_arguments = queue_arguments(&crm);
    assert!(
        crm_arguments.contains(r#"{"x-message-ttl",600000}"#),
        "{crm_arguments}"
    );
    assert!(
        crm_arguments.contains(r#"{"x-queue-type","classic"}"#),
        "{crm_arguments}"
    );
    channel
        .queue_delete(crm.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    proxy.cut();
    harness::wait_sample(
        relay.addr,
        "hirehop_relay_broker_reconnects_total",
        "1",
        |n| n >= 1.0,
    )
    .await;
    assert!(!exists(&broker, &crm).await, "a reconnect declared {crm}");
    // ...until the exchange is gone too: then the relay declares everything again, with
    // its arguments.
    channel
        .exchange_delete(relay.exchange.as_str().into(), Default::default())
        .await
        .unwrap();
    proxy.cut();
    eventually(&format!("{crm} to be declared again"), PATIENCE, || async {
        exists(&broker, &crm).await.then_some(())
    })
    .await;
    assert_eq!(queue_arguments(&crm), crm_arguments);
    relay.stop().await;
}

#[tokio::test]
async fn per_event_queues_catch_the_first_message_of_a_new_event() {
    let exchange = unique_exchange();
    let queue = exchange.own("ev.brand.new.event");
    let relay = TestRelay::builder()
        .env("RELAY_AMQP__PER_EVENT_QUEUES", "true")
        .env(
            "RELAY_AMQP__PER_EVENT_QUEUE_PREFIX",
            &per_event_prefix(&exchange),
        )
        .exchange(exchange)
        .start()
        .await;
    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();
    assert!(!exists(&broker, &queue).await);
    let reply = relay.post(webhook("brand.new.event")).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(message_id(&get(&channel, &queue).await), reply.message_id());
    // The second one uses the cached declaration and lands in the same queue.
    let reply = relay.post(webhook("brand.new.event")).await;
    assert_eq!(message_id(&get(&channel, &queue).await), reply.message_id());
    relay.stop().await;
}

/// Events first seen while the broker is out of reach are spooled; replay declares their
/// queues before it publishes them, so they reach their own queues, not `<exchange>.unrouted`.
#[tokio::test]
async fn per_event_queues_catch_new_events_replayed_from_the_spool() {
    let proxy = Proxy::start(broker_addr()).await;
    proxy.refuse(true);
    let exchange = unique_exchange();
    let events = [
        "first.seen.spooled",
        "second.seen.spooled",
        "third.seen.spooled",
    ];
    let queues = events.map(|event| exchange.own(&format!("ev.{event}")));
    let relay = spooling_with_per_event_queues(&proxy, exchange).await;
    // Replay sends batches of one, two, then four webhooks: the second holds two new keys,
    // the third only keys declared already.
    let mut accepted = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..2 {
        for (event, ids) in events.iter().zip(&mut accepted) {
            ids.push(relay.post_spooled(event).await);
        }
    }

    proxy.refuse(false);
    wait_sample(relay.addr, "hirehop_relay_spool_messages", "0", |n| {
        n == 0.0
    })
    .await;
    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();
    let unrouted = relay.config.amqp.unrouted_name();
    assert_eq!(take_all(&channel, &unrouted).await, Vec::<String>::new());
    // Each once, in the order they arrived.
    for (queue, ids) in queues.iter().zip(&accepted) {
        assert_eq!(&take_all(&channel, queue).await, ids, "in {queue}");
    }
    relay.stop().await;
}

/// A spooled webhook whose queue the broker refuses to declare at replay stays at the head of
/// the spool, and nothing behind it is published, until the queue can be declared.
#[tokio::test]
async fn an_event_queue_refused_at_replay_holds_the_spool_until_it_is_fixed() {
    let proxy = Proxy::start(broker_addr()).await;
    proxy.refuse(true);
    let exchange = unique_exchange();
    let events = ["before.refused", "refused.at.replay", "after.refused"];
    let queues = events.map(|event| exchange.own(&format!("ev.{event}")));
    let relay = spooling_with_per_event_queues(&proxy, exchange).await;
    let mut accepted = Vec::new();
    for event in events {
        accepted.push(relay.post_spooled(event).await);
    }
    // Meanwhile a classic queue takes the name where the relay declares a quorum one.
    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(queues[1].as_str().into(), durable, FieldTable::default())
        .await
        .unwrap();

    proxy.refuse(false);
    wait_sample(
        relay.addr,
        "hirehop_relay_spool_replay_failures_total",
        "at least 1",
        |failures| failures >= 1.0,
    )
    .await;
    // The one before it was replayed; it and the one after it stay, unpublished.
    assert_eq!(readyz(relay.addr).await.json()["spool"]["messages"], 2);
    assert_eq!(take_all(&channel, &queues[0]).await, &accepted[..1]);
    assert!(!exists(&broker, &queues[2]).await);
    let unrouted = relay.config.amqp.unrouted_name();
    assert_eq!(take_all(&channel, &unrouted).await, Vec::<String>::new());

    channel
        .queue_delete(queues[1].as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    wait_sample(relay.addr, "hirehop_relay_spool_messages", "0", |n| {
        n == 0.0
    })
    .await;
    for (queue, id) in queues.iter().zip(&accepted).skip(1) {
        assert_eq!(
            take_all(&channel, queue).await,
            std::slice::from_ref(id),
            "in {queue}"
        );
    }
    assert_eq!(take_all(&channel, &unrouted).await, Vec::<String>::new());
    relay.stop().await;
}

#[tokio::test]
async fn an_event_queue_the_broker_refuses_gets_503_and_is_not_spooled() {
    let exchange = unique_exchange();
    let prefix = per_event_prefix(&exchange);
    exchange.own("ev.job.created");
    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();
    // A classic queue where the relay declares a quorum one: PRECONDITION_FAILED, for good.
    let taken = exchange.own("ev.job.updated");
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(taken.as_str().into(), options, FieldTable::default())
        .await
        .unwrap();
    let relay = TestRelay::builder()
        .env("RELAY_AMQP__PER_EVENT_QUEUES", "true")
        .env("RELAY_AMQP__PER_EVENT_QUEUE_PREFIX", &prefix)
        .env("RELAY_SPOOL__ENABLED", "true")
        .exchange(exchange)
        .start()
        .await;
    let refused = relay.post(webhook("job.updated")).await;
    refused.assert_unavailable();
    let metrics = scrape(relay.addr).await;
    assert_eq!(
        sample(
            &metrics,
            r#"hirehop_relay_publishes_total{outcome="refused"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &metrics,
            r#"hirehop_relay_rejections_total{reason="queue_refused"}"#
        ),
        1.0
    );
    // Spooled, it would block replay for good and every later webhook would queue behind it.
    let other = relay.post(webhook("job.created")).await;
    assert_eq!(other.status, StatusCode::ACCEPTED);
    assert_eq!(other.json()["status"], "accepted", "{other:?}");
    relay.stop().await;
}

#[tokio::test]
async fn an_event_too_long_for_its_queue_name_gets_400() {
    let exchange = unique_exchange();
    let prefix = per_event_prefix(&exchange);
    let room = 255 - prefix.len();
    let longest = "a".repeat(room);
    let queue = exchange.own(&format!("ev.{longest}"));
    let relay = TestRelay::builder()
        .env("RELAY_AMQP__PER_EVENT_QUEUES", "true")
        .env("RELAY_AMQP__PER_EVENT_QUEUE_PREFIX", &prefix)
        .exchange(exchange)
        .start()
        .await;
    let too_long = relay.post(webhook(&"a".repeat(room + 1))).await;
    assert_eq!(too_long.status, StatusCode::BAD_REQUEST, "{too_long:?}");
    // The longest event that fits makes a queue name of exactly 255 bytes.
    let fits = relay.post(webhook(&longest)).await;
    assert_eq!(fits.status, StatusCode::ACCEPTED, "{fits:?}");
    assert_eq!(fits.json()["status"], "accepted", "{fits:?}");
    assert_eq!(queue.len(), 255);
    let broker = harness::broker().await;
    assert!(exists(&broker, &queue).await);
    relay.stop().await;
}

#[tokio::test]
async fn a_routing_template_routes_two_companies_apart() {
    let relay = TestRelay::builder()
        .env("RELAY_AMQP__ROUTING_KEY_TEMPLATE", "{company_id}.{event}")
        .env("RELAY_AUTH__EXPORT_KEYS", &format!("key-a,key-b,{KEY}"))
        .start()
        .await;
    let mut first = relay.queue("1.#").await;
    let mut second = relay.queue("2.job.*").await;
    let a = relay.post(webhook_with("job.updated", "key-a", 1)).await;
    let b = relay.post(webhook_with("job.updated", "key-b", 2)).await;
    let delivery = first.next().await;
    assert_eq!(message_id(&delivery), a.message_id());
    assert_eq!(delivery.routing_key.as_str(), "1.job.updated");
    assert_eq!(message_id(&second.next().await), b.message_id());
    relay
        .assert_nothing_published_before_marker(&mut first, "1.marker")
        .await;
    relay.stop().await;
}

#[tokio::test]
async fn a_full_reject_publish_queue_gives_503_or_spools_and_loses_nothing() {
    for spool in ["false", "true"] {
        let exchange = unique_exchange();
        let name = exchange.own("full");
        let file =
            format!("[[amqp.queues]]\nname = \"{name}\"\nbindings = [\"#\"]\nmax_length = 2\n");
        let relay = TestRelay::builder()
            .env("RELAY_SPOOL__ENABLED", spool)
            .env("RELAY_AMQP__CONFIRM_TIMEOUT_MS", "3000")
            .file(&file)
            .exchange(exchange)
            .start()
            .await;
        // Quorum queues apply the limit once it is exceeded, so the refusal may come a
        // message or so after the second.
        let mut accepted = Vec::new();
        let refused = loop {
            let reply = relay.post(webhook("job.updated")).await;
            if reply.status != StatusCode::ACCEPTED || reply.json()["status"] == "spooled" {
                break reply;
            }
            accepted.push(reply.message_id());
            assert!(
                accepted.len() < 10,
                "the full queue never refused a message"
            );
        };
        if spool == "false" {
            assert_eq!(
                refused.status,
                StatusCode::SERVICE_UNAVAILABLE,
                "{:?}",
                refused.body
            );
        } else {
            assert_eq!(refused.status, StatusCode::ACCEPTED, "{:?}", refused.body);
            accepted.push(refused.message_id());
        }
        // A consumer makes room; everything accepted arrives, in order.
        let broker = harness::broker().await;
        let mut queue = harness::TestQueue::consume(&broker, &name).await;
        for id in &accepted {
            assert_eq!(&message_id(&queue.next().await), id);
        }
        relay.stop().await;
    }
}

#[tokio::test]
async fn a_queue_declared_differently_stops_startup_naming_queue_and_argument() {
    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();
    let exchange = unique_exchange();
    let name = exchange.own("mismatch");
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(name.as_str().into(), durable, FieldTable::default())
        .await
        .unwrap();
    let config = std::env::temp_dir().join(format!("{exchange}.toml"));
    std::fs::write(
        &config,
        format!("[[amqp.queues]]\nname = \"{name}\"\nbindings = [\"#\"]\n"),
    )
    .unwrap();
    let url = harness::amqp_url();
    let config_arg = config.to_string_lossy().into_owned();
    let relay = RelayProcess::start(&["--config", &config_arg], &env(&exchange, &url));
    let (status, log) = relay.exit().await;
    assert!(!status.success(), "{log}");
    assert!(log.contains(&format!("queue {name}")), "{log}");
    assert!(log.contains("x-queue-type"), "{log}");
    let _ = std::fs::remove_file(config);
}

#[tokio::test]
async fn send_posts_a_sample_that_tail_prints() {
    let exchange = unique_exchange();
    let url = harness::amqp_url();
    let relay_env = env(&exchange, &url);
    let mut relay = RelayProcess::spawn(&relay_env).await;
    relay.wait_for("connected to the broker").await;

    let mut tail = tokio::process::Command::new(env!("CARGO_BIN_EXE_hirehop-relay"))
        .args(["tail", "--pattern", "job.#", "--json"])
        .env_clear()
        .envs(relay_env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut tail_err = BufReader::new(tail.stderr.take().unwrap()).lines();
    let ready = tokio::time::timeout(PATIENCE, tail_err.next_line())
        .await
        .expect("tail starts")
        .unwrap()
        .unwrap_or_default();
    assert!(ready.starts_with("tailing exchange"), "{ready}");

    let webhook_url = format!("http://{}/webhooks/hirehop", relay.addr());
    let sent = tokio::process::Command::new(env!("CARGO_BIN_EXE_hirehop-relay"))
        .args([
            "send",
            "--url",
            &webhook_url,
            "--event",
            "job.status.updated",
        ])
        .args(["--key", KEY, "--company", "7"])
        .env_clear()
        .output()
        .await
        .unwrap();
    let answer = String::from_utf8(sent.stdout).unwrap();
    assert!(sent.status.success(), "{answer}");
    assert!(answer.starts_with("202 Accepted"), "{answer}");
    let answer: serde_json::Value = serde_json::from_str(answer.lines().nth(1).unwrap()).unwrap();

    let mut tail_out = BufReader::new(tail.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(PATIENCE, tail_out.next_line())
        .await
        .expect("tail prints the message")
        .unwrap()
        .unwrap();
    let printed: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(printed["routing_key"], "job.status.updated");
    assert_eq!(printed["properties"]["message_id"], answer["message_id"]);
    assert_eq!(printed["headers"]["company_id"], 7);
    assert_eq!(printed["body"]["event"], "job.status.updated");
    assert_eq!(printed["body"]["export_key"], "<redacted>");
    assert!(!line.contains(KEY));

    // A wrong key: send says so and fails.
    let refused = tokio::process::Command::new(env!("CARGO_BIN_EXE_hirehop-relay"))
        .args(["send", "--url", &webhook_url, "--key", "nope"])
        .env_clear()
        .output()
        .await
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stdout).starts_with("401"));

    tail.kill().await.unwrap();
    relay.terminate().await;
}

#[tokio::test]
async fn topology_prints_and_applies_what_the_config_describes() {
    let exchange = unique_exchange();
    let name = exchange.own("jobs");
    let config = std::env::temp_dir().join(format!("{exchange}.toml"));
    std::fs::write(
        &config,
        format!("[[amqp.queues]]\nname = \"{name}\"\nbindings = [\"job.#\"]\n"),
    )
    .unwrap();
    let url = harness::amqp_url();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_hirehop-relay"))
        .args(["topology", "--apply", "--config", &config.to_string_lossy()])
        .env_clear()
        .envs(env(&exchange, &url))
        .output()
        .await
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        printed.contains(&format!("exchange {exchange} (topic, durable")),
        "{printed}"
    );
    assert!(
        printed.contains(&format!("queue {name} (durable, x-queue-type=quorum)")),
        "{printed}"
    );
    assert!(
        printed.contains("bound to") && printed.contains("job.#"),
        "{printed}"
    );
    let broker = harness::broker().await;
    assert!(exists(&broker, &name).await, "--apply declared the queue");
    let _ = std::fs::remove_file(config);
}

#[tokio::test]
async fn tail_gives_up_on_a_broker_that_never_answers() {
    // Accepts TCP connections (the kernel does) but never speaks AMQP.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("amqp://guest:guest@{}/%2f", silent.local_addr().unwrap());
    let exchange = unique_exchange();
    let mut tail_env = env(&exchange, &url);
    tail_env.push(("RELAY_AMQP__CONNECT_TIMEOUT_MS", "500"));
    let started = Instant::now();
    let tail = RelayProcess::start(&["tail", "--pattern", "#"], &tail_env);
    let (status, log) = tail.exit().await;
    assert!(!status.success(), "{log}");
    assert!(log.contains("timed out"), "{log}");
    assert!(started.elapsed() < Duration::from_secs(10), "{log}");
}
