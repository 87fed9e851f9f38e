//! The spool: with the broker out of reach, webhooks are still accepted (fsynced locally),
//! survive SIGKILL and torn writes, and reach the broker once it is back.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hyper::{Method, StatusCode};
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};

use crate::harness::{
    self, KEY, PATIENCE, RelayProcess, TestRelay, broker_addr, env, message_id, readyz, request,
    sample, scrape, send, unique_exchange, via, wait_readyz, wait_sample, webhook, webhook_with,
};
use crate::offline::Offline;
use crate::proxy::Proxy;

/// Waits until `/readyz` shows the broker as connected.
pub async fn wait_broker_connected(addr: std::net::SocketAddr) {
    wait_readyz(addr, "the broker is connected", |reply| {
        reply.json()["broker"] == "connected"
    })
    .await;
}

/// The `received_at` header of `delivery`.
fn received_at(delivery: &lapin::message::Delivery) -> SystemTime {
    let headers = delivery.properties.headers().as_ref().unwrap().inner();
    let Some(AMQPValue::LongString(stamp)) = headers.get("received_at") else {
        panic!("no received_at header: {headers:?}");
    };
    humantime::parse_rfc3339(&stamp.to_string()).expect("received_at is RFC 3339")
}

/// `now`, rounded down to the millisecond as `received_at` is.
fn now_ms() -> SystemTime {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    UNIX_EPOCH + Duration::from_millis(u64::try_from(since.as_millis()).unwrap())
}

/// Every message now in `queue`, taken off it: their message ids, in order.
pub async fn take_all(channel: &lapin::Channel, queue: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let no_ack = BasicGetOptions { no_ack: true };
    while let Some(message) = channel.basic_get(queue.into(), no_ack).await.unwrap() {
        ids.push(message_id(&message.delivery));
    }
    ids
}

/// What reached the broker against what was answered 202.
#[derive(Debug)]
pub struct Count {
    accepted: usize,
    on_broker: usize,
    missing: usize,
    duplicates: usize,
}

impl Count {
    /// Every webhook answered 202 is on the broker, nothing else is (not one that was
    /// refused), and at most `duplicates` arrived twice.
    pub fn assert_delivered(&self, duplicates: usize) {
        assert_eq!(self.missing, 0, "{self:?}");
        assert_eq!(self.on_broker, self.accepted + self.duplicates, "{self:?}");
        assert!(self.duplicates <= duplicates, "{self:?}");
    }
}

pub fn count(accepted: &[String], on_broker: &[String]) -> Count {
    let unique: HashSet<&String> = on_broker.iter().collect();
    Count {
        accepted: accepted.len(),
        on_broker: on_broker.len(),
        missing: accepted.iter().filter(|id| !unique.contains(id)).count(),
        duplicates: on_broker.len() - unique.len(),
    }
}

