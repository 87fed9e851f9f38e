//! The machine, OS and versions a run was measured on, for the report header.

use std::time::{Duration, SystemTime};

/// `2 CPUs (model name), 23.6 GiB RAM`.
pub fn describe() -> String {
    // The machine's CPUs, not the ones this process may use (`--cpus` narrows those).
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpus = cpuinfo
        .lines()
        .filter(|line| line.starts_with("processor"))
        .count();
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map_or("unknown CPU", |(_, model)| model.trim());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let ram_gib = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or_else(
            || "unknown".to_owned(),
            |kib| format!("{:.1}", kib / 1024.0 / 1024.0),
        );
    format!("{cpus} CPUs ({model}), {ram_gib} GiB RAM")
}

/// `Debian GNU/Linux 12 (bookworm), kernel 6.1.0`.
pub fn os() -> String {
    let release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let name = release
        .lines()
        .find_map(|line| line.strip_prefix("PRETTY_NAME="))
        .map_or("unknown OS", |name| name.trim_matches('"'));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{name}, kernel {}", kernel.trim())
}

pub fn rustc() -> String {
    command_output("rustc", &["--version"]).unwrap_or_else(|| "rustc unknown".to_owned())
}

/// The broker's version from `rabbitmqctl version` (on the machine running the broker).
pub async fn rabbitmq() -> String {
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new("rabbitmqctl")
            .arg("version")
            .kill_on_drop(true)
            .output(),
    )
    .await;
    match output {
        Ok(Ok(out)) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .map_or_else(|| "unknown".to_owned(), |v| v.trim().to_owned()),
        _ => "unknown (rabbitmqctl version failed)".to_owned(),
    }
}

/// Now, as `2024-05-14T09:31:07Z`.
pub fn date() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
