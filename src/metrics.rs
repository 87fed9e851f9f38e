//! Prometheus metrics, all named `hirehop_relay_*`, plus the standard `process_*` ones on
//! Linux ([`process`]); and the exposition format each scrape gets ([`Format`]).
//!
//! Labels carry only bounded values chosen by the relay: routes, status codes, rejection
//! reasons, delivery outcomes, and event names up to `metrics.max_event_labels` distinct
//! ones (later names fold into `other`, and only authenticated webhooks count, so a stranger
//! cannot grow the series). Never a key, a body or a peer address.
//!
//! A label of a fixed set of values takes an enum of those values ([`Route`],
//! [`RejectionReason`], [`PublishOutcome`], [`ConnectionErrorKind`], [`TlsFailure`]), each
//! value written once, in `labels.rs`. Those of rejection reasons, delivery outcomes,
//! connection error kinds and TLS failures exist at zero from the start: a series that first
//! appears at 1 shows no increase to `rate()` or `increase()`, so an alert on the first
//! `spool_full` would never fire.

mod labels;
#[cfg(target_os = "linux")]
mod process;

pub use labels::{ConnectionErrorKind, PublishOutcome, RejectionReason, Route, TlsFailure};

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::config::Config;
use crate::health::{BrokerState, Health};

/// How `/metrics` is written: chosen per scrape by [`Format::negotiate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0, which Prometheus asks for first.
    OpenMetrics,
    /// Prometheus' text format 0.0.4: for scrapers that do not ask for OpenMetrics,
    /// `promtool check metrics`, and people with curl.
    Text,
}

impl Format {
    /// The format the `Accept` header prefers (by `q`, then by order), as Prometheus' client
    /// libraries choose: OpenMetrics only when asked for, the text format otherwise (no
    /// header, `*/*`, `text/plain`, or nothing we serve).
    pub fn negotiate(accept: Option<&str>) -> Format {
        let mut best = (Format::Text, 0.0_f32);
        for range in accept.unwrap_or_default().split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media_type = parts.next().unwrap_or_default().to_ascii_lowercase();
            let format = match media_type.as_str() {
                "application/openmetrics-text" => Format::OpenMetrics,
                "text/plain" | "text/*" | "*/*" => Format::Text,
                _ => continue,
            };
            let q = parts
                .filter_map(|param| param.split_once('='))
                .find(|(name, _)| name.trim().eq_ignore_ascii_case("q"))
                .map_or(1.0, |(_, q)| q.trim().parse().unwrap_or(0.0));
            if q > best.1 {
                best = (format, q);
            }
        }
        best.0
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: Route,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: Route,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectionLabels {
    reason: RejectionReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: PublishOutcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: ConnectionErrorKind,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TlsFailureLabels {
    reason: TlsFailure,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: String,
}

/// Every metric the relay exports.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_seconds: Family<RouteLabels, Histogram>,
    in_flight: Gauge,
    connections: Gauge,
    rejections: Family<RejectionLabels, Counter>,
    /// `hirehop_relay_publishes_total`'s series, one per outcome in `PublishOutcome::ALL`'s
    /// order: counted for every webhook, so found by index rather than by hashing labels.
    publishes: Vec<Counter>,
    confirm_seconds: Histogram,
    webhooks: EventCounters,
    broker_connected: Gauge,
    broker_blocked: Gauge,
    reconnects: Counter,
    stalls: Counter,
    spool_messages: Gauge,
    spool_bytes: Gauge,
    spool_accepting: Gauge,
    replayed: Counter,
    replay_failures: Counter,
    connection_errors: Family<KindLabels, Counter>,
    tls_handshake_failures: Family<TlsFailureLabels, Counter>,
    /// One scrape at a time: state gauges are refreshed, then everything encoded.
    render: Mutex<()>,
    ready: Gauge,
    /// Registered only when the relay terminates TLS.
    certificate_expiry: Gauge<f64, AtomicU64>,
}

/// `hirehop_relay_webhooks_total`, by event: the first `max` event names get a counter of
/// their own, later ones share `other`'s. A name seen before is counted under a read lock,
/// without allocating.
struct EventCounters {
    family: Family<EventLabels, Counter>,
    by_name: RwLock<HashMap<String, Counter>>,
    max: usize,
}

impl EventCounters {
    fn inc(&self, event: &str) {
        let by_name = self.by_name.read().unwrap_or_else(|p| p.into_inner());
        if let Some(counter) = by_name.get(event) {
            counter.inc();
            return;
        }
        drop(by_name);
        let mut by_name = self.by_name.write().unwrap_or_else(|p| p.into_inner());
        let counter = |event: &str| {
            self.family
                .get_or_create(&EventLabels {
                    event: event.to_owned(),
                })
                .clone()
        };
        if by_name.len() < self.max {
            by_name
                .entry(event.to_owned())
                .or_insert_with(|| counter(event))
                .inc();
        } else {
            counter("other").inc();
        }
    }
}

/// `values` as a help text lists them: `a, b, c`.
fn listed<L: Copy>(values: &[L], as_str: fn(L) -> &'static str) -> String {
    let names: Vec<&str> = values.iter().map(|&value| as_str(value)).collect();
    names.join(", ")
}

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~8 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 15))
}

