//! The process edge: command line, logging, configuration, signals; then
//! [`hirehop_relay::run`], or one of the tools.

#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use clap::{Parser, Subcommand};
use hirehop_relay::amqp::history::{Filter, Start, point_in_time};
use hirehop_relay::amqp::replay::{self, Target};
use hirehop_relay::amqp::requeue;
use hirehop_relay::amqp::tail::tail;
use hirehop_relay::amqp::{declare_topology_once, topology};
use hirehop_relay::config::{AmqpConfig, Config, LogFormat};
use hirehop_relay::routing::TopicPattern;
use hirehop_relay::send::Sample;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Relays HireHop webhooks to a RabbitMQ topic exchange, answering 202 only once the broker
/// has confirmed a webhook, or the local spool has it on disk.
#[derive(Parser)]
#[command(
    version,
    about,
    after_help = "Run with --help for how to configure it.",
    after_long_help = CONFIGURATION
)]
struct Cli {
    #[command(flatten)]
    config: ConfigFile,
    #[command(subcommand)]
    command: Option<Command>,
}

/// What `--help` says about configuration, for someone who has only the binary.
const CONFIGURATION: &str = "\
Configuration:
  Built-in defaults, then the TOML file given with --config, then environment variables,
  each overriding the one before. A variable is RELAY_, the section, two underscores and the
  key: http.listen is RELAY_HTTP__LISTEN, amqp.url is RELAY_AMQP__URL. Lists are
  comma-separated there. An unknown setting, in the file or the environment, is an error.

  One setting is required, an export key (the company's export key, in HireHop's company
  settings), so that the relay never runs open:
      RELAY_AUTH__EXPORT_KEYS=key1,key2 hirehop-relay

  Everything else has a default: the broker amqp://guest:guest@127.0.0.1:5672/%2f, the
  webhook port 0.0.0.0:8080, the spool in the state directory ($STATE_DIRECTORY, else
  ~/.local/state/hirehop-relay/spool). `hirehop-relay check-config` prints every setting
  with its value; deploy/relay.toml in the source explains each one. The log level comes
  from RUST_LOG (info by default), the log format from log.format (text or json).";

