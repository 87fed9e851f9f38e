//! Starting relays against the real broker, talking HTTP to them, waiting for what they do,
//! reading what reached the broker, and leaving the broker as it was.
//!
//! - [`eventually`] is the one way to wait for a condition: it polls, and fails the test with
//!   what it waited for and what it saw last.
//! - [`TestRelay::builder`] starts a relay in this process, [`RelayProcess`] the real binary.
//! - [`TestExchange`] names what a test declares on the broker and deletes it when dropped, so
//!   a test that fails leaves the broker as clean as one that passes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_lite::StreamExt;
use hirehop_relay::Relay;
use hirehop_relay::config::Config;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::proxy::Proxy;

/// The export key every test relay accepts.
pub const KEY: &str = "k3y-for-tests-0001";

/// Ceiling for anything a test waits on; a healthy run never comes close.
pub const PATIENCE: Duration = Duration::from_secs(15);

/// How often [`eventually`] looks again.
const POLL: Duration = Duration::from_millis(20);

/// What an [`eventually`] check gives: `Some` or `Ok` with a value once its condition holds;
/// `None`, or `Err` with what it saw instead, while it does not.
pub trait Observed {
    type Value;
    fn observed(self) -> Result<Self::Value, String>;
}

impl<T> Observed for Option<T> {
    type Value = T;
    fn observed(self) -> Result<T, String> {
        self.ok_or_else(|| "nothing".to_owned())
    }
}

impl<T, E: std::fmt::Debug> Observed for Result<T, E> {
    type Value = T;
    fn observed(self) -> Result<T, String> {
        self.map_err(|seen| format!("{seen:?}"))
    }
}

/// Runs `check` every 20 ms until its condition holds, and returns the value it gave then.
/// When `deadline` passes first (a check still running is cut short), the test fails, saying
/// what it waited for and what `check` saw last.
///
/// `check` is a closure returning a future (`|| async { ... }`) rather than an async closure,
/// whose futures the compiler cannot yet prove `Send` for inside a spawned task. A check that
/// must change something outside it goes through a `Mutex`.
pub async fn eventually<O: Observed, F: Future<Output = O>>(
    what: &str,
    deadline: Duration,
    mut check: impl FnMut() -> F,
) -> O::Value {
    let mut last = None;
    let polled = tokio::time::timeout(deadline, async {
        loop {
            match check().await.observed() {
                Ok(value) => return value,
                Err(seen) => last = Some(seen),
            }
            tokio::time::sleep(POLL).await;
        }
    })
    .await;
    polled.unwrap_or_else(|_| {
        panic!(
            "waited {deadline:?} for {what}, in vain; last seen: {}",
            last.as_deref()
                .unwrap_or("nothing yet: the first check never finished")
        )
    })
}

