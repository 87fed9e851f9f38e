//! The relay under test: the real `hirehop-relay` binary as a child process, configured only
//! through `RELAY_*` environment variables and observed only through HTTP (`/readyz`) and
//! `/proc`, so the bench keeps working while the relay's insides change.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::process::Command;

use crate::http_client;
use crate::server_process::ServerProcess;

/// The export key the bench's relays accept and its webhooks carry.
pub const KEY: &str = "bench-export-key-0001";
/// `history.enabled`: off, unless a relay measures what the history stream costs (`--history`).
const HISTORY: &str = "RELAY_HISTORY__ENABLED";
/// The relay's default `http.path`.
pub const WEBHOOK_PATH: &str = "/webhooks/hirehop";
/// How long a relay may take to connect to the broker, or to drain its spool.
const PATIENCE: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(100);

/// The relay binary run with `args`, configured as every relay of the bench: no variables
/// from the bench's own environment, the bench's export key, history off unless `history`
/// (the bench compares the relay with a publisher that writes to the exchange alone), and
/// publishing to `exchange`.
pub fn command(binary: &Path, args: &[&str], exchange: &str, history: bool) -> Command {
    let mut command = Command::new(binary);
    command
        .args(args)
        .env_clear()
        .env("RELAY_AMQP__EXCHANGE", exchange)
        .env("RELAY_AUTH__EXPORT_KEYS", KEY)
        .env(HISTORY, if history { "true" } else { "false" });
    command
}

/// Declares `exchange` exactly as a relay with default settings does, by the relay's own
/// `topology --apply`: the topic exchange and its `<exchange>.unrouted` alternate exchange and
/// queue (and the history stream with `history`).
pub async fn declare_topology(
    binary: &Path,
    amqp_url: &str,
    exchange: &str,
    history: bool,
) -> anyhow::Result<()> {
    let output = command(binary, &["topology", "--apply"], exchange, history)
        .env("RELAY_AMQP__URL", amqp_url)
        .output()
        .await
        .with_context(|| format!("failed to run {}", binary.display()))?;
    if !output.status.success() {
        bail!(
            "`hirehop-relay topology --apply` failed for exchange {exchange}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// A spool directory of its own under the system's temp directory, removed when dropped.
pub struct SpoolDir(PathBuf);

impl SpoolDir {
    pub fn new(name: &str) -> SpoolDir {
        SpoolDir(std::env::temp_dir().join(format!("hirehop-relay-{name}-spool")))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SpoolDir {
    fn drop(&mut self) {
        if self.0.exists()
            && let Err(err) = std::fs::remove_dir_all(&self.0)
        {
            eprintln!("warning: failed to remove {}: {err}", self.0.display());
        }
    }
}

/// What every relay of a run shares.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// The relay's release binary.
    pub binary: PathBuf,
    pub channels: usize,
    pub rust_log: String,
}

/// Where one relay publishes and spools.
pub struct RelaySpec<'a> {
    pub name: &'static str,
    pub amqp_url: &'a str,
    pub exchange: &'a str,
    pub spool: &'a SpoolDir,
    /// With the history stream `<exchange>.history` (declared by the relay itself).
    pub history: bool,
}

pub struct Relay {
    pub process: ServerProcess,
}

impl Relay {
    /// Starts the binary and waits for its `listening` line. With the spool on (the default)
    /// the port opens before the broker is connected: see [`Relay::wait_connected`].
    pub async fn start(settings: &RelaySettings, spec: RelaySpec<'_>) -> anyhow::Result<Relay> {
        let mut command = command(&settings.binary, &["serve"], spec.exchange, spec.history);
        command
            .env("RUST_LOG", &settings.rust_log)
            .env("RELAY_LOG__FORMAT", "text")
            .env("RELAY_HTTP__LISTEN", "127.0.0.1:0")
            .env("RELAY_HTTP__PATH", WEBHOOK_PATH)
            .env("RELAY_AMQP__URL", spec.amqp_url)
            .env("RELAY_AMQP__CHANNELS", settings.channels.to_string())
            .env("RELAY_SPOOL__DIR", spec.spool.path());
        let process = ServerProcess::spawn(spec.name, command).await?;
        Ok(Relay { process })
    }

    pub fn addr(&self) -> SocketAddr {
        self.process.addr
    }

    /// Waits until `/readyz` says the broker is connected (so the exchange is declared).
    pub async fn wait_connected(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let ready = self.readiness().await?;
            if ready["broker"] == "connected" {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the {} did not connect to the broker within {PATIENCE:?} (/readyz: {ready}); \
                     its log:\n{}",
                    self.process.name,
                    self.process.recent_log()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Webhooks waiting in the spool (0 without a spool).
    pub async fn spooled(&self) -> anyhow::Result<u64> {
        Ok(self.readiness().await?["spool"]["messages"]
            .as_u64()
            .unwrap_or(0))
    }

    /// Waits until the spool is empty (everything spooled was confirmed by the broker).
    pub async fn wait_spool_drained(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = self.spooled().await?;
            if left == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the spool of the {} still holds {left} webhooks",
                    self.process.name
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn readiness(&self) -> anyhow::Result<serde_json::Value> {
        let (_, body) = http_client::get_json(self.addr(), "/readyz")
            .await
            .with_context(|| format!("GET /readyz of the {} failed", self.process.name))?;
        Ok(body)
    }

    pub async fn stop(self) {
        self.process.stop().await;
    }
}
