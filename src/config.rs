//! Typed configuration: built-in defaults, then an optional TOML file, then `RELAY_*`
//! environment variables (`__` between nesting levels, e.g. `RELAY_AMQP__URL`).
//!
//! This is the only module that knows about the `config` crate. Everything is read once at
//! startup, validated here, and passed down as plain typed structs: deeper code never sees a
//! raw string where a `SocketAddr`, a `Duration` or an [`ExportKey`] belongs.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use crate::auth::{ExportKey, Keyring};
use crate::routing::{self, RoutingTemplate};

/// An error while loading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file, the environment or a value could not be read into the typed config.
    #[error(transparent)]
    Load(#[from] config::ConfigError),
    /// A value was read but is not acceptable.
    #[error("invalid {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
    /// A setting's value is not acceptable, with where it came from (`from RELAY_HTTP__LISTEN`,
    /// `in relay.toml`).
    #[error("invalid {setting} {origin}: {reason}")]
    Value {
        setting: String,
        origin: String,
        reason: String,
    },
    /// A setting that does not exist (a typo, most likely), with where it came from.
    #[error("unknown setting {setting} {origin}{}", did_you_mean(suggestion))]
    Unknown {
        setting: String,
        origin: String,
        suggestion: Option<String>,
    },
    /// No export key is configured at all: the relay would accept nothing, or worse.
    #[error(
        "no export key configured: set auth.export_keys in the config file, \
         RELAY_AUTH__EXPORT_KEYS=key1,key2 in the environment, or auth.export_keys_file \
         (the relay refuses to run open)"
    )]
    NoExportKey,
}

fn did_you_mean(suggestion: &Option<String>) -> String {
    suggestion
        .as_ref()
        .map(|name| format!("; did you mean {name}?"))
        .unwrap_or_default()
}

/// The `RELAY_*` variables that are ours. Kubernetes injects `RELAY_PORT`,
/// `RELAY_SERVICE_HOST`, ... for a Service named `relay` (and `RELAY_METRICS_PORT`, ... for
/// one named `relay-metrics`): without a `__` they cannot be a setting and are left alone.
/// `RELAY_HTTP_LISTEN` (one underscore) is a typo, and an error.
fn relay_variables(env: HashMap<String, String>) -> Result<HashMap<String, String>, ConfigError> {
    let mut ours = HashMap::new();
    for (name, value) in env {
        let Some(rest) = name.strip_prefix("RELAY_") else {
            continue;
        };
        if rest.contains("__") {
            check_variable(&name)?;
            ours.insert(name, value);
            continue;
        }
        if is_service_link(rest) {
            continue;
        }
        let lower = rest.to_ascii_lowercase();
        if let Some(section) = schema::fields::<Config>()
            .iter()
            .find(|s| lower.starts_with(&format!("{s}_")))
        {
            return Err(ConfigError::Invalid {
                key: "environment",
                reason: format!(
                    "{name}: separate the section from the key with two underscores \
                     (RELAY_{}__{})",
                    section.to_ascii_uppercase(),
                    &rest[section.len() + 1..]
                ),
            });
        }
    }
    Ok(ours)
}

/// The name of the variable that sets `setting`: `RELAY_HTTP__LISTEN` for `http.listen`.
fn variable(setting: &str) -> String {
    format!("RELAY_{}", setting.replace('.', "__").to_ascii_uppercase())
}

/// A `RELAY_<SECTION>__<KEY>` variable must name a setting: refused by name otherwise, with
/// the nearest one if it looks like a typo.
fn check_variable(name: &str) -> Result<(), ConfigError> {
    let setting = name["RELAY_".len()..]
        .replace("__", ".")
        .to_ascii_lowercase();
    let known = known_setting(&setting, schema::fields::<Config>(), Config::section_fields);
    match known {
        Ok(()) => Ok(()),
        Err(suggestion) => Err(ConfigError::Unknown {
            origin: format!("from {name}"),
            setting,
            suggestion: suggestion.map(|s| variable(&s)),
        }),
    }
}

/// Whether `section.key` is a setting; if not, the nearest one, if any is near.
fn known_setting(
    setting: &str,
    sections: &[&str],
    keys: impl Fn(&str) -> Option<&'static [&'static str]>,
) -> Result<(), Option<String>> {
    let (section, key) = setting.split_once('.').unwrap_or((setting, ""));
    let Some(section_keys) = keys(section) else {
        let near = nearest(section, sections);
        return Err(near.map(|s| format!("{s}.{key}")));
    };
    if section_keys.contains(&key) {
        return Ok(());
    }
    Err(nearest(key, section_keys).map(|k| format!("{section}.{k}")))
}

/// The candidate most like `name`, if one is close enough to be a typo of it.
fn nearest<'a>(name: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (strsim::jaro_winkler(name, c), *c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// Every key of `file` must be a setting: refused by name otherwise, with the nearest one. A
/// file that is not TOML is left to the loader, which says where it fails to parse.
fn check_file(path: &Path) -> Result<(), ConfigError> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let Ok(table) = text.parse::<toml::Table>() else {
        return Ok(());
    };
    let origin = format!("in {}", path.display());
    let unknown = |setting: String, suggestion| ConfigError::Unknown {
        setting,
        origin: origin.clone(),
        suggestion,
    };
    let sections = schema::fields::<Config>();
    for (section, value) in &table {
        let Some(keys) = value.as_table() else {
            let known = known_setting(section, sections, Config::section_fields);
            return Err(unknown(section.clone(), known.err().flatten()));
        };
        for (key, value) in keys {
            let setting = format!("{section}.{key}");
            known_setting(&setting, sections, Config::section_fields)
                .map_err(|suggestion| unknown(setting.clone(), suggestion))?;
            // `[[amqp.queues]]` and `[[auth.companies]]` entries have keys of their own.
            let entry_keys = match setting.as_str() {
                "amqp.queues" => schema::fields::<QueueConfig>(),
                "auth.companies" => schema::fields::<CompanyKeys>(),
                _ => continue,
            };
            for entry in value
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e.as_table())
            {
                let unknown_key = entry
                    .keys()
                    .find(|name| !entry_keys.contains(&name.as_str()));
                if let Some(name) = unknown_key {
                    let suggestion = nearest(name, entry_keys).map(|k| format!("{setting}.{k}"));
                    return Err(unknown(format!("{setting}.{name}"), suggestion));
                }
            }
        }
    }
    Ok(())
}

