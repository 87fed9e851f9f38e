//! The deploy files run for real.
//!
//! - The documented nginx configuration (`deploy/systemd/nginx.conf`) in front of a relay:
//!   nginx reuses its connections to the relay, and closes an idle one before the relay's own
//!   idle timeout does, so a webhook never races the relay's close (which nginx answers with
//!   502, and HireHop never sends again). nginx runs for real (Debian package `nginx`) with
//!   the file as it is written, but for the addresses: its ports, its certificate
//!   (self-signed, from `openssl`) and the relay's address are the test's.
//! - certbot's deploy hook (`deploy/systemd/certbot-deploy-hook.sh`) on a lineage laid out as
//!   certbot's, with its settings pointed at the test's directory (it runs as root, as
//!   certbot runs it, to set owners).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use hyper::StatusCode;

use crate::harness::{PATIENCE, TestRelay, eventually, scrape, webhook};

/// nginx started by the test; killed (with its workers) when dropped.
struct Nginx {
    child: tokio::process::Child,
    dir: PathBuf,
    port: u16,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // On TERM the master stops its workers, then itself (SIGKILL would leave the workers
        // running). QUIT would wait for idle connections.
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            let deadline = Instant::now() + PATIENCE;
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port nothing listens on right now, for nginx to bind.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `text` (of the deploy file `name`) with each `(from, to)` replaced, every `from` required
/// to be there: a changed file fails here instead of being tested with one of its addresses
/// left in.
fn substitute(name: &str, text: &str, replacements: &[(&str, &str)]) -> String {
    let mut text = text.to_owned();
    for (from, to) in replacements {
        assert!(
            text.contains(from),
            "{name} no longer contains {from:?}: update this test"
        );
        text = text.replace(from, to);
    }
    text
}

/// A certificate and its key, self-signed, written to `dir` as `cert.pem` and `key.pem`.
fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let status = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=hirehop-relay.example.com"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("the openssl command is installed (Debian package openssl)");
    assert!(status.success(), "openssl could not make a certificate");
    (cert, key)
}

impl Nginx {
    /// Starts nginx with the documented server blocks, in front of `relay`, and waits until
    /// it accepts connections.
    async fn start(relay: SocketAddr) -> Nginx {
        let dir = std::env::temp_dir().join(format!("nginx-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = self_signed(&dir);
        let (port, plain_port) = (free_port(), free_port());
        let documented = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd/nginx.conf"),
        )
        .unwrap();
        let site = substitute(
            "deploy/systemd/nginx.conf",
            &documented,
            &[
                ("listen 443 ssl;", &format!("listen 127.0.0.1:{port} ssl;")),
                ("listen [::]:443 ssl;", ""),
                ("listen 80;", &format!("listen 127.0.0.1:{plain_port};")),
                ("listen [::]:80;", ""),
                (
                    "/etc/letsencrypt/live/hirehop-relay.example.com/fullchain.pem",
                    &cert.to_string_lossy(),
                ),
                (
                    "/etc/letsencrypt/live/hirehop-relay.example.com/privkey.pem",
                    &key.to_string_lossy(),
                ),
                ("server 127.0.0.1:8080;", &format!("server {relay};")),
            ],
        );
        std::fs::write(dir.join("site.conf"), site).unwrap();
        // The main configuration a distribution's nginx.conf would be, kept in the test's
        // directory: the documented file goes into `http` as sites-available files do.
        let d = dir.display();
        let main = format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n  \
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  include {d}/site.conf;\n}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), main).unwrap();
        let child = tokio::process::Command::new("nginx")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr")).unwrap())
            .spawn()
            .expect("nginx is installed (Debian package nginx)");
        let nginx = Nginx { child, dir, port };
        eventually("nginx to listen", PATIENCE, || async {
            match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                Ok(_) => Ok(()),
                Err(err) => Err(format!("{err}; nginx says:\n{}", nginx.error_log())),
            }
        })
        .await;
        nginx
    }

    /// What nginx said: on stderr (before its log is open) and in its error log.
    fn error_log(&self) -> String {
        ["stderr", "error.log"]
            .map(|name| std::fs::read_to_string(self.dir.join(name)).unwrap_or_default())
            .join("")
    }

    /// Posts `body` to the webhook path through nginx over TLS, as HireHop would; the status.
    async fn post(&self, body: &str) -> StatusCode {
        let host = format!("hirehop-relay.example.com:{}", self.port);
        let output = tokio::time::timeout(
            PATIENCE,
            tokio::process::Command::new("curl")
                .args(["-sS", "--insecure", "-o", "/dev/null", "-w", "%{http_code}"])
                .args(["--resolve", &format!("{host}:127.0.0.1")])
                .args(["--data-binary", body])
                .arg(format!("https://{host}/webhooks/hirehop"))
                .output(),
        )
        .await
        .expect("curl answers in time")
        .expect("curl is installed (Debian package curl)");
        let code = String::from_utf8_lossy(&output.stdout);
        StatusCode::from_u16(code.trim().parse().unwrap_or(0)).unwrap_or_else(|_| {
            panic!(
                "curl got no answer: {}",
                String::from_utf8_lossy(&output.stderr)
            )
        })
    }
}

/// Established TCP connections whose local port is `port` (IPv4): on the relay's port, the
/// connections nginx holds to it.
fn established_on(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("Linux's /proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields[1]
                .rsplit(':')
                .next()
                .and_then(|hex| u16::from_str_radix(hex, 16).ok());
            // State 01 is ESTABLISHED.
            local_port == Some(port) && fields[3] == "01"
        })
        .count()
}

