//! Export keys: the only credential HireHop sends, and a dangerous one, since the same key
//! also opens the company's data exports.
//!
//! An [`ExportKey`] keeps only the SHA-256 digest of the configured secret, prints as
//! `<redacted>` in `Debug` and when serialized, and is compared in constant time. Comparing
//! fixed-size digests also hides the configured key's length. A [`Keyring`] holds keys that
//! open every company and keys that open one company only (several at once during a rotation).

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Serialize, Serializer};
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

/// A configured export key. Deliberately neither `Display` nor a `Debug` that shows anything.
#[derive(Clone)]
pub struct ExportKey {
    digest: [u8; 32],
}

/// A configured export key was empty.
#[derive(Debug, thiserror::Error)]
#[error("an export key must not be empty")]
pub struct EmptyKey;

impl ExportKey {
    /// `secret` without surrounding whitespace (a stray space or newline in a config file or
    /// a mounted Secret), wherever the key was configured.
    pub fn new(secret: &str) -> Result<ExportKey, EmptyKey> {
        let secret = secret.trim();
        if secret.is_empty() {
            return Err(EmptyKey);
        }
        Ok(ExportKey {
            digest: Sha256::digest(secret.as_bytes()).into(),
        })
    }

    fn matches(&self, presented: &[u8; 32]) -> Choice {
        self.digest.ct_eq(presented)
    }
}

// Hand-written so that a key typed without quotes (a number in TOML) is refused with a
// message that does not quote it, as serde's "invalid type: integer `…`" would.
impl<'de> serde::Deserialize<'de> for ExportKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ExportKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an export key as a quoted string")
            }
            fn visit_str<E: serde::de::Error>(self, secret: &str) -> Result<ExportKey, E> {
                ExportKey::new(secret).map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<ExportKey, E> {
                Err(E::custom("an export key must be a quoted string"))
            }
            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<ExportKey, E> {
                Err(E::custom("an export key must be a quoted string"))
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<ExportKey, E> {
                Err(E::custom("an export key must be a quoted string"))
            }
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<ExportKey, E> {
                Err(E::custom("an export key must be a quoted string"))
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl fmt::Debug for ExportKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ExportKey(<redacted>)")
    }
}

impl Serialize for ExportKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// Every key the relay accepts.
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    any_company: Vec<ExportKey>,
    by_company: HashMap<u64, Vec<ExportKey>>,
}

impl Keyring {
    pub fn new(
        any_company: Vec<ExportKey>,
        by_company: impl IntoIterator<Item = (u64, Vec<ExportKey>)>,
    ) -> Keyring {
        let mut keyring = Keyring {
            any_company,
            by_company: HashMap::new(),
        };
        for (company_id, keys) in by_company {
            keyring
                .by_company
                .entry(company_id)
                .or_default()
                .extend(keys);
        }
        keyring
    }

    pub fn is_empty(&self) -> bool {
        self.any_company.is_empty() && self.by_company.values().all(Vec::is_empty)
    }

    /// Whether `presented` opens `company_id` (a company-wide key opens only its company; a
    /// key from `auth.export_keys` opens all).
    ///
    /// Every candidate is compared, without an early exit, so the time taken does not say
    /// which key matched or how much of it.
    pub fn verify(&self, presented: &str, company_id: Option<u64>) -> bool {
        if presented.is_empty() {
            return false;
        }
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let company_keys = company_id
            .and_then(|id| self.by_company.get(&id))
            .map_or(&[][..], Vec::as_slice);
        let matched = self
            .any_company
            .iter()
            .chain(company_keys)
            .fold(Choice::from(0), |acc, key| acc | key.matches(&digest));
        matched.into()
    }
}

/// The keyring in use, replaced whole when the keys file changes.
pub type KeyStore = crate::reload::Swap<Keyring>;

/// A keys file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeysFileError {
    #[error("failed to read keys file {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("keys file {path}, line {line}: expected KEY or COMPANY_ID KEY")]
    Syntax { path: PathBuf, line: usize },
}

/// The keys one keys file holds.
#[derive(Debug, Default)]
pub struct FileKeys {
    pub any_company: Vec<ExportKey>,
    pub by_company: Vec<(u64, Vec<ExportKey>)>,
}

/// Keys from a file (e.g. a mounted Kubernetes Secret): one per line, `KEY` for a key that
/// opens every company or `COMPANY_ID KEY` for one company; blank lines and `#` comments
/// are skipped.
pub fn read_keys_file(path: &std::path::Path) -> Result<FileKeys, KeysFileError> {
    let text = std::fs::read_to_string(path).map_err(|cause| KeysFileError::Read {
        path: path.to_owned(),
        cause,
    })?;
    let syntax = |line| KeysFileError::Syntax {
        path: path.to_owned(),
        line,
    };
    let mut keys = FileKeys::default();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields[..] {
            [key] => keys
                .any_company
                .push(ExportKey::new(key).map_err(|_| syntax(n + 1))?),
            [company, key] => {
                let company = company.parse().map_err(|_| syntax(n + 1))?;
                let key = ExportKey::new(key).map_err(|_| syntax(n + 1))?;
                keys.by_company.push((company, vec![key]));
            }
            _ => return Err(syntax(n + 1)),
        }
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> ExportKey {
        ExportKey::new(s).unwrap()
    }

    #[test]
    fn debug_and_serialize_never_show_the_secret() {
        let k = key("22u43mrjwe7u");
        assert_eq!(format!("{k:?}"), "ExportKey(<redacted>)");
        let keyring = Keyring::new(vec![k.clone()], [(1, vec![k])]);
        assert!(!format!("{keyring:?}").contains("22u43mrjwe7u"));
    }

    #[test]
    fn empty_keys_are_refused_when_configured_and_when_presented() {
        assert!(ExportKey::new("").is_err());
        assert!(ExportKey::new("  ").is_err());
        let keyring = Keyring::new(vec![key("k")], []);
        assert!(!keyring.verify("", None));
    }

    #[test]
    fn global_keys_open_every_company() {
        let keyring = Keyring::new(vec![key("global")], []);
        assert!(keyring.verify("global", None));
        assert!(keyring.verify("global", Some(42)));
        assert!(!keyring.verify("globa", Some(42)));
        assert!(!keyring.verify("global ", Some(42)));
    }

    #[test]
    fn keys_file_lines_are_keys_or_company_and_key() {
        let path = std::env::temp_dir().join(format!("keys-{}", uuid::Uuid::now_v7()));
        std::fs::write(
            &path,
            "# rotation in progress\nglobal1\n\n 7 old7 \n7 new7\n",
        )
        .unwrap();
        let keys = read_keys_file(&path).unwrap();
        let keyring = Keyring::new(keys.any_company, keys.by_company);
        assert!(keyring.verify("global1", Some(3)));
        assert!(keyring.verify("old7", Some(7)) && keyring.verify("new7", Some(7)));
        assert!(!keyring.verify("new7", Some(8)));
        std::fs::write(&path, "7 new7 extra\n").unwrap();
        let err = read_keys_file(&path).unwrap_err().to_string();
        assert!(
            err.ends_with("line 1: expected KEY or COMPANY_ID KEY"),
            "{err}"
        );
        assert!(!err.contains("new7"), "the message never quotes a key");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn company_keys_open_only_their_company_and_rotation_accepts_both() {
        let keyring = Keyring::new(vec![], [(1, vec![key("old")]), (1, vec![key("new")])]);
        assert!(keyring.verify("old", Some(1)));
        assert!(keyring.verify("new", Some(1)));
        assert!(!keyring.verify("new", Some(2)));
        assert!(!keyring.verify("new", None));
    }
}