/// Names the variable or file a bad value came from: the loader's errors name only the key.
fn locate(err: ConfigError, file: Option<&Path>, env: &HashMap<String, String>) -> ConfigError {
    let (setting, reason) = match err {
        ConfigError::Load(config::ConfigError::Type {
            key: Some(key),
            unexpected,
            expected,
            ..
        }) => (
            key,
            format!("invalid type: {unexpected}, expected {expected}"),
        ),
        ConfigError::Load(config::ConfigError::At {
            key: Some(key),
            error,
            ..
        }) => (key, error.to_string()),
        ConfigError::Invalid { key, reason } if key.contains('.') => (key.to_owned(), reason),
        other => return other,
    };
    let name = variable(&setting);
    let origin = if env.contains_key(&name) {
        format!("from {name}")
    } else if let Some(path) = file {
        format!("in {}", path.display())
    } else {
        "in the defaults".to_owned()
    };
    let hint = if reason.contains("socket address") {
        " (expected host:port, e.g. 127.0.0.1:8080)"
    } else {
        ""
    };
    ConfigError::Value {
        setting,
        origin,
        reason: format!("{reason}{hint}"),
    }
}

/// The shapes of Kubernetes' service link variables, after the Service's name:
/// `_SERVICE_HOST`, `_SERVICE_PORT[_<name>]`, `_PORT`, `_PORT_<port>_<proto>[_ADDR|...]`.
fn is_service_link(rest: &str) -> bool {
    rest.contains("_SERVICE_HOST")
        || rest.contains("_SERVICE_PORT")
        || rest.ends_with("_PORT")
        || rest.contains("_PORT_")
}

/// The process's `RELAY_*` variables. Others may hold anything, even bytes that are not
/// UTF-8; one of ours that is not UTF-8 is an error, not a setting silently changed.
fn process_environment() -> Result<HashMap<String, String>, ConfigError> {
    let mut ours = HashMap::new();
    for (name, value) in std::env::vars_os() {
        let Some(name) = name.to_str().filter(|name| name.starts_with("RELAY_")) else {
            continue;
        };
        let value = value
            .into_string()
            .map_err(|_| invalid("environment", format!("{name} is not valid UTF-8")))?;
        ours.insert(name.to_owned(), value);
    }
    Ok(ours)
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// The whole configuration of one relay process.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub http: HttpConfig,
    pub amqp: AmqpConfig,
    pub auth: AuthConfig,
    pub spool: SpoolConfig,
    pub tls: TlsConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    pub history: HistoryConfig,
}

/// The webhook-facing HTTP server.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address the webhook port binds to.
    pub listen: SocketAddr,
    /// Path HireHop posts to. `GET`/`HEAD` there answer 200 for URL checks.
    pub path: String,
    /// Largest accepted body; larger ones get 413.
    pub max_body_bytes: u64,
    /// Time a client has to send its request headers; also the longest a connection may
    /// stay silent before its first byte, or idle with no request in flight (HTTP/1 and 2).
    pub header_read_timeout_ms: u64,
    /// Time a client has to send its whole body once the headers arrived.
    pub request_timeout_ms: u64,
    /// Longest pause allowed between two pieces of the body (slow-body clients).
    pub body_idle_timeout_ms: u64,
    /// Most request headers accepted (431 beyond).
    pub max_headers: usize,
    /// Most bytes of request line and headers accepted (at least 8192).
    pub max_header_bytes: usize,
    /// Only these networks may post webhooks (CIDRs or addresses); empty: everyone. Others
    /// get 403 before their body is read. Health and metrics are not affected.
    #[serde(deserialize_with = "ip_nets")]
    pub allow_from: Vec<ipnet::IpNet>,
    /// Load balancers whose forwarding header is believed.
    #[serde(deserialize_with = "ip_nets")]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The header those proxies maintain: `x-forwarded-for` or `forwarded` (RFC 7239). Only
    /// that one is read.
    pub forwarded_header: crate::access::ForwardedHeader,
    /// On shutdown, time in-flight requests get to finish before connections are cut.
    pub drain_timeout_ms: u64,
    /// Value of `Retry-After` on 503 answers.
    pub retry_after_secs: u64,
    /// Webhook requests handled at once; beyond it, 503 at once instead of queueing.
    pub max_in_flight: usize,
    /// Open connections at once; beyond it, new connections get 503 and are closed.
    pub max_connections: usize,
    /// Open connections from one address (the TCP peer; an IPv6 /64); beyond it, new ones
    /// are closed at once. `trusted_proxies` are not limited by it.
    pub max_connections_per_ip: usize,
    /// Failed key checks (wrong or missing `export_key`) a source address may make per
    /// minute once its burst is spent; beyond, its wrong keys get 429. 0: no limit. A valid
    /// key is never refused for this.
    pub key_failures_per_minute: u32,
    /// Failed key checks a source address may make at once before the rate applies.
    pub key_failure_burst: u32,
}

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
    pub confirm_timeout_ms: u64,
    /// How long the broker may stay silent (no confirm at all) while publishes wait on a
    /// connection before the relay calls it stalled: waiting webhooks go to the spool, and
    /// the connection is abandoned for the next node.
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

/// Who may post webhooks.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Keys accepted for any company. In the environment: a comma-separated list.
    #[serde(deserialize_with = "list_or_comma_separated")]
    pub export_keys: Vec<ExportKey>,
    /// Keys that only open one company each; several per company during a rotation.
    pub companies: Vec<CompanyKeys>,
    /// More keys from a file (`KEY` or `COMPANY_ID KEY` per line), re-read when it changes
    /// and on SIGHUP; e.g. a mounted Kubernetes Secret.
    #[serde(default)]
    pub export_keys_file: Option<PathBuf>,
    /// Refuse webhooks whose `time` is more than this many seconds old (or ahead); 0: off.
    /// Off by default: HireHop's clock and delays are unknown.
    pub max_age_secs: u64,
}

