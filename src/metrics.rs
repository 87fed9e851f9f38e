//! Prometheus metrics (OpenMetrics text), all named `hirehop_relay_*`.
//!
//! Labels carry only bounded values chosen by the relay: routes, status codes, rejection
//! reasons, delivery outcomes, and event names up to `metrics.max_event_labels` distinct
//! ones (later names fold into `other`, and only authenticated webhooks count, so a stranger
//! cannot grow the series). Never a key, a body or a peer address.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::delivery::{BrokerState, Health};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
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
    rejections: Family<ReasonLabels, Counter>,
    publishes: Family<OutcomeLabels, Counter>,
    confirm_seconds: Histogram,
    webhooks: Family<EventLabels, Counter>,
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
    tls_handshake_failures: Family<ReasonLabels, Counter>,
    events: EventNames,
    /// One scrape at a time: state gauges are refreshed, then everything encoded.
    render: Mutex<()>,
}

/// Decides which event names get a label of their own.
struct EventNames {
    seen: Mutex<HashSet<String>>,
    max: usize,
}

impl EventNames {
    fn label(&self, event: &str) -> String {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.contains(event) {
            return event.to_owned();
        }
        if seen.len() < self.max {
            seen.insert(event.to_owned());
            return event.to_owned();
        }
        "other".to_owned()
    }
}

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~8 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 15))
}

impl Metrics {
    pub fn new(max_event_labels: usize) -> Metrics {
        let mut registry = Registry::with_prefix("hirehop_relay");
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
        let rejections = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "rejections",
            "Requests not accepted, by reason",
            rejections.clone(),
        );
        let publishes = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "publishes",
            "Webhook deliveries by outcome (ack, nack, returned, timeout, unavailable, error, spooled, spool_full, spool_error)",
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
            "Connections ended early, by kind (header_timeout, headers_too_large, bad_request, tls_handshake, over_limit, over_ip_limit, io)",
            connection_errors.clone(),
        );
        let tls_handshake_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed, by reason (timeout, plain_http, not_tls, certificate_rejected, client_alert, incompatible, protocol, closed, io)",
            tls_handshake_failures.clone(),
        );
        registry.register(
            "build",
            "Version of the running relay",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        Metrics {
            registry,
            requests,
            request_seconds,
            in_flight,
            connections,
            rejections,
            publishes,
            confirm_seconds,
            webhooks,
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
            events: EventNames {
                seen: Mutex::new(HashSet::new()),
                max: max_event_labels,
            },
            render: Mutex::new(()),
        }
    }

    pub fn request(&self, route: &'static str, status: u16, elapsed: Duration) {
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

    pub fn rejection(&self, reason: &'static str) {
        self.rejections
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn publish(&self, outcome: &'static str) {
        self.publishes
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn confirm_latency(&self, elapsed: Duration) {
        self.confirm_seconds.observe(elapsed.as_secs_f64());
    }

    pub fn webhook(&self, event: &str) {
        let event = self.events.label(event);
        self.webhooks.get_or_create(&EventLabels { event }).inc();
    }

    pub fn connection_error(&self, kind: &'static str) {
        self.connection_errors
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    pub fn tls_handshake_failure(&self, reason: &'static str) {
        self.tls_handshake_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn replayed(&self, n: u64) {
        self.replayed.inc_by(n);
    }

    pub fn replay_failed(&self) {
        self.replay_failures.inc();
    }

    /// The exposition text, with state gauges read from `health` and the counts the
    /// publisher keeps.
    pub fn render(&self, health: &Health, broker: BrokerCounts) -> String {
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
        let mut text = String::new();
        if let Err(err) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
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
    use super::*;

    #[test]
    fn event_labels_are_bounded() {
        let metrics = Metrics::new(100);
        for i in 0..10_000 {
            metrics.webhook(&format!("made.up.event{i}"));
        }
        metrics.webhook("made.up.event0");
        let health = Health {
            broker: BrokerState::Connected,
            broker_error: None,
            spool: None,
        };
        let text = metrics.render(&health, BrokerCounts::default());
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
        let metrics = Metrics::new(10);
        let health = Health {
            broker: BrokerState::Blocked,
            broker_error: None,
            spool: None,
        };
        let counts = BrokerCounts {
            reconnects: 3,
            stalls: 2,
        };
        let text = metrics.render(&health, counts);
        assert!(text.contains("hirehop_relay_broker_connected 1"), "{text}");
        assert!(text.contains("hirehop_relay_broker_blocked 1"), "{text}");
        assert!(
            text.contains("hirehop_relay_broker_reconnects_total 3"),
            "{text}"
        );
        assert!(
            text.contains("hirehop_relay_broker_stalls_total 2"),
            "{text}"
        );
        // Reading the same count again adds nothing.
        let again = metrics.render(&health, counts);
        assert!(again.contains("hirehop_relay_broker_reconnects_total 3"));
        assert!(again.contains("hirehop_relay_broker_stalls_total 2"));
        let stalled = Health {
            broker: BrokerState::Stalled,
            ..health
        };
        let text = metrics.render(&stalled, counts);
        assert!(text.contains("hirehop_relay_broker_connected 0"), "{text}");
        assert!(
            text.contains("hirehop_relay_build_info{version=\""),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
