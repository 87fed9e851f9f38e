//! TLS on the webhook port: HTTP/2 over ALPN, renewed certificates, a certificate and key
//! that do not belong together (at start, on reload, in `check-config`), stalled handshakes
//! against the connection caps, plain HTTP sent to the TLS port.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{self, RelayProcess, TestRelay, env, eventually, unique_exchange};

/// A directory of its own for a test's certificates, removed when dropped.
struct CertDir(PathBuf);

impl CertDir {
    fn new() -> CertDir {
        let dir = std::env::temp_dir().join(format!("relay-tls-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        CertDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// A new self-signed pair for localhost, written to `<name>.crt` and `<name>.key`; returns
    /// the certificate (the root a client trusts).
    fn pair(&self, name: &str) -> Vec<u8> {
        self_signed(
            &self.path(&format!("{name}.crt")),
            &self.path(&format!("{name}.key")),
            name,
        )
    }

    /// Puts `<from>.crt` (or `.key`) in place as the file the relay reads, in one step (a
    /// rename), as certbot and Kubernetes do.
    fn install(&self, from: &str, ext: &str) {
        let staged = self.path(&format!("staged.{ext}"));
        std::fs::copy(self.path(&format!("{from}.{ext}")), &staged).unwrap();
        std::fs::rename(&staged, self.path(&format!("live.{ext}"))).unwrap();
    }

    fn live(&self) -> (String, String) {
        let show = |ext: &str| {
            self.path(&format!("live.{ext}"))
                .to_string_lossy()
                .into_owned()
        };
        (show("crt"), show("key"))
    }
}

impl Drop for CertDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A self-signed certificate for localhost, made with the `openssl` command.
fn self_signed(cert: &Path, key: &Path, name: &str) -> Vec<u8> {
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "2", "-subj", &format!("/CN={name}")])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        // An end-entity certificate: webpki refuses a CA certificate as a server's own.
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(key)
        .arg("-out")
        .arg(cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("the openssl command is installed (Debian package openssl)");
    assert!(status.success());
    std::fs::read(cert).unwrap()
}

/// Posts a webhook over TLS trusting only `root_pem`; returns the status and the protocol
/// ALPN chose, or `None` if the handshake fails (the server's certificate is not that one).
async fn tls_post(addr: SocketAddr, root_pem: &[u8]) -> Option<(StatusCode, Option<Vec<u8>>)> {
    let body = harness::webhook("job.updated");
    let (status, alpn, _) =
        tls_request(addr, root_pem, Method::POST, "/webhooks/hirehop", body).await?;
    Some((status, alpn))
}

/// The relay's `/metrics`, over TLS.
async fn tls_scrape(addr: SocketAddr, root_pem: &[u8]) -> String {
    let (status, _, body) = tls_request(addr, root_pem, Method::GET, "/metrics", String::new())
        .await
        .expect("the handshake succeeds");
    assert_eq!(status, StatusCode::OK);
    String::from_utf8(body.to_vec()).unwrap()
}

/// One HTTP/2 request over TLS trusting only `root_pem`: the status, the protocol ALPN chose
/// and the body; `None` if the handshake fails.
async fn tls_request(
    addr: SocketAddr,
    root_pem: &[u8],
    method: Method,
    path: &str,
    body: String,
) -> Option<(StatusCode, Option<Vec<u8>>, bytes::Bytes)> {
    use rustls_pki_types::pem::PemObject;
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(root_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(
        rustls::crypto::ring::default_provider().into(),
    )
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let stream = connector.connect(name, tcp).await.ok()?;
    let (_, session) = stream.get_ref();
    let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
    let authority = format!("https://localhost:{}", addr.port());
    let (mut sender, _connection) = harness::h2_connect(stream).await;
    let request = harness::h2_request(method, &authority, path, body);
    let response = sender.send_request(request).await.ok()?;
    let status = response.status();
    let body = response.into_body().collect().await.ok()?.to_bytes();
    Some((status, alpn, body))
}

/// Posts over TLS trusting `root_pem` until the relay serves that certificate (at most
/// `within`); the answer must then be a 202.
async fn served_within(addr: SocketAddr, root_pem: &[u8], within: Duration) {
    let (status, _) = eventually("the certificate to be served", within, || async {
        tls_post(addr, root_pem).await
    })
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn tls_serves_h2_and_picks_up_a_renewed_certificate() {
    let dir = CertDir::new();
    let first = dir.pair("first");
    dir.install("first", "crt");
    dir.install("first", "key");
    let (cert, key) = dir.live();
    let relay = TestRelay::builder()
        .env("RELAY_TLS__CERT_FILE", &cert)
        .env("RELAY_TLS__KEY_FILE", &key)
        .start()
        .await;
    let (status, alpn) = tls_post(relay.addr, &first)
        .await
        .expect("the first certificate");
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));

    // Renewal: new files in place; the relay notices within its check interval.
    let second = dir.pair("second");
    dir.install("second", "key");
    dir.install("second", "crt");
    served_within(relay.addr, &second, Duration::from_secs(40)).await;
    relay.stop().await;
}

/// The relay's environment for a TLS port with the live pair in `dir`.
fn tls_env<'a>(
    exchange: &'a str,
    url: &'a str,
    live: &'a (String, String),
) -> Vec<(&'a str, &'a str)> {
    let mut relay_env = env(exchange, url);
    relay_env.push(("RELAY_TLS__CERT_FILE", &live.0));
    relay_env.push(("RELAY_TLS__KEY_FILE", &live.1));
    relay_env
}

#[tokio::test]
async fn a_certificate_and_key_that_do_not_belong_together_are_refused_at_start_and_by_check_config()
 {
    let dir = CertDir::new();
    dir.pair("a");
    dir.pair("b");
    dir.install("a", "crt");
    dir.install("b", "key");
    let (exchange, url, live) = (unique_exchange(), harness::amqp_url(), dir.live());
    let relay_env = tls_env(&exchange, &url, &live);

    let (status, log) = RelayProcess::start(&[], &relay_env).exit().await;
    assert!(
        !status.success(),
        "the relay served a mismatched pair:\n{log}"
    );
    assert!(
        log.contains("does not belong to the private key") && log.contains(&live.0),
        "{log}"
    );
    assert!(!log.contains("listening"), "{log}");

    let (status, log) = RelayProcess::start(&["check-config"], &relay_env)
        .exit()
        .await;
    assert!(!status.success());
    assert!(log.contains("does not belong to the private key"), "{log}");

    // A certificate file that is not there.
    let missing = (
        dir.path("nowhere.crt").to_string_lossy().into_owned(),
        live.1.clone(),
    );
    let (status, log) = RelayProcess::start(&["check-config"], &tls_env(&exchange, &url, &missing))
        .exit()
        .await;
    assert!(!status.success());
    assert!(
        log.contains("failed to read certificate chain") && log.contains("nowhere.crt"),
        "{log}"
    );

    // The matching pair passes.
    dir.install("b", "crt");
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_hirehop-relay"))
        .arg("check-config")
        .env_clear()
        .envs(relay_env.iter().copied())
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let printed = String::from_utf8_lossy(&check.stdout);
    assert!(
        printed.contains("# tls: ") && printed.contains("matches"),
        "{printed}"
    );
}

#[tokio::test]
async fn a_reload_keeps_the_old_pair_until_the_matching_key_arrives() {
    let dir = CertDir::new();
    let old = dir.pair("old");
    dir.install("old", "crt");
    dir.install("old", "key");
    let (exchange, url, live) = (unique_exchange(), harness::amqp_url(), dir.live());
    let mut relay = RelayProcess::spawn(&tls_env(&exchange, &url, &live)).await;
    relay.wait_for("connected to the broker").await;
    let addr = relay.addr();
    assert_eq!(tls_post(addr, &old).await.unwrap().0, StatusCode::ACCEPTED);

    // Only the new certificate is in place: the relay keeps the old pair, and says so.
    let new = dir.pair("new");
    dir.install("new", "crt");
    relay.signal("HUP");
    relay.wait_for("reloading TLS certificate").await;
    let failed = relay.wait_for("TLS certificate reload failed").await;
    assert!(
        failed.contains("ERROR") && failed.contains("does not belong"),
        "{failed}"
    );
    assert_eq!(tls_post(addr, &old).await.unwrap().0, StatusCode::ACCEPTED);
    assert!(
        tls_post(addr, &new).await.is_none(),
        "a mismatched pair is served"
    );

    // The key arrives: the new pair is served from the next check on (SIGHUP: at once).
    dir.install("new", "key");
    relay.signal("HUP");
    relay.wait_for("TLS certificate reloaded").await;
    served_within(addr, &new, Duration::from_secs(5)).await;
    assert!(tls_post(addr, &old).await.is_none());

    // Certbot's order, key and chain a moment apart, caught in between: the relay waits
    // for the pair to settle, without an error.
    let third = dir.pair("third");
    dir.install("third", "key");
    relay.signal("HUP");
    relay.wait_for("reloading TLS certificate").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    dir.install("third", "crt");
    relay.wait_for("TLS certificate reloaded").await;
    served_within(addr, &third, Duration::from_secs(5)).await;

    let log = relay.terminate().await;
    assert_eq!(
        log.matches("TLS certificate reload failed").count(),
        1,
        "only the pair that stayed mismatched is an error:\n{log}"
    );
}

/// A TCP connection from `from` (a 127.0.0.0/8 address) that starts a TLS record and then
/// says nothing more: a stalled handshake.
async fn stalled_handshake(relay: SocketAddr, from: &str) -> tokio::net::TcpStream {
    let mut stream = harness::connect_from(relay, from).await;
    // A handshake record header of a ClientHello, and no ClientHello.
    let _ = stream.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).await;
    stream
}