/// The keys of one HireHop company.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CompanyKeys {
    pub company_id: u64,
    pub export_keys: Vec<ExportKey>,
}

/// The local spool that keeps webhooks the broker cannot confirm right now.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// Without the spool, a webhook that cannot be confirmed gets 503 (and HireHop drops it).
    pub enabled: bool,
    /// Directory of the spool; one relay per directory. Relative paths start from the
    /// working directory. By default the service's state directory (see
    /// [`default_spool_dir`]).
    #[serde(default = "default_spool_dir")]
    pub dir: PathBuf,
    /// Disk the spool may use; beyond it webhooks get 503.
    pub max_bytes: u64,
    /// On shutdown, after the HTTP drain, how long replay may go on emptying the spool into
    /// the broker before the relay exits with what is left on disk.
    pub shutdown_replay_timeout_ms: u64,
}

/// Optional TLS termination on the webhook port.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Time a client has for the whole TLS handshake, from its first byte on.
    pub handshake_timeout_ms: u64,
    /// PEM certificate chain; with `key_file`, turns TLS on. Re-read when it changes.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve `/metrics` on this address instead of the webhook port (which then answers 404
    /// there), so metrics need not face the internet.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Distinct event names that get a label of their own; the rest count as `other`.
    pub max_event_labels: usize,
}

/// The history stream `<exchange>.history`: every accepted webhook, kept by RabbitMQ for
/// `replay`, `tail --since` and recovery.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryConfig {
    /// Publish through the fanout exchange `<exchange>.history`, which keeps every webhook in
    /// the stream queue of the same name and passes it on to `amqp.exchange`.
    pub enabled: bool,
    /// How long the stream keeps a message (`x-max-age`), e.g. `7d` or `36h`; whole seconds.
    #[serde(with = "duration_text")]
    pub max_age: Duration,
    /// Most bytes the stream keeps (`x-max-length-bytes`); the oldest segments go first.
    pub max_bytes: u64,
}

/// Log output.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// The defaults, as a TOML document: the single source of truth for every default value, and
/// the base layer the file and the environment override.
const DEFAULTS: &str = r#"
[http]
listen = "0.0.0.0:8080"
path = "/webhooks/hirehop"
max_body_bytes = 1048576
header_read_timeout_ms = 10000
request_timeout_ms = 30000
drain_timeout_ms = 10000
retry_after_secs = 5
max_in_flight = 1024
max_connections = 4096
max_connections_per_ip = 1024
body_idle_timeout_ms = 10000
max_headers = 100
max_header_bytes = 16384
allow_from = []
trusted_proxies = []
forwarded_header = "x-forwarded-for"
key_failures_per_minute = 30
key_failure_burst = 20

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

[auth]
export_keys = []
companies = []
max_age_secs = 0

[tls]
handshake_timeout_ms = 3000

[spool]
enabled = true
max_bytes = 1073741824
shutdown_replay_timeout_ms = 15000

[metrics]
max_event_labels = 200

[log]
format = "text"

[history]
enabled = true
max_age = "7d"
max_bytes = 2147483648
"#;

/// Where the spool lives unless `spool.dir` says otherwise: in the state directory systemd
/// gives the service (`StateDirectory=`, as `$STATE_DIRECTORY`), else in the user's state
/// directory (`$XDG_STATE_HOME`, or `~/.local/state`). Never the working directory, so that
/// `cargo run` in a checkout leaves no spool in it; the container image sets
/// `XDG_STATE_HOME=/var/lib`.
fn default_spool_dir() -> PathBuf {
    let var = |name| std::env::var_os(name).filter(|value| !value.is_empty());
    state_spool_dir(var("STATE_DIRECTORY"), var("XDG_STATE_HOME"), var("HOME"))
}