pub fn amqp_url() -> String {
    std::env::var("HIREHOP_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// The broker's `host:port`, for the proxy.
pub fn broker_addr() -> SocketAddr {
    let uri: lapin::uri::AMQPUri = amqp_url()
        .parse()
        .expect("HIREHOP_TEST_AMQP_URL is a valid AMQP URI");
    format!("{}:{}", uri.authority.host, uri.authority.port)
        .parse()
        .expect("the test broker's host is an IP address")
}

/// A connection for the test's own declarations and consumers.
pub async fn broker() -> lapin::Connection {
    broker_at(&amqp_url()).await
}

/// A connection to the broker at `url` (e.g. a node of the test's own).
pub async fn broker_at(url: &str) -> lapin::Connection {
    let connected = tokio::time::timeout(
        PATIENCE,
        lapin::Connection::connect(url, lapin::ConnectionProperties::default()),
    )
    .await;
    match connected {
        Ok(Ok(connection)) => connection,
        Ok(Err(err)) => no_broker(url, &err.to_string()),
        Err(_) => no_broker(url, "timed out"),
    }
}

fn no_broker(url: &str, why: &str) -> ! {
    panic!(
        "cannot reach RabbitMQ at {url} ({why}). These tests need a real broker: start one \
         with `rabbitmq-server -detached` (Debian package rabbitmq-server) or \
         `docker compose up -d rabbitmq`, or point HIREHOP_TEST_AMQP_URL at one"
    )
}

/// A realistic HireHop webhook, signed with [`KEY`].
pub fn webhook(event: &str) -> String {
    webhook_with(event, KEY, 1)
}

pub fn webhook_with(event: &str, key: &str, company_id: u64) -> String {
    serde_json::json!({
        "time": "2022-03-29 07:50:42",
        "user_id": 1,
        "user_name": "John Smith",
        "user_email": "john@email.com",
        "company_id": company_id,
        "export_key": key,
        "event": event,
        "data": {"ID": 1234, "NUMBER": 1234, "JOB_NAME": "Summer festival", "STATUS": 2},
        "changes": {"STATUS": {"from": "1", "to": "2"}}
    })
    .to_string()
}

/// An HTTP answer, fully read.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("the relay answers JSON")
    }

    /// A 503 that tells the client when to come back (`Retry-After`, 5 s by default).
    pub fn assert_unavailable(&self) {
        assert_eq!(self.status, StatusCode::SERVICE_UNAVAILABLE, "{self:?}");
        assert_eq!(self.headers["retry-after"], "5", "{self:?}");
    }

    pub fn message_id(&self) -> String {
        self.json()["message_id"]
            .as_str()
            .expect("a 202 carries the message_id")
            .to_owned()
    }
}

/// How [`send`]'s error starts when the relay took longer than [`PATIENCE`] to answer.
pub const NO_ANSWER: &str = "no answer in time";

/// Sends one request on a fresh connection; an answer that takes longer than [`PATIENCE`]
/// is an error (a hung relay fails the test instead of hanging it).
pub async fn send(addr: SocketAddr, request: Request<Full<Bytes>>) -> Result<Reply, String> {
    tokio::time::timeout(PATIENCE, send_unbounded(addr, request))
        .await
        .unwrap_or_else(|_| Err(format!("{NO_ANSWER} ({PATIENCE:?})")))
}

async fn send_unbounded(addr: SocketAddr, request: Request<Full<Bytes>>) -> Result<Reply, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// The relay's `/metrics` at `addr` (the webhook port unless `metrics.listen` moved them), as
/// a client that asks for no format in particular gets them: Prometheus' text format 0.0.4.
pub async fn scrape(addr: SocketAddr) -> String {
    let reply = send(addr, request(Method::GET, "/metrics", ""))
        .await
        .expect("the relay answers /metrics");
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    String::from_utf8(reply.body.to_vec()).unwrap()
}

/// The value of the sample whose line starts with `series` (name and labels).
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

/// Waits until the sample `series` on `addr`'s `/metrics` passes `check` (described by
/// `what`), for [`PATIENCE`] at most.
pub async fn wait_sample(addr: SocketAddr, series: &str, what: &str, check: impl Fn(f64) -> bool) {
    eventually(&format!("{series} to be {what}"), PATIENCE, || async {
        let value = sample(&scrape(addr).await, series);
        if check(value) { Ok(()) } else { Err(value) }
    })
    .await;
}

/// The relay's `/readyz` at `addr`.
pub async fn readyz(addr: SocketAddr) -> Reply {
    send(addr, request(Method::GET, "/readyz", ""))
        .await
        .expect("the relay answers /readyz")
}

/// Waits until `addr`'s `/readyz` passes `check` (described by `what`), for [`PATIENCE`] at
/// most; returns that answer.
pub async fn wait_readyz(addr: SocketAddr, what: &str, check: impl Fn(&Reply) -> bool) -> Reply {
    eventually(&format!("/readyz to say {what}"), PATIENCE, || async {
        let reply = readyz(addr).await;
        if check(&reply) { Ok(reply) } else { Err(reply) }
    })
    .await
}

