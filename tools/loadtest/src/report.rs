//! The results: one [`Sample`] per phase, aggregated over repeats (medians) into markdown
//! tables, with the machine they were measured on and the targets of the issue.

use std::fmt::Write as _;
use std::time::Duration;

use crate::broker::{Layout, QueueType};
use crate::procs::{CpuClock, Memory};
use crate::stats::{Latency, median};

/// What was loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    /// A lapin client publishing straight to the broker: the ceiling.
    Raw,
    /// The relay binary, over HTTP.
    Relay,
    /// A plain hyper server that answers 202: the HTTP floor.
    Floor,
    /// The floor plus the raw publisher's publish and confirm: the least a relay can do.
    Bare,
    /// The relay with its broker unreachable: every webhook goes to the spool.
    Spooling,
    /// The relay with the history stream on (`--history`); the others run without it.
    RelayHistory,
}

impl System {
    fn label(self) -> &'static str {
        match self {
            System::Raw => "raw lapin publisher",
            System::Relay => "**relay**",
            System::Floor => "hyper floor (no broker)",
            System::Bare => "bare relay (hyper + lapin only)",
            System::Spooling => "**relay, spool only**",
            System::RelayHistory => "relay, history on",
        }
    }

    /// The layout its samples carry when `layout` is being reported: none for the systems
    /// that run without the broker's queues (the floor, spool only).
    fn layout_key(self, layout: Layout) -> Option<Layout> {
        (!matches!(self, System::Floor | System::Spooling)).then_some(layout)
    }

    /// Whether its rows show a ratio to the raw publisher (the `× raw` columns).
    fn against_raw(self) -> bool {
        matches!(self, System::Relay | System::Bare | System::RelayHistory)
    }
}

/// How it was loaded (and how a phase loads its system).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Closed { concurrency: usize },
    Open { rate: f64 },
}

/// What reached the broker after a phase.
#[derive(Debug, Clone, Copy)]
pub struct Verification {
    pub accepted: u64,
    pub on_broker: u64,
}

/// One phase: one system, one layout, one load, one repeat.
#[derive(Debug, Clone)]
pub struct Sample {
    /// `None` for the floor, which has no broker.
    pub layout: Option<Layout>,
    pub system: System,
    pub mode: Mode,
    pub repeat: usize,
    pub accepted_per_sec: f64,
    /// Accepted over the whole phase, warm-up and tail included.
    pub accepted_total: u64,
    pub latency: Latency,
    pub service: Latency,
    pub not_accepted: u64,
    /// CPU seconds per 1,000 accepted of the server process (relay or floor).
    pub server_cpu_per_1k: Option<f64>,
    pub broker_cpu_per_1k: Option<f64>,
    /// CPU seconds per 1,000 accepted of the bench process: the HTTP client, or the raw
    /// publisher for the baseline.
    pub client_cpu_per_1k: f64,
    /// CPU seconds per second of server, broker and bench together: the cores they kept busy.
    pub cores_busy: f64,
    /// Share of the whole machine's CPU time that was idle (or waiting for I/O) in the window.
    pub machine_idle_pct: f64,
    /// Share stolen by the hypervisor for other guests: the machine's noise.
    pub machine_steal_pct: f64,
    /// The server's RSS at the end of the measured window, in KiB.
    pub server_rss_kib: Option<u64>,
    pub verification: Option<Verification>,
}

/// Memory of one server process over its life.
#[derive(Debug, Clone)]
pub struct MemoryRow {
    pub process: String,
    pub idle_fresh: Memory,
    /// RSS at the end of closed-loop windows, per concurrency (max over repeats).
    pub under_load: Vec<(usize, u64)>,
    /// The larger of `VmHWM` and every RSS read of the process, in KiB.
    pub peak_kib: u64,
    pub idle_after: Memory,
}