#[tokio::test]
async fn broker_out_of_reach_webhooks_are_spooled_then_replayed_in_order() {
    let proxy = Proxy::start(broker_addr()).await;
    proxy.refuse(true);
    let relay = TestRelay::builder()
        .env("RELAY_AMQP__RECONNECT_MAX_BACKOFF_MS", "1000")
        .via(&proxy)
        .without_waiting_for_the_broker()
        .start()
        .await;

    let ready = readyz(relay.addr).await;
    assert_eq!(
        ready.status,
        StatusCode::OK,
        "accepting into the spool is safe"
    );
    assert_eq!(ready.json()["status"], "degraded");
    assert_eq!(ready.json()["broker"], "disconnected");

    // The relay's own topology, declared ahead of it, and a queue that takes every `job.*`
    // and refuses it (nack): once the broker is back, replay of the spooled `job.*` webhooks
    // keeps failing, so the spool stays non-empty with the broker connected, for as long as
    // this queue exists.
    let broker = harness::broker().await;
    hirehop_relay::amqp::topology::declare(&relay.config.amqp, &broker)
        .await
        .unwrap();
    let channel = broker.create_channel().await.unwrap();
    let blocker = format!("{}.blocker", relay.exchange);
    let mut refuse_all = FieldTable::default();
    refuse_all.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    refuse_all.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    channel
        .queue_declare(
            blocker.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            refuse_all,
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            blocker.as_str().into(),
            relay.exchange.as_str().into(),
            "job.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let posted_from = now_ms();
    let mut ids = Vec::new();
    for n in 0..20 {
        ids.push(relay.post_spooled(&format!("job.n{n}")).await);
    }
    // One the broker would confirm, spooled behind them: replay must not let it overtake the
    // refused `job.*` head, although it is in the first batch replay reads.
    ids.push(relay.post_spooled("stock.moved").await);
    let posted_until = SystemTime::now();
    assert_eq!(readyz(relay.addr).await.json()["spool"]["messages"], 21);

    proxy.refuse(false);
    wait_broker_connected(relay.addr).await;
    wait_sample(
        relay.addr,
        "hirehop_relay_spool_replay_failures_total",
        "at least 1 (replay tried, the blocker refused)",
        |failures| failures >= 1.0,
    )
    .await;
    // The broker is back and would confirm this one (nothing refuses `late.*`), but the
    // spool is not empty: it must go behind what is there, not overtake it.
    assert_eq!(readyz(relay.addr).await.json()["spool"]["messages"], 21);
    ids.push(relay.post_spooled("late.arrival").await);
    assert_eq!(readyz(relay.addr).await.json()["spool"]["messages"], 22);

    channel
        .queue_delete(blocker.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    // Nothing else was bound: they land in the unrouted queue, in arrival order.
    let mut unrouted = relay.unrouted().await;
    for (n, id) in ids.iter().enumerate() {
        let delivery = unrouted.next().await;
        assert_eq!(&message_id(&delivery), id, "message {n} out of order");
        let expected_key = match n {
            0..20 => format!("job.n{n}"),
            20 => "stock.moved".to_owned(),
            _ => "late.arrival".to_owned(),
        };
        assert_eq!(delivery.routing_key.as_str(), expected_key);
        let headers = delivery.properties.headers().as_ref().unwrap().inner();
        assert_eq!(headers.get("replayed"), Some(&AMQPValue::Boolean(true)));
        // Stamped when it arrived over HTTP, not when it was replayed (which happened
        // after `posted_until`: the broker was out of reach until then).
        if n <= 20 {
            let stamped = received_at(&delivery);
            assert!(
                posted_from <= stamped && stamped <= posted_until,
                "received_at {stamped:?} is outside {posted_from:?}..={posted_until:?}"
            );
        }
    }
    // Each published once: none went out ahead of the refused head to be sent again after it.
    wait_sample(relay.addr, "hirehop_relay_spool_messages", "0", |n| {
        n == 0.0
    })
    .await;
    assert_eq!(
        sample(
            &scrape(relay.addr).await,
            "hirehop_relay_spool_replayed_total"
        ),
        22.0
    );
    relay.stop().await;
}

#[tokio::test]
async fn sigkill_while_the_broker_is_out_of_reach_loses_no_accepted_webhook() {
    let offline = Offline::start().await;
    let (proxy, exchange) = (&offline.proxy, &offline.exchange);
    let relay_env = offline.env();
    let relay = RelayProcess::spawn(&relay_env).await;
    let addr = relay.addr();

    let accepted_count = Arc::new(AtomicUsize::new(0));
    let clients = harness::post_until_gone(addr, 8, 1000, &accepted_count);
    harness::wait_count(&accepted_count, 200).await;
    relay.signal("KILL");
    let mut accepted = HashSet::new();
    for client in clients {
        accepted.extend(client.await.unwrap());
    }
    let (status, _) = relay.exit().await;
    assert!(!status.success());

    // Restart on the same spool, with the broker reachable again.
    proxy.refuse(false);
    let mut relay = RelayProcess::spawn(&relay_env).await;
    relay.wait_for("will be replayed").await;
    wait_broker_connected(relay.addr()).await;
    let broker = harness::broker().await;
    let unrouted = format!("{exchange}.unrouted");
    harness::TestQueue::consume(&broker, &unrouted)
        .await
        .expect_all(accepted)
        .await;
    relay.terminate().await;
}

#[tokio::test]
async fn a_corrupt_spool_tail_is_reported_and_the_rest_delivered() {
    let offline = Offline::start().await;
    let (proxy, exchange, dir) = (&offline.proxy, &offline.exchange, &offline.dir);
    let relay_env = offline.env();
    let relay = RelayProcess::spawn(&relay_env).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        let req = request(Method::POST, "/webhooks/hirehop", webhook("job.updated"));
        let reply = send(relay.addr(), req).await.unwrap();
        assert_eq!(reply.json()["status"], "spooled");
        ids.push(reply.message_id());
    }
    relay.signal("KILL");
    relay.exit().await;

    // Power lost mid-write: half a record at the end of the newest segment.
    let mut segments: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "seg"))
        .collect();
    segments.sort();
    let newest = segments.last().expect("the spool has a segment");
    let mut bytes = std::fs::read(newest).unwrap();
    bytes.extend_from_slice(&[0xff, 0x00, 0x00, 0x00, 0xde, 0xad, 0xbe, 0xef, b'{', b'"']);
    std::fs::write(newest, bytes).unwrap();

    proxy.refuse(false);
    let mut relay = RelayProcess::start(&[], &relay_env);
    relay.wait_for("torn or corrupt").await;
    relay.wait_for("listening").await;
    let broker = harness::broker().await;
    let unrouted = format!("{exchange}.unrouted");
    relay.wait_for("connected to the broker").await;
    let mut queue = harness::TestQueue::consume(&broker, &unrouted).await;
    for id in &ids {
        assert_eq!(&message_id(&queue.next().await), id);
    }
    relay.terminate().await;
}

