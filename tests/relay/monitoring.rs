//! The monitoring kit against the real thing: the alert rules (deploy/prometheus/) through
//! `promtool`, the relay's `/metrics` through `promtool check metrics`, and the rules and the
//! Grafana dashboard (deploy/grafana/) evaluated by a real Prometheus (Debian's `prometheus`
//! package) scraping running relays and a RabbitMQ node with its Prometheus plugin; the
//! runbook links; the certificate expiry metric.

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use hyper::{Method, StatusCode};
use promql_parser::label::MatchOp;
use promql_parser::parser::{Expr, VectorSelector};
use promql_parser::util::{ExprVisitor, walk_expr};
use serde_json::Value;

use crate::harness::{
    self, PATIENCE, TestRelay, eventually, request, sample, scrape, send, webhook,
};
use crate::local_cluster::LocalCluster;

/// How long Prometheus may take to scrape, evaluate and see what a test expects; scrapes
/// and evaluations run every second.
const PROMETHEUS_PATIENCE: Duration = Duration::from_secs(60);

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a program of Debian's `prometheus` package; fails the test with how to install it
/// when it is missing.
fn prometheus_tool(program: &str) -> std::process::Command {
    let found = std::process::Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    assert!(
        found.is_ok(),
        "{program} is not installed: these tests need Debian's prometheus package \
         (apt-get install prometheus)"
    );
    std::process::Command::new(program)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    for args in [
        ["check", "rules", "deploy/prometheus/alerts.yml"],
        ["test", "rules", "deploy/prometheus/alerts.test.yml"],
    ] {
        let output = prometheus_tool("promtool")
            .args(args)
            .current_dir(root())
            .output()
            .expect("promtool runs");
        assert!(
            output.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// The dashboard as Grafana imports it: valid JSON of its documented schema, every panel and
/// query on the data source variable, every query filtered by the relay selector.
#[test]
fn the_dashboard_uses_its_variables_everywhere() {
    let dashboard = dashboard();
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
    assert_eq!(dashboard["uid"], "hirehop-relay");
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    let names: Vec<&str> = variables
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["datasource", "exchange", "instance"]);
    assert_eq!(variables[0]["type"], "datasource");
    assert_eq!(variables[0]["query"], "prometheus");
    let on_variable = serde_json::json!({"type": "prometheus", "uid": "${datasource}"});
    for variable in &variables[1..] {
        assert_eq!(variable["datasource"], on_variable, "{variable}");
    }
    let mut ids = HashSet::new();
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap();
        assert!(ids.insert(panel["id"].as_u64().unwrap()), "id of {title}");
        for key in ["h", "w", "x", "y"] {
            assert!(panel["gridPos"][key].is_u64(), "gridPos of {title}");
        }
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"], on_variable, "{title}");
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title} has no query");
        let mut ref_ids = HashSet::new();
        for target in targets {
            assert_eq!(target["datasource"], on_variable, "{title}");
            assert!(ref_ids.insert(target["refId"].as_str().unwrap()), "{title}");
            let expr = target["expr"].as_str().unwrap();
            // Every series the query reads is one of the relays chosen above.
            let marked = expr.replace("$instance", "chosen-relays");
            for selector in selectors(&fill_in(&marked)) {
                let chosen = selector.matchers.matchers.iter().any(|m| {
                    m.name == "instance"
                        && matches!(m.op, MatchOp::Re(_))
                        && m.value == "chosen-relays"
                });
                assert!(chosen, "{title}: {expr} reads series of any relay");
            }
            queries += 1;
        }
    }
    assert!(queries >= 20, "{queries} queries");
}