/// Where and how the numbers were taken.
#[derive(Debug, Clone)]
pub struct Setup {
    pub date: String,
    pub machine: String,
    pub os: String,
    pub rustc: String,
    pub rabbitmq: String,
    pub command: String,
    pub warmup: Duration,
    pub duration: Duration,
    pub repeats: usize,
    pub body_bytes: usize,
    pub channels: usize,
    pub open_connections: usize,
    pub open_fraction: f64,
    /// `minimal` or `relay`: the properties the raw publisher sends.
    pub raw_properties: String,
    pub relay_log: String,
    pub clock: CpuClock,
    /// The broker processes whose CPU is read (several: the nodes of a cluster).
    pub broker_processes: usize,
    pub queue_type: QueueType,
    /// `(broker CPUs, everything else's CPUs)`, when the run split them.
    pub cpu_split: Option<(String, String)>,
}

/// The spool-mode webhooks, replayed to the broker by a relay started after them.
#[derive(Debug, Clone, Copy)]
pub struct Replay {
    pub verification: Verification,
    /// From the replaying relay's start until its spool was empty.
    pub secs: f64,
}

pub struct Report {
    pub setup: Setup,
    pub samples: Vec<Sample>,
    pub memory: Vec<MemoryRow>,
    pub replay: Option<Replay>,
    pub layouts: Vec<Layout>,
    pub concurrencies: Vec<usize>,
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        self.write_setup(&mut out);
        self.write_closed(&mut out);
        self.write_open(&mut out);
        self.write_memory(&mut out);
        self.write_targets(&mut out);
        self.write_breakdown(&mut out);
        self.write_history(&mut out);
        out
    }

    fn write_setup(&self, out: &mut String) {
        let s = &self.setup;
        let clock = if s.clock.measured {
            format!("CLK_TCK={} (getconf)", s.clock.ticks_per_sec)
        } else {
            format!("CLK_TCK={} (assumed)", s.clock.ticks_per_sec)
        };
        let _ = writeln!(out, "### Run of {}\n", s.date);
        let _ = writeln!(out, "- machine: {}", s.machine);
        let _ = writeln!(out, "- OS: {}", s.os);
        let _ = writeln!(out, "- {}; RabbitMQ {}", s.rustc, s.rabbitmq);
        let _ = writeln!(out, "- command: `{}`", s.command);
        let _ = writeln!(
            out,
            "- each phase: {:.1} s warm-up + {:.1} s measured; {} repeat(s), systems interleaved, \
             medians shown (max latency, memory under load: max over repeats; non-2xx: sum)",
            s.warmup.as_secs_f64(),
            s.duration.as_secs_f64(),
            s.repeats
        );
        let _ = writeln!(
            out,
            "- bodies: {} B HireHop envelopes over 4 event names; {} AMQP channels (relay, bare relay and raw); \
             open loop over {} connections at {} x the layout's raw ceiling",
            s.body_bytes, s.channels, s.open_connections, s.open_fraction
        );
        let _ = writeln!(
            out,
            "- properties of the raw publisher and the bare relay: {} ({})",
            s.raw_properties,
            if s.raw_properties == "relay" {
                "the relay's message id, timestamp, type and headers"
            } else {
                "persistent, content type; the relay adds message id, timestamp, type, headers"
            }
        );
        let _ = writeln!(
            out,
            "- relay `RUST_LOG={}`; CPU = utime+stime from /proc/<pid>/stat, {clock}; broker CPU {}",
            s.relay_log,
            match s.broker_processes {
                0 => "not visible (no beam.smp process found)".to_owned(),
                1 => "from its beam.smp process".to_owned(),
                n => format!("summed over {n} processes (the nodes of a cluster)"),
            }
        );
        if s.queue_type != QueueType::Classic {
            let _ = writeln!(out, "- the layouts' queues: {}", s.queue_type.as_str());
        }
        let _ = match &s.cpu_split {
            Some((broker, rest)) => writeln!(
                out,
                "- CPUs split: the broker pinned to CPU {broker}; the relay, the bare relay, the \
                 floor, the raw publisher and the load generator to CPU {rest}"
            ),
            None => writeln!(
                out,
                "- CPUs shared: the broker, the relay and the load generator all run on every CPU"
            ),
        };
        out.push('\n');
    }

    fn write_closed(&self, out: &mut String) {
        out.push_str("#### Closed loop (fixed concurrency)\n\n");
        out.push_str(
            "| layout | conns | system | accepted/s | × raw | p50 ms | p90 ms | p99 ms | max ms \
             | non-2xx | server CPU s/1k | broker CPU s/1k | client CPU s/1k | cores busy \
             | idle/steal % | on broker |\n",
        );
        out.push_str("|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|\n");
        for &layout in &self.layouts {
            for &concurrency in &self.concurrencies {
                let mode = Mode::Closed { concurrency };
                for system in [
                    System::Raw,
                    System::Relay,
                    System::Bare,
                    System::RelayHistory,
                ] {
                    self.closed_row(out, Some(layout), system, mode);
                }
            }
        }
        for system in [System::Floor, System::Spooling] {
            for &concurrency in &self.concurrencies {
                let mode = Mode::Closed { concurrency };
                self.closed_row(out, None, system, mode);
            }
        }
        out.push('\n');
        if let Some(replay) = self.replay {
            let v = replay.verification;
            let _ = writeln!(
                out,
                "Spool only: the broker URL points at a closed port, so every 202 is a fsynced \
                 spool append. Afterwards a relay with the real broker replayed the spool: \
                 {} of {} spooled webhooks reached the broker in {:.1} s ({:.0} msg/s, \
                 including its start and connect).\n",
                v.on_broker,
                v.accepted,
                replay.secs,
                v.on_broker as f64 / replay.secs.max(f64::EPSILON),
            );
        }
    }

    fn closed_row(&self, out: &mut String, layout: Option<Layout>, system: System, mode: Mode) {
        let samples = self.select(layout, system, |m| m == mode);
        let Some(row) = Row::of(&samples) else {
            return;
        };
        let Mode::Closed { concurrency } = mode else {
            return;
        };
        let ratio = match layout {
            Some(layout) if system.against_raw() => fmt_opt(
                self.throughput_ratio(layout, concurrency, (system, System::Raw)),
                2,
            ),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "| {} | {concurrency} | {} | {:.0} | {ratio} | {} | {} |",
            system_layout_label(system, layout),
            system.label(),
            row.accepted_per_sec,
            row.latency_cells(),
            row.cost_cells(),
        );
    }

    fn write_open(&self, out: &mut String) {
        out.push_str(
            "#### Open loop (fixed rate; latency from the intended send time)\n\n\
             | layout | rate/s | system | achieved/s | p50 ms | p90 ms | p99 ms | max ms \
             | p99 service ms | p99 × raw | non-2xx | server CPU s/1k | broker CPU s/1k \
             | client CPU s/1k | cores busy | idle/steal % | on broker |\n\
             |---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|\n",
        );
        for &layout in &self.layouts {
            for system in [System::Raw, System::Relay, System::Bare, System::Floor] {
                let rate = self.open_rate(layout);
                let samples = self.select(
                    system.layout_key(layout),
                    system,
                    |m| matches!(m, Mode::Open { rate: r } if Some(r) == rate),
                );
                let Some(row) = Row::of(&samples) else {
                    continue;
                };
                let p99_ratio = if system.against_raw() {
                    fmt_opt(self.p99_ratio(layout, (system, System::Raw)), 2)
                } else {
                    String::new()
                };
                let label = match system {
                    System::Floor => format!("{} (same rate)", System::Floor.label()),
                    _ => system.label().to_owned(),
                };
                let _ = writeln!(
                    out,
                    "| {layout} | {:.0} | {label} | {:.0} | {} | {:.2} | {p99_ratio} | {} |",
                    rate.unwrap_or_default(),
                    row.accepted_per_sec,
                    row.latency_cells(),
                    row.service.p99,
                    row.cost_cells(),
                );
            }
        }
        out.push('\n');
    }

    fn write_memory(&self, out: &mut String) {
        out.push_str("#### Memory (RSS, MiB)\n\n| process | idle, fresh |");
        for c in &self.concurrencies {
            let _ = write!(out, " under load, {c} conns |");
        }
        out.push_str(" peak (VmHWM or an RSS read) | idle after load |\n|---|--:|");
        for _ in &self.concurrencies {
            out.push_str("--:|");
        }
        out.push_str("--:|--:|\n");
        for row in &self.memory {
            let _ = write!(
                out,
                "| {} | {:.1} |",
                row.process,
                mib(row.idle_fresh.rss_kib)
            );
            for c in &self.concurrencies {
                let at = row
                    .under_load
                    .iter()
                    .find(|(n, _)| n == c)
                    .map(|(_, kib)| *kib);
                let _ = write!(out, " {} |", fmt_opt(at.map(mib), 1));
            }
            let _ = writeln!(
                out,
                " {:.1} | {:.1} |",
                mib(row.peak_kib),
                mib(row.idle_after.rss_kib)
            );
        }
        out.push('\n');
    }

    fn write_targets(&self, out: &mut String) {
        out.push_str(
            "#### Targets (ratios within this run; the bare relay is the baseline)\n\n\
             | target | measured | met |\n|---|---|---|\n",
        );
        for &layout in &self.layouts {
            let ratios: Vec<(usize, Option<f64>)> = self
                .concurrencies
                .iter()
                .map(|&c| (c, self.throughput_ratio(layout, c, RELAY_VS_BARE)))
                .collect();
            let measured = ratios
                .iter()
                .map(|(c, r)| format!("{} at {c} conns", fmt_opt(*r, 2)))
                .collect::<Vec<_>>()
                .join(", ");
            let met = verdict(ratios.iter().map(|(_, r)| r.map(|r| r >= 0.95)));
            let _ = writeln!(
                out,
                "| accepted/s ≥ 0.95 × bare relay, {layout} | {measured} | {met} |"
            );
        }
        let per_layout_ratio = |ratio: &dyn Fn(Layout) -> Option<f64>| {
            self.layouts
                .iter()
                .map(|&l| (l, ratio(l)))
                .collect::<Vec<(Layout, Option<f64>)>>()
        };
        let latency = [
            (
                "p50",
                per_layout_ratio(&|l| self.latency_ratio(l, RELAY_VS_BARE, |s| s.latency.p50)),
            ),
            (
                "p99",
                per_layout_ratio(&|l| self.latency_ratio(l, RELAY_VS_BARE, |s| s.latency.p99)),
            ),
        ];
        for (name, ratios) in latency {
            let _ = writeln!(
                out,
                "| open-loop {name} ≤ 1.25 × bare relay's (same rate) | {} | {} |",
                per_layout(&ratios, "×"),
                verdict(ratios.iter().map(|(_, r)| r.map(|r| r <= 1.25)))
            );
        }
        let cpu = per_layout_ratio(&|l| self.cpu_ratio(l, RELAY_VS_BARE));
        let _ = writeln!(
            out,
            "| relay CPU/request ≤ 1.15 × bare relay's (open loop, same rate) | {} | {} |",
            per_layout(&cpu, "×"),
            verdict(cpu.iter().map(|(_, r)| r.map(|r| r <= 1.15)))
        );
        // The relay's own closed-loop rate with the broker up, one queue: the "normal".
        let spool: Vec<(usize, Option<f64>)> = self
            .concurrencies
            .iter()
            .map(|&c| (c, self.spool_ratio(Layout::OneQueue, c)))
            .collect();
        let _ = writeln!(
            out,
            "| relay, spool only: accepted/s ≥ 0.5 × relay accepted/s with the broker up ({}, same conns) | {} | {} |",
            Layout::OneQueue,
            spool
                .iter()
                .map(|(c, r)| format!("{}× at {c} conns", fmt_opt(*r, 2)))
                .collect::<Vec<_>>()
                .join(", "),
            verdict(spool.iter().map(|(_, r)| r.map(|r| r >= 0.5)))
        );
        let relay_rows: Vec<&MemoryRow> = self
            .memory
            .iter()
            .filter(|row| row.process.starts_with("relay"))
            .collect();
        // Each relay process: the two layouts, and spool only.
        let at_256: Vec<(&str, Option<f64>)> = relay_rows
            .iter()
            .map(|row| {
                let at = row.under_load.iter().find(|(c, _)| *c == 256);
                (row.process.as_str(), at.map(|(_, kib)| mib(*kib)))
            })
            .collect();
        let _ = writeln!(
            out,
            "| relay RSS ≤ 30 MiB at 256 connections | {} | {} |",
            labelled(&at_256, " MiB"),
            verdict(at_256.iter().map(|(_, v)| v.map(|v| v <= 30.0)))
        );
        let idle: Vec<(&str, Option<f64>)> = relay_rows
            .iter()
            .map(|row| (row.process.as_str(), Some(mib(row.idle_fresh.rss_kib))))
            .collect();
        let _ = writeln!(
            out,
            "| relay RSS ≤ 10 MiB idle (fresh) | {} | {} |",
            labelled(&idle, " MiB"),
            verdict(idle.iter().map(|(_, v)| v.map(|v| v <= 10.0)))
        );
        let verified = self
            .samples
            .iter()
            .filter_map(|s| s.verification)
            .chain(self.replay.map(|r| r.verification))
            .all(|v| v.accepted == v.on_broker);
        let _ = writeln!(
            out,
            "| every 202 (and raw Ack) found on the broker, spooled ones after replay | {} | {} |",
            if verified {
                "exact match in every phase"
            } else {
                "MISMATCH (see tables)"
            },
            if verified { "yes" } else { "**no**" }
        );
        out.push('\n');
    }

    /// The relay against the bare relay, and the bare relay against raw and the floor: how
    /// much of each gap is HTTP in front of the broker on this machine, and how much is the
    /// relay's own work. Ratios of medians over paired repeats, as above.
    fn write_breakdown(&self, out: &mut String) {
        out.push_str(
            "#### Where the gaps are (bare relay: hyper + lapin only; not targets)\n\n\
             | layout | accepted/s, bare × raw | accepted/s, relay × bare \
             | CPU/request, bare × floor | CPU/request, relay × bare \
             | p99, bare × raw | p99, relay × bare |\n\
             |---|---|---|--:|--:|--:|--:|\n",
        );
        let bare = System::Bare;
        for &layout in &self.layouts {
            let closed = |systems| {
                self.concurrencies
                    .iter()
                    .map(|&c| fmt_opt(self.throughput_ratio(layout, c, systems), 2))
                    .collect::<Vec<_>>()
                    .join(" / ")
            };
            let _ = writeln!(
                out,
                "| {layout} | {} | {} | {} | {} | {} | {} |",
                closed((bare, System::Raw)),
                closed((System::Relay, bare)),
                fmt_opt(self.cpu_ratio(layout, (bare, System::Floor)), 2),
                fmt_opt(self.cpu_ratio(layout, (System::Relay, bare)), 2),
                fmt_opt(self.p99_ratio(layout, (bare, System::Raw)), 2),
                fmt_opt(self.p99_ratio(layout, (System::Relay, bare)), 2),
            );
        }
        let conns = self
            .concurrencies
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" / ");
        let _ = writeln!(
            out,
            "\nClosed-loop ratios at {conns} connections; CPU and p99 from the open loop at \
             the same rate."
        );
    }

    /// What the history stream costs: the relay with it on against the relay without, in the
    /// same closed loops (`--history`; nothing without it).
    fn write_history(&self, out: &mut String) {
        let on = System::RelayHistory;
        if !self.samples.iter().any(|s| s.system == on) {
            return;
        }
        out.push_str(
            "\n#### The history stream (relay with `history.enabled` ÷ without; not targets)\n\n\
             | layout | conns | accepted/s, on ÷ off | broker CPU s/1k, off → on | on ÷ off \
             | server CPU s/1k, off → on |\n\
             |---|--:|--:|--:|--:|--:|\n",
        );
        for &layout in &self.layouts {
            for &concurrency in &self.concurrencies {
                let mode = Mode::Closed { concurrency };
                let cost = |system, f: fn(&Row) -> Option<f64>| {
                    Row::of(&self.select(Some(layout), system, |m| m == mode)).and_then(|r| f(&r))
                };
                let broker = |system| cost(system, |r| r.broker_cpu_per_1k);
                let server = |system| cost(system, |r| r.server_cpu_per_1k);
                let ratio = broker(on).zip(broker(System::Relay)).map(|(a, b)| a / b);
                let _ = writeln!(
                    out,
                    "| {layout} | {concurrency} | {} | {} → {} | {} | {} → {} |",
                    fmt_opt(
                        self.throughput_ratio(layout, concurrency, (on, System::Relay)),
                        2
                    ),
                    fmt_opt(broker(System::Relay), 3),
                    fmt_opt(broker(on), 3),
                    fmt_opt(ratio, 2),
                    fmt_opt(server(System::Relay), 3),
                    fmt_opt(server(on), 3),
                );
            }
        }
    }

    fn select(
        &self,
        layout: Option<Layout>,
        system: System,
        mode: impl Fn(Mode) -> bool,
    ) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| s.layout == layout && s.system == system && mode(s.mode))
            .collect()
    }

    /// Median over repeats of `system`'s accepted/s ÷ `base`'s, pairing runs of the same
    /// repeat.
    fn throughput_ratio(
        &self,
        layout: Layout,
        concurrency: usize,
        (system, base): (System, System),
    ) -> Option<f64> {
        let mode = Mode::Closed { concurrency };
        self.paired(
            layout,
            base,
            system,
            |m| m == mode,
            |s| Some(s.accepted_per_sec),
        )
    }

    /// Spool-only accepted/s ÷ the median relay accepted/s on `layout` at `concurrency`.
    fn spool_ratio(&self, layout: Layout, concurrency: usize) -> Option<f64> {
        let mode = |m| m == Mode::Closed { concurrency };
        let rate = |samples: Vec<&Sample>| median(samples.iter().map(|s| s.accepted_per_sec));
        let spool = rate(self.select(None, System::Spooling, mode))?;
        let relay = rate(self.select(Some(layout), System::Relay, mode))?;
        (relay > 0.0).then(|| spool / relay)
    }

    /// Median over repeats of `system`'s p99 ÷ `base`'s in the open loop.
    fn p99_ratio(&self, layout: Layout, systems: (System, System)) -> Option<f64> {
        self.latency_ratio(layout, systems, |s| s.latency.p99)
    }

    /// Median over repeats of an open-loop latency of `system` ÷ `base`'s, at the same rate.
    fn latency_ratio(
        &self,
        layout: Layout,
        (system, base): (System, System),
        latency: fn(&Sample) -> f64,
    ) -> Option<f64> {
        self.paired(
            layout,
            base,
            system,
            |m| matches!(m, Mode::Open { .. }),
            |s| Some(latency(s)),
        )
    }

    /// Median over repeats of `system`'s server CPU per request ÷ `base`'s, at the same
    /// open-loop rate.
    fn cpu_ratio(&self, layout: Layout, (system, base): (System, System)) -> Option<f64> {
        let rate = self.open_rate(layout)?;
        let open = |m: Mode| matches!(m, Mode::Open { rate: r } if r == rate);
        let bases = self.select(base.layout_key(layout), base, open);
        let others = self.select(system.layout_key(layout), system, open);
        median(others.iter().filter_map(|o| {
            let b = bases.iter().find(|b| b.repeat == o.repeat)?;
            Some(o.server_cpu_per_1k? / b.server_cpu_per_1k?)
        }))
    }

    fn paired(
        &self,
        layout: Layout,
        base: System,
        system: System,
        mode: impl Fn(Mode) -> bool + Copy,
        value: impl Fn(&Sample) -> Option<f64>,
    ) -> Option<f64> {
        let bases = self.select(Some(layout), base, mode);
        let others = self.select(Some(layout), system, mode);
        median(others.iter().filter_map(|o| {
            let b = bases
                .iter()
                .find(|b| b.repeat == o.repeat && b.mode == o.mode)?;
            Some(value(o)? / value(b)?)
        }))
    }

    fn open_rate(&self, layout: Layout) -> Option<f64> {
        self.samples.iter().find_map(|s| match s.mode {
            Mode::Open { rate } if s.layout == Some(layout) => Some(rate),
            _ => None,
        })
    }
}

