//! Opening a broker connection: which node to try next, the settings the relay adds to its
//! URL, the topology it needs before publishing, the confirm-mode channels; what the broker's
//! refusals mean; and closing it again.
//!
//! Every caller that looks for a node that answers goes through `Nodes`: the tools and
//! `topology --apply` try each node once (`Nodes::try_each`), the publisher's supervisor goes
//! round them for as long as the relay runs (`Nodes::next`).
//!
//! The topology is declared in full once per process (the first connection), or again when
//! the exchange turns out to be gone. Every other connection only checks passively that the
//! exchange is there: a passive check is answered by the node the relay talks to, whereas a
//! declaration (`queue.bind` above all) waits for every cluster member, and a hung member
//! would make reconnecting to a healthy node time out.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::ConfirmSelectOptions;
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::{Channel, Connection, ConnectionProperties};

pub use crate::amqp::error::ConnectError;
use crate::amqp::error::protocol_error;
use crate::amqp::stall::StallWatch;
use crate::amqp::topology;
use crate::config::{AmqpConfig, BrokerUrl};

/// The heartbeat the relay asks for when the URL names none (`?heartbeat=N` wins), in
/// seconds. A broker that hangs while no publish waits on it is noticed after two missed
/// intervals: 10 s, instead of the 120 s of RabbitMQ's default 60 s. RabbitMQ advises 5 to
/// 20 s: shorter ones cause false alarms on busy hosts. While publishes wait, the stall
/// watch notices a hang much sooner (`amqp.stall_timeout_ms`).
pub const HEARTBEAT_SECS: u16 = 5;

/// How long closing a connection may wait for the broker's answer: a hung broker never gives
/// one, and the process must still exit.
pub(crate) const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// The broker's nodes in the order they are tried: `amqp.urls` (or `amqp.url`) from the
/// first on, then round again.
pub(crate) struct Nodes<'a> {
    nodes: Vec<&'a BrokerUrl>,
    next: usize,
}

impl<'a> Nodes<'a> {
    pub fn new(config: &'a AmqpConfig) -> Nodes<'a> {
        Nodes {
            nodes: config.nodes(),
            next: 0,
        }
    }

    /// The node to try now; the next call gives the one after it.
    pub fn next(&mut self) -> &'a BrokerUrl {
        let node = self.nodes[self.next % self.nodes.len()];
        self.next += 1;
        node
    }

    /// `attempt` on each node in turn, until one succeeds. A refusal that retrying cannot fix
    /// ends it at once: the nodes of a cluster share users, vhosts and definitions, so the
    /// next would refuse the same way.
    pub async fn try_each<T, F>(
        &mut self,
        mut attempt: impl FnMut(&'a BrokerUrl) -> F,
    ) -> Result<T, ConnectError>
    where
        F: Future<Output = Result<T, ConnectError>>,
    {
        let mut last = None;
        for _ in 0..self.nodes.len() {
            match attempt(self.next()).await {
                Ok(done) => return Ok(done),
                Err(err) if err.is_fatal() => return Err(err),
                Err(err) => last = Some(err),
            }
        }
        Err(last.expect("config has at least one broker URL"))
    }
}

/// A connection named `name` to the first node of `config` that answers: for the tools.
pub async fn connect_any(config: &AmqpConfig, name: &str) -> Result<Connection, ConnectError> {
    Nodes::new(config)
        .try_each(|node| connect(config, node, name.to_owned()))
        .await
}

/// A connection to `node` named `name` (shown in the management UI and `rabbitmqctl
/// list_connections`), within `amqp.connect_timeout_ms`, with the relay's frame size and
/// heartbeat unless the URL sets them.
pub async fn connect(
    config: &AmqpConfig,
    node: &BrokerUrl,
    name: String,
) -> Result<Connection, ConnectError> {
    let url = node.to_string();
    let timeout = config.connect_timeout();
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let mut vhost = String::new();
    let connecting = async {
        match node.expose().parse::<lapin::uri::AMQPUri>() {
            Ok(mut uri) => {
                // lapin sizes its buffers by the frame size: RabbitMQ's 128 KiB default costs
                // memory a webhook never uses.
                uri.query.frame_max.get_or_insert(config.frame_max_bytes);
                uri.query.heartbeat.get_or_insert(HEARTBEAT_SECS);
                vhost.clone_from(&uri.vhost);
                Connection::connect_uri(uri, properties).await
            }
            // Validated at load; let lapin report it if it still does not parse.
            Err(_) => Connection::connect(node.expose(), properties).await,
        }
    };
    let cause = match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(connection)) => return Ok(connection),
        Ok(Err(cause)) => cause,
        Err(_) => return Err(ConnectError::Timeout { url, timeout }),
    };
    Err(match protocol_error(&cause) {
        Some(AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)) => {
            ConnectError::LoginRefused { url, cause }
        }
        Some(AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)) => {
            ConnectError::VhostRefused { url, vhost, cause }
        }
        _ => ConnectError::Connect { url, cause },
    })
}

