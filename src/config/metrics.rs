//! `[metrics]`: the Prometheus endpoint.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

pub(super) const DEFAULTS: &str = r#"
[metrics]
max_event_labels = 200
"#;

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
