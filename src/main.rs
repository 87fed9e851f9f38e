//! The process edge: command line, logging, configuration, signals; then [`hirehop_relay::run`].

#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use clap::{Parser, Subcommand};
use hirehop_relay::amqp::tail::tail;
use hirehop_relay::amqp::{ConnectError, Publisher, declare_topology_once, topology};
use hirehop_relay::config::{Config, LogFormat};
use hirehop_relay::delivery::Delivery;
use hirehop_relay::metrics::Metrics;
use hirehop_relay::send::Sample;
use hirehop_relay::spool::Spool;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Relays HireHop webhooks to a RabbitMQ topic exchange, answering 202 only after the
/// broker confirmed the message.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// TOML config file; `RELAY_*` environment variables override it.
    #[arg(long, short, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay (the default).
    Serve,
    /// Print the effective configuration (secrets redacted) and the topology it describes,
    /// and load the TLS certificate and key if set; exit non-zero if anything is invalid.
    CheckConfig,
    /// Post a realistic sample HireHop webhook to a relay and print the answer.
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
    /// Print every message published with a routing key matching PATTERN, as it arrives.
    Tail {
        /// Topic pattern, e.g. 'job.#'.
        #[arg(long, default_value = "#")]
        pattern: String,
        /// One JSON object per line, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Print the exchanges, queues and bindings the config describes.
    Topology {
        /// Also declare them on the broker.
        #[arg(long)]
        apply: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("hirehop-relay: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let command = cli.command.unwrap_or(Command::Serve);
    if let Command::Send {
        url,
        event,
        key,
        company,
    } = &command
    {
        // Needs no relay configuration: it only talks HTTP.
        return runtime()?.block_on(send(url, event, key, *company));
    }
    let config = match command {
        Command::Tail { .. } | Command::Topology { .. } => {
            Config::load_for_tools(cli.config.as_deref())
        }
        _ => Config::load(cli.config.as_deref()),
    }
    .context("invalid configuration")?;
    match command {
        Command::CheckConfig => {
            print!("{}", config.to_redacted_toml());
            println!("\n# topology");
            for line in topology::describe(&config.amqp).lines() {
                println!("# {line}");
            }
            if let (Some(cert), Some(key)) = (&config.tls.cert_file, &config.tls.key_file) {
                // Read as the relay will read them: a missing file, or a pair that does not
                // belong together, fails here instead of at the next start.
                let chain = hirehop_relay::tls::check_pair(cert, key)
                    .context("invalid TLS certificate or key")?;
                println!(
                    "\n# tls: {} ({chain} certificate(s)) matches {}",
                    cert.display(),
                    key.display()
                );
            }
            Ok(())
        }
        Command::Topology { apply } => {
            print!("{}", topology::describe(&config.amqp));
            if apply {
                runtime()?
                    .block_on(declare_topology_once(&config.amqp))
                    .context("failed to declare the topology")?;
                eprintln!("declared");
            }
            Ok(())
        }
        Command::Tail { pattern, json } => {
            let mut out = std::io::stdout().lock();
            runtime()?
                .block_on(async {
                    tokio::select! {
                        result = tail(&config.amqp, &pattern, json, &mut out) => result,
                        _ = hirehop_relay::signal::shutdown() => Ok(()),
                    }
                })
                .context("tail stopped")
        }
        Command::Serve => {
            init_logging(config.log.format);
            runtime()?.block_on(serve(config))
        }
        Command::Send { .. } => unreachable!("handled above"),
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

async fn serve(config: Config) -> anyhow::Result<()> {
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        "starting hirehop-relay"
    );
    // From the very start: SIGHUP's default action would end the process undrained.
    hirehop_relay::signal::install_hangup_handler();
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            let signal = hirehop_relay::signal::shutdown().await;
            // Cancel first: nothing, not even a failing log write, may stand in its way.
            shutdown.cancel();
            tracing::info!(signal, "received shutdown signal");
        }
    });

    let spool = config
        .spool
        .enabled
        .then(|| open_spool(&config))
        .transpose()?;
    let publisher = Publisher::start(config.amqp.clone());
    // A refusal that retrying cannot fix (a wrong login or vhost, a topology the broker will
    // not take), met at the first connection, stops the relay.
    let fatal = Arc::new(OnceLock::new());
    if spool.is_some() {
        // With a spool, a 202 is possible before the broker answers: open the port now, so a
        // relay restarted during a broker outage keeps webhooks instead of refusing them.
        tokio::spawn({
            let (publisher, shutdown, fatal) =
                (publisher.clone(), shutdown.clone(), Arc::clone(&fatal));
            async move {
                if let Err(err) = publisher.wait_connected(shutdown.clone()).await
                    && !matches!(err, ConnectError::Cancelled)
                {
                    tracing::error!(error = %err, "cannot set up the broker; stopping");
                    let _ = fatal.set(err);
                    shutdown.cancel();
                }
            }
        });
    } else {
        // Without one, the port opens only once the broker can confirm.
        match publisher.wait_connected(shutdown.clone()).await {
            Ok(()) => {}
            Err(ConnectError::Cancelled) => {
                publisher.close().await;
                return Ok(());
            }
            Err(err) => return Err(err).context("cannot set up the broker"),
        }
    }

    let listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("failed to bind {}", config.http.listen))?;
    let metrics = Arc::new(Metrics::new(config.metrics.max_event_labels));
    let delivery = Delivery::new(publisher.clone(), spool, metrics);
    let served = hirehop_relay::run(config, delivery, listener, shutdown.cancelled_owned()).await;
    if served.is_err() {
        // `run` closes the broker connection once it has served; when it could not start,
        // close it here, before the runtime that lapin's I/O thread waits on goes away.
        publisher.close().await;
    }
    served.context("cannot serve")?;
    // Read, not taken: the task that set it may still hold its handle, and a refusal must
    // never end in exit status 0.
    match fatal.get() {
        Some(err) => Err(err.clone()).context("cannot set up the broker"),
        None => Ok(()),
    }
}

/// Opens the spool and reports what an earlier run left in it.
fn open_spool(config: &Config) -> anyhow::Result<Spool> {
    let dir = &config.spool.dir;
    let (spool, recovery) = Spool::open(dir, config.spool.max_bytes)
        .context("cannot open the spool (set spool.dir, or spool.enabled = false)")?;
    for (segment, bytes) in &recovery.corrupt {
        tracing::error!(
            segment = %segment.display(),
            bytes,
            "spool segment had a torn or corrupt tail (e.g. power loss mid-write); cut it off"
        );
    }
    if recovery.records > 0 {
        tracing::info!(
            records = recovery.records,
            "spool holds webhooks from an earlier run; they will be replayed"
        );
    }
    tracing::info!(dir = %dir.display(), max_bytes = config.spool.max_bytes, "spool ready");
    Ok(spool)
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
    match format {
        LogFormat::Json => builder.json().with_current_span(true).init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}