/// What a new connection does about the topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Topology {
    /// Declare all of it (with `amqp.declare`; else check that the exchange exists).
    Declare,
    /// Check passively that the exchange exists, and declare everything only if it is gone.
    Check,
}

/// One live connection, its publishing channels, and its stall watch.
pub(crate) struct Session {
    pub connection: Arc<Connection>,
    pub channels: Vec<Channel>,
    /// The node, password redacted.
    pub url: String,
    pub stall: Arc<StallWatch>,
    /// Whether this connection declared the whole topology.
    pub declared: bool,
}

impl Session {
    /// The connection and every channel are open, and the broker has not stalled.
    pub fn healthy(&self) -> bool {
        !self.stall.is_stalled()
            && self.connection.status().connected()
            && self.channels.iter().all(|c| c.status().connected())
    }

    /// Closes the connection, waiting at most [`CLOSE_WAIT`] for the broker's answer.
    pub async fn close(&self, reason: &str) {
        match tokio::time::timeout(CLOSE_WAIT, self.connection.close(200, reason.into())).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(
                url = %self.url,
                error = %err,
                "failed to close the broker connection cleanly"
            ),
            Err(_) => tracing::warn!(
                url = %self.url,
                "the broker did not answer the connection close in {CLOSE_WAIT:?}; leaving it"
            ),
        }
    }
}

/// Connection, topology and channels, all within `amqp.connect_timeout_ms`.
pub(crate) async fn open_session(
    config: &AmqpConfig,
    node: &BrokerUrl,
    topology: Topology,
) -> Result<Session, ConnectError> {
    let url = node.to_string();
    let timeout = config.connect_timeout();
    tokio::time::timeout(timeout, async {
        let name = format!(
            "hirehop-relay exchange={} pid={}",
            config.exchange,
            std::process::id()
        );
        let connection = connect(config, node, name).await?;
        let declared = ensure_topology(config, &connection, &url, topology).await?;
        let mut channels = Vec::with_capacity(config.channels);
        for _ in 0..config.channels {
            channels.push(open_channel(&connection).await?);
        }
        Ok(Session {
            connection: Arc::new(connection),
            channels,
            url: url.clone(),
            stall: Arc::new(StallWatch::new()),
            declared,
        })
    })
    .await
    .unwrap_or(Err(ConnectError::Timeout { url, timeout }))
}

/// Declares or checks the topology; true if it declared all of it.
async fn ensure_topology(
    config: &AmqpConfig,
    connection: &Connection,
    url: &str,
    topology: Topology,
) -> Result<bool, ConnectError> {
    if topology == Topology::Check || !config.declare {
        let Some(missing) = topology::missing_exchange(config, connection).await? else {
            return Ok(false);
        };
        if !config.declare {
            return Err(ConnectError::ExchangeMissing {
                url: url.to_owned(),
                exchange: missing,
            });
        }
        tracing::warn!(
            exchange = %missing,
            url,
            "the exchange is gone from the broker; declaring the topology again"
        );
    }
    topology::declare(config, connection).await?;
    Ok(true)
}

async fn open_channel(connection: &Connection) -> Result<Channel, ConnectError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(ConnectError::Channel)?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(ConnectError::Channel)?;
    Ok(channel)
}

/// Checks passively that the exchanges the relay publishes through exist, and declares the
/// topology again (with `amqp.declare`) if one is gone; true if it declared.
pub(crate) async fn check_topology(
    config: &AmqpConfig,
    session: &Session,
) -> Result<bool, ConnectError> {
    ensure_topology(config, &session.connection, &session.url, Topology::Check).await
}

/// The same connection with its closed channels re-opened. A channel dies of a
/// channel-level error, e.g. a publish to an exchange that was deleted: so the exchange is
/// checked first, and the topology declared again if it is gone.
pub(crate) async fn reopen_channels(
    config: &AmqpConfig,
    old: &Session,
) -> Result<Session, ConnectError> {
    let declared = ensure_topology(config, &old.connection, &old.url, Topology::Check).await?;
    let mut channels = Vec::with_capacity(old.channels.len());
    for channel in &old.channels {
        if channel.status().connected() {
            channels.push(channel.clone());
        } else {
            channels.push(open_channel(&old.connection).await?);
        }
    }
    Ok(Session {
        connection: Arc::clone(&old.connection),
        channels,
        url: old.url.clone(),
        stall: Arc::clone(&old.stall),
        declared,
    })
}