fn dashboard() -> Value {
    let path = root().join("deploy/grafana/hirehop-relay.json");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// Grafana's variables replaced for a query sent straight to Prometheus.
fn fill_in(expr: &str) -> String {
    expr.replace("$instance", ".+")
        .replace("$exchange", ".+")
        .replace("$__rate_interval", "5m")
}

/// Every vector selector in `expr` (those under range selectors included).
fn selectors(expr: &str) -> Vec<VectorSelector> {
    struct Found(Vec<VectorSelector>);
    impl ExprVisitor for Found {
        type Error = ();
        fn pre_visit(&mut self, expr: &Expr) -> Result<bool, ()> {
            match expr {
                Expr::VectorSelector(selector) => self.0.push(selector.clone()),
                Expr::MatrixSelector(range) => self.0.push(range.vs.clone()),
                _ => {}
            }
            Ok(true)
        }
    }
    let ast = promql_parser::parser::parse(expr).unwrap_or_else(|err| panic!("{expr}: {err}"));
    let mut found = Found(Vec::new());
    walk_expr(&mut found, &ast).unwrap();
    found.0
}

/// `selector` written back as PromQL, without its offset or `@`.
fn promql(selector: &VectorSelector) -> String {
    let quote = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
    let matchers: Vec<String> = selector
        .matchers
        .matchers
        .iter()
        .map(|m| {
            let op = match m.op {
                MatchOp::Equal => "=",
                MatchOp::NotEqual => "!=",
                MatchOp::Re(_) => "=~",
                MatchOp::NotRe(_) => "!~",
            };
            format!("{}{op}{}", m.name, quote(&m.value))
        })
        .collect();
    format!(
        "{}{{{}}}",
        selector.name.as_deref().unwrap_or_default(),
        matchers.join(",")
    )
}

/// The anchors GitHub gives the headings of `file`.
fn anchors(file: &Path) -> HashSet<String> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .filter_map(|line| line.strip_prefix('#'))
        .map(|heading| {
            heading
                .trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

/// A self-signed certificate for localhost valid for `days`, made with `openssl`.
fn certificate(dir: &Path, days: u32) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let status = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args([
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=localhost",
        ])
        .args(["-days", &days.to_string()])
        .args(["-addext", "subjectAltName=DNS:localhost"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
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

fn seconds_from_now(days: u64) -> f64 {
    (SystemTime::now() + Duration::from_secs(days * 86_400))
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A TLS relay (certificate valid for `days`) with plain-HTTP metrics on a port of their own.
async fn tls_relay(dir: &Path, days: u32) -> (TestRelay, SocketAddr) {
    let (cert, key) = certificate(dir, days);
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let relay = TestRelay::builder()
        .env("RELAY_TLS__CERT_FILE", &cert.to_string_lossy())
        .env("RELAY_TLS__KEY_FILE", &key.to_string_lossy())
        .env("RELAY_METRICS__LISTEN", &metrics.to_string())
        .start()
        .await;
    (relay, metrics)
}

/// Waits until `series` on `addr`'s `/metrics` passes `check`, for `ceiling` at most.
async fn wait_metric(
    addr: SocketAddr,
    series: &str,
    ceiling: Duration,
    check: impl Fn(f64) -> bool,
) {
    eventually(&format!("{series} as expected"), ceiling, || async {
        let text = scrape_when_up(addr).await;
        let value: Option<f64> = text
            .lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok());
        if value.is_some_and(&check) {
            Ok(())
        } else {
            Err(value)
        }
    })
    .await;
}

/// `scrape`, once the metrics listener (bound inside the relay's `run`) answers.
async fn scrape_when_up(addr: SocketAddr) -> String {
    eventually(&format!("{addr} to answer"), PATIENCE, || async {
        send(addr, request(Method::GET, "/healthz", "")).await
    })
    .await;
    scrape(addr).await
}

#[tokio::test]
async fn certificate_expiry_is_exported_and_follows_a_renewal() {
    let dir = std::env::temp_dir().join(format!("relay-expiry-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let (relay, metrics) = tls_relay(&dir, 2).await;
    let series = "hirehop_relay_tls_certificate_expiry_timestamp_seconds";
    let near = |days: u64| move |at: f64| (at - seconds_from_now(days)).abs() < 600.0;
    wait_metric(metrics, series, PATIENCE, near(2)).await;
    // Renewed in place: the relay looks at its files every ten seconds.
    certificate(&dir, 90);
    wait_metric(metrics, series, Duration::from_secs(40), near(90)).await;
    relay.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn metrics_are_openmetrics_for_prometheus_and_text_for_everyone_else() {
    let relay = TestRelay::start().await;
    let mut asking = request(Method::GET, "/metrics", "");
    asking.headers_mut().insert(
        "accept",
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
            .parse()
            .unwrap(),
    );
    let reply = relay.send(asking).await;
    assert_eq!(
        reply.headers["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let text = String::from_utf8_lossy(&reply.body);
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert!(text.contains("# TYPE hirehop_relay_build info\n"), "{text}");
    // `scrape` checks the content type of the text format.
    let text = scrape(relay.addr).await;
    assert!(
        text.contains("# TYPE hirehop_relay_build_info gauge\n"),
        "{text}"
    );
    relay.stop().await;
}

/// A Prometheus server of the test's own, on loopback, with its data in a temp directory.
struct Prometheus {
    addr: SocketAddr,
    _child: tokio::process::Child,
    dir: PathBuf,
}

impl Prometheus {
    /// Starts `prometheus` with `config` (YAML) and waits until it is ready.
    async fn start(config: &str) -> Prometheus {
        let dir = std::env::temp_dir().join(format!(
            "relay-prometheus-{}",
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        prometheus_tool("prometheus");
        let child = tokio::process::Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("prometheus starts");
        let prometheus = Prometheus {
            addr,
            _child: child,
            dir,
        };
        eventually("prometheus to get ready", PROMETHEUS_PATIENCE, || async {
            match send(addr, request(Method::GET, "/-/ready", "")).await {
                Ok(reply) if reply.status == StatusCode::OK => Ok(()),
                answer => Err(format!("{answer:?}; its log:\n{}", prometheus.log())),
            }
        })
        .await;
        prometheus
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// `GET path` on the HTTP API; its `data`.
    async fn api(&self, path: &str) -> Value {
        let reply = send(self.addr, request(Method::GET, path, ""))
            .await
            .expect("prometheus answers");
        let body: Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(body["status"], "success", "{path}: {body}");
        body["data"].clone()
    }

    /// The instant vector `expr` gives now.
    async fn query(&self, expr: &str) -> Vec<Value> {
        let encoded: String = expr
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let data = self.api(&format!("/api/v1/query?query={encoded}")).await;
        assert_eq!(data["resultType"], "vector", "{expr}: {data}");
        data["result"].as_array().unwrap().clone()
    }

    /// Polls `expr` until `check` accepts its result, for [`PROMETHEUS_PATIENCE`] at most.
    async fn wait(&self, expr: &str, what: &str, check: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        eventually(
            &format!("{expr} to show {what}"),
            PROMETHEUS_PATIENCE,
            || async {
                let result = self.query(expr).await;
                if check(&result) {
                    Ok(result)
                } else {
                    Err(result)
                }
            },
        )
        .await
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `promtool check metrics` on what the relay serves to a client that asks for no format.
fn lint(text: &str) {
    use std::io::Write;
    let mut child = prometheus_tool("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && complaints.trim().is_empty(),
        "promtool check metrics:\n{complaints}\non:\n{text}"
    );
}

/// The whole kit against live relays, a RabbitMQ node and Prometheus: the metrics lint clean;
/// every metric and label a rule or a dashboard query names exists; every rule evaluates
/// without error; exactly the alerts the situation calls for are active (the test's
/// certificate expires in two days; a per-event queue holds a webhook nobody consumes); every
/// dashboard query returns data; every runbook link has its entry.
#[tokio::test]
async fn prometheus_evaluates_every_rule_and_dashboard_query_against_live_relays() {
    // The RabbitMQ node boots while the rest is set up.
    let rabbit_port = free_port();
    let node = tokio::task::spawn_blocking(move || {
        let node = LocalCluster::up(1);
        node.enable_prometheus(1, rabbit_port);
        node
    });

    // A: plain HTTP, webhooks, the spool on. B: TLS, its metrics on a listener of their own.
    let plain = TestRelay::start().await;
    let dir = std::env::temp_dir().join(format!("relay-kit-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let (tls, tls_metrics) = tls_relay(&dir, 2).await;
    lint(&scrape(plain.addr).await);
    lint(&scrape_when_up(tls_metrics).await);

    let node = node.await.unwrap();
    // C: on the node, with per-event queues, so the broker-side rules have queues to watch.
    let on_node = TestRelay::builder()
        .env("RELAY_AMQP__PER_EVENT_QUEUES", "true")
        .on(&node.url(1))
        .start()
        .await;

    let rules = root().join("deploy/prometheus/alerts.yml");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files: ['{rules}']\n\
         scrape_configs:\n\
         \x20 - job_name: hirehop-relay\n\
         \x20   static_configs: [{{targets: ['{a}', '{b}', '{c}']}}]\n\
         \x20 - job_name: rabbitmq\n\
         \x20   metrics_path: /metrics/per-object\n\
         \x20   static_configs: [{{targets: ['127.0.0.1:{rabbit_port}']}}]\n",
        rules = rules.display(),
        a = plain.addr,
        b = tls_metrics,
        c = on_node.addr,
    );
    let prometheus = Prometheus::start(&config).await;
    prometheus
        .wait("up == 1", "all four targets up", |r| r.len() == 4)
        .await;

    // Traffic, once Prometheus has seen the counters before it: accepted webhooks of two
    // events, a wrong key, a bad body, a malformed request.
    let mut queue = plain.queue("#").await;
    for event in ["job.updated", "job.status.updated", "job.updated"] {
        assert_eq!(
            plain.post(webhook(event)).await.status,
            StatusCode::ACCEPTED
        );
        queue.next().await;
    }
    let wrong = harness::webhook_with("job.updated", "not-the-key", 1);
    assert_eq!(plain.post(wrong).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(plain.post("{").await.status, StatusCode::BAD_REQUEST);
    harness::raw(plain.addr, b"NONSENSE\r\n\r\n").await;
    assert_eq!(
        on_node.post(webhook("job.updated")).await.status,
        StatusCode::ACCEPTED
    );
    prometheus
        .wait(
            "sum(hirehop_relay_webhooks_total) == 4 and sum(hirehop_relay_connection_errors_total{kind=\"bad_request\"}) == 1",
            "the traffic counted",
            |r| r.len() == 1,
        )
        .await;

    // Every series a rule reads exists, and every rule has been evaluated without error.
    let what = "every rule to be evaluated";
    let groups = eventually(what, PROMETHEUS_PATIENCE, || async {
        let groups = prometheus.api("/api/v1/rules").await["groups"].clone();
        let all: Vec<&Value> = groups
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap())
            .collect();
        if all.iter().all(|r| r["health"] != "unknown") {
            Ok(groups)
        } else {
            Err(groups)
        }
    })
    .await;
    let runbook = anchors(&root().join("docs/runbook.md"));
    let mut rules = Vec::new();
    for group in groups.as_array().unwrap() {
        rules.extend(group["rules"].as_array().unwrap().iter().cloned());
    }
    assert_eq!(rules.len(), 19, "the rules in {}", rules.len());
    for rule in &rules {
        let name = rule["name"].as_str().unwrap();
        assert_eq!(rule["health"], "ok", "{name}: {rule}");
        assert!(
            ["critical", "warning"].contains(&rule["labels"]["severity"].as_str().unwrap_or("")),
            "{name} has no severity"
        );
        for annotation in ["summary", "description"] {
            assert!(
                rule["annotations"][annotation].is_string(),
                "{name}: {annotation}"
            );
        }
        let link = rule["annotations"]["runbook_url"].as_str().unwrap_or("");
        let anchor = link
            .strip_prefix("docs/runbook.md#")
            .unwrap_or_else(|| panic!("{name}: {link}"));
        assert!(
            runbook.contains(anchor),
            "{name}: docs/runbook.md has no #{anchor}"
        );
        for selector in selectors(rule["query"].as_str().unwrap()) {
            let what = format!("any series ({name})");
            prometheus
                .wait(&promql(&selector), &what, |r| !r.is_empty())
                .await;
        }
    }

    // Active: the certificate rules (it expires in two days), and the per-event queue that
    // holds the webhook sent to C and has no consumer (RabbitMQ updates its queue metrics
    // every few seconds). Nothing else.
    let active = |rules: &[Value]| -> BTreeSet<String> {
        rules
            .iter()
            .filter(|r| r["state"] != "inactive")
            .map(|r| {
                format!(
                    "{} {}",
                    r["name"].as_str().unwrap(),
                    r["labels"]["severity"].as_str().unwrap()
                )
            })
            .collect()
    };
    let expected: BTreeSet<String> = [
        "HireHopRelayCertificateExpiresSoon critical",
        "HireHopRelayCertificateExpiresSoon warning",
        "HireHopRelayEventQueueNotConsumed warning",
    ]
    .map(String::from)
    .into();
    let what = format!("the active alerts to be {expected:?}");
    let rules = eventually(&what, PROMETHEUS_PATIENCE, || async {
        let groups = prometheus.api("/api/v1/rules").await["groups"].clone();
        let rules: Vec<Value> = groups
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().clone())
            .collect();
        let now = active(&rules);
        if now == expected { Ok(rules) } else { Err(now) }
    })
    .await;
    let certificate = rules
        .iter()
        .find(|r| r["name"] == "HireHopRelayCertificateExpiresSoon")
        .unwrap();
    let alert = &certificate["alerts"][0];
    assert_eq!(
        alert["labels"]["instance"],
        tls_metrics.to_string(),
        "{alert}"
    );

    // Every dashboard query returns data; the variables list both relays' exchanges.
    for panel in dashboard()["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = fill_in(target["expr"].as_str().unwrap());
            let title = panel["title"].as_str().unwrap();
            prometheus
                .wait(&expr, &format!("data for {title:?}"), |r| !r.is_empty())
                .await;
        }
    }
    for variable in dashboard()["templating"]["list"].as_array().unwrap() {
        let Some(query) = variable["query"]["query"].as_str() else {
            continue;
        };
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .and_then(|q| q.rsplit_once(", "))
            .unwrap_or_else(|| panic!("{query}"));
        let (selector, label) = (fill_in(inner.0), inner.1);
        let values: HashSet<String> = prometheus
            .query(&selector)
            .await
            .iter()
            .map(|s| s["metric"][label].as_str().unwrap().to_owned())
            .collect();
        let want: HashSet<String> = match label {
            "exchange" => [&plain.exchange, &tls.exchange, &on_node.exchange]
                .map(|e| e.to_string())
                .into(),
            _ => [plain.addr, tls_metrics, on_node.addr]
                .map(|a| a.to_string())
                .into(),
        };
        assert_eq!(values, want, "{query}");
    }
    assert_eq!(
        sample(&scrape(plain.addr).await, "hirehop_relay_ready"),
        1.0
    );

    drop(prometheus);
    plain.stop().await;
    tls.stop().await;
    on_node.stop().await;
    drop(node);
    let _ = std::fs::remove_dir_all(dir);
}

/// Runs `hirehop-relay status --url http://ADDR [args]`; its exit success and stdout.
async fn run_status(addr: SocketAddr, args: &[&str]) -> (bool, String) {
    let output = tokio::time::timeout(
        PATIENCE,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_hirehop-relay"))
            .args(["status", "--url", &format!("http://{addr}")])
            .args(args)
            .env_clear()
            .output(),
    )
    .await
    .expect("status answers in time")
    .expect("the binary runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        assert!(stderr.contains("not ready"), "{stdout}{stderr}");
    }
    (output.status.success(), stdout)
}

#[tokio::test]
async fn status_summarizes_a_running_relay_for_people_and_scripts() {
    let relay = TestRelay::start().await;
    let mut queue = relay.queue("#").await;
    for event in ["job.updated", "job.updated", "job.created"] {
        assert_eq!(
            relay.post(webhook(event)).await.status,
            StatusCode::ACCEPTED
        );
        queue.next().await;
    }
    let wrong = harness::webhook_with("job.updated", "not-the-key", 1);
    assert_eq!(relay.post(wrong).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(relay.post("[]").await.status, StatusCode::BAD_REQUEST);

    let (ready, text) = run_status(relay.addr, &[]).await;
    assert!(ready, "{text}");
    for line in [
        format!(
            "hirehop-relay {} at http://{}",
            env!("CARGO_PKG_VERSION"),
            relay.addr
        ),
        "state:     ok (ready)".to_owned(),
        "broker:    connected".to_owned(),
        "spool:     0 webhooks, 0 B of 1.0 GiB (accepting)".to_owned(),
        "accepted:  3 since start (3 confirmed, 0 spooled; 0 replayed from the spool)".to_owned(),
        "refused:   0 with 503 (lost: HireHop does not send them again)".to_owned(),
        "rejected:  2 with 4xx".to_owned(),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "no line {line:?} in:\n{text}"
        );
    }
    let by_event: Vec<&str> = text.lines().filter(|l| l.starts_with("  job.")).collect();
    assert_eq!(by_event.len(), 2, "{text}");
    assert!(
        by_event[0].starts_with("  job.updated ") && by_event[0].ends_with(" 2"),
        "{text}"
    );

    let (_, json) = run_status(relay.addr, &["--json"]).await;
    let json: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["ready"], true);
    assert_eq!(json["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(json["accepted"]["total"], 3);
    assert_eq!(json["accepted"]["by"]["job.updated"], 2);
    assert_eq!(json["accepted"]["by"]["job.created"], 1);
    assert_eq!(json["rejected"]["by"]["bad_key"], 1);
    assert_eq!(json["rejected"]["by"]["bad_json"], 1);
    assert_eq!(json["refused"]["total"], 0);
    assert_eq!(json["spool"]["max_bytes"], 1_073_741_824_u64);
    relay.stop().await;
}

#[tokio::test]
async fn status_says_not_ready_and_counts_what_was_lost() {
    // No spool, and a broker the relay loses: /readyz answers 503, webhooks get 503.
    let proxy = crate::proxy::Proxy::start(harness::broker_addr()).await;
    let relay = TestRelay::builder()
        .env("RELAY_SPOOL__ENABLED", "false")
        .via(&proxy)
        .start()
        .await;
    proxy.refuse(true);
    proxy.cut();
    harness::wait_readyz(relay.addr, "the broker is gone", |reply| {
        reply.status != StatusCode::OK
    })
    .await;
    relay
        .post(webhook("job.updated"))
        .await
        .assert_unavailable();

    let (ready, text) = run_status(relay.addr, &[]).await;
    assert!(
        !ready,
        "exit status 0 for a relay that is not ready:\n{text}"
    );
    assert!(
        text.contains("state:     unavailable (NOT READY)"),
        "{text}"
    );
    assert!(text.contains("broker:    disconnected"), "{text}");
    assert!(text.contains("spool:     off"), "{text}");
    assert!(text.contains("refused:   1 with 503"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("  broker_unavailable ") && l.ends_with(" 1")),
        "{text}"
    );
    proxy.refuse(false);
    relay.stop().await;

    // Nothing there: an error that names the address.
    let nobody: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_hirehop-relay"))
        .args(["status", "--url", &format!("http://{nobody}")])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("failed to connect to {nobody}")),
        "{stderr}"
    );
}
