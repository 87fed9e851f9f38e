//! Throughput, latency, CPU and memory of the relay, as ratios of what the broker itself can
//! do on the same machine in the same run. See BENCHMARKS.md for how to read the results.
//!
//! `cargo run --release -p loadtest` (add `-- --quick` for a short smoke run, `-- --help`
//! for the knobs); it builds the relay's release binary first. It needs the RabbitMQ broker
//! the tests use (127.0.0.1:5672, guest/guest).
//!
//! # What runs
//! - **relay**: the `hirehop-relay` binary as a child process (`RELAY_*` variables, its own
//!   exchange and spool directory, no per-request log line), loaded over HTTP/1.1 by a hyper
//!   client with one keep-alive connection per worker.
//! - **raw**: the baseline, a lapin publisher in this process sending the same bodies straight
//!   to the broker, asking for the relay's default `frame_max`: persistent, `mandatory`,
//!   waiting for each confirm, over as many channels as the relay, with as many messages in
//!   flight as the relay gets connections, to an exchange and queues of the same layout.
//! - **floor**: a plain hyper server answering 202 without a broker (this binary re-executed
//!   with `--floor-server`, with an empty environment like the relay): the cost of HTTP alone.
//! - **bare relay**: the floor plus the raw publisher's publish-and-confirm per request (this
//!   binary re-executed with `--bare-server`), and nothing else: what any relay built from
//!   hyper and lapin achieves here, so that the relay's own cost can be told from the cost of
//!   putting HTTP in front of the broker on this machine.
//!
//! # How
//! For each queue layout (one queue bound with `#`; one queue per event name) and each
//! repeat, raw, relay and bare relay run back to back (order rotating) in a closed loop at
//! each concurrency; then, at half the layout's raw ceiling, all four run in an open
//! loop (latency from the intended send time). Every phase warms up, then measures a window:
//! accepted per second, latency percentiles (HDR histogram), CPU seconds of the server,
//! the broker and this process per 1,000 accepted (from `/proc/<pid>/stat`), and the server's
//! RSS. After each phase the bench counts the messages in the queues (exact: nothing consumes
//! them and every confirm is in) against the 202s (or Acks), then purges them. Last, the
//! relay runs with its broker unreachable (every 202 is a spool append), and a second relay
//! replays that spool to the broker, where every spooled webhook is counted.
//!
//! The report is printed as markdown and written to `target/bench-results.md`. A benchmark is
//! not a test: nothing here asserts on timing; the targets are evaluated in the report.

#![forbid(unsafe_code)]

mod broker;
mod cpus;
mod http_client;
mod load;
mod machine;
mod payload;
mod procs;
mod raw_publisher;
mod relay;
mod report;
mod server_process;
mod servers;
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use tokio::process::Command;

use crate::broker::{Broker, Layout, QueueType, Queues};
use crate::http_client::{HttpClient, Target};
use crate::load::Client;
use crate::payload::Webhook;
use crate::procs::{CpuClock, MachineCpu, Memory};
use crate::raw_publisher::{RawProperties, RawPublisher};
use crate::relay::{Relay, RelaySettings, RelaySpec, SpoolDir, WEBHOOK_PATH};
use crate::report::{MemoryRow, Mode, Replay, Report, Sample, Setup, System, Verification};
use crate::server_process::ServerProcess;
use crate::stats::{Tally, Window, median};

/// Distinct bodies sent in rotation.
const DISTINCT_BODIES: usize = 64;
/// The relay's lifecycle lines (`listening addr=...` is how the bench learns the port, and
/// spool or broker trouble shows up in the progress lines), but not its one `info` line per
/// webhook, which would cost more than some of what is measured.
const DEFAULT_RELAY_LOG: &str = "warn,hirehop_relay=info,hirehop_relay::webhook=warn";
/// Time for a fresh or just unloaded process to settle before its idle memory is read.
const SETTLE: Duration = Duration::from_secs(1);
/// Longest measured window of a spool-mode phase: it spools faster than the broker takes,
/// and all of it is replayed (and counted) afterwards.
const SPOOL_WINDOW: Duration = Duration::from_secs(2);
/// Pause between phases, so the tail of one does not overlap the next.
const PAUSE: Duration = Duration::from_millis(300);

