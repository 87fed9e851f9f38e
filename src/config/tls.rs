//! `[tls]`: optional TLS termination on the webhook port.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid, nonzero};

pub(super) const DEFAULTS: &str = r#"
[tls]
handshake_timeout_ms = 3000
"#;

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

impl TlsConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(invalid(
                "tls",
                "set both cert_file and key_file, or neither",
            ));
        }
        nonzero(&[("tls.handshake_timeout_ms", self.handshake_timeout_ms)])
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }
}
