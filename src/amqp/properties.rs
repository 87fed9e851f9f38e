//! The AMQP properties and headers of a published webhook: the consumer contract, written
//! down for consumers in `docs/consumers.md` ("The message"). Apart from publishing so that
//! what consumers read changes in one place, beside the test that pins it; the benchmark's
//! raw publisher builds its messages here too. The copies `hirehop-relay replay` makes keep
//! these and add `history_replayed_at` (see [`replay`](crate::amqp::replay)).

use std::time::UNIX_EPOCH;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use sha2::{Digest, Sha256};

use crate::amqp::{integer, long_string};
use crate::message::Message;

/// The AMQP properties and headers `message` is published with.
pub fn properties(message: &Message) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert("event".into(), long_string(&message.event));
    if let Some(id) = message.company_id {
        headers.insert("company_id".into(), integer(id));
    }
    if let Some(id) = message.user_id {
        headers.insert("user_id".into(), integer(id));
    }
    // Strings made here are moved in, not copied again.
    let received_at = humantime::format_rfc3339_millis(message.received_at).to_string();
    headers.insert(
        "received_at".into(),
        AMQPValue::LongString(received_at.into()),
    );
    let body_sha256 = crate::tracecontext::lower_hex(&Sha256::digest(&message.body));
    headers.insert(
        "body_sha256".into(),
        AMQPValue::LongString(body_sha256.into()),
    );
    if message.replayed {
        headers.insert("replayed".into(), AMQPValue::Boolean(true));
    }
    if !message.traceparent.is_empty() {
        headers.insert("traceparent".into(), long_string(&message.traceparent));
    }
    if let Some(state) = &message.tracestate {
        headers.insert("tracestate".into(), long_string(state));
    }
    let timestamp = message
        .received_at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2) // persistent
        .with_message_id(message.message_id.as_str().into())
        .with_timestamp(timestamp)
        .with_app_id("hirehop-relay".into())
        // The event name fits: it passed the 255-byte routing key check.
        .with_type(message.event.as_str().into())
        .with_headers(headers)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::routing::RoutingKey;

    #[test]
    fn properties_carry_the_consumer_contract() {
        let received_at = UNIX_EPOCH + Duration::from_millis(1_648_540_242_123);
        let message = Message {
            routing_key: RoutingKey::new("", "job.updated").unwrap(),
            event: "job.updated".into(),
            body: Bytes::from_static(b"{}"),
            message_id: "id-1".into(),
            company_id: Some(1),
            user_id: None,
            received_at,
            replayed: false,
            traceparent: String::new(),
            tracestate: None,
        };
        let props = properties(&message);
        assert_eq!(props.delivery_mode(), &Some(2));
        assert_eq!(props.timestamp(), &Some(1_648_540_242));
        assert_eq!(
            props.kind().as_ref().map(|s| s.as_str()),
            Some("job.updated")
        );
        let headers = props.headers().as_ref().unwrap().inner();
        assert_eq!(
            headers.get("received_at"),
            Some(&long_string("2022-03-29T07:50:42.123Z"))
        );
        assert_eq!(headers.get("company_id"), Some(&AMQPValue::LongLongInt(1)));
        assert!(!headers.contains_key("user_id"));
        assert_eq!(
            headers.get("body_sha256"),
            Some(&long_string(
                "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
            ))
        );
    }
}
