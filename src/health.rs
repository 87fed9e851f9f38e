//! Liveness and readiness: whether a webhook sent now would be kept, and what the probes
//! `/healthz` and `/readyz` answer. Both listeners (the webhook port and `metrics.listen`)
//! answer them here, and the `hirehop_relay_ready` gauge reads the same rule.
//!
//! Readiness follows where the next webhook would go: straight to a confirming broker, or
//! into the spool. It is read from the broker connection and the spool as they are at each
//! probe; nothing here keeps state. Routing a request to a probe, and the methods a probe
//! answers, are the listeners' ([`crate::webhook`]).

use std::sync::Arc;

use hyper::StatusCode;

use crate::amqp::Publisher;
use crate::spool::{Depth, Spool};

/// A health endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// `/healthz`: the process serves HTTP. For liveness checks.
    Liveness,
    /// `/readyz`: a webhook sent now would be kept. For readiness checks and load balancers.
    Readiness,
}

impl Probe {
    /// The probe served at `path`, if any.
    pub fn at(path: &str) -> Option<Probe> {
        match path {
            "/healthz" => Some(Probe::Liveness),
            "/readyz" => Some(Probe::Readiness),
            _ => None,
        }
    }

    /// The status code and JSON body this probe answers; `health` is read only by the probe
    /// that needs it.
    pub fn answer(self, health: impl FnOnce() -> Health) -> (StatusCode, String) {
        match self {
            // The process answers, so it is alive.
            Probe::Liveness => (StatusCode::OK, r#"{"status":"ok"}"#.to_owned()),
            Probe::Readiness => health().readiness(),
        }
    }
}

/// What `/readyz` reports: the broker connection and the spool, as they are now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub broker: BrokerState,
    /// Why the broker is not `Connected`, for a person.
    pub broker_error: Option<String>,
    /// `None` with the spool off.
    pub spool: Option<SpoolHealth>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerState {
    Connected,
    /// Connected, but publishing is blocked by a resource alarm.
    Blocked,
    /// The broker stopped answering; the relay abandoned the connection and has no new one
    /// yet.
    Stalled,
    Disconnected,
}

impl BrokerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BrokerState::Connected => "connected",
            BrokerState::Blocked => "blocked",
            BrokerState::Stalled => "stalled",
            BrokerState::Disconnected => "disconnected",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolHealth {
    pub depth: Depth,
    /// False while the spool is full or its writes fail.
    pub accepting: bool,
    /// Why writes fail, while they do.
    pub error: Option<Arc<str>>,
}

impl Health {
    /// The state of `publisher`'s connection and of `spool` (if enabled) now.
    pub fn of(publisher: &Publisher, spool: Option<&Spool>) -> Health {
        let (broker, broker_error) = match publisher.outage() {
            Some(outage) if outage.stalled => (BrokerState::Stalled, Some(outage.reason)),
            Some(outage) => (BrokerState::Disconnected, Some(outage.reason)),
            None if publisher.is_blocked() => (
                BrokerState::Blocked,
                Some("the broker blocked publishing (a memory or disk alarm)".to_owned()),
            ),
            None => (BrokerState::Connected, None),
        };
        let spool = spool.map(|spool| SpoolHealth {
            depth: spool.depth(),
            accepting: spool.is_accepting(),
            error: spool.write_error(),
        });
        Health {
            broker,
            broker_error,
            spool,
        }
    }

    /// Safe to send webhooks here: they go straight to a confirming broker, or the spool
    /// takes them. While the spool is not empty, webhooks queue behind it, so then only the
    /// spool's state counts.
    pub fn ready(&self) -> bool {
        let behind_spool = self.spool.as_ref().is_some_and(|s| s.depth.records > 0);
        let direct = self.broker == BrokerState::Connected && !behind_spool;
        direct || self.spool.as_ref().is_some_and(|s| s.accepting)
    }

    /// `ok`; `degraded` (accepting, but into the spool, or the spool is still draining, or
    /// it could not take a webhook the broker failed to confirm); or `unavailable`.
    pub fn status(&self) -> &'static str {
        let spool_ok = self
            .spool
            .as_ref()
            .is_none_or(|s| s.depth.records == 0 && s.accepting);
        match (self.broker, self.ready()) {
            (_, false) => "unavailable",
            (BrokerState::Connected, true) if spool_ok => "ok",
            (_, true) => "degraded",
        }
    }

    /// `/readyz`: 200 while ready, else 503, with the parts in the body.
    fn readiness(&self) -> (StatusCode, String) {
        let mut body =
            serde_json::json!({ "status": self.status(), "broker": self.broker.as_str() });
        if let Some(error) = &self.broker_error {
            body["broker_error"] = error.as_str().into();
        }
        if let Some(spool) = &self.spool {
            body["spool"] = serde_json::json!({
                "accepting": spool.accepting,
                "messages": spool.depth.records,
                "bytes": spool.depth.bytes,
            });
            if let Some(error) = &spool.error {
                body["spool"]["error"] = error.as_ref().into();
            }
        }
        let status = if self.ready() {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (status, body.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(broker: BrokerState, records: u64, accepting: bool) -> Health {
        Health {
            broker,
            broker_error: None,
            spool: Some(SpoolHealth {
                depth: Depth {
                    records,
                    bytes: records * 100,
                },
                accepting,
                error: None,
            }),
        }
    }

    #[test]
    fn readiness_follows_where_the_next_webhook_would_go() {
        use BrokerState::*;
        // Straight to a confirming broker.
        assert_eq!(health(Connected, 0, true).status(), "ok");
        // A spool that cannot take a webhook is a warning while the broker confirms.
        assert!(health(Connected, 0, false).ready());
        assert_eq!(health(Connected, 0, false).status(), "degraded");
        // Into the spool: fine while it accepts.
        assert_eq!(health(Disconnected, 3, true).status(), "degraded");
        assert_eq!(health(Blocked, 0, true).status(), "degraded");
        assert_eq!(health(Stalled, 0, true).status(), "degraded");
        assert!(!health(Stalled, 0, false).ready());
        // Behind a full spool, even with the broker up, the next webhook gets 503.
        assert_eq!(health(Connected, 3, false).status(), "unavailable");
        assert!(!health(Disconnected, 0, false).ready());
        let no_spool = Health {
            broker: Disconnected,
            broker_error: None,
            spool: None,
        };
        assert_eq!(no_spool.status(), "unavailable");
    }

    #[test]
    fn probes_answer_their_parts_as_json() {
        assert_eq!(Probe::at("/healthz"), Some(Probe::Liveness));
        assert_eq!(Probe::at("/readyz"), Some(Probe::Readiness));
        assert_eq!(Probe::at("/readyz/"), None);
        let (status, body) = Probe::Liveness.answer(|| unreachable!("liveness reads no state"));
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, r#"{"status":"ok"}"#)
        );

        let mut stuck = health(BrokerState::Stalled, 12, false);
        stuck.broker_error = Some("stopped answering".into());
        stuck.spool.as_mut().unwrap().error = Some("No space left on device".into());
        let (status, body) = Probe::Readiness.answer(|| stuck);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "status": "unavailable",
                "broker": "stalled",
                "broker_error": "stopped answering",
                "spool": {
                    "accepting": false,
                    "messages": 12,
                    "bytes": 1200,
                    "error": "No space left on device",
                },
            })
        );
        let (status, body) = Probe::Readiness.answer(|| Health {
            spool: None,
            ..health(BrokerState::Connected, 0, true)
        });
        assert_eq!(status, StatusCode::OK);
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({ "status": "ok", "broker": "connected" })
        );
    }
}
