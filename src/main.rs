//! The process edge: command line, logging, configuration, signals; then [`hirehop_relay::run`].

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hirehop_relay::config::{Config, LogFormat};
use hirehop_relay::publisher::{ConnectError, Publisher};
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
    /// Print the effective configuration (secrets redacted) and exit; non-zero if invalid.
    CheckConfig,
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
    let config = Config::load(cli.config.as_deref()).context("invalid configuration")?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::CheckConfig => {
            print!("{}", config.to_redacted_toml());
            Ok(())
        }
        Command::Serve => {
            init_logging(config.log.format);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("failed to start the async runtime")?
                .block_on(serve(config))
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        "starting hirehop-relay"
    );
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            hirehop_relay::signal::shutdown().await;
            shutdown.cancel();
        }
    });

    // The broker first: the HTTP port opens only once a 202 is possible.
    let publisher = match Publisher::connect(config.amqp.clone(), shutdown.clone()).await {
        Ok(publisher) => publisher,
        Err(ConnectError::Cancelled) => return Ok(()),
        Err(err) => return Err(err).context("cannot set up the broker"),
    };
    let listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("failed to bind {}", config.http.listen))?;
    hirehop_relay::run(config, publisher, listener, shutdown.cancelled_owned()).await;
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().with_current_span(true).init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}
