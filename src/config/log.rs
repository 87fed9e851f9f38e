//! `[log]`: log output.

use std::path::Path;

use serde::{Deserialize, Serialize};

pub(super) const DEFAULTS: &str = r#"
[log]
format = "text"
"#;

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

impl LogFormat {
    /// The format asked for by `RELAY_LOG__FORMAT` or the file's `log.format`, read on its
    /// own so that an error in the rest of the configuration is logged in that format too.
    /// Text when neither says, or says something else.
    pub(super) fn hint(file: Option<&Path>) -> LogFormat {
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
}
