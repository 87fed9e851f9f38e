//! hirehop-relay takes HireHop webhooks off the internet and puts them onto RabbitMQ.
//!
//! HireHop never retries a webhook and ignores the answer, so the one promise this crate
//! makes is: **a 2xx is sent only after the broker confirmed the persistent message, or
//! after the webhook was fsynced to the local spool.**
//!
//! # A webhook's life
//! 1. [`server`] accepts the TCP connection (TLS via [`tls`] if configured) and speaks
//!    HTTP/1.1 or HTTP/2 with hyper, under connection-level limits.
//! 2. [`webhook`] routes the request (`POST http.path`; `/healthz`, `/readyz`, `/metrics`),
//!    applies [`access`] rules, refuses a declared body over `http.max_body_bytes` before
//!    reading it, then reads the body under size and time limits into one [`bytes::Bytes`]
//!    and only then takes an `http.max_in_flight` permit.
//! 3. [`envelope`] reads `event`, `export_key`, `company_id`, `user_id` and `time` out of
//!    those bytes, borrowing them, without building a document.
//! 4. [`auth`] checks the key in constant time against the [`auth::Keyring`] in use; a
//!    wrong one spends its source's [`access::KeyFailureBudget`].
//! 5. [`routing`] turns the event name into a [`routing::RoutingKey`] (checked once).
//! 6. [`delivery`] hands the [`message::Message`] to [`amqp`], which publishes the very
//!    same `Bytes` with `mandatory` (through the fanout that keeps a copy in the history
//!    stream, when history is on, to the topic exchange) and waits for that message's
//!    publisher confirm; only an Ack becomes a plain 202. When the broker cannot confirm
//!    (down, blocked, nack, timeout), the message goes to the [`spool`] instead and the 202
//!    is sent once it is fsynced on disk; [`delivery::replay`] drains the spool later. The
//!    delivery runs in the request's own task and always to its end: should the client hang
//!    up, [`completion`] spawns the rest of it.
//!
//! # The process
//! [`config`] reads and validates everything once, at load, into a [`config::Config`]; the
//! keys and the routing template are built there. [`run`] builds the relay from it:
//! [`Relay::start`] opens the [`spool`], starts the [`amqp`] publisher and binds the
//! webhook port (at once with a spool; without one, only once the broker is set up), and
//! [`Relay::run`] serves until shutdown, then stops in order. A refusal of the broker that
//! retrying cannot fix stops the relay with [`RunError::Broker`]. `main` parses the command
//! line, sets up logging, turns SIGTERM/SIGINT ([`signal`]) into the shutdown token and calls
//! [`run`], or one of the tools.
//!
//! Around it: [`signal`] also turns SIGHUP into reloads of the keys file and the TLS pair
//! ([`reload`]); [`health`] says whether a webhook sent now would be kept (`/readyz`, on both
//! listeners); [`metrics`] counts what happens; [`rejection_log`] logs what strangers cause
//! without letting a flood into the log; [`tracecontext`] carries W3C trace context into the
//! message; [`send`], [`status`], [`amqp::tail`], [`amqp::replay`] and [`amqp::requeue`] are
//! the `send`, `status`, `tail`, `replay` and `requeue` tools.

#![forbid(unsafe_code)]
// The tour above links to the private modules it describes: `cargo doc
// --document-private-items` renders them.
#![allow(rustdoc::private_intra_doc_links)]

// What the binary, the tests and the benchmark use: the configuration and the relay (below),
// the tools, the types they build messages and filters from, and the metrics' label values
// (which the docs test compares with the metrics reference).
pub mod amqp;
pub mod config;
pub mod envelope;
pub mod message;
pub mod metrics;
pub mod routing;
pub mod send;
pub mod signal;
pub mod status;
pub mod tracecontext;

// The relay's insides.
mod access;
mod auth;
mod completion;
mod delivery;
mod health;
mod rejection_log;
mod reload;
mod server;
mod spool;
mod tls;
mod webhook;