#[tokio::test]
async fn stalled_handshakes_from_one_address_cannot_keep_a_tls_client_out() {
    let dir = CertDir::new();
    let root = dir.pair("relay");
    dir.install("relay", "crt");
    dir.install("relay", "key");
    let (cert, key) = dir.live();
    let relay = TestRelay::builder()
        .env("RELAY_TLS__CERT_FILE", &cert)
        .env("RELAY_TLS__KEY_FILE", &key)
        .env("RELAY_TLS__HANDSHAKE_TIMEOUT_MS", "1000")
        .env("RELAY_HTTP__MAX_CONNECTIONS", "32")
        .env("RELAY_HTTP__MAX_CONNECTIONS_PER_IP", "8")
        .start()
        .await;
    let addr = relay.addr;
    // About 60 new stalled handshakes a second from 127.0.0.2, for the whole test: alone, they
    // would hold the 32 connections for the header read timeout (10 s) each.
    let attack = tokio::spawn(async move {
        let mut held = std::collections::VecDeque::new();
        loop {
            held.push_back(stalled_handshake(addr, "127.0.0.2").await);
            if held.len() > 300 {
                held.pop_front();
            }
            tokio::time::sleep(Duration::from_millis(16)).await;
        }
    });
    // A real TLS client from 127.0.0.1, meanwhile: every webhook a 202.
    let started = Instant::now();
    let mut accepted = 0;
    while started.elapsed() < Duration::from_secs(4) {
        let (status, _) = tls_post(addr, &root).await.expect("the handshake succeeds");
        assert_eq!(status, StatusCode::ACCEPTED);
        accepted += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    attack.abort();
    assert!(accepted >= 10, "{accepted}");
    // Both defences were used: handshakes timed out, and the address hit its cap.
    let metrics = tls_scrape(addr, &root).await;
    assert!(
        harness::sample(
            &metrics,
            r#"hirehop_relay_tls_handshake_failures_total{reason="timeout"}"#
        ) >= 8.0,
        "{metrics}"
    );
    assert!(
        harness::sample(
            &metrics,
            r#"hirehop_relay_connection_errors_total{kind="over_ip_limit"}"#
        ) >= 1.0,
        "{metrics}"
    );
    relay.stop().await;
}

#[tokio::test]
async fn plain_http_to_the_tls_port_is_told_to_use_tls() {
    let dir = CertDir::new();
    let root = dir.pair("relay");
    dir.install("relay", "crt");
    dir.install("relay", "key");
    let (cert, key) = dir.live();
    let relay = TestRelay::builder()
        .env("RELAY_TLS__CERT_FILE", &cert)
        .env("RELAY_TLS__KEY_FILE", &key)
        .start()
        .await;
    let body = harness::webhook("job.updated");
    let request = format!(
        "POST /webhooks/hirehop HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(harness::PATIENCE, stream.read_to_string(&mut answer))
        .await
        .expect("the relay answers and closes")
        .unwrap();
    drop(stream);
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    assert!(
        answer.ends_with(r#"{"error":"this port speaks TLS: use https://"}"#),
        "{answer}"
    );
    // TLS still works, and the mistake is counted.
    assert_eq!(
        tls_post(relay.addr, &root).await.unwrap().0,
        StatusCode::ACCEPTED
    );
    let metrics = tls_scrape(relay.addr, &root).await;
    assert_eq!(
        harness::sample(
            &metrics,
            r#"hirehop_relay_tls_handshake_failures_total{reason="plain_http"}"#
        ),
        1.0
    );
    relay.stop().await;
}

#[tokio::test]
async fn refused_renegotiations_do_not_write_a_log_line_each() {
    let dir = CertDir::new();
    let root = dir.pair("relay");
    dir.install("relay", "crt");
    dir.install("relay", "key");
    let (exchange, url, live) = (unique_exchange(), harness::amqp_url(), dir.live());
    let mut relay_env = tls_env(&exchange, &url, &live);
    // Idle connections are closed soon: each client below ends when the relay closes it.
    relay_env.push(("RELAY_HTTP__HEADER_READ_TIMEOUT_MS", "500"));
    let mut relay = RelayProcess::spawn(&relay_env).await;
    relay.wait_for("connected to the broker").await;
    let addr = relay.addr();
    // openssl's client asks to renegotiate on a line with R (TLS 1.2: 1.3 has none); rustls
    // refuses with a warning alert and, left alone, a WARN line each time.
    let clients: Vec<_> = (0..10).map(|_| tokio::spawn(renegotiate(addr))).collect();
    for client in clients {
        client.await.unwrap();
    }
    // The relay still serves.
    assert_eq!(tls_post(addr, &root).await.unwrap().0, StatusCode::ACCEPTED);
    let log = relay.terminate().await;
    assert!(
        !log.contains("rustls") && !log.contains("Renegotiation"),
        "per-client TLS warnings in the log:\n{log}"
    );
}

/// One `openssl s_client` that connects over TLS 1.2 and asks to renegotiate, until the relay
/// closes the connection.
async fn renegotiate(addr: SocketAddr) {
    let mut client = tokio::process::Command::new("openssl")
        .args([
            "s_client",
            "-tls1_2",
            "-servername",
            "localhost",
            "-connect",
        ])
        .arg(addr.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        // Where it reports renegotiating.
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the openssl command is installed (Debian package openssl)");
    let mut stdin = client.stdin.take().unwrap();
    let mut stderr = tokio::io::BufReader::new(client.stderr.take().unwrap());
    stdin.write_all(b"R\n").await.unwrap();
    let mut seen = String::new();
    tokio::time::timeout(harness::PATIENCE, async {
        let mut line = String::new();
        while !seen.contains("RENEGOTIATING")
            && tokio::io::AsyncBufReadExt::read_line(&mut stderr, &mut line)
                .await
                .unwrap()
                > 0
        {
            seen.push_str(&line);
            line.clear();
        }
    })
    .await
    .expect("openssl renegotiates in time");
    assert!(seen.contains("RENEGOTIATING"), "{seen}");
    tokio::time::timeout(harness::PATIENCE, client.wait())
        .await
        .expect("the relay closes the connection")
        .unwrap();
    drop(stdin);
}
