//! W3C Trace Context (`traceparent`, `tracestate`): the relay joins the caller's trace, or
//! starts one, and hands it on in the AMQP headers so a consumer's spans join it too.

use std::fmt;

use hyper::HeaderMap;

/// The relay's own span in a trace: the caller's trace id (or a new one), a new span id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// `00-<trace id>-<span id>-<flags>`, lowercase hex: built once, on the stack (this runs
    /// for every webhook).
    traceparent: [u8; TRACEPARENT_LEN],
    /// Vendor data from the caller, passed on as it came (when well-formed).
    pub tracestate: Option<String>,
}

const TRACEPARENT_LEN: usize = 55;
/// Where the trace id, the span id and the flags sit in a `traceparent`.
const TRACE_ID: std::ops::Range<usize> = 3..35;
const SPAN_ID: std::ops::Range<usize> = 36..52;
const FLAGS: std::ops::Range<usize> = 53..55;

impl TraceContext {
    /// A child of the request's `traceparent` if it has a valid one, else a new sampled root.
    pub fn from_headers(headers: &HeaderMap) -> TraceContext {
        let parent = headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_traceparent);
        let mut traceparent = *b"00-00000000000000000000000000000000-0000000000000000-01";
        random_hex(&mut traceparent[SPAN_ID]);
        let tracestate = match parent {
            Some((trace_id, flags)) => {
                traceparent[TRACE_ID].copy_from_slice(trace_id.as_bytes());
                traceparent[FLAGS].copy_from_slice(flags.as_bytes());
                headers
                    .get("tracestate")
                    .and_then(|v| v.to_str().ok())
                    .filter(|s| s.len() <= 512 && !s.is_empty())
                    .map(str::to_owned)
            }
            None => {
                random_hex(&mut traceparent[TRACE_ID]);
                None
            }
        };
        TraceContext {
            traceparent,
            tracestate,
        }
    }

    pub fn trace_id(&self) -> &str {
        &self.as_str()[TRACE_ID]
    }

    /// The `traceparent` that names the relay's span: `00-<trace id>-<span id>-<flags>`.
    pub fn traceparent(&self) -> String {
        self.as_str().to_owned()
    }

    fn as_str(&self) -> &str {
        // Always ASCII: hex digits and dashes, checked or written here.
        std::str::from_utf8(&self.traceparent).unwrap_or_default()
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `(trace_id, flags)` of a version-00 `traceparent`, if valid.
fn parse_traceparent(value: &str) -> Option<(&str, &str)> {
    let mut parts = value.trim().split('-');
    let (version, trace_id, parent_id, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let valid = version == "00"
        && parts.next().is_none()
        && hex(trace_id, 32)
        && hex(parent_id, 16)
        && hex(flags, 2)
        && trace_id.bytes().any(|b| b != b'0')
        && parent_id.bytes().any(|b| b != b'0');
    valid.then_some((trace_id, flags))
}

/// Fills `out` with a random id in lowercase hex (`out.len() / 2` random bytes, at most 16).
fn random_hex(out: &mut [u8]) {
    loop {
        // One random number, formatted once: this runs for every webhook.
        let id = fastrand::u128(..).to_be_bytes();
        let id = &id[id.len() - out.len() / 2..];
        // All zeros is invalid in W3C trace context.
        if id.iter().any(|&b| b != 0) {
            // Cannot fail: `out` is exactly twice `id`'s length.
            let _ = hex::encode_to_slice(id, out);
            return;
        }
    }
}

/// `bytes` in lowercase hex, through hex's byte table: the formatter's padded `{:0w$x}` and
/// `hex::encode`'s char iterator cost several times as much, and ids and the body's digest
/// are formatted for every webhook.
pub(crate) fn lower_hex(bytes: &[u8]) -> String {
    let mut out = vec![0; 2 * bytes.len()];
    // Cannot fail: the output is exactly twice the input's length.
    let _ = hex::encode_to_slice(bytes, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (k.parse().unwrap(), v.parse().unwrap()))
            .collect()
    }

    #[test]
    fn joins_the_callers_trace_with_a_new_span() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ctx = TraceContext::from_headers(&headers(&[
            ("traceparent", parent),
            ("tracestate", "vendor=abc"),
        ]));
        let ours = ctx.to_string();
        assert_eq!(ctx.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(ours.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(ours.ends_with("-01"));
        assert_ne!(ours, parent, "a new span id");
        assert_eq!(ctx.tracestate.as_deref(), Some("vendor=abc"));
    }

    #[test]
    fn random_ids_have_the_right_width() {
        for _ in 0..1000 {
            let (mut trace, mut span) = ([0; 32], [0; 16]);
            random_hex(&mut trace);
            random_hex(&mut span);
            assert!(
                trace
                    .iter()
                    .chain(&span)
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
            );
            assert!(trace.iter().any(|&b| b != b'0') && span.iter().any(|&b| b != b'0'));
        }
    }

    #[test]
    fn starts_a_trace_when_there_is_none_or_it_is_malformed() {
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            let ctx = TraceContext::from_headers(&headers(&[("traceparent", bad)]));
            let value = ctx.to_string();
            assert_eq!(value.len(), 55, "{value}");
            assert!(parse_traceparent(&value).is_some(), "{value}");
            assert!(!value.contains("4bf92f"), "{bad:?} must not be joined");
        }
    }
}
