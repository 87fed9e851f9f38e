//! Memory while spooling: bursts of large webhooks with the broker out of reach, measured on
//! the real binary (`VmHWM` and `VmRSS` in `/proc/PID/status`) against the formula in
//! docs/operating.md (Memory).

use hyper::{Method, StatusCode};

use crate::harness::{KEY, RelayProcess, request, send, webhook_with};
use crate::offline::Offline;
use crate::tmpfs::Tmpfs;

const MIB: u64 = 1024 * 1024;
const MAX_IN_FLIGHT: u64 = 64;
const MAX_BODY_BYTES: u64 = MIB;
/// The formula's constant: the binary and its runtime at rest, a replay batch, and slack.
const BASE: u64 = 24 * MIB;
/// Bodies held at the peak, in units of `max_in_flight × max_body_bytes`: each body once,
/// plus, for the requests being read at that moment, hyper's buffers and the joined copy.
const PEAK_BODIES: f64 = 1.75;
/// What the allocator keeps after the bursts, for the next one, in the same units.
const AFTER_BODIES: f64 = 1.0;

/// `VmHWM` (peak resident memory) and `VmRSS` of process `pid`, in bytes.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        let line = status
            .lines()
            .find(|line| line.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"));
        let kib: u64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap();
        kib * 1024
    };
    (field("VmHWM:"), field("VmRSS:"))
}

#[tokio::test]
async fn spooling_bursts_of_large_webhooks_stays_within_the_memory_formula() {
    // On tmpfs: the test is about the relay's memory, not the machine's disk.
    let disk = Tmpfs::mount("400m");
    let offline = Offline::start_in(disk.path().join("spool")).await;
    let (in_flight, body_bytes) = (MAX_IN_FLIGHT.to_string(), MAX_BODY_BYTES.to_string());
    let mut relay_env = offline.env();
    relay_env.extend([
        ("RELAY_HTTP__MAX_IN_FLIGHT", in_flight.as_str()),
        ("RELAY_HTTP__MAX_BODY_BYTES", body_bytes.as_str()),
        ("RELAY_SPOOL__SHUTDOWN_REPLAY_TIMEOUT_MS", "0"),
    ]);
    let relay = RelayProcess::spawn(&relay_env).await;
    let pid = relay.child.id().expect("the relay runs");
    let mut body = webhook_with("job.updated", KEY, 1);
    body.insert_str(1, &format!("\"pad\":\"{}\",", "x".repeat(1_000_000)));
    assert!(body.len() as u64 <= MAX_BODY_BYTES);
    let body = bytes::Bytes::from(body);

    // Five bursts of max_in_flight webhooks at once, each burst answered before the next.
    for _ in 0..5 {
        let burst: Vec<_> = (0..MAX_IN_FLIGHT)
            .map(|_| {
                let (addr, body) = (relay.addr(), body.clone());
                tokio::spawn(async move {
                    send(addr, request(Method::POST, "/webhooks/hirehop", body)).await
                })
            })
            .collect();
        for reply in burst {
            let reply = reply.await.unwrap().expect("the relay answers");
            assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
            assert_eq!(reply.json()["status"], "spooled");
        }
    }

    let (peak, after) = memory(pid);
    let bodies = (MAX_IN_FLIGHT * MAX_BODY_BYTES) as f64;
    let peak_limit = BASE + (PEAK_BODIES * bodies) as u64;
    let after_limit = BASE + (AFTER_BODIES * bodies) as u64;
    let mib = |bytes: u64| bytes as f64 / MIB as f64;
    eprintln!(
        "peak {:.1} MiB (limit {:.1}), after the bursts {:.1} MiB (limit {:.1})",
        mib(peak),
        mib(peak_limit),
        mib(after),
        mib(after_limit)
    );
    assert!(
        peak <= peak_limit,
        "peak RSS {:.1} MiB is over {:.1} MiB = 24 MiB + {PEAK_BODIES} x {MAX_IN_FLIGHT} x 1 MiB",
        mib(peak),
        mib(peak_limit)
    );
    assert!(
        after <= after_limit,
        "RSS after the bursts {:.1} MiB is over {:.1} MiB = 24 MiB + {AFTER_BODIES} x \
         {MAX_IN_FLIGHT} x 1 MiB: memory held after a burst",
        mib(after),
        mib(after_limit)
    );
    relay.terminate().await;
}
