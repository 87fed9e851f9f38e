//! The HTTP side of the load generator: one hyper HTTP/1.1 keep-alive connection per worker,
//! as a webhook sender behind a load balancer would hold them.

use std::net::SocketAddr;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::load::{Client, REQUEST_TIMEOUT};
use crate::payload::Webhook;
use crate::stats::Outcome;

/// Where the webhooks go.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub path: String,
}

/// One keep-alive connection; re-opened if the server closes it.
pub struct HttpClient {
    target: Target,
    host: HeaderValue,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl HttpClient {
    /// Opens the connection now, so that connecting is not part of the measurement.
    pub async fn connect(target: &Target) -> anyhow::Result<HttpClient> {
        let host = HeaderValue::from_str(&target.addr.to_string())
            .context("a socket address is a valid Host header")?;
        let sender = open(target.addr)
            .await
            .with_context(|| format!("failed to connect to {}", target.addr))?;
        Ok(HttpClient {
            target: target.clone(),
            host,
            sender: Some(sender),
        })
    }

    /// `count` connections to `target`.
    pub async fn connect_many(target: &Target, count: usize) -> anyhow::Result<Vec<HttpClient>> {
        let mut clients = Vec::with_capacity(count);
        for _ in 0..count {
            clients.push(HttpClient::connect(target).await?);
        }
        Ok(clients)
    }

    async fn post(&mut self, body: Bytes) -> Result<Outcome, String> {
        let sender = match &mut self.sender {
            Some(sender) if !sender.is_closed() => sender,
            _ => self
                .sender
                .insert(open(self.target.addr).await.map_err(|e| e.to_string())?),
        };
        sender.ready().await.map_err(|e| e.to_string())?;
        let request = Request::builder()
            .method(Method::POST)
            .uri(self.target.path.as_str())
            .header(HOST, self.host.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        // Read the (small) answer to the end so the connection can carry the next request.
        response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok(if status.is_success() {
            Outcome::Accepted
        } else {
            Outcome::Rejected(status.as_u16().to_string())
        })
    }
}

impl Client for HttpClient {
    async fn send(&mut self, webhook: &Webhook) -> Outcome {
        match tokio::time::timeout(REQUEST_TIMEOUT, self.post(webhook.body.clone())).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(err)) => {
                self.sender = None;
                Outcome::Failed(err)
            }
            Err(_) => {
                self.sender = None;
                Outcome::Failed(format!("no answer within {REQUEST_TIMEOUT:?}"))
            }
        }
    }
}

/// `GET path` on a fresh connection; the status and the body as JSON (`Null` if it is not).
pub async fn get_json(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, serde_json::Value)> {
    let mut sender = open(addr).await?;
    let request = Request::builder()
        .method(Method::GET)
        .uri(path)
        .header(HOST, addr.to_string())
        .body(Full::new(Bytes::new()))?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((
        status,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    ))
}

async fn open(addr: SocketAddr) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(addr).await?;
    // Requests are small and sent in one write, like the relay's answers.
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        // A connection error shows up on the next request through `sender`.
        let _ = connection.await;
    });
    Ok(sender)
}