/// Connections the relay closed because they sat idle (or sent nothing) for its timeout.
fn idle_closes(metrics: &str) -> f64 {
    let series = "hirehop_relay_connection_errors_total{kind=\"header_timeout\"} ";
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series))
        .map_or(0.0, |value| value.trim().parse().unwrap())
}

#[tokio::test]
async fn behind_the_documented_nginx_an_idle_upstream_connection_never_meets_a_502() {
    let relay = TestRelay::start().await;
    let idle_timeout = Duration::from_millis(relay.config.http.header_read_timeout_ms);
    let mut queue = relay.queue("#").await;
    let nginx = Nginx::start(relay.addr).await;

    assert_eq!(
        nginx.post(&webhook("job.updated")).await,
        StatusCode::ACCEPTED
    );
    let answered = Instant::now();
    queue.next().await;

    // nginx keeps the connection for the next webhook (or this test would prove nothing)...
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        established_on(relay.addr.port()),
        1,
        "nginx did not keep its connection to the relay open:\n{}",
        nginx.error_log()
    );
    // ...and closes it itself, before the relay's idle timeout would.
    let what = "the idle connection to be closed";
    eventually(what, idle_timeout + PATIENCE, || async {
        match established_on(relay.addr.port()) {
            0 => Ok(()),
            open => Err(format!("{open} open")),
        }
    })
    .await;
    let held = answered.elapsed();
    assert_eq!(
        idle_closes(&scrape(relay.addr).await),
        0.0,
        "the relay closed nginx's idle connection after {held:?}: nginx keeps idle connections \
         longer than the relay's idle timeout ({idle_timeout:?}), so a webhook can race the \
         close and get a 502"
    );
    assert!(held < idle_timeout, "held {held:?}");

    // A webhook after an idle period longer than the relay's timeout gets through.
    tokio::time::sleep(
        (answered + idle_timeout + Duration::from_secs(1)).duration_since(Instant::now()),
    )
    .await;
    assert_eq!(
        nginx.post(&webhook("job.updated")).await,
        StatusCode::ACCEPTED,
        "{}",
        nginx.error_log()
    );
    queue.next().await;
    drop(nginx);
    relay.stop().await;
}

/// The file's mode bits (permissions, setgid), owner and group.
fn owner_and_mode(path: &Path) -> (u32, u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).unwrap();
    (meta.mode() & 0o7777, meta.uid(), meta.gid())
}

#[test]
fn the_certbot_deploy_hook_copies_its_lineage_for_the_relays_group_only() {
    let uid = std::process::Command::new("id").arg("-u").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "this test runs the hook as certbot does, as root (it sets owners): run it as root"
    );
    // Debian's `daemon` group (gid 1) stands in for `hirehop-relay`.
    let (group, gid) = ("daemon", 1);
    let dir = std::env::temp_dir().join(format!("certbot-{}", uuid::Uuid::now_v7().simple()));
    let live = dir.join("live");
    let dest = dir.join("tls");
    let hook_text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd/certbot-deploy-hook.sh"),
    )
    .unwrap();
    let hook = dir.join("hook.sh");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        &hook,
        substitute(
            "deploy/systemd/certbot-deploy-hook.sh",
            &hook_text,
            &[
                ("DOMAIN=hirehop-relay.example.com", "DOMAIN=relay.test"),
                (
                    "DEST=/etc/hirehop-relay/tls",
                    &format!("DEST={}", dest.display()),
                ),
                ("GROUP=hirehop-relay", &format!("GROUP={group}")),
            ],
        ),
    )
    .unwrap();
    // A lineage laid out as certbot's (live/<name>/fullchain.pem, privkey.pem).
    let issue = |name: &str| {
        let lineage = live.join(name);
        std::fs::create_dir_all(&lineage).unwrap();
        let (cert, key) = self_signed(&lineage);
        std::fs::rename(cert, lineage.join("fullchain.pem")).unwrap();
        std::fs::rename(key, lineage.join("privkey.pem")).unwrap();
    };
    let run_hook = |name: &str| {
        let status = std::process::Command::new("sh")
            .arg(&hook)
            .env("RENEWED_LINEAGE", live.join(name))
            .status()
            .unwrap();
        assert!(status.success(), "the hook failed for {name}");
    };

    issue("other.test");
    run_hook("other.test");
    assert!(!dest.exists(), "the hook copied another host's certificate");

    let mut previous = Vec::new();
    for round in ["issued", "renewed"] {
        issue("relay.test");
        run_hook("relay.test");
        assert_eq!(owner_and_mode(&dest), (0o750, 0, gid), "{round}: {dest:?}");
        for file in ["fullchain.pem", "privkey.pem"] {
            let path = dest.join(file);
            assert_eq!(owner_and_mode(&path), (0o640, 0, gid), "{round}: {path:?}");
            let copied = std::fs::read(&path).unwrap();
            let original = std::fs::read(live.join("relay.test").join(file)).unwrap();
            assert_eq!(copied, original, "{round}: {file} differs from certbot's");
        }
        let chain = std::fs::read(dest.join("fullchain.pem")).unwrap();
        assert_ne!(chain, previous, "{round}: the chain was not replaced");
        previous = chain;
        let names: Vec<String> = std::fs::read_dir(&dest)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names.len(),
            2,
            "{round}: left behind in {dest:?}: {names:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