/// Load generator and baseline for hirehop-relay (see BENCHMARKS.md).
#[derive(Parser, Debug)]
#[command(name = "loadtest")]
struct Args {
    /// Short smoke run (a minute or two): one repeat, 1.5 s phases.
    #[arg(long)]
    quick: bool,
    /// Measured seconds per phase [default: 4; with --quick: 1.5]. Spool-mode phases measure
    /// at most 2 s: everything they spool is replayed afterwards.
    #[arg(long)]
    duration_secs: Option<f64>,
    /// Warm-up seconds before each measured window [default: 1; with --quick: 0.5].
    #[arg(long)]
    warmup_secs: Option<f64>,
    /// Repeats of every comparison, interleaved; medians are reported [default: 3; with
    /// --quick: 1].
    #[arg(long)]
    repeats: Option<usize>,
    /// Closed-loop concurrencies: HTTP connections, and the raw publisher's in-flight window.
    #[arg(long, value_delimiter = ',', default_values_t = [64, 256])]
    concurrency: Vec<usize>,
    /// Open-loop rate, as a fraction of the layout's raw ceiling (best raw msg/s).
    #[arg(long, default_value_t = 0.5)]
    open_fraction: f64,
    /// Connections (raw: concurrent publishers) that share the open-loop rate.
    #[arg(long, default_value_t = 64)]
    open_connections: usize,
    /// Type of the layouts' queues: `classic`, or `quorum` (replicated over the nodes of a
    /// cluster; see BENCHMARKS.md for a run on a local three-node cluster).
    #[arg(long, value_enum, default_value_t = QueueType::Classic)]
    queue_type: QueueType,
    /// The broker's processes, whose CPU time is the broker's (e.g. every node of a cluster),
    /// comma-separated [default: the RabbitMQ `beam.smp` found on this machine].
    #[arg(long, value_delimiter = ',', value_name = "PIDS")]
    broker_pids: Vec<u32>,
    /// Also run, in each layout's closed loops, a relay with the history stream on
    /// (`history.enabled`, the relay's default; the other relays run without it), to measure
    /// what the stream costs: throughput and broker CPU per message.
    #[arg(long)]
    history: bool,
    /// Properties of the raw publisher's and the bare relay's messages: `minimal`
    /// (persistent, content type) or `relay` (the relay's properties and headers, to see what
    /// they cost the broker).
    #[arg(long, value_enum, default_value_t = RawProperties::Minimal)]
    raw_properties: RawProperties,
    /// Pin every thread of the broker (its `beam.smp` process, which must run on this machine)
    /// to these CPUs for the run, e.g. `1`; its affinity is restored at the end. Needs --cpus.
    #[arg(long, requires = "cpus", value_name = "LIST")]
    broker_cpus: Option<String>,
    /// Pin this bench (load generator, raw publisher) and the relay and floor servers it
    /// starts to these CPUs, e.g. `0`. Needs --broker-cpus.
    #[arg(long, requires = "broker_cpus", value_name = "LIST")]
    cpus: Option<String>,
    /// AMQP channels of the relay and of the raw publisher.
    #[arg(long, default_value_t = 4)]
    channels: usize,
    /// Size of each webhook body in bytes.
    #[arg(long, default_value_t = 1500)]
    body_bytes: usize,
    /// The broker.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    /// RUST_LOG of the relay; must keep its `listening` line (target `hirehop_relay`) on.
    #[arg(long, default_value = DEFAULT_RELAY_LOG)]
    relay_log: String,
    /// Where the markdown report is written.
    #[arg(long, default_value = "target/bench-results.md")]
    out: PathBuf,
    /// The relay binary to measure [default: the release build of this workspace, built
    /// first with cargo].
    #[arg(long, value_name = "PATH")]
    relay_bin: Option<PathBuf>,
    /// Run as the plain hyper floor server (used by the bench itself).
    #[arg(long, hide = true)]
    floor_server: bool,
    /// Run as the bare relay, publishing to this exchange (used by the bench itself).
    #[arg(long, hide = true, value_name = "EXCHANGE")]
    bare_server: Option<String>,
}

/// The run, with the `--quick` defaults applied.
#[derive(Debug, Clone)]
struct Plan {
    warmup: Duration,
    duration: Duration,
    repeats: usize,
    concurrencies: Vec<usize>,
    open_fraction: f64,
    open_connections: usize,
    raw_properties: RawProperties,
    queue_type: QueueType,
    broker_pids: Vec<u32>,
    history: bool,
    channels: usize,
    body_bytes: usize,
    amqp_url: String,
    relay_log: String,
    out: PathBuf,
    /// The relay binary.
    relay_bin: PathBuf,
    /// `(broker CPUs, everything else's CPUs)`, when the run splits them.
    cpu_split: Option<(String, String)>,
}

