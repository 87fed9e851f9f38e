//! The relay on a real three-node RabbitMQ cluster (`local_cluster`), with all three URLs
//! and a quorum queue, under an open-loop load while a node fails: killed, drained, alarmed,
//! frozen. Each fault counts the 202s against what the cluster holds (by `message_id`), the
//! answers that were not 202 (there must be none) and the duplicates, and prints a line of
//! the table in deploy/rabbitmq/README.md (On a RabbitMQ cluster).
//!
//! One cluster serves every fault, one after the other (a fault is never injected while
//! another runs), and each fault leaves the cluster whole again.

use std::future::Future;
use std::time::{Duration, Instant};

use hyper::StatusCode;
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::harness::{self, TestExchange, TestQueue, TestRelay, wait_readyz};
use crate::load::{Sent, expect_on_broker, open_loop};
use crate::local_cluster::LocalCluster;

/// The node the relay connects to first (its `amqp.urls` start with it).
const RELAYS_NODE: usize = 1;
/// The node the test reads from; never faulted.
const WATCHER: usize = 3;
/// Every webhook is answered within this, whatever the fault: about a stall threshold and a
/// spool write, with room for a loaded machine. (Before stalls were noticed, a frozen node
/// held each webhook for the 5 s confirm timeout.)
const SLOWEST: Duration = Duration::from_secs(3);

/// The relay's topology for `exchange`, declared as `hirehop-relay topology --apply` does,
/// through node `leader`: the history stream's leader (like a quorum queue's) starts on the
/// node it is declared through, and every publish waits for the stream's confirm.
async fn declare_topology_on(cluster: &LocalCluster, leader: usize, exchange: &str) {
    let url = cluster.url(leader);
    let config = harness::config(&harness::env(exchange, &url), None);
    hirehop_relay::amqp::declare_topology_once(&config.amqp)
        .await
        .expect("the topology is declared through the leader's node");
}

/// What one fault cost.
struct Row {
    fault: &'static str,
    rate: u32,
    requests: usize,
    not_accepted: usize,
    spooled: usize,
    duplicates: usize,
    slowest: Duration,
    /// From the fault to the first webhook confirmed by the broker directly again after the
    /// relay first spooled one (after the fault itself, if it spooled none).
    confirmed_again: Option<Duration>,
}

impl std::fmt::Display for Row {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let again = self
            .confirmed_again
            .map_or("-".to_owned(), |d| format!("{:.1} s", d.as_secs_f64()));
        write!(
            f,
            "| {} | {}/s | {} | {} | {} | {} | {:.2} s | {again} |",
            self.fault,
            self.rate,
            self.requests,
            self.not_accepted,
            self.spooled,
            self.duplicates,
            self.slowest.as_secs_f64(),
        )
    }
}

/// A relay on the cluster under load, with a quorum queue that takes everything it publishes.
struct Run {
    relay: TestRelay,
    /// The connection `queue` is consumed on.
    _watcher: lapin::Connection,
    queue: TestQueue,
    load: JoinHandle<Vec<Sent>>,
    stop: CancellationToken,
    rate: u32,
    fault_at: Option<Instant>,
}