/// Connects to the first node that answers, declares the topology, and disconnects: for
/// `hirehop-relay topology --apply` (which declares whatever `amqp.declare` says).
pub async fn declare_topology_once(config: &AmqpConfig) -> Result<(), ConnectError> {
    let config = AmqpConfig {
        declare: true,
        ..config.clone()
    };
    let session = Nodes::new(&config)
        .try_each(|node| open_session(&config, node, Topology::Declare))
        .await?;
    session.close("topology declared").await;
    Ok(())
}

/// Exponential backoff from 100 ms up to `max`, with jitter between half and all of the
/// step, so many relays losing the same broker do not reconnect in lockstep.
pub fn backoff(attempt: u32, max: Duration) -> Duration {
    let step = Duration::from_millis(100)
        .saturating_mul(2u32.saturating_pow(attempt.min(20)))
        .min(max);
    let half = step / 2;
    half + half.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::Config;

    /// A config naming the nodes `a`, `b` and `c`.
    fn three_nodes() -> AmqpConfig {
        let urls = "amqp://u:p@a:5672/%2f,amqp://u:p@b:5672/%2f,amqp://u:p@c:5672/%2f";
        let env = [("RELAY_AUTH__EXPORT_KEYS", "k"), ("RELAY_AMQP__URLS", urls)]
            .map(|(k, v)| (k.to_owned(), v.to_owned()));
        Config::load_from(None, Some(HashMap::from(env)))
            .unwrap()
            .amqp
    }

    fn host(node: &BrokerUrl) -> String {
        node.to_string()
            .split_once('@')
            .and_then(|(_, rest)| rest.split_once(':'))
            .map(|(host, _)| host.to_owned())
            .unwrap()
    }

    #[test]
    fn nodes_go_round_from_the_first() {
        let config = three_nodes();
        let mut nodes = Nodes::new(&config);
        let order: Vec<String> = (0..5).map(|_| host(nodes.next())).collect();
        assert_eq!(order, ["a", "b", "c", "a", "b"]);
    }

    #[tokio::test]
    async fn each_node_is_tried_until_one_answers_and_a_refusal_ends_the_round() {
        let config = three_nodes();
        let timeout = |node: &BrokerUrl| ConnectError::Timeout {
            url: node.to_string(),
            timeout: Duration::from_secs(1),
        };
        let refusal = |node: &BrokerUrl| ConnectError::ExchangeMissing {
            url: node.to_string(),
            exchange: "x".to_owned(),
        };

        let mut tried = Vec::new();
        let answered = Nodes::new(&config)
            .try_each(|node| {
                tried.push(host(node));
                let answer = if host(node) == "b" {
                    Ok(host(node))
                } else {
                    Err(timeout(node))
                };
                async move { answer }
            })
            .await;
        assert_eq!(answered.unwrap(), "b");
        assert_eq!(tried, ["a", "b"]);

        let mut tried = Vec::new();
        let err = Nodes::new(&config)
            .try_each(|node| {
                tried.push(host(node));
                let answer: Result<(), _> = Err(if host(node) == "b" {
                    refusal(node)
                } else {
                    timeout(node)
                });
                async move { answer }
            })
            .await
            .unwrap_err();
        assert!(err.is_fatal(), "{err}");
        assert_eq!(tried, ["a", "b"]);

        let err = Nodes::new(&config)
            .try_each(|node| {
                let answer: Result<(), _> = Err(timeout(node));
                async move { answer }
            })
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("@c:5672"),
            "the last node's error: {err}"
        );
    }

    #[test]
    fn backoff_grows_exponentially_within_jitter_and_is_capped() {
        let max = Duration::from_secs(30);
        for attempt in 0..40 {
            let nominal = Duration::from_millis(100)
                .saturating_mul(2u32.saturating_pow(attempt.min(20)))
                .min(max);
            for _ in 0..20 {
                let delay = backoff(attempt, max);
                assert!(
                    delay >= nominal / 2 && delay <= nominal,
                    "{attempt}: {delay:?}"
                );
            }
        }
        assert!(backoff(100, max) <= max);
        assert!(backoff(0, max) <= Duration::from_millis(100));
    }
}
