//! `[spool]`: the local spool that keeps webhooks the broker cannot confirm right now.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid};

/// `spool.dir` is not here: its default is worked out at startup ([`default_spool_dir`]).
pub(super) const DEFAULTS: &str = r#"
[spool]
enabled = true
max_bytes = 1073741824
shutdown_replay_timeout_ms = 15000
"#;

/// The local spool that keeps webhooks the broker cannot confirm right now.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// Without the spool, a webhook that cannot be confirmed gets 503 (and HireHop drops it).
    pub enabled: bool,
    /// Directory of the spool; one relay per directory. Relative paths start from the
    /// working directory. By default the service's state directory (see
    /// [`default_spool_dir`]).
    #[serde(default = "default_spool_dir")]
    pub dir: PathBuf,
    /// Disk the spool may use; beyond it webhooks get 503.
    pub max_bytes: u64,
    /// On shutdown, after the HTTP drain, how long replay may go on emptying the spool into
    /// the broker before the relay exits with what is left on disk.
    pub shutdown_replay_timeout_ms: u64,
}

impl SpoolConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.enabled && self.max_bytes < 1024 * 1024 {
            return Err(invalid(
                "spool.max_bytes",
                "must be at least 1 MiB (1048576)",
            ));
        }
        Ok(())
    }

    pub fn shutdown_replay_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_replay_timeout_ms)
    }
}

/// Where the spool lives unless `spool.dir` says otherwise: in the state directory systemd
/// gives the service (`StateDirectory=`, as `$STATE_DIRECTORY`), else in the user's state
/// directory (`$XDG_STATE_HOME`, or `~/.local/state`). Never the working directory, so that
/// `cargo run` in a checkout leaves no spool in it; the container image sets
/// `XDG_STATE_HOME=/var/lib`.
fn default_spool_dir() -> PathBuf {
    let var = |name| std::env::var_os(name).filter(|value| !value.is_empty());
    state_spool_dir(var("STATE_DIRECTORY"), var("XDG_STATE_HOME"), var("HOME"))
}

fn state_spool_dir(
    state_directory: Option<OsString>,
    xdg_state_home: Option<OsString>,
    home: Option<OsString>,
) -> PathBuf {
    if let Some(dirs) = state_directory {
        // systemd lists one directory per `StateDirectory=` entry, separated by colons.
        let first = std::env::split_paths(&dirs).next().unwrap_or_default();
        return first.join("spool");
    }
    let state = xdg_state_home
        .map(PathBuf::from)
        .or_else(|| home.map(|home| Path::new(&home).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("/var/lib"));
    state.join("hirehop-relay/spool")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::config::tests::env;

    #[test]
    fn no_replay_at_shutdown_is_a_valid_choice() {
        let settings = env(&[
            ("RELAY_AUTH__EXPORT_KEYS", "k1"),
            ("RELAY_SPOOL__SHUTDOWN_REPLAY_TIMEOUT_MS", "0"),
        ]);
        let config = Config::load_from(None, settings).unwrap();
        assert_eq!(config.spool.shutdown_replay_timeout(), Duration::ZERO);
    }

    #[test]
    fn the_spool_lives_in_the_state_directory_not_the_working_directory() {
        let os = |s: &str| Some(OsString::from(s));
        // systemd's StateDirectory=hirehop-relay.
        assert_eq!(
            state_spool_dir(os("/var/lib/hirehop-relay"), os("/x"), os("/home/u")),
            Path::new("/var/lib/hirehop-relay/spool")
        );
        assert_eq!(
            state_spool_dir(os("/var/lib/a:/var/lib/b"), None, None),
            Path::new("/var/lib/a/spool")
        );
        // The container image's XDG_STATE_HOME=/var/lib.
        assert_eq!(
            state_spool_dir(None, os("/var/lib"), None),
            Path::new("/var/lib/hirehop-relay/spool")
        );
        // `cargo run` as a user.
        assert_eq!(
            state_spool_dir(None, None, os("/home/u")),
            Path::new("/home/u/.local/state/hirehop-relay/spool")
        );
        assert_eq!(
            state_spool_dir(None, None, None),
            Path::new("/var/lib/hirehop-relay/spool")
        );
        // And a configured directory wins.
        let config = Config::load_from(
            None,
            env(&[
                ("RELAY_AUTH__EXPORT_KEYS", "k"),
                ("RELAY_SPOOL__DIR", "here"),
            ]),
        )
        .unwrap();
        assert_eq!(config.spool.dir, Path::new("here"));
    }
}