/// Posts a webhook for `event` over HTTP/2 on `io` (prior knowledge, or after ALPN chose h2);
/// `authority` is `scheme://host:port`.
pub async fn post_h2<IO>(io: IO, authority: &str, event: &str) -> StatusCode
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, _connection) = h2_connect(io).await;
    let req = h2_request(Method::POST, authority, "/webhooks/hirehop", webhook(event));
    sender.send_request(req).await.unwrap().status()
}

/// An HTTP/2 connection over `io` (prior knowledge, or after ALPN): its request sender, and
/// its task, which ends when the connection does.
pub async fn h2_connect<IO>(
    io: IO,
) -> (
    hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(io),
    )
    .await
    .unwrap();
    (sender, tokio::spawn(connection))
}

/// [`request`] for HTTP/2, which carries the authority (`http://host:port`) in the URI, not
/// in a Host header.
pub fn h2_request(
    method: Method,
    authority: &str,
    path: &str,
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    let mut req = request(method, path, body);
    *req.uri_mut() = format!("{authority}{path}").parse().unwrap();
    req.headers_mut().remove("host");
    req
}

pub fn request(method: Method, path: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", "relay.test")
        .body(Full::new(body.into()))
        .unwrap()
}

/// A TCP connection to `addr` from `from`, one of this machine's 127.0.0.0/8 addresses: a
/// client other than the test's usual 127.0.0.1, for the per-address limits.
pub async fn connect_from(addr: SocketAddr, from: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(from.parse().unwrap(), 0))
        .unwrap();
    socket.connect(addr).await.unwrap()
}

/// Writes `bytes` as they are and returns the response head (status line and headers).
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    read_head(&mut stream).await
}

pub async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    tokio::time::timeout(PATIENCE, async {
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => break,
            }
        }
    })
    .await
    .expect("the relay answers in time");
    String::from_utf8_lossy(&head).into_owned()
}

/// A spool directory of its own for each relay, under the system's temp directory.
pub fn spool_dir(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("{name}-spool"))
}

/// An exchange name no other test uses, on the test broker.
pub fn unique_exchange() -> TestExchange {
    TestExchange::new(Some(amqp_url()))
}

/// How long the cleanup of a [`TestExchange`] may take: it runs as a test ends, a failed one
/// included, and must not hang it (a broker that went away).
const CLEANUP_PATIENCE: Duration = Duration::from_secs(10);

/// An exchange name of a test's own. Dropped, it deletes from the test broker, as queues and as
/// exchanges, the names a relay on it declares (the exchange, `<name>.unrouted`,
/// `<name>.history`) and the names handed out by [`TestExchange::own`]: at the end of the
/// test, and also while a failed test unwinds, so that a red run leaves the broker clean.
pub struct TestExchange {
    name: String,
    /// The broker it is deleted from; none for a broker of the test's own.
    cleanup_url: Option<String>,
    own: Mutex<Vec<String>>,
}

impl TestExchange {
    /// A unique name on a broker of the test's own (`LocalCluster`), which goes with all on it
    /// when the test ends: nothing is deleted, so nothing waits on a node a fault left frozen
    /// or down.
    pub fn on_own_broker() -> TestExchange {
        TestExchange::new(None)
    }

    fn new(cleanup_url: Option<String>) -> TestExchange {
        TestExchange {
            name: format!("relay-test-{}", uuid::Uuid::now_v7().simple()),
            cleanup_url,
            own: Mutex::new(Vec::new()),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// `<exchange>.<suffix>`: the name of a queue or an exchange the test declares for itself,
    /// deleted with this exchange.
    pub fn own(&self, suffix: &str) -> String {
        let name = format!("{}.{suffix}", self.name);
        self.own.lock().unwrap().push(name.clone());
        name
    }
}

impl std::ops::Deref for TestExchange {
    type Target = str;
    fn deref(&self) -> &str {
        &self.name
    }
}

impl std::fmt::Display for TestExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

impl std::fmt::Debug for TestExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.name)
    }
}