/// The comparisons: the relay, against the raw publisher.
/// Issue 19's baseline: what any relay built from hyper and lapin does on the same machine.
const RELAY_VS_BARE: (System, System) = (System::Relay, System::Bare);

/// Medians of one (layout, system, mode) over its repeats.
struct Row {
    accepted_per_sec: f64,
    latency: Latency,
    service: Latency,
    not_accepted: u64,
    server_cpu_per_1k: Option<f64>,
    broker_cpu_per_1k: Option<f64>,
    client_cpu_per_1k: f64,
    cores_busy: f64,
    machine_idle_pct: f64,
    machine_steal_pct: f64,
    verification: String,
}

impl Row {
    fn of(samples: &[&Sample]) -> Option<Row> {
        if samples.is_empty() {
            return None;
        }
        let med = |f: fn(&Sample) -> f64| median(samples.iter().map(|s| f(s))).unwrap_or(0.0);
        let med_opt = |f: fn(&Sample) -> Option<f64>| median(samples.iter().filter_map(|s| f(s)));
        let max = samples
            .iter()
            .map(|s| s.latency.max)
            .fold(0.0_f64, f64::max);
        Some(Row {
            accepted_per_sec: med(|s| s.accepted_per_sec),
            latency: Latency {
                p50: med(|s| s.latency.p50),
                p90: med(|s| s.latency.p90),
                p99: med(|s| s.latency.p99),
                max,
            },
            service: Latency {
                p50: med(|s| s.service.p50),
                p90: med(|s| s.service.p90),
                p99: med(|s| s.service.p99),
                max: samples
                    .iter()
                    .map(|s| s.service.max)
                    .fold(0.0_f64, f64::max),
            },
            not_accepted: samples.iter().map(|s| s.not_accepted).sum(),
            server_cpu_per_1k: med_opt(|s| s.server_cpu_per_1k),
            broker_cpu_per_1k: med_opt(|s| s.broker_cpu_per_1k),
            client_cpu_per_1k: med(|s| s.client_cpu_per_1k),
            cores_busy: med(|s| s.cores_busy),
            machine_idle_pct: med(|s| s.machine_idle_pct),
            machine_steal_pct: med(|s| s.machine_steal_pct),
            verification: verification(samples),
        })
    }

