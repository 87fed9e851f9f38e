//! The bench's own servers, on the relay's server stack, each the least a system of its kind
//! can do:
//!
//! - **the HTTP floor** reads the body and answers 202, with no broker: the cost of HTTP
//!   alone;
//! - **the bare relay** reads the body, publishes it exactly as the raw publisher does
//!   (same connection settings, channels, properties and `mandatory`), waits for the confirm
//!   and answers 202 on an Ack, 503 otherwise. No envelope, key, routing template, headers,
//!   metrics, spool or logging: what any relay built from hyper and lapin costs at the least,
//!   on this machine, with its load generator beside it.
//!
//! Each runs in its own process (the bench binary re-executed with `--floor-server` or
//! `--bare-server`), so that its CPU time and memory are read from `/proc` exactly like the
//! relay's. Both use the relay's server stack (hyper-util's auto builder, a multi-threaded
//! Tokio runtime, `TCP_NODELAY`). Between them and the relay, the bench separates what HTTP
//! costs, what the hand-off to the broker costs, and what the relay's own work costs.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::payload::Webhook;
use crate::raw_publisher::{RawProperties, RawPublisher};
use crate::stats::Outcome;

/// The answer to a webhook kept: about as long as the relay's.
const ACCEPTED: &str =
    r#"{"status":"accepted","message_id":"00000000-0000-7000-8000-000000000000"}"#;
/// The answer to anything else.
const NOT_ACCEPTED: &str = r#"{"status":"not accepted"}"#;

/// What the bare relay publishes to, and what it is sent.
pub struct Bare {
    pub amqp_url: String,
    pub exchange: String,
    pub channels: usize,
    pub properties: RawProperties,
    /// The bench's webhooks, so that a body is published with the routing key (and, with
    /// `--raw-properties relay`, the ids) the raw publisher gives it, without parsing it.
    pub webhooks: Vec<Webhook>,
}

/// What a server does with a body it has read.
enum Kind {
    Floor,
    Bare {
        publisher: RawPublisher,
        by_body: HashMap<Bytes, Webhook>,
    },
}

/// Serves on `127.0.0.1:0` until killed; prints `listening addr=...` on stderr once bound
/// (the bare relay: once connected to the broker too).
pub fn serve(bare: Option<Bare>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?
        .block_on(async {
            let kind = match bare {
                None => Kind::Floor,
                Some(bare) => Kind::Bare {
                    publisher: RawPublisher::connect(
                        "hirehop-relay bench bare relay",
                        &bare.amqp_url,
                        &bare.exchange,
                        bare.channels,
                        bare.properties,
                    )
                    .await?,
                    by_body: bare
                        .webhooks
                        .into_iter()
                        .map(|w| (w.body.clone(), w))
                        .collect(),
                },
            };
            // Made once and kept for the life of the process (the bench kills it): every
            // connection borrows it, with no reference count touched per request.
            accept_loop(Box::leak(Box::new(kind))).await
        })
}

async fn accept_loop(kind: &'static Kind) -> anyhow::Result<()> {
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .context("failed to bind 127.0.0.1:0")?;
    eprintln!("listening addr={}", listener.local_addr()?);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                eprintln!("accept failed: {err}");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = service_fn(move |request| accept(kind, request));
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
}

async fn accept(
    kind: &'static Kind,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    // Read the whole body, as the relay must before it can answer.
    let status = match (request.into_body().collect().await, kind) {
        (Err(_), _) => StatusCode::BAD_REQUEST,
        (Ok(_), Kind::Floor) => StatusCode::ACCEPTED,
        (Ok(body), Kind::Bare { publisher, by_body }) => match by_body.get(&body.to_bytes()) {
            None => {
                eprintln!("bare relay: a body that is not one of the bench's webhooks");
                StatusCode::NOT_FOUND
            }
            Some(webhook) => match publisher.publish_confirmed(webhook).await {
                Outcome::Accepted => StatusCode::ACCEPTED,
                // On stderr, which the bench shows when a phase has answers other than 202.
                failed => {
                    eprintln!("bare relay: not accepted: {failed:?}");
                    StatusCode::SERVICE_UNAVAILABLE
                }
            },
        },
    };
    let body = if status == StatusCode::ACCEPTED {
        ACCEPTED
    } else {
        NOT_ACCEPTED
    };
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}