impl Drop for TestExchange {
    fn drop(&mut self) {
        let Some(url) = self.cleanup_url.clone() else {
            return;
        };
        let mut names = vec![
            self.name.clone(),
            format!("{}.unrouted", self.name),
            format!("{}.history", self.name),
        ];
        names.append(&mut self.own.lock().unwrap_or_else(|e| e.into_inner()));
        // Drop cannot await, and a failed test unwinds inside its runtime: the deletes run on a
        // thread and a runtime of their own, and the test waits for them.
        let deleted = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|err| err.to_string())?;
            runtime.block_on(async {
                tokio::time::timeout(CLEANUP_PATIENCE, delete_all(&url, &names))
                    .await
                    .unwrap_or_else(|_| Err(format!("not done in {CLEANUP_PATIENCE:?}")))
            })
        })
        .join();
        match deleted {
            Ok(Ok(())) => {}
            Ok(Err(err)) => eprintln!("cleanup of exchange {}: {err}", self.name),
            Err(_) => eprintln!("cleanup of exchange {}: the thread panicked", self.name),
        }
    }
}

/// Deletes each of `names` as a queue and as an exchange, whichever it is (RabbitMQ deletes
/// what is not there without an error).
async fn delete_all(url: &str, names: &[String]) -> Result<(), String> {
    let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .map_err(|err| err.to_string())?;
    let mut failed = Vec::new();
    for name in names {
        // On a channel each: a refused delete (a queue still exclusive to the test's own
        // connection) closes its channel.
        let channel = connection
            .create_channel()
            .await
            .map_err(|err| err.to_string())?;
        if let Err(err) = channel
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await
        {
            failed.push(format!("queue {name}: {err}"));
            continue;
        }
        if let Err(err) = channel
            .exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default())
            .await
        {
            failed.push(format!("exchange {name}: {err}"));
            continue;
        }
        let _ = channel.close(200, "deleted".into()).await;
    }
    let _ = connection.close(200, "test done".into()).await;
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; "))
    }
}

/// The settings every relay under test starts from: a free port on loopback, the broker at
/// `url`, the exchange, and [`KEY`].
pub fn env<'a>(exchange: &'a str, url: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("RELAY_HTTP__LISTEN", "127.0.0.1:0"),
        ("RELAY_AMQP__URL", url),
        ("RELAY_AMQP__EXCHANGE", exchange),
        ("RELAY_AUTH__EXPORT_KEYS", KEY),
    ]
}

/// The configuration `env` (`RELAY_*` variables, later ones winning) and the TOML `file`
/// give, as the relay would load it.
pub fn config(env: &[(&str, &str)], file: Option<&str>) -> Config {
    let env: HashMap<String, String> = env
        .iter()
        .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
        .collect();
    let path = file.map(|contents| {
        let path =
            std::env::temp_dir().join(format!("relay-test-{}.toml", uuid::Uuid::now_v7().simple()));
        std::fs::write(&path, contents).unwrap();
        path
    });
    let config = Config::load_from(path.as_deref(), Some(env));
    if let Some(path) = path {
        let _ = std::fs::remove_file(path);
    }
    config.expect("test config is valid")
}

/// A relay running in this process, on an exchange of its own.
pub struct TestRelay {
    pub addr: SocketAddr,
    pub exchange: TestExchange,
    pub config: Config,
    shutdown: Option<CancellationToken>,
    task: Option<JoinHandle<Result<(), hirehop_relay::RunError>>>,
    broker: lapin::Connection,
    channel: lapin::Channel,
}

/// How a [`TestRelay`] is set up; [`TestRelayBuilder::start`] starts it.
pub struct TestRelayBuilder<'a> {
    env: Vec<(String, String)>,
    file: Option<&'a str>,
    /// Where the relay publishes, when not where the test watches (through a proxy).
    relay_url: Option<String>,
    /// Where the test watches: the test broker unless [`TestRelayBuilder::on`].
    watch_url: Option<String>,
    exchange: Option<TestExchange>,
    wait_for_broker: bool,
}