#[tokio::test]
async fn a_full_spool_answers_503_loses_nothing_and_recovers() {
    let proxy = Proxy::start(broker_addr()).await;
    proxy.refuse(true);
    let relay = TestRelay::builder()
        .env("RELAY_SPOOL__MAX_BYTES", "1048576")
        .via(&proxy)
        .without_waiting_for_the_broker()
        .start()
        .await;
    // 100 KB webhooks: about ten fit.
    let big = |n: usize| {
        let mut body = webhook_with("job.updated", KEY, 1);
        body.insert_str(1, &format!("\"pad{n}\":\"{}\",", "x".repeat(100_000)));
        body
    };
    let mut accepted = Vec::new();
    let full = loop {
        let reply = relay.post(big(accepted.len())).await;
        if reply.status != StatusCode::ACCEPTED {
            break reply;
        }
        accepted.push(reply.message_id());
        assert!(accepted.len() < 20, "the spool never filled up");
    };
    assert_eq!(full.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        full.json()["error"]
            .as_str()
            .unwrap()
            .contains("spool full")
    );
    assert!(full.headers.contains_key("retry-after"));
    let ready = readyz(relay.addr).await;
    assert_eq!(
        ready.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{:?}",
        ready.body
    );
    assert_eq!(ready.json()["status"], "unavailable");

    proxy.refuse(false);
    wait_broker_connected(relay.addr).await;
    let mut unrouted = relay.unrouted().await;
    for id in &accepted {
        assert_eq!(&message_id(&unrouted.next().await), id);
    }
    // Once replay has caught up, space is free again, and the relay says so. The last
    // segment is deleted by the spool's writer after replay passed its end, so the spool
    // accepts again a moment after its depth reaches 0: wait for the state, not the depth.
    wait_readyz(
        relay.addr,
        "said ok with the spool empty and accepting",
        |reply| {
            let body = reply.json();
            body["status"] == "ok"
                && body["spool"]["messages"] == 0
                && body["spool"]["accepting"] == true
        },
    )
    .await;
    let ready = readyz(relay.addr).await;
    assert_eq!(ready.status, StatusCode::OK, "{:?}", ready.body);
    let reply = relay.post(big(99)).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
    relay.stop().await;
}

