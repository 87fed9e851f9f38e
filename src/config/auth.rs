//! `[auth]`: who may post webhooks.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

use super::{ConfigError, invalid};
use crate::auth::{ExportKey, Keyring};

pub(super) const DEFAULTS: &str = r#"
[auth]
export_keys = []
companies = []
max_age_secs = 0
"#;

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

impl AuthConfig {
    /// The keys file is not read here but by [`AuthConfig::read_keyring`], for the relay
    /// only: the tools never verify a key and must not need one.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for company in &self.companies {
            if company.export_keys.is_empty() {
                return Err(invalid(
                    "auth.companies",
                    format!("company {} has no export_keys", company.company_id),
                ));
            }
        }
        Ok(())
    }

    /// The configured keys, with those of `export_keys_file` (read now), ready for
    /// verification: once at load, then by each reload of the file.
    pub(crate) fn read_keyring(&self) -> Result<Keyring, ConfigError> {
        let mut any = self.export_keys.clone();
        let mut companies: Vec<(u64, Vec<ExportKey>)> = self
            .companies
            .iter()
            .map(|c| (c.company_id, c.export_keys.clone()))
            .collect();
        if let Some(path) = &self.export_keys_file {
            let keys = crate::auth::read_keys_file(path)
                .map_err(|err| invalid("auth.export_keys_file", err.to_string()))?;
            any.extend(keys.any_company);
            companies.extend(keys.by_company);
        }
        Ok(Keyring::new(any, companies))
    }
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

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::config::tests::{env, write_file};

    #[test]
    fn only_the_relay_reads_the_keys_file() {
        let settings = env(&[("RELAY_AUTH__EXPORT_KEYS_FILE", "/nonexistent/keys.toml")]);
        // What `load_for_tools` does: `tail` and `topology` never verify a key.
        assert!(crate::config::read(None, settings.clone()).is_ok());
        let err = Config::load_from(None, settings).unwrap_err().to_string();
        assert!(err.contains("auth.export_keys_file"), "{err}");
    }

    #[test]
    fn the_keys_file_is_read_at_load_and_again_only_by_a_reload() {
        let file = write_file("# one key for every company\nfile-key\n");
        let path = file.path().to_string_lossy().into_owned();
        let config =
            Config::load_from(None, env(&[("RELAY_AUTH__EXPORT_KEYS_FILE", &path)])).unwrap();
        // Gone between load and serving (a relay without a spool waits for the broker).
        drop(file);
        assert!(config.keyring().verify("file-key", Some(1)));
        let reload = config.auth.read_keyring().unwrap_err().to_string();
        assert!(reload.contains("failed to read keys file"), "{reload}");
    }

    #[test]
    fn no_key_at_all_refuses_to_start_and_says_how_to_set_one() {
        let err = Config::load_from(None, env(&[])).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("no export key configured"), "{message}");
        assert!(message.contains("RELAY_AUTH__EXPORT_KEYS"), "{message}");
    }

    #[test]
    fn env_keys_are_comma_separated_and_keep_leading_zeros() {
        let config = Config::load_from(
            None,
            env(&[("RELAY_AUTH__EXPORT_KEYS", "0012, abc123 ,,true")]),
        )
        .unwrap();
        let keyring = config.keyring();
        for key in ["0012", "abc123", "true"] {
            assert!(keyring.verify(key, None), "{key} should be accepted");
        }
        assert!(!keyring.verify("12", None));
    }

    #[test]
    fn company_keys_open_only_their_company() {
        let file = write_file(
            r#"
            [auth]
            export_keys = ["file-key"]
            [[auth.companies]]
            company_id = 7
            export_keys = ["old7", "new7"]
            "#,
        );
        let config = Config::load_from(Some(file.path()), env(&[])).unwrap();
        let keyring = config.keyring();
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
        let keys = Config::load_from(Some(file.path()), env(&[])).unwrap();
        let keys = keys.keyring();
        assert!(keys.verify("a", Some(2)));
        assert!(keys.verify("b", Some(1)));
    }
}
