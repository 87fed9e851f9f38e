//! Export keys: the only credential HireHop sends, and a dangerous one, since the same key
//! also opens the company's data exports.
//!
//! An [`ExportKey`] keeps only the SHA-256 digest of the configured secret, prints as
//! `<redacted>` in `Debug` and when serialized, and is compared in constant time. Comparing
//! fixed-size digests also hides the configured key's length. A [`Keyring`] holds keys that
//! open every company and keys that open one company only (several at once during a rotation).

use std::collections::HashMap;
use std::fmt;

use serde::{Serialize, Serializer};
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

/// A configured export key. Deliberately neither `Display` nor a `Debug` that shows anything.
#[derive(Clone, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct ExportKey {
    digest: [u8; 32],
}

/// A configured export key was empty.
#[derive(Debug, thiserror::Error)]
#[error("an export key must not be empty")]
pub struct EmptyKey;

impl ExportKey {
    pub fn new(secret: &str) -> Result<ExportKey, EmptyKey> {
        if secret.trim().is_empty() {
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

impl TryFrom<String> for ExportKey {
    type Error = EmptyKey;
    fn try_from(secret: String) -> Result<Self, Self::Error> {
        ExportKey::new(&secret)
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
    fn company_keys_open_only_their_company_and_rotation_accepts_both() {
        let keyring = Keyring::new(vec![], [(1, vec![key("old")]), (1, vec![key("new")])]);
        assert!(keyring.verify("old", Some(1)));
        assert!(keyring.verify("new", Some(1)));
        assert!(!keyring.verify("new", Some(2)));
        assert!(!keyring.verify("new", None));
    }
}
