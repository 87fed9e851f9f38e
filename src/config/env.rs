//! The `RELAY_*` environment variables: which are settings, which are someone else's, and
//! which are typos.

use std::collections::HashMap;

use super::{ConfigError, invalid, schema};

/// The environment as a source for the loader: `RELAY_`, the section, `__`, the key.
pub(super) fn source(ours: HashMap<String, String>) -> config::Environment {
    // `prefix_separator("_")` matters: with only `separator("__")` the prefix would have to
    // be followed by `__` too (`RELAY__AMQP__URL`).
    config::Environment::with_prefix("RELAY")
        .prefix_separator("_")
        .separator("__")
        .source(Some(ours))
}

/// The process's `RELAY_*` variables. Others may hold anything, even bytes that are not
/// UTF-8; one of ours that is not UTF-8 is an error, not a setting silently changed.
pub(super) fn process_environment() -> Result<HashMap<String, String>, ConfigError> {
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

/// The `RELAY_*` variables that are ours. Kubernetes injects `RELAY_PORT`,
/// `RELAY_SERVICE_HOST`, ... for a Service named `relay` (and `RELAY_METRICS_PORT`, ... for
/// one named `relay-metrics`): without a `__` they cannot be a setting and are left alone.
/// `RELAY_HTTP_LISTEN` (one underscore) is a typo, and an error.
pub(super) fn relay_variables(
    env: HashMap<String, String>,
) -> Result<HashMap<String, String>, ConfigError> {
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
        if let Some(section) = schema::sections()
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
pub(super) fn variable(setting: &str) -> String {
    format!("RELAY_{}", setting.replace('.', "__").to_ascii_uppercase())
}

/// A `RELAY_<SECTION>__<KEY>` variable must name a setting: refused by name otherwise, with
/// the nearest one if it looks like a typo.
fn check_variable(name: &str) -> Result<(), ConfigError> {
    let setting = name["RELAY_".len()..]
        .replace("__", ".")
        .to_ascii_lowercase();
    schema::known_setting(&setting).map_err(|suggestion| ConfigError::Unknown {
        origin: format!("from {name}"),
        setting,
        suggestion: suggestion.map(|s| variable(&s)),
    })
}

/// The shapes of Kubernetes' service link variables, after the Service's name:
/// `_SERVICE_HOST`, `_SERVICE_PORT[_<name>]`, `_PORT`, `_PORT_<port>_<proto>[_ADDR|...]`.
fn is_service_link(rest: &str) -> bool {
    rest.contains("_SERVICE_HOST")
        || rest.contains("_SERVICE_PORT")
        || rest.ends_with("_PORT")
        || rest.contains("_PORT_")
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::config::tests::env;

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
}
