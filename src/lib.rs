//! hirehop-relay takes HireHop webhooks off the internet and puts them onto RabbitMQ.
//!
//! HireHop never retries a webhook and ignores the answer, so the one promise this crate
//! makes is: **a 2xx is sent only after the broker confirmed the persistent message.**
//!
//! # A webhook's life
//! 1. [`server`] accepts the TCP connection and speaks HTTP/1.1 (or HTTP/2) with hyper.
//! 2. [`webhook`] routes the request (`POST http.path`; `/healthz`, `/readyz`), refuses a
//!    declared body over `http.max_body_bytes` before reading it, then reads the body under a
//!    size and a time limit into one [`bytes::Bytes`].
//! 3. [`envelope`] reads `event`, `export_key`, `company_id` and `user_id` out of those bytes,
//!    borrowing them, without building a document.
//! 4. [`auth`] checks the key in constant time against the configured [`auth::Keyring`].
//! 5. [`routing`] turns the event name into a [`routing::RoutingKey`] (checked once).
//! 6. [`delivery`] hands the [`message::Message`] to [`publisher`], which publishes the very
//!    same `Bytes` to the topic exchange with `mandatory` and waits for that message's
//!    publisher confirm; only an Ack becomes a plain 202. When the broker cannot confirm
//!    (down, blocked, nack, timeout), the message goes to the [`spool`] instead and the 202
//!    is sent once it is fsynced on disk; [`delivery::replay`] drains the spool later.
//!
//! [`config`] loads everything once at startup; [`signal`] turns SIGTERM/SIGINT into the
//! shutdown future that [`run`] takes.

#![forbid(unsafe_code)]

pub mod auth;
pub mod config;
pub mod delivery;
pub mod envelope;
pub mod message;
pub mod publisher;
pub mod routing;
pub mod server;
pub mod signal;
pub mod spool;
pub mod webhook;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::delivery::Delivery;
use crate::webhook::App;

/// Serves webhooks on `listener`, delivering through `delivery` (the broker, and the spool
/// if enabled), until `shutdown` resolves; then drains in-flight requests, waits for
/// deliveries still under way, stops replay, and closes the spool and the broker connection.
///
/// Production passes the configured address and [`signal::shutdown`]; tests pass
/// `127.0.0.1:0` and a oneshot.
pub async fn run(
    config: Config,
    delivery: Delivery,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) {
    match listener.local_addr() {
        Ok(addr) => tracing::info!(%addr, path = %config.http.path, "listening"),
        Err(err) => tracing::warn!(error = %err, "listening on an unknown address"),
    }
    let stop_replay = CancellationToken::new();
    let replay = delivery.spool().map(|spool| {
        let task = delivery::replay(
            delivery.publisher().clone(),
            spool.clone(),
            stop_replay.clone(),
        );
        tokio::spawn(task)
    });
    let app = Arc::new(App {
        keyring: config.keyring(),
        routing_key_prefix: config.amqp.routing_key_prefix.clone(),
        http: config.http.clone(),
        delivery: delivery.clone(),
        publishes: TaskTracker::new(),
    });
    server::serve(listener, Arc::clone(&app), shutdown).await;

    // Deliveries whose client hung up are not covered by the connection drain.
    app.publishes.close();
    let ceiling = config.amqp.confirm_timeout();
    if tokio::time::timeout(ceiling, app.publishes.wait())
        .await
        .is_err()
    {
        tracing::warn!("deliveries still under way at shutdown");
    }
    stop_replay.cancel();
    if let Some(replay) = replay {
        // Replay stops between batches; a batch is bounded by the confirm timeout.
        let _ = tokio::time::timeout(ceiling * 2, replay).await;
    }
    if let Some(spool) = delivery.spool() {
        spool.close().await;
    }
    delivery.publisher().close().await;
    tracing::info!("stopped");
}
