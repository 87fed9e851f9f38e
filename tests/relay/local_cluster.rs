//! Brokers of a test's own: RabbitMQ nodes started with `deploy/rabbitmq/local-cluster.sh` on
//! free loopback ports, with their own node names, data directory and Erlang cookie, and
//! stopped and deleted when dropped (a panicking test included). Faults that would disturb
//! every other test on the shared broker (a resource alarm, a frozen or killed node) are
//! injected here.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// One node (a broker of the test's own) or several joined into a cluster.
pub struct LocalCluster {
    name: String,
    nodes: usize,
    port: u16,
    /// More environment for the script and the nodes it starts (`RABBITMQ_*` settings).
    env: Vec<(String, String)>,
}

impl LocalCluster {
    /// Starts `nodes` nodes and joins them. Takes a few seconds per node.
    pub fn up(nodes: usize) -> LocalCluster {
        Self::up_with(nodes, &[])
    }

    /// Like [`LocalCluster::up`], with `env` in the nodes' environment, e.g.
    /// `RABBITMQ_FEATURE_FLAGS` for a node with only some feature flags enabled.
    pub fn up_with(nodes: usize, env: &[(&str, &str)]) -> LocalCluster {
        let mut last = String::new();
        // A port found free can be taken before the node binds it: try other ports then.
        for _ in 0..5 {
            let cluster = LocalCluster {
                name: format!("hhrt{:06x}", fastrand::u32(..0x00ff_ffff)),
                nodes,
                port: free_ports(nodes),
                env: env
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            };
            let output = cluster.script(&["up"]);
            if output.status.success() {
                return cluster;
            }
            last = describe(&output);
            // Whatever started is stopped and deleted by `down`.
            drop(cluster);
            if !last.contains("is in use") {
                break;
            }
        }
        panic!(
            "cannot start a local RabbitMQ node with deploy/rabbitmq/local-cluster.sh (it needs \
             rabbitmq-server: apt-get install rabbitmq-server):\n{last}"
        )
    }

    /// The AMQP URL of node `n` (1-based), guest/guest on the default vhost.
    pub fn url(&self, n: usize) -> String {
        assert!((1..=self.nodes).contains(&n), "no node {n}");
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port(n))
    }

    /// Every node's URL, in order: the relay's `amqp.urls`.
    pub fn urls(&self) -> Vec<String> {
        (1..=self.nodes).map(|n| self.url(n)).collect()
    }

    pub fn amqp_port(&self, n: usize) -> u16 {
        self.port + u16::try_from(n - 1).expect("few nodes")
    }

    /// Node `n`'s name, e.g. `hhrt1a2b3c1@localhost`.
    pub fn node_name(&self, n: usize) -> String {
        format!("{}{n}@localhost", self.name)
    }

    /// SIGKILL: the node crashes.
    pub fn kill(&self, n: usize) {
        self.run(&["kill", &n.to_string()]);
    }

    /// A clean stop.
    pub fn stop(&self, n: usize) {
        self.run(&["stop", &n.to_string()]);
    }

    /// Starts a killed or stopped node again and waits until it runs.
    pub fn start(&self, n: usize) {
        self.run(&["start", &n.to_string()]);
    }

    /// SIGSTOP: the node hangs with its connections open (a GC pause, a stuck disk, a frozen
    /// VM). [`LocalCluster::thaw`] resumes it; dropping the cluster does too.
    pub fn freeze(&self, n: usize) {
        self.run(&["freeze", &n.to_string()]);
    }

    pub fn thaw(&self, n: usize) {
        self.run(&["thaw", &n.to_string()]);
    }

    /// `rabbitmqctl ARGS` against node `n`; its standard output.
    pub fn ctl(&self, n: usize, args: &[&str]) -> String {
        let node = n.to_string();
        let mut all = vec!["ctl", node.as_str()];
        all.extend_from_slice(args);
        self.run(&all)
    }

    /// Another CLI tool (`rabbitmq-upgrade`, `rabbitmq-queues`, ...) against node `n`.
    pub fn cli(&self, n: usize, tool: &str, args: &[&str]) -> String {
        let node = n.to_string();
        let mut all = vec!["cli", node.as_str(), tool];
        all.extend_from_slice(args);
        self.run(&all)
    }

    /// Enables RabbitMQ's own Prometheus metrics (the `rabbitmq_prometheus` plugin) on node
    /// `n`, served on `port` (`/metrics`, `/metrics/per-object`).
    pub fn enable_prometheus(&self, n: usize, port: u16) {
        let listener =
            format!("application:set_env(rabbitmq_prometheus, tcp_config, [{{port, {port}}}]).");
        self.ctl(n, &["eval", &listener]);
        let node = n.to_string();
        let args = [
            "cli",
            &node,
            "rabbitmq-plugins",
            "enable",
            "--online",
            "rabbitmq_prometheus",
        ];
        let output = self
            .command(&args)
            // The nodes read their plugins from there; the CLI must write the same file.
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.dir().join("enabled_plugins"),
            )
            .output()
            .expect("bash runs deploy/rabbitmq/local-cluster.sh");
        assert!(
            output.status.success(),
            "enabling rabbitmq_prometheus failed:\n{}",
            describe(&output)
        );
    }

    fn run(&self, args: &[&str]) -> String {
        let output = self.script(args);
        assert!(
            output.status.success(),
            "local-cluster.sh {} failed:\n{}",
            args.join(" "),
            describe(&output)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn script(&self, args: &[&str]) -> Output {
        self.command(args)
            .output()
            .expect("bash runs deploy/rabbitmq/local-cluster.sh")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(script());
        command
            .args(args)
            .env("CLUSTER_NAME", &self.name)
            .env("CLUSTER_NODES", self.nodes.to_string())
            .env("CLUSTER_PORT", self.port.to_string())
            .env("CLUSTER_DIR", self.dir())
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        command
    }

    fn dir(&self) -> PathBuf {
        std::env::temp_dir().join(format!("hirehop-relay-cluster-{}", self.name))
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let output = self.script(&["down"]);
        if !output.status.success() {
            eprintln!("local-cluster.sh down failed:\n{}", describe(&output));
        }
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/rabbitmq/local-cluster.sh")
}

fn describe(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A base port such that `n` AMQP ports from it, and their Erlang distribution ports (20,000
/// above), are free right now and below the kernel's ephemeral range. A port in that range
/// can be given to any outgoing connection (the tests open hundreds a second) while a killed
/// node is down, and the node then cannot listen on it again (`eaddrinuse`).
fn free_ports(n: usize) -> u16 {
    const LOWEST: u16 = 10_000;
    let n = u16::try_from(n).expect("few nodes");
    let ephemeral = ephemeral_ports_start();
    let room = ephemeral.saturating_sub(LOWEST + 20_000 + n);
    assert!(
        room > 0,
        "the ephemeral ports start at {ephemeral} (net.ipv4.ip_local_port_range): no room below \
         them for {n} nodes' ports from {LOWEST} and 20,000 above"
    );
    loop {
        let base = LOWEST + fastrand::u16(..room);
        let free = (base..base + n)
            .flat_map(|port| [port, port + 20_000])
            .all(|port| TcpListener::bind(("127.0.0.1", port)).is_ok());
        if free {
            return base;
        }
    }
}

/// The first port of the kernel's ephemeral range, from which it picks the local port of an
/// outgoing connection or of a listener on port 0.
fn ephemeral_ports_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}
