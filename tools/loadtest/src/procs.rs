//! What the processes under test used, from their own accounting in `/proc` (Linux only).
//!
//! CPU time is `utime + stime` from `/proc/<pid>/stat`, summed over all threads by the kernel,
//! in clock ticks (`getconf CLK_TCK`, 100 if that cannot be run). Memory is `VmRSS` (now) and
//! `VmHWM` (peak over the process's life) from `/proc/<pid>/status`.

use anyhow::Context;

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