impl Plan {
    fn new(args: Args) -> anyhow::Result<Plan> {
        let (duration, warmup, repeats) = if args.quick {
            (1.5, 0.5, 1)
        } else {
            (4.0, 1.0, 3)
        };
        let secs = |value: Option<f64>, default: f64, name: &str| {
            let value = value.unwrap_or(default);
            Duration::try_from_secs_f64(value).with_context(|| format!("invalid --{name}"))
        };
        let plan = Plan {
            duration: secs(args.duration_secs, duration, "duration-secs")?,
            warmup: secs(args.warmup_secs, warmup, "warmup-secs")?,
            repeats: args.repeats.unwrap_or(repeats),
            concurrencies: args.concurrency,
            open_fraction: args.open_fraction,
            open_connections: args.open_connections,
            raw_properties: args.raw_properties,
            queue_type: args.queue_type,
            broker_pids: args.broker_pids,
            history: args.history,
            channels: args.channels,
            body_bytes: args.body_bytes,
            amqp_url: args.amqp_url,
            relay_log: args.relay_log,
            out: args.out,
            relay_bin: match args.relay_bin {
                Some(path) => path,
                None => build_relay()?,
            },
            cpu_split: args.broker_cpus.zip(args.cpus),
        };
        anyhow::ensure!(!plan.duration.is_zero(), "--duration-secs must be above 0");
        anyhow::ensure!(plan.repeats > 0, "--repeats must be at least 1");
        anyhow::ensure!(
            !plan.concurrencies.is_empty() && !plan.concurrencies.contains(&0),
            "--concurrency must list numbers above 0"
        );
        anyhow::ensure!(
            plan.open_fraction > 0.0 && plan.open_connections > 0,
            "--open-fraction and --open-connections must be above 0"
        );
        anyhow::ensure!(plan.channels > 0, "--channels must be at least 1");
        Ok(plan)
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = if args.floor_server {
        servers::serve(None)
    } else if let Some(exchange) = args.bare_server {
        servers::serve(Some(servers::Bare {
            webhooks: bench_webhooks(args.body_bytes),
            amqp_url: args.amqp_url,
            exchange,
            channels: args.channels,
            properties: args.raw_properties,
        }))
    } else {
        Plan::new(args).and_then(|plan| {
            // Before the runtime starts its threads, so that they (and every process started
            // later) inherit it.
            if let Some((_, cpus)) = &plan.cpu_split {
                cpus::pin_self(cpus)?;
            }
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("failed to start the async runtime")?
                .block_on(run(plan))
        })
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("loadtest: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(plan: Plan) -> anyhow::Result<()> {
    let out = plan.out.clone();
    // On Ctrl-C the bench is dropped: its servers are killed and the broker's CPUs restored.
    let report = tokio::select! {
        report = async { Bench::new(plan).await?.run().await } => report?,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
    };
    let markdown = report.markdown();
    println!("\n{markdown}");
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
    }
    std::fs::write(&out, markdown).with_context(|| format!("failed to write {}", out.display()))?;
    eprintln!("report written to {}", out.display());
    Ok(())
}

/// Who takes the load.
#[derive(Clone, Copy)]
enum Via<'a> {
    Raw(&'a RawPublisher),
    Relay(&'a Relay),
    /// The floor, or the bare relay.
    Server(&'a ServerProcess),
}

impl<'a> Via<'a> {
    /// The process whose CPU and memory are read, if it is not the bench itself.
    fn server(self) -> Option<&'a ServerProcess> {
        match self {
            Via::Raw(_) => None,
            Via::Relay(relay) => Some(&relay.process),
            Via::Server(server) => Some(server),
        }
    }
}

/// What a phase loads, and where its messages must show up.
#[derive(Clone, Copy)]
struct Subject<'a> {
    system: System,
    layout: Option<Layout>,
    via: Via<'a>,
    /// Counted against the accepted webhooks after the phase, then purged.
    queues: Option<&'a Queues>,
}

/// CPU seconds used so far by the processes of a phase.
#[derive(Debug, Clone, Copy)]
struct CpuSnapshot {
    server: Option<f64>,
    broker: Option<f64>,
    client: f64,
    machine: MachineCpu,
}

/// What was read from `/proc` over a measured window.
struct Usage {
    window: Window,
    before: CpuSnapshot,
    after: CpuSnapshot,
    server_rss_kib: Option<u64>,
}

struct Bench {
    plan: Plan,
    relay_settings: RelaySettings,
    broker: Broker,
    clock: CpuClock,
    /// The broker's processes, summed; empty if none was found.
    broker_pids: Vec<u32>,
    /// Held for the whole run: dropping it gives the broker its CPUs back.
    _broker_pin: Option<cpus::BrokerPin>,
    webhooks: Arc<[Webhook]>,
    run_id: String,
    samples: Vec<Sample>,
    memory: Vec<MemoryRow>,
    replay: Option<Replay>,
    phases: usize,
}

impl Bench {
    async fn new(plan: Plan) -> anyhow::Result<Bench> {
        let broker = Broker::connect(&plan.amqp_url, plan.queue_type).await?;
        let webhooks = bench_webhooks(plan.body_bytes).into();
        // Short, unique, and sorts by time like the relay's own ids.
        let run_id = uuid::Uuid::now_v7().simple().to_string()[..12].to_owned();
        let broker_pids = match plan.broker_pids.as_slice() {
            [] => procs::find_broker_pid().into_iter().collect(),
            pids => pids.to_vec(),
        };
        let broker_pin = match (&plan.cpu_split, broker_pids.as_slice()) {
            (None, _) => None,
            (Some((broker_cpus, _)), [pid]) => Some(cpus::BrokerPin::set(*pid, broker_cpus)?),
            (Some(_), [_, _, ..]) => anyhow::bail!("--broker-cpus pins one broker process"),
            (Some(_), []) => anyhow::bail!(
                "--broker-cpus needs the broker on this machine, and no RabbitMQ beam.smp \
                 process was found"
            ),
        };
        Ok(Bench {
            relay_settings: RelaySettings {
                binary: plan.relay_bin.clone(),
                channels: plan.channels,
                rust_log: plan.relay_log.clone(),
            },
            plan,
            broker,
            clock: CpuClock::detect(),
            broker_pids,
            _broker_pin: broker_pin,
            webhooks,
            run_id,
            samples: Vec::new(),
            memory: Vec::new(),
            replay: None,
            phases: 0,
        })
    }

    async fn run(mut self) -> anyhow::Result<Report> {
        let setup = self.setup().await;
        let floor = own_server("floor server", &["--floor-server"]).await?;
        tokio::time::sleep(SETTLE).await;
        let floor_fresh = floor.memory()?;
        for (i, layout) in Layout::ALL.into_iter().enumerate() {
            self.layout(layout, &floor, i == 0).await?;
        }
        tokio::time::sleep(SETTLE).await;
        let row = self.memory_row("hyper floor", None, System::Floor, floor_fresh, &floor)?;
        self.memory.push(row);
        floor.stop().await;
        self.spool_mode().await?;
        Ok(Report {
            setup,
            samples: self.samples,
            memory: self.memory,
            replay: self.replay,
            layouts: Layout::ALL.to_vec(),
            concurrencies: self.plan.concurrencies.clone(),
        })
    }

    async fn setup(&self) -> Setup {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let mut command = "cargo run --release -p loadtest".to_owned();
        if !args.is_empty() {
            command = format!("{command} -- {}", args.join(" "));
        }
        Setup {
            date: machine::date(),
            machine: machine::describe(),
            os: machine::os(),
            rustc: machine::rustc(),
            rabbitmq: machine::rabbitmq().await,
            command,
            warmup: self.plan.warmup,
            duration: self.plan.duration,
            repeats: self.plan.repeats,
            body_bytes: self.webhooks.first().map_or(0, |w| w.body.len()),
            channels: self.plan.channels,
            open_connections: self.plan.open_connections,
            open_fraction: self.plan.open_fraction,
            raw_properties: format!("{:?}", self.plan.raw_properties).to_lowercase(),
            relay_log: self.plan.relay_log.clone(),
            clock: self.clock,
            broker_processes: self.broker_pids.len(),
            queue_type: self.plan.queue_type,
            cpu_split: self.plan.cpu_split.clone(),
        }
    }

    fn name(&self, what: &str) -> String {
        format!("bench-{}-{what}", self.run_id)
    }

    /// All phases of one layout; its exchanges and queues are deleted whatever happens.
    async fn layout(
        &mut self,
        layout: Layout,
        floor: &ServerProcess,
        with_floor_closed: bool,
    ) -> anyhow::Result<()> {
        let raw_queues = Queues::new(&self.name(&format!("raw-{}", layout.short())), layout);
        let relay_queues = Queues::new(&self.name(&format!("relay-{}", layout.short())), layout);
        let bare_queues = Queues::new(&self.name(&format!("bare-{}", layout.short())), layout);
        let mut history_queues =
            Queues::new(&self.name(&format!("hist-{}", layout.short())), layout);
        history_queues.history = true;
        let queues = LayoutQueues {
            raw: &raw_queues,
            relay: &relay_queues,
            bare: &bare_queues,
            history: &history_queues,
        };
        let result = self
            .layout_processes(layout, &queues, floor, with_floor_closed)
            .await;
        for queues in [&raw_queues, &relay_queues, &bare_queues, &history_queues] {
            self.broker.delete(queues).await;
        }
        result
    }

    async fn layout_processes(
        &mut self,
        layout: Layout,
        queues: &LayoutQueues<'_>,
        floor: &ServerProcess,
        with_floor_closed: bool,
    ) -> anyhow::Result<()> {
        let LayoutQueues {
            raw: raw_queues,
            relay: relay_queues,
            bare: bare_queues,
            history: history_queues,
        } = *queues;
        for queues in [raw_queues, bare_queues] {
            let plan = &self.plan;
            relay::declare_topology(&plan.relay_bin, &plan.amqp_url, &queues.exchange, false)
                .await?;
            self.broker.declare_queues(queues).await?;
        }
        let raw = RawPublisher::connect(
            "hirehop-relay bench raw",
            &self.plan.amqp_url,
            &raw_queues.exchange,
            self.plan.channels,
            self.plan.raw_properties,
        )
        .await?;
        let spool = SpoolDir::new(&relay_queues.exchange);
        let relay = self.relay_on_broker("relay", relay_queues, &spool).await?;
        let bare = self.bare_relay(&bare_queues.exchange).await?;
        let history_spool = SpoolDir::new(&history_queues.exchange);
        let history = match self.plan.history {
            true => Some(
                self.relay_on_broker("relay, history on", history_queues, &history_spool)
                    .await?,
            ),
            false => None,
        };
        let subjects = Subjects {
            raw: Subject {
                system: System::Raw,
                layout: Some(layout),
                via: Via::Raw(&raw),
                queues: Some(raw_queues),
            },
            relay: Subject {
                system: System::Relay,
                layout: Some(layout),
                via: Via::Relay(&relay),
                queues: Some(relay_queues),
            },
            bare: Subject {
                system: System::Bare,
                layout: Some(layout),
                via: Via::Server(&bare),
                queues: Some(bare_queues),
            },
            floor: Subject {
                system: System::Floor,
                layout: None,
                via: Via::Server(floor),
                queues: None,
            },
            history: history.as_ref().map(|relay| Subject {
                system: System::RelayHistory,
                layout: Some(layout),
                via: Via::Relay(relay),
                queues: Some(history_queues),
            }),
        };
        let result = self.compare(layout, &subjects, with_floor_closed).await;
        raw.close().await;
        relay.stop().await;
        bare.stop().await;
        if let Some(history) = history {
            history.stop().await;
        }
        result
    }

    /// The bare relay (see `servers.rs`), publishing to `exchange` as the raw publisher does.
    async fn bare_relay(&self, exchange: &str) -> anyhow::Result<ServerProcess> {
        let plan = &self.plan;
        let properties = plan
            .raw_properties
            .to_possible_value()
            .context("every --raw-properties value has a name")?;
        let (channels, body_bytes) = (plan.channels.to_string(), plan.body_bytes.to_string());
        own_server(
            "bare relay",
            &[
                "--bare-server",
                exchange,
                "--amqp-url",
                &plan.amqp_url,
                "--channels",
                &channels,
                "--body-bytes",
                &body_bytes,
                "--raw-properties",
                properties.get_name(),
            ],
        )
        .await
    }

    /// Closed loops (raw, relay and bare relay, and the floor), then open loops at half the
    /// ceiling.
    async fn compare(
        &mut self,
        layout: Layout,
        subjects: &Subjects<'_>,
        with_floor_closed: bool,
    ) -> anyhow::Result<()> {
        let relay = subjects
            .relay
            .via
            .server()
            .context("the relay is a process")?;
        tokio::time::sleep(SETTLE).await;
        let relay_fresh = relay.memory()?;

        for repeat in 0..self.plan.repeats {
            for concurrency in self.plan.concurrencies.clone() {
                let load = Mode::Closed { concurrency };
                if with_floor_closed {
                    // The floor has no broker: once, in the first layout, is enough.
                    self.phase(subjects.floor, load, repeat).await?;
                }
                let mut order = vec![subjects.raw, subjects.relay, subjects.bare];
                order.extend(subjects.history);
                let n = order.len();
                order.rotate_left(repeat % n);
                for subject in order {
                    self.phase(subject, load, repeat).await?;
                }
            }
        }

        let ceiling = self
            .ceiling(layout)
            .context("no raw publisher throughput was measured")?;
        let load = Mode::Open {
            rate: (ceiling * self.plan.open_fraction).round().max(1.0),
        };
        for repeat in 0..self.plan.repeats {
            let mut order = [subjects.raw, subjects.relay, subjects.bare, subjects.floor];
            order.rotate_left(repeat % 4);
            for subject in order {
                self.phase(subject, load, repeat).await?;
            }
        }

        tokio::time::sleep(SETTLE).await;
        let process = format!("relay, {layout}");
        let row = self.memory_row(&process, Some(layout), System::Relay, relay_fresh, relay)?;
        self.memory.push(row);
        Ok(())
    }

    /// The relay with its broker unreachable (all into the spool), then a relay with the real
    /// broker replaying that spool, to check every 202 arrives.
    async fn spool_mode(&mut self) -> anyhow::Result<()> {
        let queues = Queues::new(&self.name("spool"), Layout::OneQueue);
        let spool = SpoolDir::new(&queues.exchange);
        let result = self.spool_phases(&queues, &spool).await;
        self.broker.delete(&queues).await;
        result
    }

    async fn spool_phases(&mut self, queues: &Queues, spool: &SpoolDir) -> anyhow::Result<()> {
        let unreachable = unreachable_broker_url()?;
        let relay = Relay::start(
            &self.relay_settings,
            RelaySpec {
                name: "relay (spool only)",
                amqp_url: &unreachable,
                exchange: &queues.exchange,
                spool,
                history: false,
            },
        )
        .await?;
        tokio::time::sleep(SETTLE).await;
        let fresh = relay.process.memory()?;
        let subject = Subject {
            system: System::Spooling,
            layout: None,
            via: Via::Relay(&relay),
            queues: None,
        };
        let first = self.samples.len();
        // Once per concurrency: there is no baseline to pair with, and the spool grows.
        for concurrency in self.plan.concurrencies.clone() {
            self.phase(subject, Mode::Closed { concurrency }, 0).await?;
        }
        let spooled: u64 = self.samples[first..].iter().map(|s| s.accepted_total).sum();
        tokio::time::sleep(SETTLE).await;
        let row = self.memory_row(
            "relay, spool only",
            None,
            System::Spooling,
            fresh,
            &relay.process,
        )?;
        self.memory.push(row);
        relay.stop().await;

        let started = Instant::now();
        let replaying = self
            .relay_on_broker("relay (replaying the spool)", queues, spool)
            .await?;
        let drained = replaying.wait_spool_drained().await;
        let secs = started.elapsed().as_secs_f64();
        let on_broker = self.broker.count(queues).await?;
        replaying.stop().await;
        drained?;
        self.replay = Some(Replay {
            verification: Verification {
                accepted: spooled,
                on_broker,
            },
            secs,
        });
        eprintln!(
            "     replay: {on_broker} of {spooled} spooled webhooks on the broker after {secs:.1} s"
        );
        Ok(())
    }

    /// Starts a relay on the real broker, publishing to `queues.exchange`, and binds `queues`
    /// once it is connected (connected means it declared its exchange). Anything it publishes
    /// before (a replay) lands in `<exchange>.unrouted`, which is counted too.
    async fn relay_on_broker(
        &self,
        name: &'static str,
        queues: &Queues,
        spool: &SpoolDir,
    ) -> anyhow::Result<Relay> {
        let spec = RelaySpec {
            name,
            amqp_url: &self.plan.amqp_url,
            exchange: &queues.exchange,
            spool,
            history: queues.history,
        };
        let relay = Relay::start(&self.relay_settings, spec).await?;
        relay.wait_connected().await?;
        self.broker.declare_queues(queues).await?;
        Ok(relay)
    }

    /// The best median raw msg/s over the closed-loop concurrencies of `layout`.
    fn ceiling(&self, layout: Layout) -> Option<f64> {
        self.plan
            .concurrencies
            .iter()
            .filter_map(|&concurrency| {
                median(
                    self.samples
                        .iter()
                        .filter(|s| {
                            s.layout == Some(layout)
                                && s.system == System::Raw
                                && s.mode == Mode::Closed { concurrency }
                        })
                        .map(|s| s.accepted_per_sec),
                )
            })
            .max_by(f64::total_cmp)
    }

    /// The memory row of `server`, idle now, from its samples (`layout`, `system`): RSS at the
    /// end of closed-loop windows, max over repeats, per concurrency; and the peak, the larger
    /// of `VmHWM` and every RSS read (the kernel updates `VmHWM` lazily, so it can lag).
    fn memory_row(
        &self,
        process: &str,
        layout: Option<Layout>,
        system: System,
        idle_fresh: Memory,
        server: &ServerProcess,
    ) -> anyhow::Result<MemoryRow> {
        let idle_after = server.memory()?;
        let samples = || {
            self.samples
                .iter()
                .filter(move |s| s.layout == layout && s.system == system)
        };
        let under_load = self
            .plan
            .concurrencies
            .iter()
            .filter_map(|&concurrency| {
                samples()
                    .filter(|s| s.mode == Mode::Closed { concurrency })
                    .filter_map(|s| s.server_rss_kib)
                    .max()
                    .map(|kib| (concurrency, kib))
            })
            .collect();
        let peak_kib = samples()
            .filter_map(|s| s.server_rss_kib)
            .chain([idle_after.hwm_kib, idle_after.rss_kib, idle_fresh.rss_kib])
            .max()
            .unwrap_or_default();
        Ok(MemoryRow {
            process: process.to_owned(),
            idle_fresh,
            under_load,
            peak_kib,
            idle_after,
        })
    }

    /// Opens the clients `subject` needs for `load` (before the clock starts) and runs it.
    async fn phase(
        &mut self,
        subject: Subject<'_>,
        load: Mode,
        repeat: usize,
    ) -> anyhow::Result<()> {
        let workers = match load {
            Mode::Closed { concurrency } => concurrency,
            Mode::Open { .. } => self.plan.open_connections,
        };
        match subject.via {
            Via::Raw(raw) => {
                self.measure(subject, raw.clients(workers), load, repeat)
                    .await
            }
            Via::Relay(Relay { process: server }) | Via::Server(server) => {
                let target = Target {
                    addr: server.addr,
                    path: WEBHOOK_PATH.to_owned(),
                };
                let clients = HttpClient::connect_many(&target, workers).await?;
                self.measure(subject, clients, load, repeat).await
            }
        }
    }

    /// One warm-up and measured window; then verification against the broker and a purge.
    async fn measure<C: Client>(
        &mut self,
        subject: Subject<'_>,
        clients: Vec<C>,
        load: Mode,
        repeat: usize,
    ) -> anyhow::Result<()> {
        let duration = match subject.system {
            System::Spooling => self.plan.duration.min(SPOOL_WINDOW),
            _ => self.plan.duration,
        };
        let log_mark = subject.via.server().map(ServerProcess::log_mark);
        let window = Window::after_warmup(self.plan.warmup, duration);
        let webhooks = Arc::clone(&self.webhooks);
        let rate = match load {
            Mode::Closed { .. } => None,
            Mode::Open { rate } => Some(rate),
        };
        let traffic = load::run(clients, webhooks, rate, window);
        let (tally, usage) = tokio::join!(traffic, self.usage(subject.via.server(), window));
        let usage = usage?;
        let verification = match subject.queues {
            Some(queues) => Some(self.verify(subject, queues, &tally).await?),
            None => None,
        };
        let sample = sample(subject, load, repeat, &tally, &usage, verification);
        self.phases += 1;
        self.progress(&sample, &tally, subject, log_mark);
        self.samples.push(sample);
        tokio::time::sleep(PAUSE).await;
        Ok(())
    }

    /// Counts what reached `queues` against what was accepted, then empties them.
    async fn verify(
        &self,
        subject: Subject<'_>,
        queues: &Queues,
        tally: &Tally,
    ) -> anyhow::Result<Verification> {
        if let Via::Relay(relay) = subject.via {
            // A webhook the broker failed to confirm in time is spooled and replayed: it
            // counts once the spool is empty again.
            let spooled = relay.spooled().await?;
            if spooled > 0 {
                eprintln!("     {spooled} webhooks went to the spool; waiting for the replay");
                relay.wait_spool_drained().await?;
            }
        }
        let on_broker = self.broker.count(queues).await?;
        self.broker.purge(queues).await?;
        Ok(Verification {
            accepted: tally.accepted_total,
            on_broker,
        })
    }

    /// CPU times at the window's start and end, and the server's RSS at its end.
    async fn usage(&self, server: Option<&ServerProcess>, window: Window) -> anyhow::Result<Usage> {
        let pid = server.map(|s| s.pid);
        tokio::time::sleep_until(window.start.into()).await;
        let before = self.cpu(pid)?;
        tokio::time::sleep_until(window.end.into()).await;
        let after = self.cpu(pid)?;
        let server_rss_kib = server.map(|s| s.memory()).transpose()?.map(|m| m.rss_kib);
        Ok(Usage {
            window,
            before,
            after,
            server_rss_kib,
        })
    }

    fn cpu(&self, server: Option<u32>) -> anyhow::Result<CpuSnapshot> {
        Ok(CpuSnapshot {
            server: server.map(|pid| self.clock.cpu_secs(pid)).transpose()?,
            // The broker is not ours: if it cannot be read, the column stays empty.
            broker: (!self.broker_pids.is_empty())
                .then(|| {
                    let secs = self.broker_pids.iter().map(|&pid| self.clock.cpu_secs(pid));
                    secs.sum::<anyhow::Result<f64>>().ok()
                })
                .flatten(),
            client: self.clock.cpu_secs(std::process::id())?,
            machine: MachineCpu::read()?,
        })
    }

    /// One line per phase on stderr, and the evidence when something was not accepted.
    fn progress(
        &self,
        sample: &Sample,
        tally: &Tally,
        subject: Subject<'_>,
        log_mark: Option<u64>,
    ) {
        let layout = sample.layout.map_or("--", Layout::short);
        let load = match sample.mode {
            Mode::Closed { concurrency } => format!("closed {concurrency:>3} conns"),
            Mode::Open { rate } => format!("open {rate:.0}/s"),
        };
        let system = match sample.system {
            System::Raw => "raw  ",
            System::Relay => "relay",
            System::Bare => "bare ",
            System::Floor => "floor",
            System::Spooling => "spool",
            System::RelayHistory => "hist ",
        };
        let cpu = sample
            .server_cpu_per_1k
            .map_or_else(String::new, |c| format!(", server CPU {c:.3} s/1k"));
        let verified = sample.verification.map_or_else(String::new, |v| {
            format!(", on broker {}/{}", v.on_broker, v.accepted)
        });
        eprintln!(
            "[{:>2}] {layout} {system} {load} #{}: {:>6.0}/s, p99 {:.2} ms{cpu}, \
             {:.2} cores busy, idle {:.0}%, steal {:.0}%{verified}",
            self.phases,
            sample.repeat + 1,
            sample.accepted_per_sec,
            sample.latency.p99,
            sample.cores_busy,
            sample.machine_idle_pct,
            sample.machine_steal_pct,
        );
        if tally.not_accepted() > 0 {
            eprintln!(
                "     not accepted: {:?}, {} without answer (last: {})",
                tally.rejected,
                tally.failed,
                tally.last_failure.as_deref().unwrap_or("-")
            );
            if let Some(server) = subject.via.server() {
                eprintln!("     {} log:\n{}", server.name, server.recent_log());
            }
        } else if let (Some(server), Some(mark)) = (subject.via.server(), log_mark) {
            // The relay logs at warn and above: anything it said during the phase matters.
            for line in server.logged_since(mark).iter().take(5) {
                eprintln!("     {}: {line}", server.name);
            }
        }
    }
}

/// One phase's numbers, per 1,000 accepted where it is a cost.
fn sample(
    subject: Subject<'_>,
    load: Mode,
    repeat: usize,
    tally: &Tally,
    usage: &Usage,
    verification: Option<Verification>,
) -> Sample {
    let accepted = tally.accepted_in_window;
    let per_1k = |secs: f64| (accepted > 0).then(|| secs * 1000.0 / accepted as f64);
    let (before, after) = (usage.before, usage.after);
    let used = |b: Option<f64>, a: Option<f64>| Some(a? - b?);
    let server = used(before.server, after.server);
    let broker = used(before.broker, after.broker);
    let client = after.client - before.client;
    let (machine_idle_pct, machine_steal_pct) = before.machine.shares_until(&after.machine);
    Sample {
        layout: subject.layout,
        system: subject.system,
        mode: load,
        repeat,
        accepted_per_sec: accepted as f64 / usage.window.secs(),
        accepted_total: tally.accepted_total,
        latency: tally.latency(),
        service: tally.service_time(),
        not_accepted: tally.not_accepted(),
        server_cpu_per_1k: server.and_then(per_1k),
        broker_cpu_per_1k: broker.and_then(per_1k),
        client_cpu_per_1k: per_1k(client).unwrap_or(f64::NAN),
        cores_busy: (server.unwrap_or(0.0) + broker.unwrap_or(0.0) + client) / usage.window.secs(),
        machine_idle_pct,
        machine_steal_pct,
        server_rss_kib: usage.server_rss_kib,
        verification,
    }
}

/// The systems one layout compares.
struct Subjects<'a> {
    raw: Subject<'a>,
    relay: Subject<'a>,
    bare: Subject<'a>,
    floor: Subject<'a>,
    /// The relay with the history stream on, with `--history`.
    history: Option<Subject<'a>>,
}

/// The queues of one layout, one set per system that publishes.
#[derive(Clone, Copy)]
struct LayoutQueues<'a> {
    raw: &'a Queues,
    relay: &'a Queues,
    bare: &'a Queues,
    history: &'a Queues,
}

