//! One accepted webhook on its way to the broker, and its encoding in the spool.

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::routing::RoutingKey;

/// Everything the publisher needs to build the AMQP message (the consumer contract:
/// `docs/consumers.md`, "The message"); the body is the request body, byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub routing_key: RoutingKey,
    /// The event name as HireHop sent it (the routing key may carry a prefix).
    pub event: String,
    pub body: Bytes,
    pub message_id: String,
    pub company_id: Option<u64>,
    pub user_id: Option<u64>,
    pub received_at: SystemTime,
    /// Published from the spool rather than straight from the request.
    pub replayed: bool,
    /// W3C `traceparent` naming the relay's span, and the caller's `tracestate`.
    pub traceparent: String,
    pub tracestate: Option<String>,
}

/// A spool record that cannot be read back as a message.
#[derive(Debug, thiserror::Error)]
#[error("unreadable spool record: {0}")]
pub struct DecodeError(String);

/// The metadata part of a spool record. Field names are the on-disk format: add, never rename.
/// Written from borrowed strings, read back into owned ones.
#[derive(Serialize, Deserialize)]
struct SpooledHeader<'a> {
    message_id: Cow<'a, str>,
    event: Cow<'a, str>,
    routing_key: Cow<'a, str>,
    company_id: Option<u64>,
    user_id: Option<u64>,
    received_at_ms: u64,
    #[serde(default)]
    traceparent: Cow<'a, str>,
    #[serde(default)]
    tracestate: Option<Cow<'a, str>>,
}

impl Message {
    /// The spool record, `[u32 LE header length][header JSON][body]`, in two parts: the
    /// small header, and the body itself (shared, not copied: a spooled webhook costs its
    /// body's memory once, however large).
    pub fn encode(&self) -> std::io::Result<[Bytes; 2]> {
        let received_at_ms = self
            .received_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let header = SpooledHeader {
            message_id: Cow::Borrowed(&self.message_id),
            event: Cow::Borrowed(&self.event),
            routing_key: Cow::Borrowed(self.routing_key.as_str()),
            company_id: self.company_id,
            user_id: self.user_id,
            received_at_ms,
            traceparent: Cow::Borrowed(&self.traceparent),
            tracestate: self.tracestate.as_deref().map(Cow::Borrowed),
        };
        // Neither can fail for strings and numbers of the sizes a request can carry; if
        // either ever did, this webhook would be refused, not the relay stopped.
        let header = serde_json::to_vec(&header)?;
        let header_len = u32::try_from(header.len()).map_err(std::io::Error::other)?;
        let mut out = BytesMut::with_capacity(4 + header.len());
        out.put_u32_le(header_len);
        out.put_slice(&header);
        Ok([out.freeze(), self.body.clone()])
    }

    /// Reads back what [`Message::encode`] wrote; the body shares `record`'s memory.
    pub fn decode(mut record: Bytes) -> Result<Message, DecodeError> {
        if record.len() < 4 {
            return Err(DecodeError("too short".into()));
        }
        let header_len = record.get_u32_le() as usize;
        if record.len() < header_len {
            return Err(DecodeError("header longer than the record".into()));
        }
        let header = record.split_to(header_len);
        let header: SpooledHeader =
            serde_json::from_slice(&header).map_err(|err| DecodeError(err.to_string()))?;
        // A routing key that was valid when spooled passes the event-name rules again.
        let routing_key =
            RoutingKey::new("", &header.routing_key).map_err(|err| DecodeError(err.to_string()))?;
        Ok(Message {
            routing_key,
            event: header.event.into_owned(),
            body: record,
            message_id: header.message_id.into_owned(),
            company_id: header.company_id,
            user_id: header.user_id,
            received_at: UNIX_EPOCH + Duration::from_millis(header.received_at_ms),
            replayed: false,
            traceparent: header.traceparent.into_owned(),
            tracestate: header.tracestate.map(Cow::into_owned),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spool_encoding_round_trips() {
        let message = Message {
            routing_key: RoutingKey::new("hirehop.", "job.updated").unwrap(),
            event: "job.updated".into(),
            body: Bytes::from_static("{\"a\":\"é\"}\n".as_bytes()),
            message_id: "01a2".into(),
            company_id: Some(7),
            user_id: None,
            received_at: UNIX_EPOCH + Duration::from_millis(1_648_540_242_123),
            replayed: false,
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            tracestate: Some("v=1".into()),
        };
        let [header, body] = message.encode().unwrap();
        assert_eq!(body.as_ptr(), message.body.as_ptr(), "the body was copied");
        let record = Bytes::from([header, body].concat());
        assert_eq!(Message::decode(record).unwrap(), message);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for record in [
            &b""[..],
            b"\x05\x00\x00\x00{}",
            b"\x02\x00\x00\x00{}",
            b"\xff\xff\xff\xff",
        ] {
            assert!(Message::decode(Bytes::copy_from_slice(record)).is_err());
        }
    }
}
