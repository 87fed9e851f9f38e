//! A server the bench starts as a child process (the relay, the floor or the bare relay): started,
//! its `listening addr=...` line awaited, its last log lines kept for error reports, and
//! killed when dropped.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::procs::{self, Memory};

/// How long a child gets to print its `listening addr=...` line.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How many of a child's last log lines are kept for error reports.
const KEPT_LOG_LINES: usize = 40;

/// The last lines a child logged, and how many it logged in all.
#[derive(Debug, Default)]
struct Log {
    lines: VecDeque<String>,
    total: u64,
}

/// A server started by the bench (the relay, the floor or the bare relay); killed when dropped.
pub struct ServerProcess {
    pub name: &'static str,
    pub pid: u32,
    pub addr: SocketAddr,
    child: Child,
    log: Arc<Mutex<Log>>,
}

impl ServerProcess {
    /// Starts `command` and waits for the line on its stderr that contains `listening` and
    /// `addr=<ip:port>`. Its stderr is read for as long as it runs (a full pipe would block
    /// it); the last lines are kept for error messages.
    pub async fn spawn(name: &'static str, mut command: Command) -> anyhow::Result<Self> {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .with_context(|| format!("failed to start the {name}"))?;
        let pid = child
            .id()
            .with_context(|| format!("the {name} exited at once"))?;
        let stderr = child
            .stderr
            .take()
            .context("stderr of a child spawned with a pipe")?;
        let log = Arc::new(Mutex::new(Log::default()));
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(read_log(stderr, Arc::clone(&log), addr_tx));
        let addr = match tokio::time::timeout(STARTUP_TIMEOUT, addr_rx).await {
            Ok(Ok(addr)) => addr,
            Ok(Err(_)) => bail!(
                "the {name} exited before listening; its log:\n{}",
                recent(&log)
            ),
            Err(_) => bail!(
                "the {name} did not listen within {STARTUP_TIMEOUT:?}; its log:\n{}",
                recent(&log)
            ),
        };
        Ok(ServerProcess {
            name,
            pid,
            addr,
            child,
            log,
        })
    }

    pub fn memory(&self) -> anyhow::Result<Memory> {
        procs::memory(self.pid)
    }

    /// The last lines the process logged.
    pub fn recent_log(&self) -> String {
        recent(&self.log)
    }

    /// How many lines the process logged so far; see [`ServerProcess::logged_since`].
    pub fn log_mark(&self) -> u64 {
        self.log.lock().map_or(0, |log| log.total)
    }

    /// The lines logged after `mark` that are still kept.
    pub fn logged_since(&self, mark: u64) -> Vec<String> {
        let Ok(log) = self.log.lock() else {
            return Vec::new();
        };
        let new = usize::try_from(log.total.saturating_sub(mark)).unwrap_or(usize::MAX);
        log.lines
            .iter()
            .skip(log.lines.len().saturating_sub(new))
            .cloned()
            .collect()
    }

    /// SIGTERM, then SIGKILL if it has not exited after a while.
    pub async fn stop(mut self) {
        let termed = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .is_ok_and(|status| status.success());
        if termed
            && tokio::time::timeout(Duration::from_secs(20), self.child.wait())
                .await
                .is_ok()
        {
            return;
        }
        eprintln!(
            "warning: the {} did not stop on SIGTERM; killing it",
            self.name
        );
        let _ = self.child.kill().await;
    }
}

async fn read_log(
    stderr: tokio::process::ChildStderr,
    log: Arc<Mutex<Log>>,
    addr_tx: tokio::sync::oneshot::Sender<SocketAddr>,
) {
    let mut addr_tx = Some(addr_tx);
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(addr) = listening_addr(&line)
            && let Some(tx) = addr_tx.take()
        {
            let _ = tx.send(addr);
        }
        if let Ok(mut log) = log.lock() {
            if log.lines.len() == KEPT_LOG_LINES {
                log.lines.pop_front();
            }
            log.lines.push_back(line);
            log.total += 1;
        }
    }
}

/// `addr=127.0.0.1:NNNN` from a log line that says `listening`.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    if !line.contains("listening") {
        return None;
    }
    line.split("addr=")
        .nth(1)?
        .split_whitespace()
        .next()?
        .trim_matches('"')
        .parse()
        .ok()
}

fn recent(log: &Mutex<Log>) -> String {
    log.lock()
        .map(|log| log.lines.iter().cloned().collect::<Vec<_>>().join("\n"))
        .unwrap_or_default()
}
