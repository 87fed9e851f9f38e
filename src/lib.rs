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
//!    is sent once it is fsynced on disk; [`delivery::replay`] drains the spool later.
//!
//! Around it: [`config`] loads everything once at startup; [`signal`] turns SIGTERM/SIGINT
//! into the shutdown future that [`run`] takes, and SIGHUP into key reloads; [`health`] says
//! whether a webhook sent now would be kept (`/readyz`, on both listeners); [`metrics`]
//! counts what happens; [`rejection_log`] logs what strangers cause without letting a flood
//! into the log; [`tracecontext`] carries W3C trace context into the message;
//! [`send`], [`status`], [`amqp::tail`], [`amqp::replay`] and [`amqp::requeue`] are the
//! `send`, `status`, `tail`, `replay` and `requeue` tools.

#![forbid(unsafe_code)]

pub mod access;
pub mod amqp;
pub mod auth;
pub mod config;
pub mod delivery;
pub mod envelope;
pub mod health;
pub mod message;
pub mod metrics;
pub mod rejection_log;
pub mod reload;
pub mod routing;
pub mod send;
pub mod server;
pub mod signal;
pub mod spool;
pub mod status;
pub mod tls;
pub mod tracecontext;
pub mod webhook;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access::{AccessPolicy, KeyFailureBudget};
use crate::auth::KeyStore;
use crate::config::Config;
use crate::delivery::Delivery;
use crate::rejection_log::RejectionLog;
use crate::reload::Reload;
use crate::webhook::App;

/// Why [`run`] could not serve.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("failed to bind metrics.listen {addr}: {cause}")]
    MetricsBind {
        addr: std::net::SocketAddr,
        cause: std::io::Error,
    },
}

/// Serves webhooks on `listener`, delivering through `delivery` (the broker, and the spool
/// if enabled), until `shutdown` resolves; then drains in-flight requests, waits for
/// deliveries still under way, lets replay empty the spool for up to
/// `spool.shutdown_replay_timeout_ms`, and closes the spool and the broker connection.
///
/// Production passes the configured address and [`signal::shutdown`]; tests pass
/// `127.0.0.1:0` and a oneshot.
pub async fn run(
    config: Config,
    delivery: Delivery,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
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
                .map_err(|cause| RunError::MetricsBind { addr, cause })?,
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
    spawn_key_reloads(&config, &keys, stopping.clone());
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
        spawn_metrics_server(listener, &config, &delivery, rejections, stopping.clone())
    });
    let app = Arc::new(App {
        keys,
        routing: config.routing().clone(),
        http: config.http.clone(),
        delivery: delivery.clone(),
        publishes: TaskTracker::new(),
        in_flight: Semaphore::new(config.http.max_in_flight),
        metrics_here: config.metrics.listen.is_none(),
        access: AccessPolicy::new(
            config.http.allow_from.clone(),
            config.http.trusted_proxies.clone(),
            config.http.forwarded_header,
        ),
        key_failures: KeyFailureBudget::new(
            config.http.key_failures_per_minute,
            config.http.key_failure_burst,
        ),
        rejections: Arc::clone(&rejections),
        redact_export_key: config.amqp.redact_export_key,
        max_age: (config.auth.max_age_secs > 0)
            .then(|| std::time::Duration::from_secs(config.auth.max_age_secs)),
    });
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
        shutdown,
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
            // Replay stops between batches; a batch is bounded by the confirm timeout.
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