/// For `check-config`: reads a certificate and key as the relay will (see [`tls`]).
pub use tls::check_pair as check_tls_pair;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::amqp::{ConnectError, Publisher};
use crate::auth::KeyStore;
use crate::config::Config;
use crate::delivery::Delivery;
use crate::metrics::Metrics;
use crate::rejection_log::RejectionLog;
use crate::reload::Reload;
use crate::spool::Spool;
use crate::webhook::App;

/// Runs the relay `config` describes until `shutdown` is cancelled: [`Relay::start`], then
/// [`Relay::run`]. `main` calls this; tests that need the address in between call the two.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    match Relay::start(config, shutdown).await? {
        Some(relay) => relay.run().await,
        None => Ok(()),
    }
}

/// Why the relay could not start, or stopped on an error. Each says what failed; the causes
/// follow as its [`source`](std::error::Error::source)s.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot open the spool (set spool.dir, or spool.enabled = false)")]
    Spool(#[source] spool::OpenError),
    /// A refusal that retrying cannot fix (a wrong login or vhost, a topology the broker
    /// will not take), met at the first connection.
    #[error("cannot set up the broker")]
    Broker(#[source] ConnectError),
    #[error("failed to bind {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        cause: std::io::Error,
    },
    #[error("cannot serve")]
    Serve(#[source] ServeError),
}

/// Why the listeners could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("failed to bind metrics.listen {addr}: {cause}")]
    MetricsBind {
        addr: SocketAddr,
        cause: std::io::Error,
    },
}

/// A relay whose webhook port is bound: its spool open, its publisher started.
pub struct Relay {
    config: Config,
    delivery: Delivery,
    listener: TcpListener,
    /// Cancelled by the caller's shutdown, or by a refusal of the broker (`fatal`).
    stop: CancellationToken,
    /// The refusal that stopped a relay already serving (with a spool, it serves before the
    /// broker answers).
    fatal: Arc<OnceLock<ConnectError>>,
}

impl Relay {
    /// Opens the spool, starts the publisher, and binds `http.listen`: at once with a spool
    /// (a 202 is possible before the broker answers, so a relay restarted during a broker
    /// outage keeps webhooks instead of refusing them); without one, only once the broker is
    /// set up, since then only its confirm can keep a webhook. `None` when `shutdown` came
    /// first.
    pub async fn start(
        config: Config,
        shutdown: CancellationToken,
    ) -> Result<Option<Relay>, RunError> {
        let stop = shutdown.child_token();
        let spool = config
            .spool
            .enabled
            .then(|| open_spool(&config))
            .transpose()
            .map_err(RunError::Spool)?;
        let publisher = Publisher::start(config.amqp.clone());
        let fatal = Arc::new(OnceLock::new());
        if spool.is_some() {
            tokio::spawn({
                let (publisher, stop, fatal) =
                    (publisher.clone(), stop.clone(), Arc::clone(&fatal));
                async move {
                    if let Err(err) = publisher.wait_connected(stop.clone()).await
                        && !matches!(err, ConnectError::Cancelled)
                    {
                        tracing::error!(error = %err, "cannot set up the broker; stopping");
                        let _ = fatal.set(err);
                        stop.cancel();
                    }
                }
            });
        } else {
            tracing::info!(
                listen = %config.http.listen,
                "spool.enabled = false: the webhook port stays closed until the broker answers \
                 (without a spool only the broker's confirm can keep a webhook)"
            );
            match publisher.wait_connected(stop.clone()).await {
                Ok(()) => {}
                Err(ConnectError::Cancelled) => {
                    publisher.close().await;
                    return Ok(None);
                }
                Err(err) => {
                    publisher.close().await;
                    return Err(RunError::Broker(err));
                }
            }
        }
        let addr = config.http.listen;
        let listener = match TcpListener::bind(addr).await {
            Ok(listener) => listener,
            Err(cause) => {
                publisher.close().await;
                return Err(RunError::Bind { addr, cause });
            }
        };
        let metrics = Arc::new(Metrics::new(&config));
        Ok(Some(Relay {
            delivery: Delivery::new(publisher, spool, metrics),
            config,
            listener,
            stop,
            fatal,
        }))
    }