impl TestRelay {
    /// A relay with the test defaults, once it is connected to the test broker.
    pub async fn start() -> TestRelay {
        Self::builder().start().await
    }

    /// A relay set up by the builder's calls, started by its `start`.
    pub fn builder<'a>() -> TestRelayBuilder<'a> {
        TestRelayBuilder {
            env: Vec::new(),
            file: None,
            relay_url: None,
            watch_url: None,
            exchange: None,
            wait_for_broker: true,
        }
    }
}

impl<'a> TestRelayBuilder<'a> {
    /// A setting, as the `RELAY_*` variable that would set it; it wins over the defaults, the
    /// file and earlier calls.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        assert_ne!(
            key, "RELAY_AMQP__EXCHANGE",
            "name the exchange with .exchange(), so that it is deleted at the end"
        );
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Several settings, as [`TestRelayBuilder::env`].
    pub fn envs(self, vars: &[(&str, &str)]) -> Self {
        vars.iter()
            .fold(self, |builder, (key, value)| builder.env(key, value))
    }

    /// A configuration file with `toml` in it, under the settings.
    pub fn file(mut self, toml: &'a str) -> Self {
        self.file = Some(toml);
        self
    }

    /// Connected to the test broker through `proxy`, which can break the network.
    pub fn via(mut self, proxy: &Proxy) -> Self {
        self.relay_url = Some(via(proxy));
        self
    }

    /// On the broker at `url` (a node of the test's own), where the test watches too; the
    /// exchange is left there, to go with the node.
    pub fn on(mut self, url: &str) -> Self {
        self.watch_url = Some(url.to_owned());
        self
    }

    /// On `exchange`, which the test named first (to declare something for it, say).
    pub fn exchange(mut self, exchange: TestExchange) -> Self {
        self.exchange = Some(exchange);
        self
    }

    /// Serving at once, whether the broker answers or not (the spool keeps what it cannot
    /// confirm), instead of once the relay is connected.
    pub fn without_waiting_for_the_broker(mut self) -> Self {
        self.wait_for_broker = false;
        self
    }

    pub async fn start(self) -> TestRelay {
        let exchange = self.exchange.unwrap_or_else(|| match self.watch_url {
            Some(_) => TestExchange::on_own_broker(),
            None => unique_exchange(),
        });
        let watch_url = self.watch_url.unwrap_or_else(amqp_url);
        let relay_url = self.relay_url.unwrap_or_else(|| watch_url.clone());
        let spool = spool_dir(&exchange).to_string_lossy().into_owned();
        let mut env = env(&exchange, &relay_url);
        env.push(("RELAY_SPOOL__DIR", &spool));
        env.extend(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let config = config(&env, self.file);
        let broker = broker_at(&watch_url).await;
        let channel = broker.create_channel().await.unwrap();
        let (addr, shutdown, task) = start_in_process(&config, self.wait_for_broker).await;
        TestRelay {
            addr,
            exchange,
            config,
            shutdown: Some(shutdown),
            task: Some(task),
            broker,
            channel,
        }
    }
}

/// What `main` does with a loaded configuration, in this process: the publisher (connected,
/// when `wait_for_broker`), the spool, the metrics and `run` on the configured port. Returns
/// the port, the sender that shuts the relay down, and its task.
async fn start_in_process(
    config: &Config,
    wait_for_broker: bool,
) -> (
    SocketAddr,
    CancellationToken,
    JoinHandle<Result<(), hirehop_relay::RunError>>,
) {
    // What `main` runs, in two steps for the address in between.
    let shutdown = CancellationToken::new();
    let relay = tokio::time::timeout(PATIENCE, Relay::start(config.clone(), shutdown.clone()))
        .await
        .expect("the relay starts in time")
        .expect("the relay starts")
        .expect("the relay was not shut down");
    if wait_for_broker {
        tokio::time::timeout(PATIENCE, relay.wait_connected())
            .await
            .expect("the relay connects to the broker in time")
            .expect("the relay sets up the broker");
    }
    let addr = relay.local_addr().unwrap();
    (addr, shutdown, tokio::spawn(relay.run()))
}