/// `--config FILE`, for the commands that read the relay's configuration.
#[derive(clap::Args, Default)]
struct ConfigFile {
    /// TOML config file; `RELAY_*` environment variables override it.
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay (the default).
    Serve {
        #[command(flatten)]
        config: ConfigFile,
    },
    /// Print the effective configuration (secrets redacted) and the topology it describes,
    /// and load the TLS certificate and key if set; exit non-zero if anything is invalid.
    CheckConfig {
        #[command(flatten)]
        config: ConfigFile,
    },
    /// Post a realistic sample HireHop webhook to a relay and print the answer. Needs no
    /// configuration.
    Send {
        /// The relay's webhook URL (plain HTTP).
        #[arg(long, default_value = "http://127.0.0.1:8080/webhooks/hirehop")]
        url: String,
        /// Event name; known HireHop events get a matching sample body.
        #[arg(long, default_value = "job.status.updated")]
        event: String,
        /// Export key to put in the body.
        #[arg(long, env = "HIREHOP_EXPORT_KEY")]
        key: String,
        /// HireHop company id.
        #[arg(long, default_value_t = 1)]
        company: u64,
    },
    /// Summarize a running relay: its state, broker and spool, and the webhooks it accepted
    /// and refused since it started. Exits non-zero when the relay is not ready.
    Status {
        /// The relay's base URL: its webhook port, or metrics.listen when that is set.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// One JSON object, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Print every message published with a routing key matching PATTERN, as it arrives.
    Tail {
        #[command(flatten)]
        config: ConfigFile,
        /// Topic pattern, e.g. 'job.#'.
        #[arg(long, default_value = "#")]
        pattern: String,
        /// One JSON object per line, for scripts.
        #[arg(long)]
        json: bool,
        /// Start in the past: the history stream from this time on (RFC 3339, or a duration
        /// ago such as 1h), then what arrives.
        #[arg(long, value_name = "TIME", value_parser = point_in_time)]
        since: Option<SystemTime>,
    },
    /// Republish webhooks from the history stream, with confirms, into one queue or through
    /// the exchange. Ends where the stream ended when it started.
    #[command(group(
        clap::ArgGroup::new("target")
            .args(["to_queue", "to_exchange", "dry_run"])
            .required(true)
            .multiple(true)
    ))]
    Replay {
        #[command(flatten)]
        config: ConfigFile,
        /// Webhooks received at or after this time (RFC 3339, or a duration ago such as 2h).
        #[arg(long, value_name = "TIME", value_parser = point_in_time)]
        since: Option<SystemTime>,
        /// Webhooks received at or before this time.
        #[arg(long, value_name = "TIME", value_parser = point_in_time)]
        until: Option<SystemTime>,
        /// Start reading at this stream offset (an interrupted replay prints where to resume).
        #[arg(long, value_name = "OFFSET")]
        from_offset: Option<u64>,
        /// Only events matching this topic pattern, e.g. 'job.#'.
        #[arg(long, value_name = "PATTERN")]
        event: Option<TopicPattern>,
        /// Only webhooks of this HireHop company.
        #[arg(long, value_name = "ID")]
        company: Option<u64>,
        /// Into this queue only (it must exist).
        #[arg(long, value_name = "QUEUE")]
        to_queue: Option<String>,
        /// Through the exchange and its bindings.
        #[arg(long, conflicts_with = "to_queue")]
        to_exchange: bool,
        /// Count what would be sent, per event; publish nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Move messages from <exchange>.unrouted (or a dead-letter queue) back through the
    /// exchange, now that a queue is bound for them; the rest stay.
    Requeue {
        #[command(flatten)]
        config: ConfigFile,
        /// The queue to move messages from [default: <exchange>.unrouted].
        #[arg(long, value_name = "QUEUE")]
        from: Option<String>,
        /// Only events matching this topic pattern, e.g. 'job.#'.
        #[arg(long, value_name = "PATTERN")]
        event: Option<TopicPattern>,
        /// Republish at most N messages.
        #[arg(long, value_name = "N")]
        limit: Option<u64>,
    },
    /// Print the exchanges, queues and bindings the config describes.
    Topology {
        #[command(flatten)]
        config: ConfigFile,
        /// Also declare them on the broker.
        #[arg(long)]
        apply: bool,
    },
}

