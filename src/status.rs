//! `hirehop-relay status`: a one-shot summary of a running relay, for an operator without
//! Prometheus: its state, broker and spool from `/readyz`, and what it accepted and refused
//! since it started from `/metrics` (read in Prometheus' text format, the relay's own
//! exposition, whose few sample lines are parsed here).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::Value;

use crate::metrics::{ConnectionErrorKind, PublishOutcome, RejectionReason};

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("invalid URL {0}: expected http://host[:port]")]
    Url(String),
    #[error("failed to connect to {addr}: {cause}")]
    Connect { addr: String, cause: std::io::Error },
    #[error("HTTP exchange with {addr} failed: {cause}")]
    Http { addr: String, cause: hyper::Error },
    #[error("{url} answered {status}; is it a hirehop-relay (or its metrics.listen)?")]
    Answer { url: String, status: StatusCode },
    #[error("{url} did not answer JSON: {cause}")]
    Readiness {
        url: String,
        cause: serde_json::Error,
    },
}

/// What `status` prints.
#[derive(Debug, Serialize)]
pub struct Status {
    pub url: String,
    pub version: Option<String>,
    /// Whether `/readyz` answered 200: a webhook sent now would be kept.
    pub ready: bool,
    /// `ok`, `degraded` or `unavailable`, as `/readyz` says.
    pub state: String,
    /// `connected`, `blocked` or `disconnected`.
    pub broker: String,
    /// `None` when the spool is off.
    pub spool: Option<Spool>,
    /// Webhooks kept (202), by event.
    pub accepted: Counts,
    /// Of those, confirmed by the broker at once, and written to the spool.
    pub confirmed: u64,
    pub spooled: u64,
    /// Spooled webhooks the broker has since confirmed.
    pub replayed: u64,
    /// Webhooks refused with 503 (lost), by reason; `connection_over_limit` and
    /// `connection_over_ip_limit` count connections refused at `http.max_connections` and
    /// `http.max_connections_per_ip`.
    pub refused: Counts,
    /// Requests refused for what they are (4xx), by reason.
    pub rejected: Counts,
}

#[derive(Debug, Serialize)]
pub struct Spool {
    pub messages: u64,
    pub bytes: u64,
    pub max_bytes: Option<u64>,
    pub accepting: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct Counts {
    pub total: u64,
    /// Only what is above zero.
    pub by: BTreeMap<String, u64>,
}

impl Counts {
    fn add(&mut self, key: &str, value: f64) {
        // Counters hold whole numbers; the text format writes them as floats.
        let value = value as u64;
        if value > 0 {
            self.total += value;
            *self.by.entry(key.to_owned()).or_default() += value;
        }
    }
}

/// Reads `/readyz` and `/metrics` from the relay at `url` (`http://host:port`).
pub async fn status(url: &str) -> Result<Status, StatusError> {
    let base = url.trim_end_matches('/');
    let (ready_status, readiness) = get(&format!("{base}/readyz")).await?;
    if !matches!(
        ready_status,
        StatusCode::OK | StatusCode::SERVICE_UNAVAILABLE
    ) {
        return Err(StatusError::Answer {
            url: format!("{base}/readyz"),
            status: ready_status,
        });
    }
    let readiness: Value =
        serde_json::from_str(&readiness).map_err(|cause| StatusError::Readiness {
            url: format!("{base}/readyz"),
            cause,
        })?;
    let (metrics_status, metrics) = get(&format!("{base}/metrics")).await?;
    if metrics_status != StatusCode::OK {
        return Err(StatusError::Answer {
            url: format!("{base}/metrics"),
            status: metrics_status,
        });
    }
    Ok(summarize(
        base,
        ready_status == StatusCode::OK,
        &readiness,
        &metrics,
    ))
}

fn summarize(url: &str, ready: bool, readiness: &Value, metrics: &str) -> Status {
    let mut status = Status {
        url: url.to_owned(),
        version: None,
        ready,
        state: readiness["status"].as_str().unwrap_or("unknown").to_owned(),
        broker: readiness["broker"].as_str().unwrap_or("unknown").to_owned(),
        spool: readiness["spool"].as_object().map(|spool| Spool {
            messages: spool["messages"].as_u64().unwrap_or_default(),
            bytes: spool["bytes"].as_u64().unwrap_or_default(),
            max_bytes: None,
            accepting: spool["accepting"].as_bool().unwrap_or_default(),
        }),
        accepted: Counts::default(),
        confirmed: 0,
        spooled: 0,
        replayed: 0,
        refused: Counts::default(),
        rejected: Counts::default(),
    };
    for sample in metrics.lines().filter_map(Sample::parse) {
        let label = |name: &str| sample.label(name).unwrap_or_default();
        match sample.name {
            "hirehop_relay_build_info" => status.version = Some(label("version").to_owned()),
            "hirehop_relay_webhooks_total" => status.accepted.add(label("event"), sample.value),
            "hirehop_relay_publishes_total" => match PublishOutcome::parse(label("outcome")) {
                Some(PublishOutcome::ack) => status.confirmed = sample.value as u64,
                Some(PublishOutcome::spooled) => status.spooled = sample.value as u64,
                _ => {}
            },
            "hirehop_relay_spool_replayed_total" => status.replayed = sample.value as u64,
            "hirehop_relay_spool_max_bytes" => {
                if let Some(spool) = &mut status.spool {
                    spool.max_bytes = Some(sample.value as u64);
                }
            }
            "hirehop_relay_rejections_total" => {
                let reason = label("reason");
                if RejectionReason::parse(reason).is_some_and(RejectionReason::is_refusal) {
                    status.refused.add(reason, sample.value);
                } else {
                    status.rejected.add(reason, sample.value);
                }
            }
            "hirehop_relay_connection_errors_total" => {
                use ConnectionErrorKind as Kind;
                if let Some(kind @ (Kind::over_limit | Kind::over_ip_limit)) =
                    Kind::parse(label("kind"))
                {
                    let refused = format!("connection_{}", kind.as_str());
                    status.refused.add(&refused, sample.value);
                }
            }
            _ => {}
        }
    }
    status
}

impl Status {
    /// The summary for a person.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let version = self.version.as_deref().unwrap_or("(unknown version)");
        let _ = writeln!(out, "hirehop-relay {version} at {}", self.url);
        let ready = if self.ready { "ready" } else { "NOT READY" };
        let _ = writeln!(out, "state:     {} ({ready})", self.state);
        let _ = writeln!(out, "broker:    {}", self.broker);
        let spool = match &self.spool {
            None => "off".to_owned(),
            Some(spool) => format!(
                "{} webhooks, {}{} ({})",
                spool.messages,
                bytes(spool.bytes),
                spool
                    .max_bytes
                    .map(|max| format!(" of {}", bytes(max)))
                    .unwrap_or_default(),
                if spool.accepting {
                    "accepting"
                } else {
                    "NOT ACCEPTING"
                }
            ),
        };
        let _ = writeln!(out, "spool:     {spool}");
        let _ = writeln!(
            out,
            "accepted:  {} since start ({} confirmed, {} spooled; {} replayed from the spool)",
            self.accepted.total, self.confirmed, self.spooled, self.replayed
        );
        list(&mut out, &self.accepted);
        let _ = writeln!(
            out,
            "refused:   {} with 503 (lost: HireHop does not send them again)",
            self.refused.total
        );
        list(&mut out, &self.refused);
        let _ = writeln!(out, "rejected:  {} with 4xx", self.rejected.total);
        list(&mut out, &self.rejected);
        out
    }
}