impl Metrics {
    pub fn new(config: &Config) -> Metrics {
        let max_event_labels = config.metrics.max_event_labels;
        let mut root = Registry::default();
        let registry = root.sub_registry_with_prefix("hirehop_relay");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by route and status code",
            requests.clone(),
        );
        let request_seconds = Family::<RouteLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from request to response, by route",
            request_seconds.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "http_requests_in_flight",
            "Webhook requests being handled now",
            in_flight.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "http_connections",
            "Connections open now, on the webhook port and the metrics listener",
            connections.clone(),
        );
        let rejections = Family::<RejectionLabels, Counter>::default();
        registry.register(
            "rejections",
            "Requests not accepted, by reason",
            rejections.clone(),
        );
        let publishes = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "publishes",
            format!(
                "Webhook deliveries by outcome ({})",
                listed(PublishOutcome::ALL, PublishOutcome::as_str)
            ),
            publishes.clone(),
        );
        let confirm_seconds = latency_histogram();
        registry.register(
            "confirm_duration_seconds",
            "Time from publish to the broker's confirm",
            confirm_seconds.clone(),
        );
        let webhooks = Family::<EventLabels, Counter>::default();
        registry.register(
            "webhooks",
            "Accepted webhooks by event (bounded; the rest count as other)",
            webhooks.clone(),
        );
        let broker_connected = Gauge::default();
        registry.register(
            "broker_connected",
            "1 while the broker connection and its channels are open",
            broker_connected.clone(),
        );
        let broker_blocked = Gauge::default();
        registry.register(
            "broker_blocked",
            "1 while the broker blocks publishing (resource alarm)",
            broker_blocked.clone(),
        );
        let reconnects = Counter::default();
        registry.register(
            "broker_reconnects",
            "Broker connections re-established after a loss",
            reconnects.clone(),
        );
        let stalls = Counter::default();
        registry.register(
            "broker_stalls",
            "Broker connections abandoned because the broker stopped answering",
            stalls.clone(),
        );
        let spool_messages = Gauge::default();
        registry.register(
            "spool_messages",
            "Webhooks in the spool waiting for replay",
            spool_messages.clone(),
        );
        let spool_bytes = Gauge::default();
        registry.register(
            "spool_bytes",
            "Bytes in the spool waiting for replay",
            spool_bytes.clone(),
        );
        let spool_accepting = Gauge::default();
        registry.register(
            "spool_accepting",
            "1 while the spool takes webhooks; 0 while it is full, its writes fail, or it is off",
            spool_accepting.clone(),
        );
        let replayed = Counter::default();
        registry.register(
            "spool_replayed",
            "Webhooks replayed from the spool and confirmed",
            replayed.clone(),
        );
        let replay_failures = Counter::default();
        registry.register(
            "spool_replay_failures",
            "Replay batches the broker did not wholly confirm (each is retried with backoff)",
            replay_failures.clone(),
        );
        let connection_errors = Family::<KindLabels, Counter>::default();
        registry.register(
            "connection_errors",
            format!(
                "Connections ended early, by kind ({})",
                listed(ConnectionErrorKind::ALL, ConnectionErrorKind::as_str)
            ),
            connection_errors.clone(),
        );
        let tls_handshake_failures = Family::<TlsFailureLabels, Counter>::default();
        registry.register(
            "tls_handshake_failures",
            format!(
                "TLS handshakes that failed, by reason ({})",
                listed(TlsFailure::ALL, TlsFailure::as_str)
            ),
            tls_handshake_failures.clone(),
        );
        registry.register(
            "build",
            "Version of the running relay",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 while a webhook sent now would be kept (readyz answers 200), else 0",
            ready.clone(),
        );
        registry.register(
            "exchange",
            "The exchange this relay publishes to",
            Info::new(vec![("exchange", config.amqp.exchange.clone())]),
        );
        if config.spool.enabled {
            let max_bytes = Gauge::<i64>::default();
            max_bytes.set(i64::try_from(config.spool.max_bytes).unwrap_or(i64::MAX));
            registry.register(
                "spool_max_bytes",
                "The spool's size limit, spool.max_bytes",
                max_bytes,
            );
        }
        let certificate_expiry = Gauge::<f64, AtomicU64>::default();
        if config.tls.cert_file.is_some() {
            registry.register(
                "tls_certificate_expiry_timestamp_seconds",
                "When the TLS certificate in use expires (its notAfter), in seconds since the epoch",
                certificate_expiry.clone(),
            );
        }
        for &reason in RejectionReason::ALL {
            rejections
                .get_or_create(&RejectionLabels { reason })
                .inc_by(0);
        }
        let publishes = PublishOutcome::ALL
            .iter()
            .map(|&outcome| publishes.get_or_create(&OutcomeLabels { outcome }).clone())
            .collect();
        for &kind in ConnectionErrorKind::ALL {
            connection_errors
                .get_or_create(&KindLabels { kind })
                .inc_by(0);
        }
        if config.tls.cert_file.is_some() {
            for &reason in TlsFailure::ALL {
                tls_handshake_failures
                    .get_or_create(&TlsFailureLabels { reason })
                    .inc_by(0);
            }
        }
        #[cfg(target_os = "linux")]
        root.register_collector(Box::new(process::ProcessCollector));
        Metrics {
            registry: root,
            requests,
            request_seconds,
            in_flight,
            connections,
            rejections,
            publishes,
            confirm_seconds,
            webhooks: EventCounters {
                family: webhooks,
                by_name: RwLock::new(HashMap::new()),
                max: max_event_labels,
            },
            broker_connected,
            broker_blocked,
            reconnects,
            stalls,
            spool_messages,
            spool_bytes,
            spool_accepting,
            replayed,
            replay_failures,
            connection_errors,
            tls_handshake_failures,
            render: Mutex::new(()),
            ready,
            certificate_expiry,
        }
    }

    pub fn request(&self, route: Route, status: u16, elapsed: Duration) {
        self.requests
            .get_or_create(&RequestLabels { route, status })
            .inc();
        self.request_seconds
            .get_or_create(&RouteLabels { route })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts one webhook request in flight until the guard is dropped.
    pub fn in_flight(&self) -> InFlight<'_> {
        self.in_flight.inc();
        InFlight(&self.in_flight)
    }

    /// Counts one open connection until the guard is dropped.
    pub fn connection(&self) -> InFlight<'_> {
        self.connections.inc();
        InFlight(&self.connections)
    }

    pub fn rejection(&self, reason: RejectionReason) {
        self.rejections
            .get_or_create(&RejectionLabels { reason })
            .inc();
    }

    pub fn publish(&self, outcome: PublishOutcome) {
        self.publishes[outcome as usize].inc();
    }

    pub fn confirm_latency(&self, elapsed: Duration) {
        self.confirm_seconds.observe(elapsed.as_secs_f64());
    }

    pub fn webhook(&self, event: &str) {
        self.webhooks.inc(event);
    }

    pub fn connection_error(&self, kind: ConnectionErrorKind) {
        self.connection_errors
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    pub fn tls_handshake_failure(&self, reason: TlsFailure) {
        self.tls_handshake_failures
            .get_or_create(&TlsFailureLabels { reason })
            .inc();
    }

    pub fn replayed(&self, n: u64) {
        self.replayed.inc_by(n);
    }

    pub fn replay_failed(&self) {
        self.replay_failures.inc();
    }

    /// When the TLS certificate in use expires: set at startup and at every reload.
    pub fn certificate_expires(&self, not_after: SystemTime) {
        let seconds = not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |since| since.as_secs_f64());
        self.certificate_expiry.set(seconds);
    }

    /// The exposition in `format`, with state gauges read from `health` and the counts the
    /// publisher keeps.
    pub fn render(&self, health: &Health, broker: BrokerCounts, format: Format) -> String {
        let _one_at_a_time = self.render.lock().unwrap_or_else(|p| p.into_inner());
        self.broker_connected.set(i64::from(matches!(
            health.broker,
            BrokerState::Connected | BrokerState::Blocked
        )));
        self.broker_blocked
            .set(i64::from(health.broker == BrokerState::Blocked));
        let counted = self.reconnects.get();
        self.reconnects
            .inc_by(broker.reconnects.saturating_sub(counted));
        let counted = self.stalls.get();
        self.stalls.inc_by(broker.stalls.saturating_sub(counted));
        let depth = health.spool.as_ref().map(|s| s.depth).unwrap_or_default();
        self.spool_messages
            .set(i64::try_from(depth.records).unwrap_or(i64::MAX));
        self.spool_bytes
            .set(i64::try_from(depth.bytes).unwrap_or(i64::MAX));
        self.spool_accepting.set(i64::from(
            health.spool.as_ref().is_some_and(|s| s.accepting),
        ));
        self.ready.set(i64::from(health.ready()));
        let mut text = String::new();
        let encoded = match format {
            Format::OpenMetrics => {
                prometheus_client::encoding::text::encode(&mut text, &self.registry)
            }
            Format::Text => {
                prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
            }
        };
        if let Err(err) = encoded {
            tracing::error!(error = %err, "failed to encode metrics");
        }
        text
    }
}

