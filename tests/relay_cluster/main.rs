//! The relay on RabbitMQ clusters of the test's own (`deploy/rabbitmq/local-cluster.sh`),
//! against a real load while their nodes fail.
//!
//! A test binary of its own: cargo runs test binaries one after the other, this one after
//! `--test relay`, whose ~130 tests otherwise ran beside it. On a busy 2-core machine a node
//! then missed its start timeout and a failover took 10 s or more. Its own tests take turns
//! too ([`one_at_a_time`]), each starting nodes of its own. `cargo test --test relay_cluster --
//! --nocapture` prints the table that `deploy/rabbitmq/README.md` quotes.
//!
//! Modules:
//! - `cluster`: a three-node cluster under load while a node is killed, drained, alarmed or
//!   frozen: every 202 on the cluster, no other answer.
//! - `script`: `local-cluster.sh` itself: nodes join, freeze, die and start again.
//! - `harness`, `proxy`, `load`, `local_cluster`: shared with `tests/relay`, which lists them.

#[allow(dead_code, reason = "shared with tests/relay; used here in part")]
#[path = "../relay/harness.rs"]
mod harness;
#[allow(dead_code, reason = "shared with tests/relay; used here in part")]
#[path = "../relay/load.rs"]
mod load;
#[allow(dead_code, reason = "shared with tests/relay; used here in part")]
#[path = "../relay/local_cluster.rs"]
mod local_cluster;
#[allow(dead_code, reason = "shared with tests/relay; used here in part")]
#[path = "../relay/proxy.rs"]
mod proxy;

mod cluster;
mod script;

/// Held by each test of this binary for as long as it runs, so that they run one at a time.
async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    TURN.lock().await
}
