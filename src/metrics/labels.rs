//! Every label value of a fixed set that the relay exports, each an enum variant, in this
//! one file. A value is written once, as its variant: prometheus-client's
//! `#[derive(EncodeLabelValue)]` exports a variant as its name, so the names are the
//! snake_case values that the alert rules, the dashboard and the docs use.

use prometheus_client::encoding::EncodeLabelValue;

/// An enum whose variants are a label's values, with `ALL` (every value, for series that
/// exist at zero from the start), `as_str` (the value as exported, for log fields) and
/// `parse` (its inverse).
macro_rules! label_values {
    ($(#[$doc:meta])* $name:ident { $($(#[$value_doc:meta])* $value:ident,)+ }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EncodeLabelValue)]
        #[allow(non_camel_case_types)] // The derive exports a variant's name as it is.
        pub enum $name {
            $($(#[$value_doc])* $value,)+
        }

        impl $name {
            /// Every value, in the order the docs list them: the declaration order, so a
            /// value's index here is `value as usize`.
            pub const ALL: &[$name] = &[$($name::$value,)+];

            /// The value as exported.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$value => stringify!($value),)+
                }
            }

            /// The value `exported` names, as read back from an exposition.
            pub fn parse(exported: &str) -> Option<$name> {
                $name::ALL.iter().copied().find(|value| value.as_str() == exported)
            }
        }
    };
}

label_values! {
    /// `route` of `hirehop_relay_http_requests_total` and
    /// `hirehop_relay_http_request_duration_seconds`: a fixed set, whatever path a client
    /// invents.
    Route {
        /// `http.path`.
        webhook,
        healthz,
        readyz,
        metrics,
        /// Any other path.
        other,
    }
}

label_values! {
    /// `reason` of `hirehop_relay_rejections_total`: why a request was not accepted.
    RejectionReason {
        bad_host,
        not_found,
        forbidden,
        method_not_allowed,
        overloaded,
        too_large,
        body_timeout,
        body_read,
        bad_json,
        bad_key,
        /// A 429: the source's budget of failed key checks is spent.
        rate_limited,
        stale,
        bad_event,
        broker_unavailable,
        unroutable,
        /// The broker will not declare the event's per-event queue.
        queue_refused,
        spool_full,
        spool_failed,
        /// A bug: the delivery task panicked.
        delivery_aborted,
    }
}

impl RejectionReason {
    /// Answered 503: a webhook the relay could not keep, which HireHop never sends again
    /// (rather than a request that was not a webhook to keep).
    pub fn is_refusal(self) -> bool {
        matches!(
            self,
            Self::overloaded
                | Self::broker_unavailable
                | Self::unroutable
                | Self::queue_refused
                | Self::spool_full
                | Self::spool_failed
                | Self::delivery_aborted
        )
    }
}

label_values! {
    /// `outcome` of `hirehop_relay_publishes_total`: what became of a delivery.
    PublishOutcome {
        /// The broker confirmed it.
        ack,
        nack,
        /// Unroutable, returned under `mandatory`.
        returned,
        /// The broker refused the event's per-event queue.
        refused,
        timeout,
        stalled,
        /// A resource alarm, given up after `amqp.stall_timeout_ms`.
        blocked,
        unavailable,
        error,
        spooled,
        spool_full,
        spool_error,
    }
}

label_values! {
    /// `kind` of `hirehop_relay_connection_errors_total`: why a connection ended early.
    ConnectionErrorKind {
        header_timeout,
        headers_too_large,
        bad_request,
        tls_handshake,
        /// Refused at `http.max_connections`.
        over_limit,
        /// Refused at `http.max_connections_per_ip`.
        over_ip_limit,
        io,
    }
}

label_values! {
    /// `reason` of `hirehop_relay_tls_handshake_failures_total`.
    TlsFailure {
        timeout,
        /// A plain HTTP request on the TLS port.
        plain_http,
        not_tls,
        /// The client refused the certificate.
        certificate_rejected,
        client_alert,
        /// No common version, cipher suite or protocol.
        incompatible,
        protocol,
        closed,
        io,
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Debug;
    use std::hash::Hash;

    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::registry::Registry;

    use super::*;

    /// Exports a series for each of `values` and checks that its label is `as_str`'s.
    fn check<L>(values: &[L], as_str: fn(L) -> &'static str)
    where
        L: EncodeLabelValue + Copy + Debug + Hash + Eq + Send + Sync + 'static,
    {
        let family = Family::<[(&'static str, L); 1], Counter>::default();
        let mut registry = Registry::default();
        registry.register("values", "one series per value", family.clone());
        for &value in values {
            family.get_or_create(&[("label", value)]).inc();
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for &value in values {
            let series = format!("values_total{{label=\"{}\"}} 1\n", as_str(value));
            assert!(text.contains(&series), "no {series} in {text}");
        }
    }

    #[test]
    fn each_value_is_exported_as_as_str_says() {
        check(Route::ALL, Route::as_str);
        check(RejectionReason::ALL, RejectionReason::as_str);
        check(PublishOutcome::ALL, PublishOutcome::as_str);
        check(ConnectionErrorKind::ALL, ConnectionErrorKind::as_str);
        check(TlsFailure::ALL, TlsFailure::as_str);
        assert_eq!(RejectionReason::bad_key.as_str(), "bad_key");
        assert_eq!(
            RejectionReason::parse("bad_key"),
            Some(RejectionReason::bad_key)
        );
        assert_eq!(RejectionReason::parse("Bad_Key"), None);
    }

    #[test]
    fn a_values_index_in_all_is_its_discriminant() {
        for (index, &outcome) in PublishOutcome::ALL.iter().enumerate() {
            assert_eq!(outcome as usize, index, "{outcome:?}");
        }
    }
}
