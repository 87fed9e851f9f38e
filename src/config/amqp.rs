//! `[amqp]`: the broker, the exchange, the queues the relay declares, and how routing keys
//! are built.

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use super::{ConfigError, HistoryConfig, invalid, nonzero, string_list};
use crate::routing::{self, RoutingTemplate};

pub(super) const DEFAULTS: &str = r#"
[amqp]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
urls = []
exchange = "hirehop"
alternate_exchange = true
unrouted_queue_type = "quorum"
routing_key_prefix = ""
routing_key_template = "{event}"
queues = []
per_event_queues = false
per_event_queue_prefix = "hirehop."
per_event_queue_type = "quorum"
channels = 4
confirm_timeout_ms = 5000
stall_timeout_ms = 1000
declare = true
connect_timeout_ms = 10000
reconnect_max_backoff_ms = 30000
frame_max_bytes = 8192
redact_export_key = false
"#;

/// The RabbitMQ side.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    /// AMQP 0-9-1 URI of the broker (`amqp://user:pass@host:5672/vhost`).
    pub url: BrokerUrl,
    /// Several nodes of a RabbitMQ cluster; when set, used instead of `url`, tried in turn.
    /// In the environment: a comma-separated list.
    #[serde(deserialize_with = "broker_urls")]
    pub urls: Vec<BrokerUrl>,
    /// Durable topic exchange the relay publishes to.
    pub exchange: String,
    /// Declare `<exchange>.unrouted` (fanout + queue) as the exchange's alternate exchange, so
    /// an event nobody is bound to yet is kept instead of dropped.
    pub alternate_exchange: bool,
    /// Type of the `<exchange>.unrouted` queue (quorum: replicated on a cluster).
    pub unrouted_queue_type: QueueType,
    /// Prepended to every routing key (e.g. `hirehop.`).
    pub routing_key_prefix: String,
    /// How the routing key is built: `{event}` (the default), or with `{company_id}`, e.g.
    /// `{company_id}.{event}` so integrators serving several companies can bind per company.
    pub routing_key_template: String,
    /// Queues declared (with their bindings) at the first connection.
    pub queues: Vec<QueueConfig>,
    /// Declare a durable queue per event name the first time it is seen, bound to exactly
    /// its routing key, before publishing it.
    pub per_event_queues: bool,
    /// Name of a per-event queue: this prefix and the routing key.
    pub per_event_queue_prefix: String,
    /// Type of per-event queues.
    pub per_event_queue_type: QueueType,
    /// Number of publishing channels, each with many confirms in flight.
    pub channels: usize,
    /// How long a publish may wait for the broker's confirm before the request gets 503.
    /// Replay of the spool has no such deadline: it calls the connection stalled once the
    /// broker has confirmed nothing at all for this long (`stall_timeout_ms` if longer).
    pub confirm_timeout_ms: u64,
    /// How long the broker may stay silent (no confirm at all) while webhooks' publishes wait
    /// on a connection before the relay calls it stalled: waiting webhooks go to the spool,
    /// and the connection is abandoned for the next node.
    pub stall_timeout_ms: u64,
    /// Declare the exchanges, queues and bindings at the first connection (and again if the
    /// exchange is found gone). `false`: the broker's definitions own the topology and the
    /// relay only checks that the exchange exists.
    pub declare: bool,
    /// How long one connection attempt (TCP + AMQP handshake + topology) may take.
    pub connect_timeout_ms: u64,
    /// Ceiling of the exponential reconnect backoff.
    pub reconnect_max_backoff_ms: u64,
    /// Largest AMQP frame asked for (a `frame_max` in the URL wins). Bodies larger than a
    /// frame are sent in several; small frames keep the relay's buffers small.
    pub frame_max_bytes: u32,
    /// Replace the value of `export_key` in the published body with `"<redacted>"` (every
    /// other byte unchanged), so consumers never see a credential that also opens the
    /// company's data exports. Off by default: the body is published byte for byte.
    pub redact_export_key: bool,
    /// The `[history]` section, copied here at load: the topology and the publisher, which
    /// take only the AMQP part of the config, need it.
    #[serde(skip)]
    pub history: HistoryConfig,
}