impl Run {
    /// Starts a relay on `cluster` (all three URLs, its own node first) and `rate` webhooks
    /// per second; the leaders of the queue and of the history stream are on node `leader`.
    async fn start(
        cluster: &LocalCluster,
        leader: usize,
        rate: u32,
        overrides: &[(&str, &str)],
    ) -> Run {
        let urls = cluster.urls().join(",");
        let watcher_url = cluster.url(WATCHER);
        let exchange = TestExchange::on_own_broker();
        declare_topology_on(cluster, leader, &exchange).await;
        let queue_name = exchange.own("all");
        // The load comes from one address, standing in for HireHop's several: a second's
        // worth of it at 300/s is over the per-address connection cap.
        let relay = TestRelay::builder()
            .env("RELAY_AMQP__URLS", &urls)
            .env("RELAY_HTTP__MAX_CONNECTIONS_PER_IP", "4096")
            .envs(overrides)
            .on(&watcher_url)
            .exchange(exchange)
            .start()
            .await;
        // Declared through the leader's node: a quorum queue's leader starts where it is
        // declared.
        let declaring = harness::broker_at(&cluster.url(leader)).await;
        let channel = declaring.create_channel().await.unwrap();
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .queue_declare(queue_name.as_str().into(), durable, arguments)
            .await
            .unwrap();
        channel
            .queue_bind(
                queue_name.as_str().into(),
                relay.exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let _ = declaring.close(200, "declared".into()).await;
        let watcher = harness::broker_at(&cluster.url(WATCHER)).await;
        let queue = TestQueue::consume(&watcher, &queue_name).await;
        let stop = CancellationToken::new();
        let load = tokio::spawn(open_loop(relay.addr, rate, stop.clone()));
        // A steady state before the fault.
        tokio::time::sleep(Duration::from_secs(2)).await;
        Run {
            relay,
            _watcher: watcher,
            queue,
            load,
            stop,
            rate,
            fault_at: None,
        }
    }

    /// Marks the moment the fault is injected.
    fn fault(&mut self) {
        self.fault_at = Some(Instant::now());
    }

    /// Keeps the load on for `after`, then checks every answer and every message.
    async fn finish(mut self, fault: &'static str, after: Duration) -> Row {
        tokio::time::sleep(after).await;
        self.stop.cancel();
        let sent = (&mut self.load).await.expect("the load does not panic");
        let fault_at = self.fault_at.expect("the fault was marked");
        let not_accepted: Vec<&Sent> = sent
            .iter()
            .filter(|s| s.status != StatusCode::ACCEPTED)
            .collect();
        let row = Row {
            fault,
            rate: self.rate,
            requests: sent.len(),
            not_accepted: not_accepted.len(),
            spooled: sent.iter().filter(|s| s.spooled).count(),
            duplicates: expect_on_broker(&mut self.queue, &sent).await,
            slowest: sent.iter().map(|s| s.took).max().unwrap_or_default(),
            confirmed_again: {
                let trouble_at = sent
                    .iter()
                    .filter(|s| s.started >= fault_at && s.spooled)
                    .map(|s| s.started)
                    .min()
                    .unwrap_or(fault_at);
                sent.iter()
                    .filter(|s| s.started >= trouble_at && s.message_id.is_some() && !s.spooled)
                    .map(|s| s.started + s.took - fault_at)
                    .min()
            },
        };
        eprintln!("{row}");
        assert!(
            not_accepted.is_empty(),
            "{fault}: {} not accepted: {not_accepted:?}",
            not_accepted.len()
        );
        assert!(
            row.slowest < SLOWEST,
            "{fault}: slowest answer {:?}",
            row.slowest
        );
        self.relay.stop().await;
        row
    }
}

/// Runs `fault`, then `repair`, which must leave the cluster whole whether the fault passed
/// or not; returns the fault's row, or why it failed.
async fn each<T: Send + 'static, F: Future<Output = T> + Send + 'static>(
    fault: F,
    repair: impl FnOnce(),
) -> Result<T, String> {
    let outcome = tokio::spawn(fault).await;
    repair();
    outcome.map_err(|err| match err.try_into_panic() {
        Ok(panic) => panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "a panic".to_owned()),
        Err(err) => err.to_string(),
    })
}

