//! Reading the history stream `<exchange>.history` (how it is fed: [`super::topology`]): from
//! the start, an offset or a point in time, with the filters `replay` and `tail --since`
//! share, either up to where the stream ended when the reader started, or on and on.
//!
//! AMQP 0-9-1 gives a stream consumer no end: at the last message it waits for the next.
//! Nor can it ask where the stream ends (`queue.declare` reports 0 messages for a stream). So
//! a reader that must stop first appends an *end marker*, confirmed, and stops when it reads
//! its own marker back: an empty message of type [`END_MARKER_TYPE`], published straight to
//! the stream (never to the exchange, so no consumer queue sees it). Every reader skips
//! markers, its own and others'.

use std::time::{Duration, SystemTime};

use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, Consumer};

use super::ConnectError;
use crate::config::AmqpConfig;
use crate::routing::TopicPattern;

/// The `type` of an end marker.
pub const END_MARKER_TYPE: &str = "hirehop-relay.end-marker";

/// How long before `--since` reading starts. A stream finds a point in time by the timestamps
/// the broker gave its chunks as it wrote them, on its own clock; `received_at` comes from the
/// relay's clock, a little earlier, and the two clocks may differ.
const CLOCK_SLACK: Duration = Duration::from_secs(300);

/// Messages delivered before the reader acks them (streams require a prefetch).
const PREFETCH: u16 = 500;

/// Where reading starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The oldest message the stream still holds.
    First,
    /// A stream offset, e.g. one an interrupted replay printed.
    Offset(u64),
    /// A few minutes before this time, so nothing received at or after it is missed.
    Since(SystemTime),
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(
        "cannot read the history stream {stream} (is history.enabled on, and has a relay run \
         with it?): {cause}"
    )]
    Missing { stream: String, cause: lapin::Error },
    #[error("failed to append the end marker to {stream}: {cause}")]
    Marker { stream: String, cause: lapin::Error },
    #[error("the broker did not take the end marker for {stream} ({outcome})")]
    MarkerRefused { stream: String, outcome: String },
    #[error("lost the broker while reading {stream}: {cause}")]
    Read { stream: String, cause: lapin::Error },
    #[error("a message in {stream} carries no x-stream-offset header")]
    NoOffset { stream: String },
}

/// What to keep of what the stream holds; every field that is set must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Received at or after this (the relay's `received_at` header).
    pub since: Option<SystemTime>,
    /// Received at or before this.
    pub until: Option<SystemTime>,
    /// The event name (the `event` header) matches this topic pattern.
    pub event: Option<TopicPattern>,
    /// The `company_id` header.
    pub company: Option<u64>,
}

impl Filter {
    pub fn matches(&self, message: &Delivery) -> bool {
        if self.since.is_some() || self.until.is_some() {
            let Some(received_at) = received_at(message) else {
                return false;
            };
            if self.since.is_some_and(|since| received_at < since)
                || self.until.is_some_and(|until| received_at > until)
            {
                return false;
            }
        }
        if let Some(pattern) = &self.event
            && !pattern.matches(&event(message))
        {
            return false;
        }
        match self.company {
            Some(company) => company_id(message) == Some(company),
            None => true,
        }
    }
}

/// The message's event name: the `event` header the relay sets, else its `type`, else its
/// routing key.
pub fn event(message: &Delivery) -> String {
    match header(message, "event") {
        Some(AMQPValue::LongString(event)) => String::from_utf8_lossy(event.as_bytes()).into(),
        _ => message
            .properties
            .kind()
            .as_ref()
            .map_or_else(|| message.routing_key.to_string(), |kind| kind.to_string()),
    }
}

/// When the relay received the message: its `received_at` header, else its `timestamp`.
pub fn received_at(message: &Delivery) -> Option<SystemTime> {
    if let Some(AMQPValue::LongString(text)) = header(message, "received_at")
        && let Ok(text) = std::str::from_utf8(text.as_bytes())
        && let Ok(time) = humantime::parse_rfc3339(text)
    {
        return Some(time);
    }
    let secs = (*message.properties.timestamp())?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

fn company_id(message: &Delivery) -> Option<u64> {
    match header(message, "company_id")? {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some((*n).into()),
        AMQPValue::LongString(text) => std::str::from_utf8(text.as_bytes()).ok()?.parse().ok(),
        _ => None,
    }
}

fn header<'a>(message: &'a Delivery, name: &str) -> Option<&'a AMQPValue> {
    message.properties.headers().as_ref()?.inner().get(name)
}

/// One message read from the stream, with its offset.
pub struct Entry {
    pub offset: u64,
    pub message: Delivery,
}

/// A consumer of the history stream.
pub struct Reader {
    stream: String,
    consumer: Consumer,
    /// The `message_id` of this reader's end marker; `None` reads on and on.
    marker: Option<String>,
    _channel: Channel,
}