    /// The `p50 | p90 | p99 | max` cells (ms) both loop tables share.
    fn latency_cells(&self) -> String {
        let l = self.latency;
        format!("{:.2} | {:.2} | {:.2} | {:.2}", l.p50, l.p90, l.p99, l.max)
    }

    /// The cells from `non-2xx` to `on broker` that both loop tables end with.
    fn cost_cells(&self) -> String {
        format!(
            "{} | {} | {} | {:.3} | {:.2} | {:.0}/{:.0} | {}",
            self.not_accepted,
            fmt_opt(self.server_cpu_per_1k, 3),
            fmt_opt(self.broker_cpu_per_1k, 3),
            self.client_cpu_per_1k,
            self.cores_busy,
            self.machine_idle_pct,
            self.machine_steal_pct,
            self.verification,
        )
    }
}

fn verification(samples: &[&Sample]) -> String {
    let checks: Vec<Verification> = samples.iter().filter_map(|s| s.verification).collect();
    if checks.is_empty() {
        return "–".to_owned();
    }
    let accepted: u64 = checks.iter().map(|v| v.accepted).sum();
    let on_broker: u64 = checks.iter().map(|v| v.on_broker).sum();
    if checks.iter().all(|v| v.accepted == v.on_broker) {
        format!("all {accepted}")
    } else {
        format!("**MISMATCH** {on_broker} of {accepted}")
    }
}