impl Command {
    /// The subcommand's own `--config`, if it takes one.
    fn config_file(&self) -> Option<&ConfigFile> {
        match self {
            Command::Serve { config }
            | Command::CheckConfig { config }
            | Command::Tail { config, .. }
            | Command::Replay { config, .. }
            | Command::Requeue { config, .. }
            | Command::Topology { config, .. } => Some(config),
            Command::Send { .. } | Command::Status { .. } => None,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve {
        config: ConfigFile::default(),
    });
    // `--config` before the subcommand or after it, not both.
    let file = match (cli.config.config, command.config_file()) {
        (Some(_), Some(ConfigFile { config: Some(_) })) => {
            eprintln!("hirehop-relay: --config is given twice");
            return ExitCode::from(2);
        }
        (Some(_), None) => {
            eprintln!("hirehop-relay: send and status take no configuration (they only talk HTTP)");
            return ExitCode::from(2);
        }
        (Some(file), Some(_)) => Some(file),
        (None, own) => own.and_then(|own| own.config.clone()),
    };
    // The relay's own errors follow log.format, so a log shipper reads them too; as far as it
    // can be told when the configuration itself is what failed.
    let json = matches!(command, Command::Serve { .. })
        && Config::log_format_hint(file.as_deref()) == LogFormat::Json;
    match run(command, file) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if json => {
            init_logging(LogFormat::Json);
            tracing::error!(error = format!("{err:#}"), "hirehop-relay cannot run");
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("hirehop-relay: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command, file: Option<PathBuf>) -> anyhow::Result<()> {
    if let Command::Send {
        url,
        event,
        key,
        company,
    } = &command
    {
        return runtime()?.block_on(send(url, event, key, *company));
    }
    if let Command::Status { url, json } = &command {
        // Needs no relay configuration either: it reads a running relay's endpoints.
        return runtime()?.block_on(status(url, *json));
    }
    let file = file.as_deref();
    let load = || Config::load(file).context("invalid configuration");
    // The tools read the broker side only, and need no export key.
    let load_for_tools = || Config::load_for_tools(file).context("invalid configuration");
    match command {
        Command::CheckConfig { .. } => {
            let config = load()?;
            print!("{}", config.to_redacted_toml());
            println!("\n# topology");
            for line in topology::describe(&config.amqp).lines() {
                println!("# {line}");
            }
            if let (Some(cert), Some(key)) = (&config.tls.cert_file, &config.tls.key_file) {
                // Read as the relay will read them: a missing file, or a pair that does not
                // belong together, fails here instead of at the next start.
                let chain = hirehop_relay::check_tls_pair(cert, key)
                    .context("invalid TLS certificate or key")?;
                println!(
                    "\n# tls: {} ({chain} certificate(s)) matches {}",
                    cert.display(),
                    key.display()
                );
            }
            Ok(())
        }
        Command::Topology { apply, .. } => {
            let amqp = load_for_tools()?;
            print!("{}", topology::describe(&amqp));
            if apply {
                runtime()?
                    .block_on(declare_topology_once(&amqp))
                    .context("failed to declare the topology")?;
                eprintln!("declared");
            }
            Ok(())
        }
        Command::Tail {
            pattern,
            json,
            since,
            ..
        } => {
            let amqp = load_for_tools()?;
            let mut out = std::io::stdout().lock();
            runtime()?
                .block_on(async {
                    tokio::select! {
                        result = tail(&amqp, &pattern, since, json, &mut out) => result,
                        _ = hirehop_relay::signal::shutdown() => Ok(()),
                    }
                })
                .context("tail stopped")
        }
        Command::Replay {
            config: _,
            since,
            until,
            from_offset,
            event,
            company,
            to_queue,
            to_exchange,
            dry_run,
        } => {
            let start = match (from_offset, since) {
                (Some(offset), _) => Start::Offset(offset),
                (None, Some(since)) => Start::Since(since),
                (None, None) => Start::First,
            };
            let target = match (to_queue, to_exchange) {
                (Some(queue), _) => Some(Target::Queue(queue)),
                (None, true) => Some(Target::Exchange),
                (None, false) => None,
            };
            let request = replay::Request {
                start,
                filter: Filter {
                    since,
                    until,
                    event,
                    company,
                },
                target,
                dry_run,
            };
            run_replay(&load_for_tools()?, &request)
        }
        Command::Requeue {
            from, event, limit, ..
        } => {
            let amqp = load_for_tools()?;
            let request = requeue::Request {
                from: from.unwrap_or_else(|| amqp.unrouted_name()),
                event,
                limit,
            };
            let mut progress = Progress::new();
            let outcome = runtime()?
                .block_on(requeue::requeue(
                    &amqp,
                    &request,
                    &mut |counts| progress.show(&counts.progress_line()),
                    stop_signal(),
                ))
                .context("requeue failed")?;
            progress.finish();
            print!("{}", outcome.counts.report(&request.from, &amqp));
            match outcome.error {
                Some(err) => Err(err).context("requeue stopped early"),
                // Unlike an unbound event, a refused queue is a fault to fix: say so in the
                // exit status too.
                None if outcome.counts.queue_refused > 0 => Err(anyhow::anyhow!(
                    "the broker refused to declare {} per-event queue(s); their messages stay \
                     in {}",
                    outcome.counts.refused_queues.len(),
                    request.from
                )),
                None => Ok(()),
            }
        }
        Command::Serve { .. } => {
            let config = load()?;
            init_logging(config.log.format);
            runtime()?.block_on(serve(config))
        }
        Command::Send { .. } | Command::Status { .. } => unreachable!("handled above"),
    }
}

fn run_replay(amqp: &AmqpConfig, request: &replay::Request) -> anyhow::Result<()> {
    let mut progress = Progress::new();
    let outcome = runtime()?
        .block_on(replay::replay(
            amqp,
            request,
            &mut |counts| progress.show(&counts.progress_line()),
            stop_signal(),
        ))
        .context("replay failed")?;
    progress.finish();
    print!("{}", outcome.counts.report(request.dry_run));
    let Some(interrupted) = outcome.interrupted else {
        return Ok(());
    };
    match interrupted.resume_from {
        Some(offset) => eprintln!(
            "everything before offset {offset} was handled; to go on from there:\n  {}",
            resume_command(offset)
        ),
        None => eprintln!("nothing was read; run the same command again"),
    }
    match interrupted.cause {
        Some(err) => Err(err).context("replay stopped early"),
        None => Err(anyhow::anyhow!("replay interrupted")),
    }
}

/// This process's command line with `--from-offset OFFSET` in place of any given.
fn resume_command(offset: u64) -> String {
    let mut args = std::env::args();
    let mut words = vec![args.next().unwrap_or_else(|| "hirehop-relay".to_owned())];
    while let Some(arg) = args.next() {
        if arg == "--from-offset" {
            args.next();
        } else if !arg.starts_with("--from-offset=") {
            words.push(arg);
        }
    }
    words.push("--from-offset".to_owned());
    words.push(offset.to_string());
    words
        .iter()
        .map(|word| {
            let plain = word
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@+".contains(c));
            if plain {
                word.clone()
            } else {
                format!("'{}'", word.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// SIGINT or SIGTERM, for the tools that stop cleanly and say how far they got.
async fn stop_signal() {
    hirehop_relay::signal::shutdown().await;
}

/// A progress line on stderr, redrawn at most five times a second, and only on a terminal.
struct Progress {
    terminal: bool,
    shown: Option<Instant>,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            terminal: std::io::stderr().is_terminal(),
            shown: None,
        }
    }

    fn show(&mut self, line: &str) {
        if !self.terminal
            || self
                .shown
                .is_some_and(|at| at.elapsed() < Duration::from_millis(200))
        {
            return;
        }
        eprint!("\r\x1b[K{line}");
        self.shown = Some(Instant::now());
    }

    fn finish(&self) {
        if self.shown.is_some() {
            eprint!("\r\x1b[K");
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")
}

async fn send(url: &str, event: &str, key: &str, company_id: u64) -> anyhow::Result<()> {
    let sample = Sample {
        event,
        export_key: key,
        company_id,
    };
    let (status, body) = hirehop_relay::send::send(url, &sample)
        .await
        .with_context(|| format!("failed to send a {event} webhook"))?;
    println!("{status}");
    println!("{}", body.trim_end());
    anyhow::ensure!(status.is_success(), "the relay answered {status}");
    Ok(())
}

async fn status(url: &str, json: bool) -> anyhow::Result<()> {
    let status = hirehop_relay::status::status(url)
        .await
        .with_context(|| format!("failed to read the status of {url}"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", status.to_text());
    }
    anyhow::ensure!(status.ready, "the relay is not ready ({})", status.state);
    Ok(())
}

async fn serve(config: Config) -> anyhow::Result<()> {
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        "starting hirehop-relay"
    );
    // From the very start: SIGHUP's default action would end the process undrained.
    hirehop_relay::signal::install_hangup_handler();
    let shutdown = CancellationToken::new();
    // Installed here, before anything listens; awaited by a task of its own.
    let signalled = hirehop_relay::signal::shutdown();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            let signal = signalled.await;
            // Cancel first: nothing, not even a failing log write, may stand in its way.
            shutdown.cancel();
            tracing::info!(signal, "received shutdown signal");
        }
    });
    Ok(hirehop_relay::run(config, shutdown).await?)
}

fn init_logging(format: LogFormat) {
    // Libraries' own lines are kept out or down unless RUST_LOG names them. lapin: the relay
    // reports every broker failure in its own words (what happened, to which node, where
    // webhooks go meanwhile), while lapin's read as fatal when they are not ("Exponential
    // backoff attempts exhausted, aborting recovery" after any failed attempt), and at warn it
    // logs a returned message whole, body and so export key included. rustls logs what any
    // TLS client can provoke (a refused renegotiation, a warning alert) at warn, a line each:
    // keep it at error; the relay counts failed handshakes itself, and logs them summarized.
    let mut directives = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    for (quiet, level) in [("lapin", "off"), ("rustls", "error")] {
        if !directives.contains(quiet) {
            directives.push_str(&format!(",{quiet}={level}"));
        }
    }
    let filter = EnvFilter::new(directives);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A closed stderr must not turn into a panic (and a relay deaf to SIGTERM).
        .log_internal_errors(false);
    // Already set up (a fatal error after serving began): keep that one.
    let _ = match format {
        LogFormat::Json => builder.json().with_current_span(true).try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
}