/// What the publisher counted since start, for [`Metrics::render`].
#[derive(Debug, Clone, Copy, Default)]
pub struct BrokerCounts {
    pub reconnects: u64,
    pub stalls: u64,
}

/// See [`Metrics::in_flight`] and [`Metrics::connection`].
pub struct InFlight<'a>(&'a Gauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::spool::Depth;

    fn config(env: &[(&str, &str)]) -> Config {
        let mut map: HashMap<String, String> =
            HashMap::from([("RELAY_AUTH__EXPORT_KEYS".into(), "k3y".into())]);
        map.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        Config::load_from(None, Some(map)).expect("a valid test config")
    }

    fn connected() -> Health {
        Health {
            broker: BrokerState::Connected,
            broker_error: None,
            spool: None,
        }
    }

    #[test]
    fn event_labels_are_bounded() {
        let metrics = Metrics::new(&config(&[("RELAY_METRICS__MAX_EVENT_LABELS", "100")]));
        for i in 0..10_000 {
            metrics.webhook(&format!("made.up.event{i}"));
        }
        metrics.webhook("made.up.event0");
        let text = metrics.render(&connected(), BrokerCounts::default(), Format::OpenMetrics);
        let series = text
            .lines()
            .filter(|l| l.starts_with("hirehop_relay_webhooks_total{"))
            .count();
        assert_eq!(series, 101, "100 names and other");
        assert!(text.contains("hirehop_relay_webhooks_total{event=\"other\"} 9900"));
        assert!(text.contains("hirehop_relay_webhooks_total{event=\"made.up.event0\"} 2"));
    }

    #[test]
    fn render_exports_state_and_build_info() {
        let metrics = Metrics::new(&config(&[]));
        let health = Health {
            broker: BrokerState::Blocked,
            broker_error: None,
            spool: None,
        };
        let counts = BrokerCounts {
            reconnects: 3,
            stalls: 2,
        };
        let text = metrics.render(&health, counts, Format::OpenMetrics);
        assert!(text.contains("hirehop_relay_broker_connected 1"), "{text}");
        assert!(text.contains("hirehop_relay_broker_blocked 1"), "{text}");
        assert!(text.contains("hirehop_relay_ready 0"), "{text}");
        assert!(
            text.contains("hirehop_relay_broker_reconnects_total 3"),
            "{text}"
        );
        assert!(
            text.contains("hirehop_relay_broker_stalls_total 2"),
            "{text}"
        );
        // Reading the same count again adds nothing.
        let again = metrics.render(&health, counts, Format::OpenMetrics);
        assert!(again.contains("hirehop_relay_broker_reconnects_total 3"));
        assert!(again.contains("hirehop_relay_broker_stalls_total 2"));
        let stalled = Health {
            broker: BrokerState::Stalled,
            ..health
        };
        let text = metrics.render(&stalled, counts, Format::OpenMetrics);
        assert!(text.contains("hirehop_relay_broker_connected 0"), "{text}");
        assert!(
            text.contains("hirehop_relay_build_info{version=\""),
            "{text}"
        );
        assert!(
            text.contains("hirehop_relay_exchange_info{exchange=\"hirehop\"} 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
        let counts = BrokerCounts {
            reconnects: 3,
            stalls: 0,
        };
        let text = metrics.render(&connected(), counts, Format::OpenMetrics);
        assert!(text.contains("hirehop_relay_ready 1"), "{text}");
    }

    #[test]
    fn the_text_format_is_what_promtool_and_prometheus_0_0_4_expect() {
        let metrics = Metrics::new(&config(&[]));
        let text = metrics.render(&connected(), BrokerCounts::default(), Format::Text);
        // Counters are described under the name their samples carry.
        assert!(
            text.contains("# TYPE hirehop_relay_rejections_total counter\n"),
            "{text}"
        );
        // No `info` type in 0.0.4: a gauge of value 1.
        assert!(
            text.contains("# TYPE hirehop_relay_build_info gauge\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
        assert!(!text.contains("# UNIT"), "{text}");
    }

    #[test]
    fn fixed_label_values_exist_at_zero_before_the_first_event() {
        let metrics = Metrics::new(&config(&[]));
        let text = metrics.render(&connected(), BrokerCounts::default(), Format::Text);
        for reason in RejectionReason::ALL.iter().map(|r| r.as_str()) {
            let series = format!("hirehop_relay_rejections_total{{reason=\"{reason}\"}} 0\n");
            assert!(text.contains(&series), "no {series} in {text}");
        }
        for outcome in PublishOutcome::ALL.iter().map(|o| o.as_str()) {
            let series = format!("hirehop_relay_publishes_total{{outcome=\"{outcome}\"}} 0\n");
            assert!(text.contains(&series), "no {series} in {text}");
        }
        for kind in ConnectionErrorKind::ALL.iter().map(|k| k.as_str()) {
            let series = format!("hirehop_relay_connection_errors_total{{kind=\"{kind}\"}} 0\n");
            assert!(text.contains(&series), "no {series} in {text}");
        }
    }

    #[test]
    fn limits_are_exported_only_where_they_apply() {
        let with_spool = Metrics::new(&config(&[("RELAY_SPOOL__MAX_BYTES", "5000000")]));
        let health = Health {
            broker: BrokerState::Connected,
            broker_error: None,
            spool: Some(crate::health::SpoolHealth {
                depth: Depth {
                    records: 2,
                    bytes: 300,
                },
                accepting: true,
                error: None,
            }),
        };
        let text = with_spool.render(&health, BrokerCounts::default(), Format::Text);
        assert!(
            text.contains("hirehop_relay_spool_max_bytes 5000000\n"),
            "{text}"
        );
        assert!(text.contains("hirehop_relay_spool_bytes 300\n"), "{text}");
        // No TLS configured: no expiry, rather than an expiry at 1970 that would page.
        assert!(!text.contains("certificate_expiry"), "{text}");

        let without = Metrics::new(&config(&[("RELAY_SPOOL__ENABLED", "false")]));
        let text = without.render(&connected(), BrokerCounts::default(), Format::Text);
        assert!(!text.contains("spool_max_bytes"), "{text}");
    }

    #[test]
    fn negotiation_gives_openmetrics_only_to_those_who_ask_for_it() {
        // What Prometheus 2.x sends.
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(Format::negotiate(None), Format::Text);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Text);
        assert_eq!(Format::negotiate(Some("text/plain")), Format::Text);
        assert_eq!(
            Format::negotiate(Some(
                "application/openmetrics-text; q=0.2, text/plain; q=0.9"
            )),
            Format::Text
        );
        assert_eq!(
            Format::negotiate(Some("Application/OpenMetrics-Text; version=1.0.0")),
            Format::OpenMetrics
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0")),
            Format::Text
        );
        assert_eq!(Format::negotiate(Some("application/json")), Format::Text);
        assert_eq!(Format::negotiate(Some(",;;q=,")), Format::Text);
    }
}