    /// The address the webhook port is bound to (`http.listen`, with the port chosen when it
    /// asks for port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Waits until the broker is set up (which [`Relay::start`] does not, with a spool): for
    /// tests that want their first webhooks confirmed rather than spooled.
    pub async fn wait_connected(&self) -> Result<(), RunError> {
        let publisher = self.delivery.publisher();
        publisher
            .wait_connected(self.stop.clone())
            .await
            .map_err(RunError::Broker)
    }

    /// Serves webhooks until shutdown; then drains in-flight requests, waits for
    /// deliveries still under way, lets replay empty the spool for up to
    /// `spool.shutdown_replay_timeout_ms`, and closes the spool and the broker connection.
    /// An error if the broker refused the relay for good meanwhile.
    pub async fn run(self) -> Result<(), RunError> {
        let Relay {
            config,
            delivery,
            listener,
            stop,
            fatal,
        } = self;
        let publisher = delivery.publisher().clone();
        if let Err(err) = serve(&config, delivery, listener, stop).await {
            // `serve` closes the broker connection once it has served; when it could not
            // start, close it here, before the runtime that lapin's I/O thread waits on goes
            // away.
            publisher.close().await;
            return Err(RunError::Serve(err));
        }
        // Read, not taken: the task that set it may still hold its handle, and a refusal must
        // never end in exit status 0.
        match fatal.get() {
            Some(err) => Err(RunError::Broker(err.clone())),
            None => Ok(()),
        }
    }
}

/// Opens the spool and reports what an earlier run left in it.
fn open_spool(config: &Config) -> Result<Spool, spool::OpenError> {
    let dir = &config.spool.dir;
    let (spool, recovery) = Spool::open(dir, config.spool.max_bytes)?;
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

/// Serves webhooks on `listener` until `stop`, then shuts down in order (see [`Relay::run`]).
async fn serve(
    config: &Config,
    delivery: Delivery,
    listener: TcpListener,
    stop: CancellationToken,
) -> Result<(), ServeError> {
    let tls = match (&config.tls.cert_file, &config.tls.key_file) {
        (Some(cert), Some(key)) => Some(Arc::new(tls::Tls::load(
            cert,
            key,
            config.tls.handshake_timeout(),
        )?)),
        _ => None,
    };
    let metrics_listener = match config.metrics.listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|cause| ServeError::MetricsBind { addr, cause })?,
        ),
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    match listener.local_addr() {
        Ok(addr) => tracing::info!(%addr, scheme, path = %config.http.path, "listening"),
        Err(err) => tracing::warn!(error = %err, "listening on an unknown address"),
    }
    // One token for everything that stops with the server.
    let stopping = CancellationToken::new();
    let (stop_replay, finish_replay) = (CancellationToken::new(), CancellationToken::new());
    let replay = delivery.spool().is_some().then(|| {
        tokio::spawn(delivery::replay(
            delivery.clone(),
            stop_replay.clone(),
            finish_replay.clone(),
        ))
    });
    let keys = Arc::new(KeyStore::new(config.keyring().clone()));
    spawn_key_reloads(config, &keys, stopping.clone());
    if let Some(tls) = &tls {
        let (tls, stop) = (Arc::clone(tls), stopping.clone());
        let metrics = Arc::clone(delivery.metrics());
        tokio::spawn(async move { tls.watch(stop, metrics).await });
    }
    let rejections = Arc::new(RejectionLog::new());
    let rejection_summaries = {
        let (rejections, stop) = (Arc::clone(&rejections), stopping.clone());
        tokio::spawn(async move { rejections.run(stop).await })
    };
    let metrics_server = metrics_listener.map(|listener| {
        let rejections = Arc::clone(&rejections);
        spawn_metrics_server(listener, config, &delivery, rejections, stopping.clone())
    });
    let app = Arc::new(App::new(
        config,
        keys,
        delivery.clone(),
        Arc::clone(&rejections),
    ));
    {
        // Sources whose budget refilled are forgotten, so the table holds recent ones only.
        let (app, stop) = (Arc::clone(&app), stopping.clone());
        tokio::spawn(async move {
            let mut sweep = tokio::time::interval(rejection_log::INTERVAL);
            loop {
                tokio::select! {
                    _ = sweep.tick() => app.key_failures.forget_refilled(),
                    () = stop.cancelled() => return,
                }
            }
        });
    }
    let handler = {
        let app = Arc::clone(&app);
        move |peer, request| webhook::handle(Arc::clone(&app), peer, request)
    };
    let metrics = Arc::clone(delivery.metrics());
    server::serve(
        listener,
        &config.http,
        tls,
        metrics,
        Arc::clone(&rejections),
        handler,
        stop.cancelled(),
    )
    .await;
    stopping.cancel();

    // Deliveries whose client hung up are not covered by the connection drain.
    app.publishes.close();
    let ceiling = config.amqp.confirm_timeout();
    if tokio::time::timeout(ceiling, app.publishes.wait())
        .await
        .is_err()
    {
        tracing::warn!("deliveries still under way at shutdown");
    }
    if let Some(mut replay) = replay {
        // What stays in the spool stays on this instance's disk, which may not come back
        // (a pod's volume): replay it while the broker confirms, for a while.
        finish_replay.cancel();
        let budget = config.spool.shutdown_replay_timeout();
        if tokio::time::timeout(budget, &mut replay).await.is_err() {
            stop_replay.cancel();
            // Replay stops between batches. A batch gives up after the confirm timeout of
            // silence from the broker, so this is enough for it unless the broker is still
            // confirming it, slowly: what it has not confirmed when the connection closes stays
            // in the spool, and may reach the broker twice.
            let _ = tokio::time::timeout(ceiling, replay).await;
        }
    }
    if let Some(metrics_server) = metrics_server {
        let _ = metrics_server.await;
    }
    // The last, short interval's summary lines.
    let _ = rejection_summaries.await;
    let left = match delivery.spool() {
        Some(spool) => {
            spool.close().await;
            Some(spool.depth())
        }
        None => None,
    };
    delivery.publisher().close().await;
    // The last line says what this instance leaves behind.
    match left {
        Some(left) if left.records > 0 => tracing::warn!(
            records = left.records,
            bytes = left.bytes,
            dir = %config.spool.dir.display(),
            "stopped; webhooks remain in the spool, and a relay started on the same spool.dir replays them"
        ),
        Some(_) => tracing::info!("stopped; spool empty"),
        None => tracing::info!("stopped"),
    }
    Ok(())
}