fn state_spool_dir(
    state_directory: Option<std::ffi::OsString>,
    xdg_state_home: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
) -> PathBuf {
    if let Some(dirs) = state_directory {
        // systemd lists one directory per `StateDirectory=` entry, separated by colons.
        let first = std::env::split_paths(&dirs).next().unwrap_or_default();
        return first.join("spool");
    }
    let state = xdg_state_home
        .map(PathBuf::from)
        .or_else(|| home.map(|home| Path::new(&home).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("/var/lib"));
    state.join("hirehop-relay/spool")
}

/// Largest `http.max_body_bytes`: a spooled webhook (the body and a small header) must stay
/// below what the spool reads back as a record.
const MAX_BODY_BYTES: u64 = 64 * 1024 * 1024;
const _: () = assert!(2 * MAX_BODY_BYTES < crate::spool::MAX_RECORD_BYTES as u64);

impl Config {
    /// Loads defaults, then `file` if given, then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_from(file, None)
    }

    /// Like [`Config::load`], with the environment given as a map instead of read from the
    /// process, so tests need no `set_var`.
    pub fn load_from(
        file: Option<&Path>,
        env: Option<HashMap<String, String>>,
    ) -> Result<Config, ConfigError> {
        let config = Self::load_unchecked_keys(file, env)?;
        if config.keyring()?.is_empty() {
            return Err(ConfigError::NoExportKey);
        }
        Ok(config)
    }

    /// Loads and validates everything but the presence of an export key: for the tools
    /// (`tail`, `topology`) that never verify one.
    pub fn load_for_tools(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_unchecked_keys(file, None)
    }

    fn load_unchecked_keys(
        file: Option<&Path>,
        env: Option<HashMap<String, String>>,
    ) -> Result<Config, ConfigError> {
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(path) = file {
            check_file(path)?;
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        let env = match env {
            Some(env) => env,
            None => process_environment()?,
        };
        let env = relay_variables(env)?;
        // `prefix_separator("_")` matters: with only `separator("__")` the prefix would have to
        // be followed by `__` too (`RELAY__AMQP__URL`).
        let environment = config::Environment::with_prefix("RELAY")
            .prefix_separator("_")
            .separator("__")
            .source(Some(env.clone()));
        let loaded = builder
            .add_source(environment)
            .build()
            .and_then(config::Config::try_deserialize::<Config>)
            .map_err(ConfigError::from)
            .and_then(|mut config| {
                config.validate()?;
                config.amqp.history = config.history.clone();
                Ok(config)
            });
        loaded.map_err(|err| locate(err, file, &env))
    }

    /// The log format asked for by `RELAY_LOG__FORMAT` or the file's `log.format`, read on
    /// its own so that an error in the rest of the configuration is logged in that format
    /// too. Text when neither says, or says something else.
    pub fn log_format_hint(file: Option<&Path>) -> LogFormat {
        let from_env = std::env::var("RELAY_LOG__FORMAT").ok();
        let from_file = || {
            let text = std::fs::read_to_string(file?).ok()?;
            let table = text.parse::<toml::Table>().ok()?;
            Some(table.get("log")?.get("format")?.as_str()?.to_owned())
        };
        match from_env.or_else(from_file).as_deref() {
            Some("json") => LogFormat::Json,
            _ => LogFormat::Text,
        }
    }

    /// The settings of each section, for naming the nearest one in errors.
    fn section_fields(section: &str) -> Option<&'static [&'static str]> {
        Some(match section {
            "http" => schema::fields::<HttpConfig>(),
            "amqp" => schema::fields::<AmqpConfig>(),
            "auth" => schema::fields::<AuthConfig>(),
            "spool" => schema::fields::<SpoolConfig>(),
            "tls" => schema::fields::<TlsConfig>(),
            "metrics" => schema::fields::<MetricsConfig>(),
            "log" => schema::fields::<LogConfig>(),
            "history" => schema::fields::<HistoryConfig>(),
            _ => return None,
        })
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !self.http.path.starts_with('/') {
            return Err(invalid("http.path", "must start with '/'"));
        }
        if ["/healthz", "/readyz"].contains(&self.http.path.as_str()) {
            return Err(invalid("http.path", "must not be a health endpoint"));
        }
        if self.http.max_headers == 0 {
            return Err(invalid("http.max_headers", "must be greater than 0"));
        }
        if self.http.max_header_bytes < 8192 {
            return Err(invalid("http.max_header_bytes", "must be at least 8192"));
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return Err(invalid(
                "tls",
                "set both cert_file and key_file, or neither",
            ));
        }
        if self.http.max_in_flight == 0 {
            return Err(invalid("http.max_in_flight", "must be greater than 0"));
        }
        if self.http.max_connections == 0 {
            return Err(invalid("http.max_connections", "must be greater than 0"));
        }
        if self.http.max_connections_per_ip == 0 {
            return Err(invalid(
                "http.max_connections_per_ip",
                "must be greater than 0",
            ));
        }
        if self.http.key_failures_per_minute > 0 && self.http.key_failure_burst == 0 {
            return Err(invalid(
                "http.key_failure_burst",
                "must be greater than 0 while http.key_failures_per_minute is on",
            ));
        }
        if self.http.max_body_bytes == 0 || self.http.max_body_bytes > MAX_BODY_BYTES {
            return Err(invalid(
                "http.max_body_bytes",
                format!("must be between 1 and {MAX_BODY_BYTES} (64 MiB)"),
            ));
        }
        for (key, ms) in [
            (
                "http.header_read_timeout_ms",
                self.http.header_read_timeout_ms,
            ),
            ("http.request_timeout_ms", self.http.request_timeout_ms),
            ("http.body_idle_timeout_ms", self.http.body_idle_timeout_ms),
            ("tls.handshake_timeout_ms", self.tls.handshake_timeout_ms),
            ("amqp.confirm_timeout_ms", self.amqp.confirm_timeout_ms),
            ("amqp.stall_timeout_ms", self.amqp.stall_timeout_ms),
            ("amqp.connect_timeout_ms", self.amqp.connect_timeout_ms),
            (
                "amqp.reconnect_max_backoff_ms",
                self.amqp.reconnect_max_backoff_ms,
            ),
        ] {
            if ms == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        if !(4096..=1 << 20).contains(&self.amqp.frame_max_bytes) {
            // 4096 is AMQP's minimum frame size.
            return Err(invalid(
                "amqp.frame_max_bytes",
                "must be between 4096 and 1048576",
            ));
        }
        if self.amqp.channels == 0 || self.amqp.channels > 64 {
            return Err(invalid("amqp.channels", "must be between 1 and 64"));
        }
        if self.amqp.exchange.is_empty() || self.amqp.exchange.len() > 200 {
            // 200, not 255: `<exchange>.unrouted` must fit in an AMQP short string too.
            return Err(invalid("amqp.exchange", "must be 1 to 200 bytes long"));
        }
        let key = if self.amqp.urls.is_empty() {
            "amqp.url"
        } else {
            "amqp.urls"
        };
        for url in self.amqp.nodes().into_iter().map(BrokerUrl::expose) {
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
        if self.spool.enabled && self.spool.max_bytes < 1024 * 1024 {
            return Err(invalid(
                "spool.max_bytes",
                "must be at least 1 MiB (1048576)",
            ));
        }
        self.validate_queues()?;
        self.validate_history()?;
        self.amqp.routing_template()?;
        for company in &self.auth.companies {
            if company.export_keys.is_empty() {
                return Err(invalid(
                    "auth.companies",
                    format!("company {} has no export_keys", company.company_id),
                ));
            }
        }
        // The keys file is read by `load_from` (the relay), not here: the tools never
        // verify a key and must not need one.
        Ok(())
    }

    fn validate_queues(&self) -> Result<(), ConfigError> {
        let mut names = std::collections::HashSet::new();
        for queue in &self.amqp.queues {
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
        if self.amqp.per_event_queues && !self.amqp.declare {
            return Err(invalid(
                "amqp.per_event_queues",
                "declares a queue per event, so it needs amqp.declare = true",
            ));
        }
        if self.amqp.per_event_queues && self.amqp.per_event_queue_prefix.len() > 64 {
            return Err(invalid(
                "amqp.per_event_queue_prefix",
                "must be at most 64 bytes",
            ));
        }
        Ok(())
    }

    fn validate_history(&self) -> Result<(), ConfigError> {
        let history = &self.history;
        if history.max_age < Duration::from_secs(1) || history.max_age.subsec_nanos() != 0 {
            return Err(invalid(
                "history.max_age",
                "must be a whole number of seconds, at least 1s (e.g. \"7d\")",
            ));
        }
        if history.max_bytes < 1024 * 1024 {
            return Err(invalid(
                "history.max_bytes",
                "must be at least 1 MiB (1048576)",
            ));
        }
        Ok(())
    }

    /// The configured keys, with those of `auth.export_keys_file` (read now), ready for
    /// verification.
    pub fn keyring(&self) -> Result<Keyring, ConfigError> {
        let mut any = self.auth.export_keys.clone();
        let mut companies: Vec<(u64, Vec<ExportKey>)> = self
            .auth
            .companies
            .iter()
            .map(|c| (c.company_id, c.export_keys.clone()))
            .collect();
        if let Some(path) = &self.auth.export_keys_file {
            let keys = crate::auth::read_keys_file(path)
                .map_err(|err| invalid("auth.export_keys_file", err.to_string()))?;
            any.extend(keys.any_company);
            companies.extend(keys.by_company);
        }
        Ok(Keyring::new(any, companies))
    }

    /// The effective configuration as TOML, with every secret redacted.
    pub fn to_redacted_toml(&self) -> String {
        // `ExportKey` serializes as a placeholder and `AmqpConfig` hides the URL's password,
        // so plain serialization is already safe to print.
        toml::to_string_pretty(self).unwrap_or_else(|err| format!("# cannot render: {err}\n"))
    }
}

impl HttpConfig {
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
    pub fn body_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.body_idle_timeout_ms)
    }
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
}

impl SpoolConfig {
    pub fn shutdown_replay_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_replay_timeout_ms)
    }
}