impl TestRelay {
    /// A fresh exclusive queue bound to the relay's exchange with `pattern`.
    pub async fn queue(&self, pattern: &str) -> TestQueue {
        let name = format!("{}.q.{}", self.exchange, uuid::Uuid::now_v7().simple());
        self.channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        self.channel
            .queue_bind(
                name.as_str().into(),
                self.exchange.as_str().into(),
                pattern.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        TestQueue::consume(&self.broker, &name).await
    }

    /// The relay's `<exchange>.unrouted` queue.
    pub async fn unrouted(&self) -> TestQueue {
        TestQueue::consume(&self.broker, &format!("{}.unrouted", self.exchange)).await
    }

    pub async fn post(&self, body: impl Into<Bytes>) -> Reply {
        self.send(request(Method::POST, &self.config.http.path, body))
            .await
    }

    /// Posts a valid webhook for `event`, checks that it was accepted into the spool (not
    /// published), and returns its message id.
    pub async fn post_spooled(&self, event: &str) -> String {
        let reply = self.post(webhook(event)).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
        assert_eq!(reply.json()["status"], "spooled", "{reply:?}");
        reply.message_id()
    }

    pub async fn send(&self, request: Request<Full<Bytes>>) -> Reply {
        send(self.addr, request).await.expect("the relay answers")
    }

    /// Posts a valid webhook for `event` and checks it is the next message on `queue`:
    /// whatever the relay published before it would have arrived first.
    pub async fn assert_nothing_published_before_marker(&self, queue: &mut TestQueue, event: &str) {
        let reply = self.post(webhook(event)).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
        let delivery = queue.next().await;
        assert_eq!(
            delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string()),
            Some(reply.message_id()),
            "something was published before the marker: {:?}",
            String::from_utf8_lossy(&delivery.data)
        );
    }

    /// Graceful shutdown; the relay's exchange and spool are deleted as it is dropped.
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            shutdown.cancel();
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(PATIENCE, task)
                .await
                .expect("the relay stops in time")
                .expect("the relay task does not panic")
                .expect("the relay serves");
        }
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        // Still running when a test fails: stopped first, so that it declares nothing again
        // while its exchange is deleted (which happens next, as the fields drop).
        if let Some(task) = self.task.take() {
            task.abort();
        }
        let _ = std::fs::remove_dir_all(&self.config.spool.dir);
    }
}

/// The test broker's URL, pointed at `proxy` instead.
pub fn via(proxy: &Proxy) -> String {
    let url = amqp_url().replacen(&broker_addr().to_string(), &proxy.addr.to_string(), 1);
    assert_ne!(
        url,
        amqp_url(),
        "HIREHOP_TEST_AMQP_URL must spell out host:port"
    );
    url
}