/// A queue the relay declares and binds to its exchange.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    pub name: String,
    /// Topic patterns (`invoice.#`, `job.status.updated`, ...).
    pub bindings: Vec<String>,
    #[serde(rename = "type", default = "QueueType::quorum")]
    pub kind: QueueType,
    /// Where rejected or expired messages go (`x-dead-letter-exchange`).
    #[serde(default)]
    pub dead_letter_exchange: Option<String>,
    /// Redeliveries before a message is dead-lettered (`x-delivery-limit`, quorum only).
    #[serde(default)]
    pub delivery_limit: Option<u32>,
    /// Replicas of a quorum queue (`x-quorum-initial-group-size`, quorum only); without it,
    /// RabbitMQ 3.x puts one on every cluster node running when the queue is declared.
    #[serde(default)]
    pub initial_group_size: Option<u32>,
    /// `x-message-ttl`.
    #[serde(default)]
    pub message_ttl_ms: Option<u64>,
    /// `x-max-length`; with `overflow = "reject-publish"` (the default) a full queue nacks,
    /// so the relay spools or answers 503 instead of the broker dropping a message.
    #[serde(default)]
    pub max_length: Option<u64>,
    #[serde(default)]
    pub overflow: Overflow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    Classic,
    /// Replicated (Raft); the right choice on a cluster.
    Quorum,
}

impl QueueType {
    fn quorum() -> QueueType {
        QueueType::Quorum
    }

    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Overflow {
    /// A full queue refuses new messages (the publisher gets a nack): nothing is dropped.
    #[default]
    RejectPublish,
    /// As `reject-publish`, and the refused message is dead-lettered.
    RejectPublishDlx,
    /// A full queue drops its oldest message. Loses data: only if you mean it.
    DropHead,
}

impl Overflow {
    pub fn as_str(self) -> &'static str {
        match self {
            Overflow::RejectPublish => "reject-publish",
            Overflow::RejectPublishDlx => "reject-publish-dlx",
            Overflow::DropHead => "drop-head",
        }
    }
}

impl AmqpConfig {
    /// Checks the section, and builds the routing template it describes.
    pub(super) fn validate(&self) -> Result<RoutingTemplate, ConfigError> {
        nonzero(&[
            ("amqp.confirm_timeout_ms", self.confirm_timeout_ms),
            ("amqp.stall_timeout_ms", self.stall_timeout_ms),
            ("amqp.connect_timeout_ms", self.connect_timeout_ms),
            (
                "amqp.reconnect_max_backoff_ms",
                self.reconnect_max_backoff_ms,
            ),
        ])?;
        if !(4096..=1 << 20).contains(&self.frame_max_bytes) {
            // 4096 is AMQP's minimum frame size.
            return Err(invalid(
                "amqp.frame_max_bytes",
                "must be between 4096 and 1048576",
            ));
        }
        if self.channels == 0 || self.channels > 64 {
            return Err(invalid("amqp.channels", "must be between 1 and 64"));
        }
        if self.exchange.is_empty() || self.exchange.len() > 200 {
            // 200, not 255: `<exchange>.unrouted` must fit in an AMQP short string too.
            return Err(invalid("amqp.exchange", "must be 1 to 200 bytes long"));
        }
        self.validate_urls()?;
        self.validate_queues()?;
        self.routing_template()
    }

    fn validate_urls(&self) -> Result<(), ConfigError> {
        let key = if self.urls.is_empty() {
            "amqp.url"
        } else {
            "amqp.urls"
        };
        for url in self.nodes().into_iter().map(BrokerUrl::expose) {
            if !url.starts_with("amqp://") && !url.starts_with("amqps://") {
                return Err(invalid(key, "must start with amqp:// or amqps://"));
            }
            match url.parse::<lapin::uri::AMQPUri>() {
                Err(err) => return Err(invalid(key, err)),
                // `amqp://host:5672/` names the vhost "", which no broker has; the default
                // vhost "/" must be escaped.
                Ok(uri) if uri.vhost.is_empty() => {
                    return Err(invalid(
                        key,
                        format!(
                            "{} names an empty vhost; the default vhost / is written %2f \
                             (amqp://host:5672/%2f), or leave the path out",
                            BrokerUrl::new(url)
                        ),
                    ));
                }
                Ok(_) => {}
            }
        }
        Ok(())
    }