impl TlsConfig {
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }
}

impl AmqpConfig {
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
    pub fn routing_template(&self) -> Result<RoutingTemplate, ConfigError> {
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

/// Accepts `["a", "b"]` (TOML) or `"a,b"` (environment variables are plain strings). Empty
/// items are dropped.
fn string_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrString {
        List(Vec<String>),
        String(String),
    }
    let items = match ListOrString::deserialize(d)? {
        ListOrString::List(items) => items,
        ListOrString::String(joined) => joined.split(',').map(str::to_owned).collect(),
    };
    Ok(items
        .into_iter()
        .map(|item| item.trim().to_owned())
        .filter(|item| !item.is_empty())
        .collect())
}

/// A duration written for people (`7d`, `36h`, `90m`), read and shown with humantime.
mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|err| {
            serde::de::Error::custom(format!(
                "{text:?} is not a duration such as 7d or 36h: {err}"
            ))
        })
    }

    pub fn serialize<S: Serializer>(duration: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*duration))
    }
}

/// CIDRs (or single addresses) as a list or a comma-separated string.
fn ip_nets<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ipnet::IpNet>, D::Error> {
    string_list(d)?
        .iter()
        .map(|item| {
            item.parse::<ipnet::IpNet>()
                .or_else(|_| item.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    serde::de::Error::custom(format!("{item:?} is not an address or CIDR"))
                })
        })
        .collect()
}

/// Export keys as a list (each read like a per-company key, so a number gets the same
/// message) or a comma-separated string (environment variables).
fn list_or_comma_separated<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ExportKey>, D::Error> {
    struct Keys;
    impl<'de> serde::de::Visitor<'de> for Keys {
        type Value = Vec<ExportKey>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of export keys, or keys separated by commas")
        }
        fn visit_str<E: serde::de::Error>(self, joined: &str) -> Result<Vec<ExportKey>, E> {
            joined
                .split(',')
                .filter(|key| !key.trim().is_empty())
                .map(|key| ExportKey::new(key).map_err(E::custom))
                .collect()
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Vec<ExportKey>, A::Error> {
            let mut keys = Vec::new();
            while let Some(key) = seq.next_element()? {
                keys.push(key);
            }
            Ok(keys)
        }
    }
    d.deserialize_any(Keys)
}

/// The field names of a configuration struct, read from its `Deserialize` impl, so the names
/// in errors cannot drift from the structs.
mod schema {
    use serde::de::{self, Deserialize, Deserializer, Visitor};