/// This bench binary re-executed with `args` as one of its own servers (the floor, the bare
/// relay), with the same (empty) environment as the relay's.
async fn own_server(name: &'static str, args: &[&str]) -> anyhow::Result<ServerProcess> {
    let exe = std::env::current_exe().context("cannot find the bench binary")?;
    let mut command = Command::new(exe);
    command.args(args).env_clear();
    ServerProcess::spawn(name, command).await
}

/// The webhooks the bench sends, and the bare relay looks bodies up in.
fn bench_webhooks(body_bytes: usize) -> Vec<Webhook> {
    payload::webhooks(relay::KEY, DISTINCT_BODIES, body_bytes)
}

/// Builds the relay's release binary with the cargo that runs this tool, and returns its path
/// (the workspace's `target/release/`, beside this tool's own directory).
fn build_relay() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO")
        .context("run through `cargo run --release -p loadtest`, or pass --relay-bin")?;
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.toml");
    eprintln!("building the relay: cargo build --release -p hirehop-relay");
    let status = std::process::Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "hirehop-relay",
            "--manifest-path",
            manifest,
        ])
        .status()
        .context("failed to run cargo")?;
    anyhow::ensure!(status.success(), "building the relay failed");
    let exe = std::env::current_exe().context("cannot find the loadtest binary")?;
    let target = exe
        .parent()
        .and_then(|profile| profile.parent())
        .context("the loadtest binary is not in a cargo target directory")?;
    Ok(target.join("release").join("hirehop-relay"))
}

/// The broker URL with a port nothing listens on (bound, then released), so connecting is
/// refused at once.
fn unreachable_broker_url() -> anyhow::Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .context("failed to find a free port for the unreachable broker")?;
    let port = listener.local_addr()?.port();
    drop(listener);
    Ok(format!("amqp://guest:guest@127.0.0.1:{port}/%2f"))
}
