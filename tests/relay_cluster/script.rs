//! `deploy/rabbitmq/local-cluster.sh` does what its header says, on two nodes of the test's
//! own: they join, and each can be frozen, killed, stopped and started again without touching
//! the other (or the shared broker).

use std::time::Duration;

use crate::local_cluster::LocalCluster;

#[tokio::test]
async fn the_local_cluster_script_joins_freezes_kills_and_restarts_nodes() {
    let _turn = crate::one_at_a_time().await;
    let cluster = LocalCluster::up(2);
    // The nodes node `n` sees running, by its own account.
    let running = |n: usize| -> Vec<String> {
        let status = cluster.ctl(n, &["cluster_status", "--formatter", "json"]);
        let status: serde_json::Value = serde_json::from_str(&status).expect("JSON status");
        let mut nodes: Vec<String> = status["running_nodes"]
            .as_array()
            .expect("running_nodes")
            .iter()
            .map(|node| node.as_str().unwrap_or_default().to_owned())
            .collect();
        nodes.sort();
        nodes
    };
    let both = vec![cluster.node_name(1), cluster.node_name(2)];
    assert_eq!(running(1), both);
    assert_eq!(cluster.urls().len(), 2);

    // A frozen node keeps its port open but answers nothing.
    cluster.freeze(2);
    let stalled = tokio::time::timeout(
        Duration::from_secs(3),
        lapin::Connection::connect(&cluster.url(2), lapin::ConnectionProperties::default()),
    )
    .await;
    assert!(
        stalled.is_err(),
        "a frozen node completed an AMQP handshake"
    );
    cluster.thaw(2);
    crate::harness::broker_at(&cluster.url(2)).await;

    cluster.kill(2);
    cluster.start(2);
    crate::harness::broker_at(&cluster.url(2)).await;
    cluster.stop(1);
    cluster.start(1);
    assert_eq!(running(2), both, "node 1 did not rejoin");
    let ping = cluster.cli(1, "rabbitmq-diagnostics", &["-q", "ping"]);
    assert!(ping.contains("succeeded"), "{ping}");
}
