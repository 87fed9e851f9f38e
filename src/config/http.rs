//! `[http]`: the webhook-facing HTTP server.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use super::{ConfigError, invalid, nonzero, string_list};

pub(super) const DEFAULTS: &str = r#"
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
"#;

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

/// Largest `http.max_body_bytes`: a spooled webhook (the body and a small header) must stay
/// below what the spool reads back as a record.
const MAX_BODY_BYTES: u64 = 64 * 1024 * 1024;
const _: () = assert!(2 * MAX_BODY_BYTES < crate::spool::MAX_RECORD_BYTES as u64);

impl HttpConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if !self.path.starts_with('/') {
            return Err(invalid("http.path", "must start with '/'"));
        }
        if ["/healthz", "/readyz"].contains(&self.path.as_str()) {
            return Err(invalid("http.path", "must not be a health endpoint"));
        }
        nonzero(&[("http.max_headers", self.max_headers as u64)])?;
        if self.max_header_bytes < 8192 {
            return Err(invalid("http.max_header_bytes", "must be at least 8192"));
        }
        nonzero(&[
            ("http.max_in_flight", self.max_in_flight as u64),
            ("http.max_connections", self.max_connections as u64),
            (
                "http.max_connections_per_ip",
                self.max_connections_per_ip as u64,
            ),
        ])?;
        if self.key_failures_per_minute > 0 && self.key_failure_burst == 0 {
            return Err(invalid(
                "http.key_failure_burst",
                "must be greater than 0 while http.key_failures_per_minute is on",
            ));
        }
        if self.max_body_bytes == 0 || self.max_body_bytes > MAX_BODY_BYTES {
            return Err(invalid(
                "http.max_body_bytes",
                format!("must be between 1 and {MAX_BODY_BYTES} (64 MiB)"),
            ));
        }
        nonzero(&[
            ("http.header_read_timeout_ms", self.header_read_timeout_ms),
            ("http.request_timeout_ms", self.request_timeout_ms),
            ("http.body_idle_timeout_ms", self.body_idle_timeout_ms),
        ])
    }

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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::Config;
    use crate::config::tests::{env, write_file};

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
    fn an_address_without_a_port_says_the_form_expected() {
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
        let file = write_file("[auth]\nexport_keys = [\"k\"]\n[http]\nlisten = \"x\"\n");
        let err = Config::load_from(Some(file.path()), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!("invalid http.listen in {}", file.path().display()))
                && err.ends_with("(expected host:port, e.g. 127.0.0.1:8080)"),
            "{err}"
        );
    }
}