/// An exclusive queue bound to `exchange` with `#`, for tests that drive a relay process:
/// declared before the load starts, so it catches everything.
pub async fn catch_all(broker: &lapin::Connection, exchange: &str) -> TestQueue {
    let channel = broker.create_channel().await.unwrap();
    let name = format!("{exchange}.all");
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    };
    channel
        .queue_declare(name.as_str().into(), exclusive, FieldTable::default())
        .await
        .unwrap();
    channel
        .queue_bind(
            name.as_str().into(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    TestQueue::consume(broker, &name).await
}

/// `clients` concurrent clients, each posting webhooks to `addr` until it stops answering
/// (or `max_each` are sent); each returns the message ids that got a 202. `accepted` counts
/// 202s as they come, so a test can act in the middle of the load.
pub fn post_until_gone(
    addr: SocketAddr,
    clients: usize,
    max_each: usize,
    accepted: &Arc<std::sync::atomic::AtomicUsize>,
) -> Vec<JoinHandle<Vec<String>>> {
    (0..clients)
        .map(|_| {
            let accepted = Arc::clone(accepted);
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for _ in 0..max_each {
                    let req = request(Method::POST, "/webhooks/hirehop", webhook("job.updated"));
                    match send(addr, req).await {
                        Ok(reply) if reply.status == StatusCode::ACCEPTED => {
                            ids.push(reply.message_id());
                            accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        Ok(reply) => panic!("unexpected {}: {:?}", reply.status, reply.body),
                        Err(err) if err.starts_with(NO_ANSWER) => panic!("{err}"),
                        // The listener is closed or the process is gone.
                        Err(_) => break,
                    }
                }
                ids
            })
        })
        .collect()
}

/// Waits until `counter` reaches `n` (a ceiling of [`PATIENCE`]).
pub async fn wait_count(counter: &std::sync::atomic::AtomicUsize, n: usize) {
    eventually(&format!("the count to reach {n}"), PATIENCE, || async {
        let count = counter.load(std::sync::atomic::Ordering::SeqCst);
        if count >= n { Ok(()) } else { Err(count) }
    })
    .await;
}

/// The ready messages and the consumers of `queue`, or `None` when the broker has no such
/// queue. Asked passively, on a channel of its own: a missing queue closes the channel it was
/// asked on.
pub async fn queue_counts(broker: &lapin::Connection, queue: &str) -> Option<(u32, u32)> {
    let channel = broker.create_channel().await.unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let declared = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .ok()?;
    let _ = channel.close(200, "counted".into()).await;
    Some((declared.message_count(), declared.consumer_count()))
}

/// A queue being consumed (auto-ack).
pub struct TestQueue {
    consumer: lapin::Consumer,
    _channel: lapin::Channel,
}

impl TestQueue {
    /// Consumes the existing queue `queue`.
    pub async fn consume(broker: &lapin::Connection, queue: &str) -> TestQueue {
        let channel = broker.create_channel().await.unwrap();
        let consumer = channel
            .basic_consume(
                queue.into(),
                format!("test-{}", uuid::Uuid::now_v7().simple()).into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        TestQueue {
            consumer,
            _channel: channel,
        }
    }

    /// Takes messages until every id in `ids` has arrived (others may come too: delivery is
    /// at-least-once); fails the test if one does not arrive within [`PATIENCE`].
    pub async fn expect_all(&mut self, ids: impl IntoIterator<Item = String>) {
        let mut missing: std::collections::HashSet<String> = ids.into_iter().collect();
        while !missing.is_empty() {
            let next = tokio::time::timeout(PATIENCE, self.consumer.next()).await;
            let Ok(Some(Ok(delivery))) = next else {
                panic!("{} accepted webhooks never arrived", missing.len());
            };
            missing.remove(&message_id(&delivery));
        }
    }

    /// The next message; fails the test if none arrives within [`PATIENCE`].
    pub async fn next(&mut self) -> lapin::message::Delivery {
        tokio::time::timeout(PATIENCE, self.consumer.next())
            .await
            .expect("a message arrives in time")
            .expect("the consumer is open")
            .expect("the delivery is readable")
    }
}

pub fn message_id(delivery: &lapin::message::Delivery) -> String {
    delivery
        .properties
        .message_id()
        .as_ref()
        .expect("every message has a message_id")
        .to_string()
}

/// The real binary, started as a child process; its stderr is collected line by line.
pub struct RelayProcess {
    pub child: tokio::process::Child,
    pub addr: Option<SocketAddr>,
    /// The spool directory it gets unless its environment names one; removed when dropped.
    own_spool: std::path::PathBuf,
    lines: mpsc::UnboundedReceiver<String>,
    log: Vec<String>,
    /// Lines before this one were matched by an earlier [`RelayProcess::wait_for`].
    matched: usize,
}

/// The `addr` field of a log line: `addr=127.0.0.1:1234` in text logs,
/// `"addr":"127.0.0.1:1234"` in JSON ones.
pub fn addr_in(line: &str) -> SocketAddr {
    let addr = match serde_json::from_str::<serde_json::Value>(line) {
        Ok(json) => json["fields"]["addr"].as_str().and_then(|s| s.parse().ok()),
        Err(_) => line
            .split("addr=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok()),
    };
    addr.unwrap_or_else(|| panic!("no address in {line:?}"))
}

/// One `rabbitmqctl list_connections` column for each connection of the relay publishing to
/// `exchange`, found by the connection name the relay gives itself.
pub fn relay_connections(exchange: &str, column: &str) -> Vec<String> {
    let output = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "-q", column, "client_properties"])
        .output()
        .expect("rabbitmqctl runs (it ships with rabbitmq-server)");
    let listing = String::from_utf8_lossy(&output.stdout);
    let needle = format!("exchange={exchange} ");
    listing
        .lines()
        .filter(|line| line.contains(&needle))
        .filter_map(|line| line.split('\t').next())
        .map(str::to_owned)
        .collect()
}