/// Reloads `auth.export_keys_file` when it changes (checked every 2 s) and on SIGHUP; a
/// reload that fails, or would leave no key at all, keeps the old keys. Without a keys file,
/// SIGHUP is only logged here (it must never end the process; the TLS pair, if any, reloads
/// on it too).
fn spawn_key_reloads(config: &Config, keys: &Arc<KeyStore>, stop: CancellationToken) {
    let mut hangups = signal::hangups();
    let Some(path) = config.auth.export_keys_file.clone() else {
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = hangups.next() => tracing::info!("received SIGHUP; no auth.export_keys_file to reload"),
                    () = stop.cancelled() => return,
                }
            }
        });
        return;
    };
    let auth = config.auth.clone();
    let reload = Reload {
        value: Arc::clone(keys),
        what: "export keys",
        files: vec![path],
        every: Duration::from_secs(2),
        load: Box::new(move || match auth.read_keyring() {
            Ok(keyring) if keyring.is_empty() => Err("it would leave no export key".to_owned()),
            Ok(keyring) => Ok(keyring),
            Err(err) => Err(err.to_string()),
        }),
    };
    tokio::spawn(reload.run(Some(hangups), stop));
}

/// Serves `/metrics` (and health) on `metrics.listen`.
fn spawn_metrics_server(
    listener: TcpListener,
    config: &Config,
    delivery: &Delivery,
    rejections: Arc<RejectionLog>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving /metrics");
    }
    let metrics = Arc::clone(delivery.metrics());
    let delivery = delivery.clone();
    let handler = move |_peer, request| webhook::handle_metrics_listener(delivery.clone(), request);
    let http = config.http.clone();
    tokio::spawn(async move {
        server::serve(
            listener,
            &http,
            None,
            metrics,
            rejections,
            handler,
            stop.cancelled_owned(),
        )
        .await;
    })
}