/// Every row of the table: issue 14's faults on one cluster, one after the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_loses_no_webhook_and_refuses_none_under_each_fault() {
    let _turn = crate::one_at_a_time().await;
    let cluster = std::sync::Arc::new(LocalCluster::up(3));
    let c = || std::sync::Arc::clone(&cluster);
    let mut rows = Vec::new();

    // SIGKILL the node the relay is on: the connection fails at once, the next URL answers.
    rows.push(
        each(
            {
                let cluster = c();
                async move {
                    let mut run = Run::start(&cluster, 2, 200, &[]).await;
                    run.fault();
                    cluster.kill(RELAYS_NODE);
                    run.finish("SIGKILL the relay's node", Duration::from_secs(5))
                        .await
                }
            },
            || cluster.start(RELAYS_NODE),
        )
        .await,
    );

    // SIGKILL the queue's leader, another node: the others elect a new one.
    rows.push(
        each(
            {
                let cluster = c();
                async move {
                    let mut run = Run::start(&cluster, 2, 200, &[]).await;
                    run.fault();
                    cluster.kill(2);
                    run.finish(
                        "SIGKILL the leader of the queue and the history",
                        Duration::from_secs(5),
                    )
                    .await
                }
            },
            || cluster.start(2),
        )
        .await,
    );

    // A rolling upgrade's first step: the node closes client connections and hands its
    // leaders over.
    rows.push(
        each(
            {
                let cluster = c();
                async move {
                    let mut run = Run::start(&cluster, RELAYS_NODE, 200, &[]).await;
                    run.fault();
                    cluster.cli(RELAYS_NODE, "rabbitmq-upgrade", &["drain"]);
                    run.finish("drain the relay's node", Duration::from_secs(5))
                        .await
                }
            },
            || {
                cluster.cli(RELAYS_NODE, "rabbitmq-upgrade", &["revive"]);
            },
        )
        .await,
    );

    // A memory alarm on one node blocks publishing in the whole cluster.
    rows.push(
        each(
            {
                let cluster = c();
                async move {
                    let mut run = Run::start(&cluster, 2, 200, &[]).await;
                    run.fault();
                    cluster.ctl(2, &["set_vm_memory_high_watermark", "0.0000001"]);
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    cluster.ctl(2, &["set_vm_memory_high_watermark", "0.4"]);
                    run.finish("memory alarm on another node", Duration::from_secs(3))
                        .await
                }
            },
            || {
                cluster.ctl(2, &["set_vm_memory_high_watermark", "0.4"]);
            },
        )
        .await,
    );

    // The relay's node hangs (SIGSTOP) for 15 s; the queue's leader is elsewhere. At 300/s,
    // webhooks waiting out the 5 s confirm timeout would overflow the in-flight cap (1,024).
    for rate in [200, 300] {
        rows.push(
            each(
                {
                    let cluster = c();
                    async move {
                        let mut run = Run::start(&cluster, 2, rate, &[]).await;
                        run.fault();
                        cluster.freeze(RELAYS_NODE);
                        tokio::time::sleep(Duration::from_secs(15)).await;
                        cluster.thaw(RELAYS_NODE);
                        run.finish("SIGSTOP the relay's node 15 s", Duration::from_secs(3))
                            .await
                    }
                },
                || cluster.thaw(RELAYS_NODE),
            )
            .await,
        );
    }

    // The leader of the queue and of the history stream hangs: no node can confirm for them
    // until it is back (RabbitMQ waits for the Erlang net tick, 60 s, before it gives a hung
    // member up), so everything goes to the spool, and from there to the queue once the
    // leader resumes.
    rows.push(
        each(
            {
                let cluster = c();
                async move {
                    let mut run = Run::start(&cluster, 2, 200, &[]).await;
                    run.fault();
                    cluster.freeze(2);
                    tokio::time::sleep(Duration::from_secs(15)).await;
                    cluster.thaw(2);
                    run.finish(
                        "SIGSTOP the leader of the queue and the history 15 s",
                        Duration::from_secs(5),
                    )
                    .await
                }
            },
            || cluster.thaw(2),
        )
        .await,
    );

    // A hang with the default settings and a light load: how long from the hang until the
    // broker confirms webhooks directly again, through a healthy node.
    rows.push(
        each(
            {
                let cluster = c();
                async move {
                    let mut run = Run::start(&cluster, 2, 20, &[]).await;
                    run.fault();
                    cluster.freeze(RELAYS_NODE);
                    tokio::time::sleep(Duration::from_secs(15)).await;
                    cluster.thaw(RELAYS_NODE);
                    let row = run
                        .finish("SIGSTOP the relay's node, default settings", Duration::ZERO)
                        .await;
                    let again = row
                        .confirmed_again
                        .expect("confirmed again during the hang");
                    assert!(again < Duration::from_secs(10), "failover took {again:?}");
                    row
                }
            },
            || cluster.thaw(RELAYS_NODE),
        )
        .await,
    );

    // The relay's node hangs while nothing is published: the heartbeat notices.
    let idle = each(
        {
            let cluster = c();
            async move {
                let urls = cluster.urls().join(",");
                let relay = TestRelay::builder()
                    .env("RELAY_AMQP__URLS", &urls)
                    .on(&cluster.url(WATCHER))
                    .start()
                    .await;
                let frozen_at = Instant::now();
                cluster.freeze(RELAYS_NODE);
                wait_readyz(relay.addr, "the broker stalled", |reply| {
                    reply.json()["broker"] == "stalled"
                })
                .await;
                let noticed = frozen_at.elapsed();
                wait_readyz(relay.addr, "the relay reconnected", |reply| {
                    reply.json()["broker"] == "connected"
                })
                .await;
                let moved = frozen_at.elapsed();
                cluster.thaw(RELAYS_NODE);
                eprintln!(
                    "idle relay, its node frozen: stalled (no heartbeat) after {:.1} s, \
                     connected to another node after {:.1} s",
                    noticed.as_secs_f64(),
                    moved.as_secs_f64()
                );
                // Two 5 s heartbeat intervals, checked every 2.5 s, and a reconnect.
                assert!(moved < Duration::from_secs(15), "{moved:?}");
                relay.stop().await;
            }
        },
        || cluster.thaw(RELAYS_NODE),
    )
    .await;

    eprintln!(
        "\n| fault | rate | requests | not 202 | spooled | duplicates | slowest answer | \
         confirmed directly again after |\n|---|---|---|---|---|---|---|---|"
    );
    let mut failed: Vec<String> = idle.err().into_iter().collect();
    for row in &rows {
        match row {
            Ok(row) => eprintln!("{row}"),
            Err(why) => failed.push(why.clone()),
        }
    }
    assert!(
        failed.is_empty(),
        "{} faults failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}
