//! Optional CPU split: the broker on CPUs of its own, everything else on the others.
//!
//! On a small machine the broker, the relay and the load generator take CPU from one another,
//! so a relay that costs CPU lowers the broker's ceiling even when it is not the bottleneck.
//! In production the broker runs on hosts of its own. `--broker-cpus` and `--cpus` give the
//! broker fixed CPUs and keep this process (load generator, raw publisher) and the servers it
//! starts (relay, floor; children inherit the affinity) off them, so both the raw publisher
//! and the relay face a broker with the same, fixed capacity.
//!
//! Affinities are set with `taskset` (util-linux). The broker's original affinity is put back
//! when the [`BrokerPin`] is dropped: at the end, on an error, or on Ctrl-C (`run` drops the
//! bench then); if the bench is killed, the command to do it by hand is printed before the pin
//! is set.

use anyhow::{Context, bail};

/// The broker's threads, pinned until this is dropped.
pub struct BrokerPin {
    pid: u32,
    original: String,
}

impl BrokerPin {
    /// Pins every thread of the broker process `pid` to `cpus` (a `taskset` list, `1` or
    /// `2-3`).
    pub fn set(pid: u32, cpus: &str) -> anyhow::Result<BrokerPin> {
        let original = affinity(pid)?;
        eprintln!(
            "pinning the broker (pid {pid}) to CPUs {cpus}; if this run is killed, restore it \
             with `taskset -a -p -c {original} {pid}`"
        );
        // The guard before the pin: `taskset -a` goes thread by thread and may fail partway,
        // and dropping the guard on that error puts back the threads it did pin.
        let pinned = BrokerPin { pid, original };
        pin(pid, cpus).with_context(|| format!("failed to pin the broker (pid {pid})"))?;
        Ok(pinned)
    }
}

impl Drop for BrokerPin {
    fn drop(&mut self) {
        if let Err(err) = pin(self.pid, &self.original) {
            eprintln!(
                "failed to restore the broker's CPUs ({err:#}): run `taskset -a -p -c {} {}`",
                self.original, self.pid
            );
        }
    }
}

/// Pins this process (all its threads; processes it starts later inherit it) to `cpus`.
pub fn pin_self(cpus: &str) -> anyhow::Result<()> {
    pin(std::process::id(), cpus).context("failed to pin the bench to --cpus")
}

/// The CPU list a process may run on, as `taskset -p -c` prints it (`0,1` or `0-3`).
fn affinity(pid: u32) -> anyhow::Result<String> {
    let out = taskset(&["-p", "-c", &pid.to_string()])?;
    // "pid 2967's current affinity list: 0,1"
    out.rsplit_once(':')
        .map(|(_, list)| list.trim().to_owned())
        .filter(|list| !list.is_empty())
        .with_context(|| format!("unexpected taskset output: {out}"))
}

fn pin(pid: u32, cpus: &str) -> anyhow::Result<()> {
    taskset(&["-a", "-p", "-c", cpus, &pid.to_string()]).map(drop)
}

fn taskset(args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new("taskset")
        .args(args)
        .output()
        .context("failed to run taskset (util-linux)")?;
    if !out.status.success() {
        bail!(
            "taskset {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
