//! Typed configuration: built-in defaults, then an optional TOML file, then `RELAY_*`
//! environment variables (`__` between nesting levels, e.g. `RELAY_AMQP__URL`).
//!
//! This is the only module that knows about the `config` crate. Everything is read once at
//! startup, validated here, and passed down as plain typed structs: deeper code never sees a
//! raw string where a `SocketAddr`, a `Duration` or an [`ExportKey`] belongs.
//!
//! One file per section (`http`, `amqp`, `auth`, `spool`, `tls`, `metrics`, `log`,
//! `history`), each with its settings' docs, defaults, rules and tests. [`env`](mod@env) and
//! [`file`](mod@file) check that every variable and key names a setting; [`schema`] knows the
//! settings' names. Loading reads the sections, validates each, and keeps what validation
//! built (the routing template, the keys) in the [`Config`] the relay runs with.
//!
//! [`ExportKey`]: crate::auth::ExportKey

mod amqp;
mod auth;
mod env;
mod file;
mod history;
mod http;
mod log;
mod metrics;
mod schema;
mod spool;
mod tls;

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize};

use crate::auth::Keyring;
use crate::routing::RoutingTemplate;

pub use amqp::{AmqpConfig, BrokerUrl, Overflow, QueueConfig, QueueType};
pub use auth::{AuthConfig, CompanyKeys};
pub use history::HistoryConfig;
pub use http::HttpConfig;
pub use log::{LogConfig, LogFormat};
pub use metrics::MetricsConfig;
pub use spool::SpoolConfig;
pub use tls::TlsConfig;

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

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// Each of `settings` (name, value) must be greater than 0.
fn nonzero(settings: &[(&'static str, u64)]) -> Result<(), ConfigError> {
    match settings.iter().find(|(_, value)| *value == 0) {
        Some((key, _)) => Err(invalid(key, "must be greater than 0")),
        None => Ok(()),
    }
}

/// The whole configuration of one relay process, validated: only [`Config::load`] and
/// [`Config::load_from`] make one. Besides the sections as configured, it holds what is
/// built from them once, at load, for the relay to use as it is.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub http: HttpConfig,
    pub amqp: AmqpConfig,
    pub auth: AuthConfig,
    pub spool: SpoolConfig,
    pub tls: TlsConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    pub history: HistoryConfig,
    /// How routing keys are built, from the `amqp.routing_key_*` settings.
    #[serde(skip)]
    routing: RoutingTemplate,
    /// The keys of `auth`, the keys file's included, as read at load.
    #[serde(skip)]
    keyring: Keyring,
}

/// What the defaults, the file and the environment say, section by section: not yet
/// validated, and never seen outside this module.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Sections {
    http: HttpConfig,
    amqp: AmqpConfig,
    auth: AuthConfig,
    spool: SpoolConfig,
    tls: TlsConfig,
    metrics: MetricsConfig,
    log: LogConfig,
    history: HistoryConfig,
}

/// The sections, each validated, and the routing they describe: all the relay needs but its
/// keys, and everything the tools need.
struct Validated {
    sections: Sections,
    routing: RoutingTemplate,
}

impl Sections {
    /// Checks each section; builds once what the checks build anyway.
    fn validate(mut self) -> Result<Validated, ConfigError> {
        self.http.validate()?;
        self.tls.validate()?;
        let routing = self.amqp.validate()?;
        self.spool.validate()?;
        self.history.validate()?;
        self.auth.validate()?;
        self.amqp.history = self.history.clone();
        Ok(Validated {
            sections: self,
            routing,
        })
    }
}

/// The defaults of every section, as TOML: the single source of truth for every default
/// value, and the base layer the file and the environment override.
const DEFAULTS: [&str; 8] = [
    http::DEFAULTS,
    amqp::DEFAULTS,
    auth::DEFAULTS,
    tls::DEFAULTS,
    spool::DEFAULTS,
    metrics::DEFAULTS,
    log::DEFAULTS,
    history::DEFAULTS,
];