    fn validate_queues(&self) -> Result<(), ConfigError> {
        let mut names = HashSet::new();
        for queue in &self.queues {
            let name = &queue.name;
            if name.is_empty() || name.len() > 255 || name.starts_with("amq.") {
                return Err(invalid(
                    "amqp.queues",
                    format!("queue name {name:?} must be 1 to 255 bytes and not start with amq."),
                ));
            }
            if !names.insert(name) {
                return Err(invalid(
                    "amqp.queues",
                    format!("queue {name} is declared twice"),
                ));
            }
            if queue.bindings.is_empty() {
                return Err(invalid(
                    "amqp.queues",
                    format!("queue {name} has no bindings"),
                ));
            }
            for pattern in &queue.bindings {
                routing::check_binding(pattern).map_err(|err| {
                    invalid(
                        "amqp.queues",
                        format!("queue {name}, binding {pattern:?}: {err}"),
                    )
                })?;
            }
            if queue.delivery_limit.is_some() && queue.kind != QueueType::Quorum {
                return Err(invalid(
                    "amqp.queues",
                    format!("queue {name}: delivery_limit needs type = \"quorum\""),
                ));
            }
            match queue.initial_group_size {
                Some(_) if queue.kind != QueueType::Quorum => {
                    return Err(invalid(
                        "amqp.queues",
                        format!("queue {name}: initial_group_size needs type = \"quorum\""),
                    ));
                }
                Some(0) => {
                    return Err(invalid(
                        "amqp.queues",
                        format!("queue {name}: initial_group_size must be at least 1"),
                    ));
                }
                _ => {}
            }
        }
        if self.per_event_queues && !self.declare {
            return Err(invalid(
                "amqp.per_event_queues",
                "declares a queue per event, so it needs amqp.declare = true",
            ));
        }
        if self.per_event_queues && self.per_event_queue_prefix.len() > 64 {
            return Err(invalid(
                "amqp.per_event_queue_prefix",
                "must be at most 64 bytes",
            ));
        }
        Ok(())
    }

    pub fn confirm_timeout(&self) -> Duration {
        Duration::from_millis(self.confirm_timeout_ms)
    }
    pub fn stall_timeout(&self) -> Duration {
        Duration::from_millis(self.stall_timeout_ms)
    }
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    pub fn reconnect_max_backoff(&self) -> Duration {
        Duration::from_millis(self.reconnect_max_backoff_ms)
    }
    /// How routing keys are built: `routing_key_prefix`, then `routing_key_template`, keys
    /// kept short enough for a per-event queue's name when those are on. An error if the
    /// three leave no room for an event name.
    fn routing_template(&self) -> Result<RoutingTemplate, ConfigError> {
        routing::check_prefix(&self.routing_key_prefix)
            .map_err(|err| invalid("amqp.routing_key_prefix", err.to_string()))?;
        let room = if self.per_event_queues {
            // A per-event queue's name is its prefix and the routing key.
            self.per_event_queue_prefix.len()
        } else {
            0
        };
        let template = RoutingTemplate::parse(&self.routing_key_template)
            .map_err(|err| invalid("amqp.routing_key_template", err.to_string()))?
            .with_prefix(&self.routing_key_prefix)
            .leaving_room(room);
        template.routing_key("e", Some(u64::MAX)).map_err(|_| {
            invalid(
                "amqp.routing_key_prefix",
                "with amqp.routing_key_template (and amqp.per_event_queue_prefix, with \
                 per-event queues) it leaves no room for an event name",
            )
        })?;
        Ok(template)
    }

    /// Name of the alternate exchange and of the queue bound to it.
    pub fn unrouted_name(&self) -> String {
        format!("{}.unrouted", self.exchange)
    }
    /// Name of the history stream, and of the fanout exchange that feeds it.
    pub fn history_name(&self) -> String {
        format!("{}.history", self.exchange)
    }
    /// The exchange the relay publishes webhooks to: `<exchange>.history` with history on
    /// (it passes every message on to `exchange`), else `exchange` itself.
    pub fn publish_exchange(&self) -> String {
        if self.history.enabled {
            self.history_name()
        } else {
            self.exchange.clone()
        }
    }
    /// The broker nodes to try, in order: `urls` if set, else `url`.
    pub fn nodes(&self) -> Vec<&BrokerUrl> {
        if self.urls.is_empty() {
            vec![&self.url]
        } else {
            self.urls.iter().collect()
        }
    }
}

/// A broker URL whose password reaches no log, `check-config` output or `{:?}`: they all
/// show it as `***`. Only [`BrokerUrl::expose`] gives the URL itself, to connect with.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct BrokerUrl(String);

