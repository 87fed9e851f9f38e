//! The HTTP floor: a plain hyper server that reads the body and answers 202, with no broker.
//!
//! It runs in its own process (the bench binary re-executed with `--floor-server`) so that
//! its CPU time and memory are read from `/proc` exactly like the relay's. It uses the same
//! server stack as the relay (hyper-util's auto builder, a multi-threaded Tokio runtime,
//! `TCP_NODELAY`), so the difference between the two is the relay's own work per webhook:
//! envelope, key, routing key, AMQP publish and confirm.

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

/// The floor's answer: about as long as the relay's.
const ACCEPTED: &str =
    r#"{"status":"accepted","message_id":"00000000-0000-7000-8000-000000000000"}"#;

/// Serves on `127.0.0.1:0` until killed; prints `listening addr=...` on stderr once bound.
pub fn serve() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?
        .block_on(accept_loop())
}

async fn accept_loop() -> anyhow::Result<()> {
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
        let connection = builder
            .serve_connection(TokioIo::new(stream), service_fn(accept))
            .into_owned();
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
}

async fn accept(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // Read the whole body, as the relay must before it can answer.
    let status = match request.into_body().collect().await {
        Ok(_) => StatusCode::ACCEPTED,
        Err(_) => StatusCode::BAD_REQUEST,
    };
    let mut response = Response::new(Full::new(Bytes::from_static(ACCEPTED.as_bytes())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}