#[tokio::test]
async fn with_two_broker_urls_the_relay_tries_the_first_then_uses_the_one_that_answers() {
    // `amqp.url` leads nowhere useful: if `amqp.urls` were ignored, nothing would connect.
    let single = Proxy::start(broker_addr()).await;
    single.refuse(true);
    let first = Proxy::start(broker_addr()).await;
    first.refuse(true);
    let urls = format!("{},{}", via(&first), harness::amqp_url());
    let single_url = via(&single);
    let relay = TestRelay::builder()
        .env("RELAY_AMQP__URL", &single_url)
        .env("RELAY_AMQP__URLS", &urls)
        .start()
        .await;
    // Connected (start waits for that): the first node was tried in its turn, `url` never.
    assert!(
        first.connection_attempts() >= 1,
        "the first of amqp.urls was never tried"
    );
    assert_eq!(
        single.connection_attempts(),
        0,
        "amqp.url is used with urls set"
    );
    let mut queue = relay.queue("#").await;
    let reply = relay.post(webhook("job.updated")).await;
    assert_eq!(reply.json()["status"], "accepted");
    assert_eq!(message_id(&queue.next().await), reply.message_id());
    relay.stop().await;
}

#[tokio::test]
async fn topology_mismatch_found_after_serving_from_the_spool_stops_the_relay() {
    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();
    let exchange = unique_exchange();
    channel
        .exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Fanout,
            lapin::options::ExchangeDeclareOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let url = harness::amqp_url();
    let relay = RelayProcess::start(&[], &env(&exchange, &url));
    let (status, log) = relay.exit().await;
    assert!(!status.success(), "{log}");
    assert!(log.contains("PRECONDITION"), "{log}");
    assert!(log.contains(&format!("exchange {exchange}")), "{log}");
}

#[tokio::test]
async fn sigterm_replays_the_spool_to_a_broker_that_just_came_back_before_exiting() {
    let offline = Offline::start().await;
    let mut relay_env = offline.env();
    relay_env.push(("RELAY_AMQP__RECONNECT_MAX_BACKOFF_MS", "300"));
    let relay = RelayProcess::spawn(&relay_env).await;
    let posted = Arc::new(AtomicUsize::new(0));
    let mut accepted = Vec::new();
    for client in harness::post_until_gone(relay.addr(), 8, 40, &posted) {
        accepted.extend(client.await.unwrap());
    }
    assert_eq!(accepted.len(), 320);
    assert_eq!(readyz(relay.addr()).await.json()["spool"]["messages"], 320);

    // The broker is back, and the relay is told to stop at once: before it has even
    // reconnected, let alone replayed.
    offline.proxy.refuse(false);
    let log = relay.terminate().await;
    assert!(log.contains("stopped; spool empty"), "{log}");
    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();
    let unrouted = format!("{}.unrouted", offline.exchange);
    let outcome = count(&accepted, &take_all(&channel, &unrouted).await);
    eprintln!("replayed on SIGTERM: {outcome:?}");
    outcome.assert_delivered(0);
}