    /// The fields `T` (a struct deriving `Deserialize`) reads.
    pub fn fields<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
        let mut fields = None;
        let _ = T::deserialize(Recorder(&mut fields));
        fields.unwrap_or_default()
    }

    /// Answers `deserialize_struct` by noting the field names, and fails every call.
    struct Recorder<'a>(&'a mut Option<&'static [&'static str]>);

    impl<'de> Deserializer<'de> for Recorder<'_> {
        type Error = de::value::Error;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = Some(fields);
            Err(de::Error::custom("fields noted"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn only_the_relay_reads_the_keys_file() {
        let settings = env(&[("RELAY_AUTH__EXPORT_KEYS_FILE", "/nonexistent/keys.toml")]);
        // What `load_for_tools` does: `tail` and `topology` never verify a key.
        assert!(Config::load_unchecked_keys(None, settings.clone()).is_ok());
        let err = Config::load_from(None, settings).unwrap_err().to_string();
        assert!(err.contains("auth.export_keys_file"), "{err}");
    }

    fn write_file(contents: &str) -> tempfile_path::TempPath {
        tempfile_path::TempPath::with_contents(contents)
    }

    /// A tiny self-deleting temp file, enough for these tests.
    mod tempfile_path {
        use std::path::{Path, PathBuf};

        pub struct TempPath(PathBuf);

        impl TempPath {
            pub fn with_contents(contents: &str) -> Self {
                let path = std::env::temp_dir().join(format!(
                    "hirehop-relay-config-{}.toml",
                    uuid::Uuid::now_v7()
                ));
                std::fs::write(&path, contents).expect("temp dir is writable");
                TempPath(path)
            }
            pub fn path(&self) -> &Path {
                &self.0
            }
        }

        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn no_replay_at_shutdown_is_a_valid_choice() {
        let settings = env(&[
            ("RELAY_AUTH__EXPORT_KEYS", "k1"),
            ("RELAY_SPOOL__SHUTDOWN_REPLAY_TIMEOUT_MS", "0"),
        ]);
        let config = Config::load_from(None, settings).unwrap();
        assert_eq!(config.spool.shutdown_replay_timeout(), Duration::ZERO);
    }

    #[test]
    fn defaults_apply_and_a_key_from_env_is_enough() {
        let config = Config::load_from(None, env(&[("RELAY_AUTH__EXPORT_KEYS", "k1")])).unwrap();
        assert_eq!(config.http.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(config.http.path, "/webhooks/hirehop");
        assert_eq!(config.http.max_body_bytes, 1024 * 1024);
        assert_eq!(config.amqp.exchange, "hirehop");
        assert_eq!(
            config.amqp.url.expose(),
            "amqp://guest:guest@127.0.0.1:5672/%2f"
        );
        assert_eq!(config.amqp.confirm_timeout(), Duration::from_secs(5));
        assert_eq!(config.amqp.stall_timeout(), Duration::from_secs(1));
        assert!(config.amqp.declare);
        assert_eq!(config.http.drain_timeout(), Duration::from_secs(10));
        assert_eq!(
            config.spool.shutdown_replay_timeout(),
            Duration::from_secs(15)
        );
        assert_eq!(config.amqp.channels, 4);
        assert_eq!(config.log.format, LogFormat::Text);
    }

    #[test]
    fn env_keys_are_comma_separated_and_keep_leading_zeros() {
        let config = Config::load_from(
            None,
            env(&[("RELAY_AUTH__EXPORT_KEYS", "0012, abc123 ,,true")]),
        )
        .unwrap();
        let keyring = config.keyring().unwrap();
        for key in ["0012", "abc123", "true"] {
            assert!(keyring.verify(key, None), "{key} should be accepted");
        }
        assert!(!keyring.verify("12", None));
    }

    #[test]
    fn no_key_at_all_refuses_to_start_and_says_how_to_set_one() {
        let err = Config::load_from(None, env(&[])).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("no export key configured"), "{message}");
        assert!(message.contains("RELAY_AUTH__EXPORT_KEYS"), "{message}");
    }

    #[test]
    fn file_overrides_defaults_and_env_overrides_file() {
        let file = write_file(
            r#"
            [http]
            listen = "127.0.0.1:9000"
            max_body_bytes = 2048
            [amqp]
            exchange = "from-file"
            [auth]
            export_keys = ["file-key"]
            [[auth.companies]]
            company_id = 7
            export_keys = ["old7", "new7"]
            "#,
        );
        let config = Config::load_from(
            Some(file.path()),
            env(&[
                ("RELAY_AMQP__EXCHANGE", "from-env"),
                ("RELAY_HTTP__MAX_BODY_BYTES", "4096"),
            ]),
        )
        .unwrap();
        assert_eq!(config.http.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(config.amqp.exchange, "from-env");
        assert_eq!(config.http.max_body_bytes, 4096);
        let keyring = config.keyring().unwrap();
        assert!(keyring.verify("file-key", Some(1)));
        assert!(keyring.verify("old7", Some(7)));
        assert!(keyring.verify("new7", Some(7)));
        assert!(
            !keyring.verify("new7", Some(8)),
            "a company key opens only its company"
        );
        assert!(!keyring.verify("new7", None));
    }

    #[test]
    fn unknown_key_in_file_is_an_error_naming_it() {
        let file = write_file("[http]\nlisten_port = 80\n[auth]\nexport_keys = [\"k\"]\n");
        let message = Config::load_from(Some(file.path()), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(message.contains("listen_port"), "{message}");
    }

    #[test]
    fn bodies_stay_far_below_what_the_spool_reads_back() {
        let load = |bytes: &str| {
            Config::load_from(
                None,
                env(&[
                    ("RELAY_AUTH__EXPORT_KEYS", "k"),
                    ("RELAY_HTTP__MAX_BODY_BYTES", bytes),
                ]),
            )
        };
        assert!(load("67108864").is_ok());
        let err = load("67108865").unwrap_err().to_string();
        assert!(err.contains("http.max_body_bytes"), "{err}");
    }

    #[test]
    fn bad_value_is_an_error_naming_the_key() {
        let message = Config::load_from(
            None,
            env(&[
                ("RELAY_AUTH__EXPORT_KEYS", "k"),
                ("RELAY_HTTP__LISTEN", "not-an-address"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(message.contains("listen"), "{message}");

        let message = Config::load_from(
            None,
            env(&[
                ("RELAY_AUTH__EXPORT_KEYS", "k"),
                ("RELAY_AMQP__CHANNELS", "0"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            message,
            "invalid amqp.channels from RELAY_AMQP__CHANNELS: must be between 1 and 64"
        );

        let message = Config::load_from(
            None,
            env(&[
                ("RELAY_AUTH__EXPORT_KEYS", "k"),
                ("RELAY_AMQP__ROUTING_KEY_PREFIX", "hirehop.#."),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            message.starts_with("invalid amqp.routing_key_prefix"),
            "{message}"
        );
    }

    #[test]
    fn missing_file_is_an_error_naming_it() {
        let message = Config::load_from(Some(Path::new("/nonexistent/relay.toml")), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(message.contains("/nonexistent/relay.toml"), "{message}");
    }

    #[test]
    fn redacted_rendering_hides_keys_and_the_url_password() {
        let config = Config::load_from(
            None,
            env(&[
                ("RELAY_AUTH__EXPORT_KEYS", "supersecretkey"),
                ("RELAY_AMQP__URL", "amqp://relay:hunter2@rabbit:5672/%2f"),
            ]),
        )
        .unwrap();
        let rendered = config.to_redacted_toml();
        assert!(!rendered.contains("supersecretkey"), "{rendered}");
        assert!(!rendered.contains("hunter2"), "{rendered}");
        assert!(
            rendered.contains("amqp://relay:***@rabbit:5672/%2f"),
            "{rendered}"
        );
        let debug = format!("{config:?}");
        assert!(
            !debug.contains("supersecretkey") && !debug.contains("hunter2"),
            "{debug}"
        );
    }

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
    }

    #[test]
    fn edge_limits_have_defaults_and_refuse_zero() {
        let config = Config::load_from(None, env(&[("RELAY_AUTH__EXPORT_KEYS", "k")])).unwrap();
        assert_eq!(config.http.max_connections_per_ip, 1024);
        assert_eq!(config.http.key_failures_per_minute, 30);
        assert_eq!(config.http.key_failure_burst, 20);
        assert_eq!(config.tls.handshake_timeout(), Duration::from_secs(3));
        for (key, value, message) in [
            (
                "RELAY_HTTP__MAX_CONNECTIONS_PER_IP",
                "0",
                "http.max_connections_per_ip",
            ),
            (
                "RELAY_TLS__HANDSHAKE_TIMEOUT_MS",
                "0",
                "tls.handshake_timeout_ms",
            ),
            (
                "RELAY_HTTP__KEY_FAILURE_BURST",
                "0",
                "http.key_failure_burst",
            ),
        ] {
            let err =
                Config::load_from(None, env(&[("RELAY_AUTH__EXPORT_KEYS", "k"), (key, value)]))
                    .unwrap_err()
                    .to_string();
            assert!(err.starts_with(&format!("invalid {message}")), "{err}");
        }
        // No limit on failed key checks: then no burst is needed either.
        let off = Config::load_from(
            None,
            env(&[
                ("RELAY_AUTH__EXPORT_KEYS", "k"),
                ("RELAY_HTTP__KEY_FAILURES_PER_MINUTE", "0"),
                ("RELAY_HTTP__KEY_FAILURE_BURST", "0"),
            ]),
        );
        assert!(off.is_ok(), "{:?}", off.err());
    }

    #[test]
    fn network_lists_take_cidrs_and_addresses() {
        let config = Config::load_from(
            None,
            env(&[
                ("RELAY_AUTH__EXPORT_KEYS", "k"),
                ("RELAY_HTTP__ALLOW_FROM", "203.0.113.0/24, 2001:db8::1"),
                ("RELAY_HTTP__TRUSTED_PROXIES", "10.0.0.0/8"),
            ]),
        )
        .unwrap();
        assert_eq!(config.http.allow_from.len(), 2);
        assert_eq!(config.http.allow_from[1].to_string(), "2001:db8::1/128");
        let err = Config::load_from(
            None,
            env(&[
                ("RELAY_AUTH__EXPORT_KEYS", "k"),
                ("RELAY_HTTP__ALLOW_FROM", "10.0.0.0/33"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("10.0.0.0/33") && err.contains("allow_from"),
            "{err}"
        );
    }

    #[test]
    fn a_key_typed_as_a_number_is_refused_without_quoting_it() {
        for file in [
            "[[auth.companies]]\ncompany_id = 1\nexport_keys = [987654321]\n",
            "[auth]\nexport_keys = [\"k\", 987654321]\n",
        ] {
            let file = write_file(file);
            let err = Config::load_from(Some(file.path()), env(&[]))
                .unwrap_err()
                .to_string();
            assert!(err.contains("must be a quoted string"), "{err}");
            assert!(!err.contains("987654321"), "{err}");
        }
    }

    #[test]
    fn keys_are_trimmed_wherever_they_are_configured() {
        let file = write_file(
            "[auth]\nexport_keys = [\" a \"]\n[[auth.companies]]\ncompany_id = 1\nexport_keys = [\" b \"]\n",
        );
        let keys = Config::load_from(Some(file.path()), env(&[]))
            .unwrap()
            .keyring()
            .unwrap();
        assert!(keys.verify("a", Some(2)));
        assert!(keys.verify("b", Some(1)));
    }

    #[test]
    fn kubernetes_service_links_are_ignored_and_single_underscores_refused() {
        let config = Config::load_from(
            None,
            env(&[
                ("RELAY_AUTH__EXPORT_KEYS", "k"),
                ("RELAY_PORT", "tcp://10.0.0.1:80"),
                ("RELAY_SERVICE_HOST", "10.0.0.1"),
                ("RELAY_PORT_80_TCP_ADDR", "10.0.0.1"),
                // A Service named `relay-metrics`.
                ("RELAY_METRICS_SERVICE_HOST", "10.0.0.2"),
                ("RELAY_METRICS_SERVICE_PORT_HTTP", "9090"),
                ("RELAY_METRICS_PORT", "tcp://10.0.0.2:9090"),
                ("RELAY_METRICS_PORT_9090_TCP_ADDR", "10.0.0.2"),
            ]),
        );
        assert!(config.is_ok(), "{:?}", config.err());
        let err = Config::load_from(
            None,
            env(&[
                ("RELAY_AUTH__EXPORT_KEYS", "k"),
                ("RELAY_HTTP_LISTEN", "0.0.0.0:1"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("RELAY_HTTP__LISTEN"), "{err}");
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
        assert!(config.amqp.routing_template().is_ok());
        let err = Config::load_from(None, settings("true"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("amqp.routing_key_prefix"), "{err}");
        assert!(err.contains("no room for an event name"), "{err}");
    }

    #[test]
    fn history_is_on_by_default_and_its_retention_is_read_and_checked() {
        let config = Config::load_from(None, env(&[("RELAY_AUTH__EXPORT_KEYS", "k")])).unwrap();
        assert!(config.history.enabled);
        assert_eq!(config.history.max_age, Duration::from_secs(7 * 86_400));
        assert_eq!(config.history.max_bytes, 2 << 30);
        assert!(
            config.amqp.history.enabled,
            "copied where the topology needs it"
        );
        assert_eq!(config.amqp.history_name(), "hirehop.history");
        assert_eq!(config.amqp.publish_exchange(), "hirehop.history");
        assert!(config.to_redacted_toml().contains("max_age = \"7days\""));

        let load = |pairs: &[(&str, &str)]| {
            let mut all = vec![("RELAY_AUTH__EXPORT_KEYS", "k")];
            all.extend_from_slice(pairs);
            Config::load_from(None, env(&all))
        };
        let off = load(&[("RELAY_HISTORY__ENABLED", "false")]).unwrap();
        assert_eq!(off.amqp.publish_exchange(), "hirehop");
        let other = load(&[
            ("RELAY_HISTORY__MAX_AGE", "36h"),
            ("RELAY_HISTORY__MAX_BYTES", "1048576"),
        ])
        .unwrap();
        assert_eq!(other.history.max_age, Duration::from_secs(36 * 3600));
        for (pairs, expected) in [
            (
                ("RELAY_HISTORY__MAX_AGE", "forever"),
                "\"forever\" is not a duration",
            ),
            (
                ("RELAY_HISTORY__MAX_AGE", "1500ms"),
                "invalid history.max_age",
            ),
            (
                ("RELAY_HISTORY__MAX_BYTES", "1000"),
                "invalid history.max_bytes",
            ),
        ] {
            let err = load(&[pairs]).unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
        }
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
    fn a_misspelled_variable_is_named_with_the_one_meant() {
        let err = Config::load_from(
            None,
            env(&[
                ("RELAY_AUTH__EXPORT_KEYS", "k"),
                ("RELAY_HTTP__LISTNE", "x"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "unknown setting http.listne from RELAY_HTTP__LISTNE; did you mean RELAY_HTTP__LISTEN?"
        );
        let err = Config::load_from(
            None,
            env(&[("RELAY_AUTH__EXPORT_KEYS", "k"), ("RELAY_SPOL__DIR", "x")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.ends_with("did you mean RELAY_SPOOL__DIR?"), "{err}");
        // Nothing near: no guess.
        let err = Config::load_from(
            None,
            env(&[("RELAY_AUTH__EXPORT_KEYS", "k"), ("RELAY_WHATEVER__X", "1")]),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(err, "unknown setting whatever.x from RELAY_WHATEVER__X");
    }

    #[test]
    fn a_bad_value_names_its_variable_or_file_and_the_expected_form() {
        let err = Config::load_from(
            None,
            env(&[
                ("RELAY_AUTH__EXPORT_KEYS", "k"),
                ("RELAY_HTTP__LISTEN", "8080"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "invalid http.listen from RELAY_HTTP__LISTEN: invalid socket address syntax \
             (expected host:port, e.g. 127.0.0.1:8080)"
        );
        let err = Config::load_from(
            None,
            env(&[
                ("RELAY_AUTH__EXPORT_KEYS", "k"),
                ("RELAY_HTTP__MAX_IN_FLIGHT", "many"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "invalid http.max_in_flight from RELAY_HTTP__MAX_IN_FLIGHT: invalid type: string \
             \"many\", expected an integer"
        );
        let file = write_file("[auth]\nexport_keys = [\"k\"]\n[amqp]\nchannels = 99\n");
        let err = Config::load_from(Some(file.path()), env(&[]))
            .unwrap_err()
            .to_string();
        let expected = format!(
            "invalid amqp.channels in {}: must be between 1 and 64",
            file.path().display()
        );
        assert_eq!(err, expected);
    }

    #[test]
    fn an_unknown_key_in_the_file_is_named_with_the_one_meant() {
        for (text, setting, meant) in [
            ("[http]\nlistne = \"x\"\n", "http.listne", "http.listen"),
            ("[htp]\nlisten = \"x\"\n", "htp.listen", "http.listen"),
            (
                "[[amqp.queues]]\nname = \"q\"\nbindngs = [\"a\"]\n",
                "amqp.queues.bindngs",
                "amqp.queues.bindings",
            ),
        ] {
            let file = write_file(&format!("[auth]\nexport_keys = [\"k\"]\n{text}"));
            let err = Config::load_from(Some(file.path()), env(&[]))
                .unwrap_err()
                .to_string();
            let expected = format!(
                "unknown setting {setting} in {}; did you mean {meant}?",
                file.path().display()
            );
            assert_eq!(err, expected);
        }
    }

    #[test]
    fn every_section_knows_its_settings() {
        for section in schema::fields::<Config>() {
            let fields = Config::section_fields(section)
                .unwrap_or_else(|| panic!("Config::section_fields has no {section}"));
            assert!(!fields.is_empty(), "{section}");
        }
        assert!(schema::fields::<HttpConfig>().contains(&"listen"));
    }

    #[test]
    fn the_spool_lives_in_the_state_directory_not_the_working_directory() {
        let os = |s: &str| Some(std::ffi::OsString::from(s));
        // systemd's StateDirectory=hirehop-relay.
        assert_eq!(
            state_spool_dir(os("/var/lib/hirehop-relay"), os("/x"), os("/home/u")),
            Path::new("/var/lib/hirehop-relay/spool")
        );
        assert_eq!(
            state_spool_dir(os("/var/lib/a:/var/lib/b"), None, None),
            Path::new("/var/lib/a/spool")
        );
        // The container image's XDG_STATE_HOME=/var/lib.
        assert_eq!(
            state_spool_dir(None, os("/var/lib"), None),
            Path::new("/var/lib/hirehop-relay/spool")
        );
        // `cargo run` as a user.
        assert_eq!(
            state_spool_dir(None, None, os("/home/u")),
            Path::new("/home/u/.local/state/hirehop-relay/spool")
        );
        assert_eq!(
            state_spool_dir(None, None, None),
            Path::new("/var/lib/hirehop-relay/spool")
        );
        // And a configured directory wins.
        let config = Config::load_from(
            None,
            env(&[
                ("RELAY_AUTH__EXPORT_KEYS", "k"),
                ("RELAY_SPOOL__DIR", "here"),
            ]),
        )
        .unwrap();
        assert_eq!(config.spool.dir, Path::new("here"));
    }
}
