//! Processes under test and their own accounting in `/proc` (Linux only).
//!
//! CPU time is `utime + stime` from `/proc/<pid>/stat`, summed over all threads by the kernel,
//! in clock ticks (`getconf CLK_TCK`, 100 if that cannot be run). Memory is `VmRSS` (now) and
//! `VmHWM` (peak over the process's life) from `/proc/<pid>/status`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long a child gets to print its `listening addr=...` line.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How many of a child's last log lines are kept for error reports.
const KEPT_LOG_LINES: usize = 40;

/// Reads process CPU times.
#[derive(Debug, Clone, Copy)]
pub struct CpuClock {
    pub ticks_per_sec: f64,
    /// Whether `ticks_per_sec` came from `getconf CLK_TCK` (otherwise it is assumed).
    pub measured: bool,
}

impl CpuClock {
    pub fn detect() -> CpuClock {
        let measured = std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|ticks| *ticks > 0.0);
        CpuClock {
            ticks_per_sec: measured.unwrap_or(100.0),
            measured: measured.is_some(),
        }
    }

    /// CPU seconds (user + system, all threads) used so far by `pid`.
    pub fn cpu_secs(&self, pid: u32) -> anyhow::Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("failed to read /proc/{pid}/stat"))?;
        // The command name (field 2) may contain spaces; the fields after it do not.
        let after_name = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .with_context(|| format!("unexpected /proc/{pid}/stat: {stat}"))?;
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
        let tick = |i: usize| -> anyhow::Result<u64> {
            fields
                .get(i)
                .and_then(|f| f.parse().ok())
                .with_context(|| format!("no CPU time in /proc/{pid}/stat"))
        };
        Ok((tick(11)? + tick(12)?) as f64 / self.ticks_per_sec)
    }
}

/// The machine's CPU time by state, from the first line of `/proc/stat` (in ticks).
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineCpu {
    pub total: u64,
    /// `idle` + `iowait`.
    pub idle: u64,
    /// Time the hypervisor ran someone else while this machine wanted to run.
    pub steal: u64,
}

impl MachineCpu {
    pub fn read() -> anyhow::Result<MachineCpu> {
        let stat = std::fs::read_to_string("/proc/stat").context("failed to read /proc/stat")?;
        let ticks: Vec<u64> = stat
            .lines()
            .next()
            .and_then(|line| line.strip_prefix("cpu "))
            .context("no cpu line in /proc/stat")?
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        let at = |i: usize| ticks.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal (guest time is inside user already).
        Ok(MachineCpu {
            total: (0..8).map(at).sum(),
            idle: at(3) + at(4),
            steal: at(7),
        })
    }

    /// Shares of `later - self` that were idle and stolen, in percent.
    pub fn shares_until(&self, later: &MachineCpu) -> (f64, f64) {
        let total = later.total.saturating_sub(self.total).max(1) as f64;
        (
            100.0 * later.idle.saturating_sub(self.idle) as f64 / total,
            100.0 * later.steal.saturating_sub(self.steal) as f64 / total,
        )
    }
}

/// Resident memory of a process, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

pub fn memory(pid: u32) -> anyhow::Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("failed to read /proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok(Memory {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
    })
}

/// The broker's Erlang VM (`beam.smp` running RabbitMQ) on this machine, if there is one and
/// it can be seen: its CPU time shows how much of each phase the broker itself costs. Only
/// the server matches (its command line has `-s rabbit boot`), not a CLI tool such as
/// `rabbitmqctl`, which runs a `beam.smp` of its own.
pub fn find_broker_pid() -> Option<u32> {
    let entries = std::fs::read_dir("/proc").ok()?;
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            comm.trim() == "beam.smp"
                && args
                    .windows(3)
                    .any(|w| w == [&b"-s"[..], &b"rabbit"[..], &b"boot"[..]])
        })
}

/// The last lines a child logged, and how many it logged in all.
#[derive(Debug, Default)]
struct Log {
    lines: VecDeque<String>,
    total: u64,
}

/// A server started by the bench (the relay, or the floor server); killed when dropped.
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
        memory(self.pid)
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