impl Reader {
    /// Starts reading the history stream of `config` at `start`. With `to_end`, appends an end
    /// marker first, and [`Reader::next`] returns `None` once it reads it back.
    pub async fn open(
        connection: &Connection,
        config: &AmqpConfig,
        start: Start,
        to_end: bool,
    ) -> Result<Reader, HistoryError> {
        let stream = config.history_name();
        let channel = connection
            .create_channel()
            .await
            .map_err(ConnectError::Channel)?;
        let missing = |cause| HistoryError::Missing {
            stream: stream.clone(),
            cause,
        };
        channel
            .queue_declare(
                stream.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(missing)?;
        let marker = if to_end {
            Some(append_end_marker(connection, &stream).await?)
        } else {
            None
        };
        channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .map_err(missing)?;
        let offset = match start {
            Start::First => AMQPValue::LongString("first".into()),
            Start::Offset(offset) => {
                AMQPValue::LongLongInt(i64::try_from(offset).unwrap_or(i64::MAX))
            }
            Start::Since(since) => {
                let from = since
                    .checked_sub(CLOCK_SLACK)
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                let secs = from
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                AMQPValue::Timestamp(secs)
            }
        };
        let mut arguments = FieldTable::default();
        arguments.insert("x-stream-offset".into(), offset);
        let consumer = channel
            .basic_consume(
                stream.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                arguments,
            )
            .await
            .map_err(missing)?;
        Ok(Reader {
            stream,
            consumer,
            marker,
            _channel: channel,
        })
    }

    /// The next webhook in the stream; `None` at this reader's end marker.
    pub async fn next(&mut self) -> Result<Option<Entry>, HistoryError> {
        loop {
            let message = match self.consumer.next().await {
                Some(Ok(message)) => message,
                Some(Err(cause)) => {
                    return Err(HistoryError::Read {
                        stream: self.stream.clone(),
                        cause,
                    });
                }
                None => return Ok(None),
            };
            // Acks only give a stream consumer credit for more: nothing is removed.
            message
                .acker
                .ack(BasicAckOptions::default())
                .await
                .map_err(|cause| HistoryError::Read {
                    stream: self.stream.clone(),
                    cause,
                })?;
            let properties = &message.properties;
            if properties.kind().as_ref().map(|k| k.as_str()) == Some(END_MARKER_TYPE) {
                let id = properties.message_id().as_ref().map(|id| id.as_str());
                if id.is_some() && id == self.marker.as_deref() {
                    return Ok(None);
                }
                continue;
            }
            let offset = match header(&message, "x-stream-offset") {
                Some(AMQPValue::LongLongInt(n)) => u64::try_from(*n).ok(),
                _ => None,
            };
            let Some(offset) = offset else {
                return Err(HistoryError::NoOffset {
                    stream: self.stream.clone(),
                });
            };
            return Ok(Some(Entry { offset, message }));
        }
    }
}

/// Publishes an end marker straight to `stream`, waits for its confirm, and returns its
/// `message_id`.
async fn append_end_marker(connection: &Connection, stream: &str) -> Result<String, HistoryError> {
    let failed = |cause| HistoryError::Marker {
        stream: stream.to_owned(),
        cause,
    };
    let channel = connection.create_channel().await.map_err(failed)?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(failed)?;
    let id = uuid::Uuid::now_v7().to_string();
    let properties = BasicProperties::default()
        .with_message_id(id.as_str().into())
        .with_type(END_MARKER_TYPE.into())
        .with_app_id("hirehop-relay".into())
        .with_delivery_mode(2);
    let confirmation = channel
        .basic_publish(
            "".into(),
            stream.into(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            &[],
            properties,
        )
        .await
        .map_err(failed)?
        .await
        .map_err(failed)?;
    let _ = channel.close(200, "end marker appended".into()).await;
    match confirmation {
        Confirmation::Ack(None) => Ok(id),
        other => Err(HistoryError::MarkerRefused {
            stream: stream.to_owned(),
            outcome: format!("{other:?}"),
        }),
    }
}

/// Why a `--since` or `--until` value is not a point in time.
#[derive(Debug, thiserror::Error)]
#[error(
    "{0:?} is neither an RFC 3339 time (2024-05-01T10:00:00Z) nor a duration ago (90m, 2h, 7d)"
)]
pub struct TimeError(String);

/// `--since`/`--until`: an RFC 3339 time (UTC if it has no offset), or a duration before now.
pub fn point_in_time(text: &str) -> Result<SystemTime, TimeError> {
    point_in_time_at(text, SystemTime::now())
}

fn point_in_time_at(text: &str, now: SystemTime) -> Result<SystemTime, TimeError> {
    let text = text.trim();
    let rfc3339 = &time::format_description::well_known::Rfc3339;
    if let Ok(time) = time::OffsetDateTime::parse(text, rfc3339) {
        return Ok(time.into());
    }
    // Also what people type: a space for the `T`, no zone (UTC).
    if let Ok(time) = humantime::parse_rfc3339_weak(text) {
        return Ok(time);
    }
    humantime::parse_duration(text)
        .ok()
        .and_then(|ago| now.checked_sub(ago))
        .ok_or_else(|| TimeError(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_in_time_are_rfc3339_or_a_duration_ago() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            point_in_time_at("2h", now).unwrap(),
            now - Duration::from_secs(7200)
        );
        assert_eq!(
            point_in_time_at("7d", now).unwrap(),
            now - Duration::from_secs(7 * 86_400)
        );
        let expected = humantime::parse_rfc3339("2024-05-01T10:00:00Z").unwrap();
        for text in [
            "2024-05-01T10:00:00Z",
            "2024-05-01 10:00:00",
            "2024-05-01T12:00:00+02:00",
        ] {
            assert_eq!(point_in_time_at(text, now).unwrap(), expected, "{text}");
        }
        let millis = point_in_time_at("2024-05-01T10:00:00.250Z", now).unwrap();
        assert_eq!(millis, expected + Duration::from_millis(250));
        for bad in ["yesterday", "", "2024-13-01T00:00:00Z"] {
            let err = point_in_time_at(bad, now).unwrap_err().to_string();
            assert!(err.contains("RFC 3339"), "{err}");
        }
    }
}