#[tokio::test]
async fn sigterm_with_the_broker_away_says_what_stays_in_the_spool_for_the_next_start() {
    let offline = Offline::start().await;
    let mut relay_env = offline.env();
    relay_env.push(("RELAY_SPOOL__SHUTDOWN_REPLAY_TIMEOUT_MS", "500"));
    let relay = RelayProcess::spawn(&relay_env).await;
    let posted = Arc::new(AtomicUsize::new(0));
    let mut accepted = Vec::new();
    for client in harness::post_until_gone(relay.addr(), 5, 10, &posted) {
        accepted.extend(client.await.unwrap());
    }
    let stopping = Instant::now();
    let log = relay.terminate().await;
    // It tried for the time it was given, not for ever.
    assert!(stopping.elapsed() < PATIENCE, "{:?}", stopping.elapsed());
    let last = log
        .lines()
        .find(|line| line.contains("webhooks remain in the spool"))
        .unwrap_or_else(|| panic!("no line about the spool left behind:\n{log}"));
    assert!(last.contains("records=50"), "{last}");
    assert!(last.contains("same spool.dir"), "{last}");

    // The next start on the same directory delivers them.
    offline.proxy.refuse(false);
    let relay = RelayProcess::spawn(&relay_env).await;
    wait_sample(relay.addr(), "hirehop_relay_spool_messages", "0", |n| {
        n == 0.0
    })
    .await;
    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();
    let unrouted = format!("{}.unrouted", offline.exchange);
    count(&accepted, &take_all(&channel, &unrouted).await).assert_delivered(0);
    relay.terminate().await;
}

/// A broker that pauses its replies for longer than `amqp.stall_timeout_ms` in the middle of a
/// replay is slow, not hung: replay waits for its confirms, rather than calling the connection
/// stalled and publishing what the broker already had again on the next one.
#[tokio::test]
async fn a_pause_in_the_brokers_replies_during_replay_duplicates_nothing() {
    // Enough for replay to be well under way, with full batches of 256, when the pause comes.
    const CLIENTS: usize = 16;
    const EACH: usize = 200;
    const WEBHOOKS: usize = CLIENTS * EACH;
    let offline = Offline::start().await;
    // The default thresholds: a stall after 1 s of silence, a 5 s confirm timeout.
    let relay = RelayProcess::spawn(&offline.env()).await;
    let posted = Arc::new(AtomicUsize::new(0));
    let mut accepted = Vec::new();
    for client in harness::post_until_gone(relay.addr(), CLIENTS, EACH, &posted) {
        accepted.extend(client.await.unwrap());
    }
    assert_eq!(accepted.len(), WEBHOOKS);
    assert_eq!(
        readyz(relay.addr()).await.json()["spool"]["messages"],
        WEBHOOKS
    );

    offline.proxy.refuse(false);
    // Batches of 1, 2, ... 128 replayed: every batch from now on is 256 webhooks.
    wait_readyz(relay.addr(), "replay under way in full batches", |reply| {
        reply.json()["spool"]["messages"]
            .as_u64()
            .is_some_and(|left| left <= (WEBHOOKS - 255) as u64)
    })
    .await;
    // The broker takes everything the relay sends and answers nothing for 1.5 s: longer than
    // `amqp.stall_timeout_ms`, but it is slow, not hung.
    offline.proxy.hold_replies(true);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Held up in the middle, not done before the pause.
    let left = readyz(relay.addr()).await.json()["spool"]["messages"].clone();
    assert!(left.as_u64().is_some_and(|left| left > 0), "{left}");
    offline.proxy.hold_replies(false);
    wait_sample(relay.addr(), "hirehop_relay_spool_messages", "0", |n| {
        n == 0.0
    })
    .await;

    let metrics = scrape(relay.addr()).await;
    let broker = harness::broker().await;
    let channel = broker.create_channel().await.unwrap();
    let unrouted = format!("{}.unrouted", offline.exchange);
    let outcome = count(&accepted, &take_all(&channel, &unrouted).await);
    eprintln!(
        "a pause of 1.5 s during replay: {outcome:?}, {} stalls",
        sample(&metrics, "hirehop_relay_broker_stalls_total")
    );
    outcome.assert_delivered(0);
    // Replay waited: the connection was never given up.
    assert_eq!(
        sample(&metrics, "hirehop_relay_broker_stalls_total"),
        0.0,
        "{metrics}"
    );
    relay.terminate().await;
}
