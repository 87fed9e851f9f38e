//! `[history]`: the history stream `<exchange>.history`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid};

pub(super) const DEFAULTS: &str = r#"
[history]
enabled = true
max_age = "7d"
max_bytes = 2147483648
"#;

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

impl HistoryConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_age < Duration::from_secs(1) || self.max_age.subsec_nanos() != 0 {
            return Err(invalid(
                "history.max_age",
                "must be a whole number of seconds, at least 1s (e.g. \"7d\")",
            ));
        }
        if self.max_bytes < 1024 * 1024 {
            return Err(invalid(
                "history.max_bytes",
                "must be at least 1 MiB (1048576)",
            ));
        }
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::config::tests::env;

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
}