fn list(out: &mut String, counts: &Counts) {
    let mut by: Vec<_> = counts.by.iter().collect();
    by.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (name, count) in by {
        let _ = writeln!(out, "  {name:<30} {count}");
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64;
    let mut unit = "B";
    for next in UNITS {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = next;
    }
    format!("{value:.1} {unit}")
}

/// One sample line of the text format: `name{label="value",...} value`.
struct Sample<'a> {
    name: &'a str,
    labels: Vec<(&'a str, String)>,
    value: f64,
}

impl<'a> Sample<'a> {
    fn parse(line: &'a str) -> Option<Sample<'a>> {
        if line.starts_with('#') || line.trim().is_empty() {
            return None;
        }
        let name_end = line.find(['{', ' '])?;
        let name = &line[..name_end];
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(inner) = rest.strip_prefix('{') {
            rest = inner;
            loop {
                rest = rest.trim_start_matches(',');
                if let Some(after) = rest.strip_prefix('}') {
                    rest = after;
                    break;
                }
                let (key, after) = rest.split_once("=\"")?;
                let (value, after) = unquote(after)?;
                labels.push((key, value));
                rest = after;
            }
        }
        let value = rest.split_whitespace().next()?.parse().ok()?;
        Some(Sample {
            name,
            labels,
            value,
        })
    }

    fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// A label value up to its closing quote, with `\\`, `\"` and `\n` undone; and what follows.
fn unquote(text: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, &text[i + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => value.push('\n'),
                other => value.push(other),
            },
            c => value.push(c),
        }
    }
    None
}

/// `GET url` (plain HTTP); the status and the body.
async fn get(url: &str) -> Result<(StatusCode, String), StatusError> {
    let uri: Uri = url.parse().map_err(|_| StatusError::Url(url.to_owned()))?;
    let (Some("http"), Some(host)) = (uri.scheme_str(), uri.host()) else {
        return Err(StatusError::Url(url.to_owned()));
    };
    let addr = format!("{host}:{}", uri.port_u16().unwrap_or(80));
    let stream = tokio::net::TcpStream::connect(&addr)
        .await
        .map_err(|cause| StatusError::Connect {
            addr: addr.clone(),
            cause,
        })?;
    let http = |cause| StatusError::Http {
        addr: addr.clone(),
        cause,
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    tokio::spawn(connection);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let request = Request::get(path)
        .header("host", host)
        // The text format: what the sample parser above reads.
        .header("accept", "text/plain; version=0.0.4")
        .header(
            "user-agent",
            concat!("hirehop-relay-status/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::<Bytes>::new())
        .map_err(|_| StatusError::Url(url.to_owned()))?;
    let response = sender.send_request(request).await.map_err(http)?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(http)?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_lines_are_read_with_their_labels() {
        let sample =
            Sample::parse(r#"hirehop_relay_webhooks_total{event="job.\"x\"\\y",a="b"} 12"#)
                .unwrap();
        assert_eq!(sample.name, "hirehop_relay_webhooks_total");
        assert_eq!(sample.label("event"), Some(r#"job."x"\y"#));
        assert_eq!(sample.label("a"), Some("b"));
        assert_eq!(sample.value, 12.0);
        let plain = Sample::parse("hirehop_relay_spool_bytes 3.0").unwrap();
        assert_eq!(
            (plain.name, plain.value),
            ("hirehop_relay_spool_bytes", 3.0)
        );
        for skipped in ["# HELP x y", "", "broken{a=\"b 1", "x{a=\"b\"}"] {
            assert!(Sample::parse(skipped).is_none(), "{skipped}");
        }
    }

    #[test]
    fn bytes_are_shown_in_binary_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(1 << 30), "1.0 GiB");
    }
}