fn layout_label(layout: Option<Layout>) -> String {
    layout.map_or_else(|| "– (no broker)".to_owned(), |l| l.to_string())
}

fn system_layout_label(system: System, layout: Option<Layout>) -> String {
    match system {
        System::Spooling => "spool, broker unreachable".to_owned(),
        _ => layout_label(layout),
    }
}

fn per_layout(values: &[(Layout, Option<f64>)], unit: &str) -> String {
    values
        .iter()
        .map(|(layout, v)| format!("{}{unit} ({})", fmt_opt(*v, 2), layout.short()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn labelled(values: &[(&str, Option<f64>)], unit: &str) -> String {
    values
        .iter()
        .map(|(label, v)| format!("{}{unit} ({label})", fmt_opt(*v, 1)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// "yes" if every check passed, "**no**" if one failed, "?" if nothing was measured.
fn verdict(checks: impl Iterator<Item = Option<bool>>) -> &'static str {
    let checks: Vec<Option<bool>> = checks.collect();
    if checks.is_empty() || checks.iter().any(Option::is_none) {
        "?"
    } else if checks.iter().all(|c| *c == Some(true)) {
        "yes"
    } else {
        "**no**"
    }
}

fn fmt_opt(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "–".to_owned(), |v| format!("{v:.decimals$}"))
}

pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