impl Config {
    /// Loads defaults, then `file` if given, then the process environment, and reads the
    /// keys file if one is set.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_from(file, None)
    }

    /// Like [`Config::load`], with the environment given as a map instead of read from the
    /// process, so tests need no `set_var`.
    pub fn load_from(
        file: Option<&Path>,
        env: Option<HashMap<String, String>>,
    ) -> Result<Config, ConfigError> {
        let Validated {
            sections: s,
            routing,
        } = read(file, env)?;
        let keyring = s.auth.read_keyring()?;
        if keyring.is_empty() {
            return Err(ConfigError::NoExportKey);
        }
        Ok(Config {
            http: s.http,
            amqp: s.amqp,
            auth: s.auth,
            spool: s.spool,
            tls: s.tls,
            metrics: s.metrics,
            log: s.log,
            history: s.history,
            routing,
            keyring,
        })
    }

    /// The broker side of the configuration, for the tools (`tail`, `topology`, `replay`,
    /// `requeue`): everything is loaded and validated, but no export key is needed and the
    /// keys file is not read, since the tools never verify a key.
    pub fn load_for_tools(file: Option<&Path>) -> Result<AmqpConfig, ConfigError> {
        Ok(read(file, None)?.sections.amqp)
    }

    /// The log format asked for by `RELAY_LOG__FORMAT` or the file's `log.format`, read on
    /// its own so that an error in the rest of the configuration is logged in that format
    /// too. Text when neither says, or says something else.
    pub fn log_format_hint(file: Option<&Path>) -> LogFormat {
        LogFormat::hint(file)
    }

    /// How routing keys are built: `amqp.routing_key_prefix`, then
    /// `amqp.routing_key_template`, short enough for a per-event queue's name.
    pub(crate) fn routing(&self) -> &RoutingTemplate {
        &self.routing
    }

    /// The export keys as read at load, the keys file's included. The relay starts with
    /// these whenever it gets to serve; later changes of the file come through reloads
    /// ([`AuthConfig::read_keyring`]).
    pub(crate) fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// The effective configuration as TOML, with every secret redacted.
    pub fn to_redacted_toml(&self) -> String {
        // `ExportKey` serializes as a placeholder and `AmqpConfig` hides the URL's password,
        // so plain serialization is already safe to print.
        toml::to_string_pretty(self).unwrap_or_else(|err| format!("# cannot render: {err}\n"))
    }
}

/// Defaults, then `file` if given, then `env` (the process environment if `None`): read into
/// the sections and validated; an error names where the bad value came from.
fn read(
    file: Option<&Path>,
    env: Option<HashMap<String, String>>,
) -> Result<Validated, ConfigError> {
    let mut builder = config::Config::builder();
    for defaults in DEFAULTS {
        builder = builder.add_source(config::File::from_str(defaults, config::FileFormat::Toml));
    }
    if let Some(path) = file {
        file::check_keys(path)?;
        builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
    }
    let env = match env {
        Some(env) => env,
        None => env::process_environment()?,
    };
    let env = env::relay_variables(env)?;
    builder
        .add_source(env::source(env.clone()))
        .build()
        .and_then(config::Config::try_deserialize::<Sections>)
        .map_err(ConfigError::from)
        .and_then(Sections::validate)
        .map_err(|err| locate(err, file, &env))
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
    let name = env::variable(&setting);
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

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use super::*;

    /// `pairs` as the environment [`Config::load_from`] takes.
    pub fn env(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    pub fn write_file(contents: &str) -> TempPath {
        TempPath::with_contents(contents)
    }

    /// A tiny self-deleting temp file, enough for these tests.
    pub struct TempPath(std::path::PathBuf);

    impl TempPath {
        fn with_contents(contents: &str) -> Self {
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
    }

    #[test]
    fn a_bad_value_names_its_variable_or_file_and_the_expected_form() {
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
}
