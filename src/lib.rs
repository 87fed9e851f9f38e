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
//! 6. [`publisher`] publishes the very same `Bytes` to the topic exchange with `mandatory`
//!    and waits for that message's publisher confirm; only an Ack becomes a 202.
//!
//! [`config`] loads everything once at startup; [`signal`] turns SIGTERM/SIGINT into the
//! shutdown future that [`run`] takes.

#![forbid(unsafe_code)]

pub mod auth;
pub mod config;
pub mod envelope;
pub mod publisher;
pub mod routing;
pub mod server;
pub mod signal;
pub mod webhook;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::publisher::Publisher;
use crate::webhook::App;

/// Serves webhooks on `listener`, publishing through `publisher` (already connected, its
/// topology declared), until `shutdown` resolves; then drains in-flight requests, waits for
/// publishes still awaiting a confirm, and closes the broker connection.
///
/// Production passes the configured address and [`signal::shutdown`]; tests pass
/// `127.0.0.1:0` and a oneshot.
pub async fn run(
    config: Config,
    publisher: Publisher,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) {
    match listener.local_addr() {
        Ok(addr) => tracing::info!(%addr, path = %config.http.path, "listening"),
        Err(err) => tracing::warn!(error = %err, "listening on an unknown address"),
    }
    let app = Arc::new(App {
        keyring: config.keyring(),
        routing_key_prefix: config.amqp.routing_key_prefix.clone(),
        http: config.http.clone(),
        publisher: publisher.clone(),
        publishes: TaskTracker::new(),
    });
    server::serve(listener, Arc::clone(&app), shutdown).await;

    // Publishes whose client hung up are not covered by the connection drain.
    app.publishes.close();
    let ceiling = config.amqp.confirm_timeout();
    if tokio::time::timeout(ceiling, app.publishes.wait())
        .await
        .is_err()
    {
        tracing::warn!("publishes still unconfirmed at shutdown");
    }
    publisher.close().await;
    tracing::info!("stopped");
}