impl RelayProcess {
    /// Starts the binary and returns at once.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> RelayProcess {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_hirehop-relay"));
        let own_spool = spool_dir(&format!("relay-process-{}", uuid::Uuid::now_v7().simple()));
        command
            .args(args)
            .env_clear()
            .env("RUST_LOG", "info")
            .env("RELAY_SPOOL__DIR", &own_spool)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("the relay binary starts");
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                let _ = tx.send(line);
            }
        });
        RelayProcess {
            child,
            addr: None,
            own_spool,
            lines,
            log: Vec::new(),
            matched: 0,
        }
    }

    /// Starts the binary and waits for its "listening" line, the readiness signal: the port
    /// is bound and the broker is set up.
    pub async fn spawn(env: &[(&str, &str)]) -> RelayProcess {
        let mut process = Self::start(&[], env);
        let line = process.wait_for("listening").await;
        // Lines logged before "listening" stay available to later waits.
        process.matched = 0;
        process.addr = Some(addr_in(&line));
        process
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("the relay is listening")
    }

    /// Waits (at most [`PATIENCE`]) for a log line containing `needle`, after the line the
    /// previous wait matched.
    pub async fn wait_for(&mut self, needle: &str) -> String {
        if let Some(i) = self.log[self.matched..]
            .iter()
            .position(|l| l.contains(needle))
        {
            self.matched += i + 1;
            return self.log[self.matched - 1].clone();
        }
        let found = tokio::time::timeout(PATIENCE, async {
            while let Some(line) = self.lines.recv().await {
                self.log.push(line.clone());
                if line.contains(needle) {
                    self.matched = self.log.len();
                    return Some(line);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            _ => panic!(
                "no log line with {needle:?}; log so far:\n{}",
                self.log.join("\n")
            ),
        }
    }

    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("the relay is running");
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Stops the relay with SIGTERM, which must end it with status 0; returns its whole log.
    pub async fn terminate(self) -> String {
        self.signal("TERM");
        let (status, log) = self.exit().await;
        assert!(
            status.success(),
            "exit status {status:?} after SIGTERM; log:\n{log}"
        );
        log
    }

    /// Waits for the process to exit; returns its status and its whole log.
    pub async fn exit(mut self) -> (std::process::ExitStatus, String) {
        let status = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("the relay exits in time")
            .unwrap();
        while let Some(line) = self.lines.recv().await {
            self.log.push(line);
        }
        (status, self.log.join("\n"))
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        // The child is killed as it drops (`kill_on_drop`), a failed test's included.
        let _ = std::fs::remove_dir_all(&self.own_spool);
    }
}