impl BrokerUrl {
    pub fn new(url: impl Into<String>) -> BrokerUrl {
        BrokerUrl(url.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// `scheme://user:***@host/...`.
impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let url = &self.0;
        let Some((scheme, rest)) = url.split_once("://") else {
            return f.write_str(url);
        };
        let authority_end = rest.find('/').unwrap_or(rest.len());
        let (authority, path) = rest.split_at(authority_end);
        match authority.rsplit_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
                write!(f, "{scheme}://{user}:***@{host}{path}")
            }
            None => f.write_str(url),
        }
    }
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.to_string())
    }
}

impl Serialize for BrokerUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

fn broker_urls<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<BrokerUrl>, D::Error> {
    Ok(string_list(d)?.into_iter().map(BrokerUrl).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::config::tests::{env, write_file};

    #[test]
    fn several_broker_urls_come_from_a_comma_separated_env_var() {
        let config = Config::load_from(
            None,
            env(&[
                ("RELAY_AUTH__EXPORT_KEYS", "k"),
                (
                    "RELAY_AMQP__URLS",
                    "amqp://a:5672/%2f, amqp://u:pw@b:5672/%2f",
                ),
            ]),
        )
        .unwrap();
        let nodes: Vec<&str> = config
            .amqp
            .nodes()
            .into_iter()
            .map(BrokerUrl::expose)
            .collect();
        assert_eq!(nodes, vec!["amqp://a:5672/%2f", "amqp://u:pw@b:5672/%2f"]);
        assert!(!format!("{:?}", config.amqp).contains(":pw@"));
        let rendered = config.to_redacted_toml();
        assert!(rendered.contains("amqp://u:***@b:5672/%2f") && !rendered.contains(":pw@"));
        let default = Config::load_from(None, env(&[("RELAY_AUTH__EXPORT_KEYS", "k")])).unwrap();
        assert_eq!(default.amqp.nodes(), vec![&default.amqp.url]);
        let bad = Config::load_from(
            None,
            env(&[
                ("RELAY_AUTH__EXPORT_KEYS", "k"),
                ("RELAY_AMQP__URLS", "http://x"),
            ]),
        );
        assert_eq!(
            bad.unwrap_err().to_string(),
            "invalid amqp.urls from RELAY_AMQP__URLS: must start with amqp:// or amqps://"
        );
    }

    #[test]
    fn an_empty_vhost_is_refused_with_the_way_to_write_the_default_one() {
        for (name, url) in [
            ("RELAY_AMQP__URL", "amqp://relay:hunter2@rabbit:5672/"),
            (
                "RELAY_AMQP__URLS",
                "amqp://a:5672/%2f,amqp://relay:hunter2@b/",
            ),
        ] {
            let err =
                Config::load_from(None, env(&[("RELAY_AUTH__EXPORT_KEYS", "k"), (name, url)]))
                    .unwrap_err()
                    .to_string();
            assert!(err.contains("empty vhost") && err.contains("%2f"), "{err}");
            assert!(
                err.contains("relay:***@") && !err.contains("hunter2"),
                "{err}"
            );
        }
        // No path at all is the default vhost.
        let config = Config::load_from(
            None,
            env(&[
                ("RELAY_AUTH__EXPORT_KEYS", "k"),
                ("RELAY_AMQP__URL", "amqp://rabbit:5672"),
            ]),
        );
        assert!(config.is_ok(), "{config:?}");
    }

    #[test]
    fn url_password_redaction_handles_odd_shapes() {
        let shown = |url: &str| BrokerUrl::new(url).to_string();
        assert_eq!(shown("amqp://h:5672/v"), "amqp://h:5672/v");
        assert_eq!(shown("amqp://u@h"), "amqp://u:***@h");
        assert_eq!(shown("amqp://u:p@ss@h/%2f"), "amqp://u:***@h/%2f");
        assert_eq!(
            format!("{:?}", BrokerUrl::new("amqp://u:p@h")),
            r#""amqp://u:***@h""#
        );
    }

    #[test]
    fn per_event_queues_need_the_relay_to_declare() {
        let err = Config::load_from(
            None,
            env(&[
                ("RELAY_AUTH__EXPORT_KEYS", "k"),
                ("RELAY_AMQP__DECLARE", "false"),
                ("RELAY_AMQP__PER_EVENT_QUEUES", "true"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("invalid amqp.per_event_queues"), "{err}");
        let config = Config::load_from(
            None,
            env(&[
                ("RELAY_AUTH__EXPORT_KEYS", "k"),
                ("RELAY_AMQP__DECLARE", "false"),
            ]),
        )
        .unwrap();
        assert!(!config.amqp.declare);
    }

    #[test]
    fn declared_queues_are_read_and_checked() {
        let file = write_file(
            r#"
            [auth]
            export_keys = ["k"]
            [[amqp.queues]]
            name = "accounting"
            bindings = ["invoice.#", "job.status.updated"]
            max_length = 1000
            delivery_limit = 5
            dead_letter_exchange = "hirehop.dead"
            [[amqp.queues]]
            name = "crm"
            type = "classic"
            bindings = ["contact.#"]
            message_ttl_ms = 60000
            "#,
        );
        let config = Config::load_from(Some(file.path()), env(&[])).unwrap();
        let queues = &config.amqp.queues;
        assert_eq!(queues[0].kind, QueueType::Quorum, "quorum by default");
        assert_eq!(
            queues[0].overflow,
            Overflow::RejectPublish,
            "never drop by default"
        );
        assert_eq!(queues[1].kind, QueueType::Classic);

        for (bad, message) in [
            ("name = \"q\"\nbindings = []", "queue q has no bindings"),
            (
                "name = \"q\"\nbindings = [\"a..b\"]",
                "queue q, binding \"a..b\"",
            ),
            (
                "name = \"q\"\ntype = \"classic\"\nbindings = [\"a\"]\ndelivery_limit = 3",
                "delivery_limit needs type = \"quorum\"",
            ),
            (
                "name = \"q\"\ntype = \"classic\"\nbindings = [\"a\"]\ninitial_group_size = 3",
                "initial_group_size needs type = \"quorum\"",
            ),
            (
                "name = \"q\"\nbindings = [\"a\"]\ninitial_group_size = 0",
                "initial_group_size must be at least 1",
            ),
        ] {
            let file = write_file(&format!(
                "[auth]\nexport_keys = [\"k\"]\n[[amqp.queues]]\n{bad}\n"
            ));
            let err = Config::load_from(Some(file.path()), env(&[]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(message), "{err}");
        }
    }

    #[test]
    fn routing_template_is_checked_at_load() {
        let ok = Config::load_from(
            None,
            env(&[
                ("RELAY_AUTH__EXPORT_KEYS", "k"),
                ("RELAY_AMQP__ROUTING_KEY_TEMPLATE", "{company_id}.{event}"),
            ]),
        );
        assert!(ok.is_ok());
        let err = Config::load_from(
            None,
            env(&[
                ("RELAY_AUTH__EXPORT_KEYS", "k"),
                ("RELAY_AMQP__ROUTING_KEY_TEMPLATE", "{company}.{event}"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("invalid amqp.routing_key_template"),
            "{err}"
        );
        let err = Config::load_from(
            None,
            env(&[
                ("RELAY_AUTH__EXPORT_KEYS", "k"),
                ("RELAY_AMQP__ROUTING_KEY_PREFIX", "hirehop.#."),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("invalid amqp.routing_key_prefix"), "{err}");
    }

    #[test]
    fn a_routing_key_prefix_that_leaves_no_room_for_an_event_is_refused_at_load() {
        let prefix = format!("{}.", "p".repeat(190));
        let per_event_prefix = format!("{}.", "q".repeat(60));
        let settings = |per_event: &'static str| {
            env(&[
                ("RELAY_AUTH__EXPORT_KEYS", "k"),
                ("RELAY_AMQP__ROUTING_KEY_PREFIX", &prefix),
                ("RELAY_AMQP__ROUTING_KEY_TEMPLATE", "{company_id}.{event}"),
                ("RELAY_AMQP__PER_EVENT_QUEUES", per_event),
                ("RELAY_AMQP__PER_EVENT_QUEUE_PREFIX", &per_event_prefix),
            ])
        };
        let config = Config::load_from(None, settings("false")).unwrap();
        let key = config
            .routing()
            .routing_key("job.updated", Some(7))
            .unwrap();
        assert_eq!(key.as_str(), format!("{prefix}7.job.updated"));
        let err = Config::load_from(None, settings("true"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("amqp.routing_key_prefix"), "{err}");
        assert!(err.contains("no room for an event name"), "{err}");
    }
}
