//! The few envelope fields the relay reads, borrowed from the raw body.
//!
//! The body is published byte for byte, so nothing here builds a document: one pass of
//! serde_json validates the whole body as JSON and captures `event`, `export_key`,
//! `company_id`, `user_id` and `time` as raw slices; every other field (`data`, `changes` as
//! `{}` or `[]`, fields HireHop adds later) is checked and dropped without being kept.
//!
//! Consumers are promised JSON they can parse, so the body must be what serde_json's own
//! `Value` reads: besides the grammar, no lone surrogate escape (`"\udc00"`), no number
//! beyond an f64 (`1e999999`, a 900k-digit integer), no nesting deeper than 128 levels.
//! serde_json skips values it is not asked to read without checking any of that, so each
//! value is read here the way `Value` would read it, and kept only as far as the relay needs.
//!
//! What HireHop sends is PHP's `json_encode`, so the readers are lenient where PHP is loose
//! (`company_id` as `1` or `"1"`) and strict where ambiguity would be dangerous: a duplicated
//! field the relay reads is refused, since the relay and a consumer could otherwise read
//! different values.

use std::borrow::Cow;
use std::ops::Range;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// Why a body is not a usable envelope. Messages go into 400 answers: they name the rule and
/// never quote the body.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("body is not a JSON object")]
    NotAnObject,
    #[error("body is not valid UTF-8")]
    NotUtf8,
    #[error("body is not valid JSON: {0}")]
    Json(serde_json::Error),
    #[error("{0} must be an integer or a string of digits")]
    NotAnId(&'static str),
}

/// The fields the relay needs, borrowed from the body where no JSON escape forces a copy.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// `None` when absent, `null` or not a string (the caller answers 400).
    pub event: Option<Cow<'a, str>>,
    /// `None` when absent, `null` or not a string (the caller answers 401).
    pub export_key: Option<Cow<'a, str>>,
    pub company_id: Option<u64>,
    pub user_id: Option<u64>,
    /// HireHop's send time (`YYYY-MM-DD HH:MM:SS`, UTC), as sent.
    pub time: Option<Cow<'a, str>>,
    /// Where `export_key`'s JSON value (quotes included) sits in the body, for redaction.
    pub export_key_span: Option<Range<usize>>,
}

/// The fields the relay reads, as raw JSON text borrowed from the body.
#[derive(Default)]
struct RawFields<'a> {
    event: Option<&'a RawValue>,
    export_key: Option<&'a RawValue>,
    company_id: Option<&'a RawValue>,
    user_id: Option<&'a RawValue>,
    time: Option<&'a RawValue>,
}

impl<'de> Deserialize<'de> for RawFields<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(RawFieldsVisitor)
    }
}

struct RawFieldsVisitor;

impl<'de> Visitor<'de> for RawFieldsVisitor {
    type Value = RawFields<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawFields<'de>, A::Error> {
        let mut fields = RawFields::default();
        while let Some(FieldName(name)) = map.next_key()? {
            let slot = match name.as_ref() {
                "event" => &mut fields.event,
                "export_key" => &mut fields.export_key,
                "company_id" => &mut fields.company_id,
                "user_id" => &mut fields.user_id,
                "time" => &mut fields.time,
                _ => {
                    map.next_value::<Checked>()?;
                    continue;
                }
            };
            if slot.is_some() {
                return Err(de::Error::custom(format_args!("duplicate field `{name}`")));
            }
            // A raw value is only scanned: read its text again as `Value` would. These are a
            // few short fields, so the second look costs little.
            let raw: &'de RawValue = map.next_value()?;
            if let Err(err) = recheck(raw.get()) {
                // Without its place in the field: serde_json adds the place in the body.
                let place = format!(" at line {} column {}", err.line(), err.column());
                let message = err.to_string();
                let reason = message.strip_suffix(&place).unwrap_or(&message);
                return Err(de::Error::custom(format_args!("{reason} in `{name}`")));
            }
            *slot = Some(raw);
        }
        Ok(fields)
    }
}

/// Reads a member's raw text as `Value` would have read it in its place.
fn recheck(raw: &str) -> Result<(), serde_json::Error> {
    // What the scan already proved: a string without escapes (its characters were checked),
    // a short integer, a literal. Only escapes, long or exponent numbers and nesting are left
    // for a second look, and the fields the relay reads seldom hold any.
    if plain_string(raw).is_some()
        || matches!(raw, "null" | "true" | "false")
        || (raw.len() <= 18 && raw.bytes().all(|b| b.is_ascii_digit() || b == b'-'))
    {
        return Ok(());
    }
    if raw.starts_with(['[', '{']) {
        // Nesting is counted from the body's top: the object around this member is one level.
        return serde_json::from_str::<Checked>(&format!("[{raw}]")).map(|_| ());
    }
    serde_json::from_str::<Checked>(raw).map(|_| ())
}

/// An object member's name, borrowed from the body unless it holds escapes.
struct FieldName<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for FieldName<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NameVisitor;
        impl<'de> Visitor<'de> for NameVisitor {
            type Value = FieldName<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, name: &'de str) -> Result<FieldName<'de>, E> {
                Ok(FieldName(Cow::Borrowed(name)))
            }
            fn visit_str<E>(self, name: &str) -> Result<FieldName<'de>, E> {
                Ok(FieldName(Cow::Owned(name.to_owned())))
            }
        }
        deserializer.deserialize_str(NameVisitor)
    }
}

/// Any JSON value, read the way serde_json's `Value` reads it (strings unescaped, numbers
/// converted, nesting counted) and then dropped.
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(CheckedVisitor)
    }
}

struct CheckedVisitor;

impl<'de> Visitor<'de> for CheckedVisitor {
    type Value = Checked;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_str<E>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_unit<E>(self) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        while map.next_entry::<Checked, Checked>()?.is_some() {}
        Ok(Checked)
    }
}

impl<'a> Envelope<'a> {
    /// Reads the envelope out of `body`, which must be one JSON object (nothing after it).
    pub fn parse(body: &'a [u8]) -> Result<Envelope<'a>, EnvelopeError> {
        // Anything but an object gets a message of its own, before any parsing.
        let first = body.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'{') {
            return Err(EnvelopeError::NotAnObject);
        }
        // serde_json skips ignored strings without checking their UTF-8; consumers must get
        // valid JSON (RFC 8259 requires UTF-8), so check the whole body.
        let body = std::str::from_utf8(body).map_err(|_| EnvelopeError::NotUtf8)?;
        let raw: RawFields<'a> = serde_json::from_str(body).map_err(EnvelopeError::Json)?;
        // A borrowed raw value is a slice of `body`: its offset is its place in the body.
        let span = |value: &RawValue| {
            let start = value.get().as_ptr() as usize - body.as_ptr() as usize;
            start..start + value.get().len()
        };
        Ok(Envelope {
            export_key_span: raw
                .export_key
                .filter(|v| v.get().starts_with('"'))
                .map(span),
            time: raw.time.and_then(string),
            event: raw.event.and_then(string),
            export_key: raw.export_key.and_then(string),
            company_id: raw
                .company_id
                .map(|v| id(v).ok_or(EnvelopeError::NotAnId("company_id")))
                .transpose()?
                .flatten(),
            // `user_id` only feeds a header: an odd one is dropped rather than the webhook.
            user_id: raw.user_id.and_then(id).flatten(),
        })
    }
}

/// The text of a JSON string that has no escapes (its quotes taken off), as scanned already.
fn plain_string(raw: &str) -> Option<&str> {
    raw.strip_prefix('"')?
        .strip_suffix('"')
        .filter(|text| !text.contains('\\'))
}

/// A JSON string's value, borrowed unless it contains escapes; `None` for any other type.
fn string(raw: &RawValue) -> Option<Cow<'_, str>> {
    let json = raw.get();
    if let Some(text) = plain_string(json) {
        return Some(Cow::Borrowed(text));
    }
    if let Ok(borrowed) = serde_json::from_str::<&str>(json) {
        return Some(Cow::Borrowed(borrowed));
    }
    serde_json::from_str::<String>(json).ok().map(Cow::Owned)
}

/// `Some(None)` for `null`, `Some(Some(n))` for `n` or `"n"`, `None` for anything else.
fn id(raw: &RawValue) -> Option<Option<u64>> {
    let json = raw.get();
    if json == "null" {
        return Some(None);
    }
    if let Ok(n) = serde_json::from_str::<u64>(json) {
        return Some(Some(n));
    }
    let s = string(raw)?;
    let digits = s.trim();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<Envelope<'_>, EnvelopeError> {
        Envelope::parse(body.as_bytes())
    }

    const DOCUMENTED: &str = r#"{
      "time": "2022-03-29 07:50:42",
      "user_id": 1,
      "user_name": "John Smith",
      "user_email": "john@email.com",
      "company_id": 1,
      "export_key": "22u43mrjwe7u",
      "event": "invoice.status.updated",
      "data": { },
      "changes": { "FIELD_NAME": { "from": "old", "to": "new" } }
    }"#;

    #[test]
    fn reads_the_documented_example() {
        let envelope = parse(DOCUMENTED).unwrap();
        assert_eq!(envelope.event.as_deref(), Some("invoice.status.updated"));
        assert_eq!(envelope.export_key.as_deref(), Some("22u43mrjwe7u"));
        assert_eq!(envelope.company_id, Some(1));
        assert_eq!(envelope.user_id, Some(1));
        assert!(matches!(envelope.event, Some(Cow::Borrowed(_))));
    }

    #[test]
    fn accepts_the_variants_php_produces() {
        let envelope = parse(
            r#"{"event":"job.updated","export_key":"k","company_id":"42","user_id":"7",
                "changes":[],"data":{"JOB_NAME":"Bühne \u00e9t\u00e9 🎪"},"job":{"ID":1}}"#,
        )
        .unwrap();
        assert_eq!(envelope.company_id, Some(42));
        assert_eq!(envelope.user_id, Some(7));

        let envelope = parse(r#"{"event":"job.updated","export_key":"k"}"#).unwrap();
        assert_eq!(envelope.company_id, None);
        assert_eq!(envelope.user_id, None);

        let envelope = parse(r#"{"event":"job.updated","company_id":null,"user_id":""}"#).unwrap();
        assert_eq!(envelope.company_id, None);
        assert_eq!(envelope.user_id, None);
    }

    #[test]
    fn the_key_span_points_at_its_json_string_in_the_body() {
        let body = r#"{"event":"a", "export_key" : "22u43mrjwe7u" ,"x":1}"#;
        let envelope = parse(body).unwrap();
        let span = envelope.export_key_span.unwrap();
        assert_eq!(&body[span], "\"22u43mrjwe7u\"");
        assert_eq!(parse(r#"{"export_key":5}"#).unwrap().export_key_span, None);
        let envelope = parse(r#"{"time":"2022-03-29 07:50:42"}"#).unwrap();
        assert_eq!(envelope.time.as_deref(), Some("2022-03-29 07:50:42"));
    }

    #[test]
    fn escaped_strings_are_unescaped() {
        let envelope = parse(r#"{"event":"job\u002eupdated","export_key":"a\"b"}"#).unwrap();
        assert_eq!(envelope.event.as_deref(), Some("job.updated"));
        assert_eq!(envelope.export_key.as_deref(), Some("a\"b"));
    }

    #[test]
    fn non_string_fields_read_as_absent() {
        let envelope = parse(r#"{"event":["job.updated"],"export_key":12345}"#).unwrap();
        assert_eq!(envelope.event, None);
        assert_eq!(envelope.export_key, None);
    }

    #[test]
    fn not_an_object_is_refused() {
        for body in [
            "",
            "   ",
            "[]",
            r#"["job.updated","k"]"#,
            "\"x\"",
            "1",
            "null",
        ] {
            assert!(
                matches!(parse(body), Err(EnvelopeError::NotAnObject)),
                "{body:?}"
            );
        }
    }

    #[test]
    fn invalid_json_is_refused() {
        for body in [
            "{",
            r#"{"event":"a"} trailing"#,
            r#"{"event":"a",}"#,
            r#"{"event":"a","event":"b"}"#,
        ] {
            assert!(
                matches!(parse(body), Err(EnvelopeError::Json(_))),
                "{body:?}"
            );
        }
        // Invalid UTF-8, even inside a field the relay does not read.
        assert!(matches!(
            Envelope::parse(b"{\"data\":\"\xff\"}"),
            Err(EnvelopeError::NotUtf8)
        ));
    }

    #[test]
    fn deep_nesting_is_refused_where_serde_json_refuses_it_without_overflowing_the_stack() {
        let deep = |n| format!("{}{}", "[".repeat(n), "]".repeat(n));
        for n in [1, 100, 126, 127, 128, 129, 100_000] {
            for field in ["data", "event"] {
                let body = format!(r#"{{"{field}":{}}}"#, deep(n));
                let value = serde_json::from_str::<serde_json::Value>(&body);
                let ours = parse(&body);
                assert_eq!(ours.is_ok(), value.is_ok(), "{field} nested {n} deep");
                if let Err(err) = ours {
                    assert!(err.to_string().contains("recursion limit"), "{err}");
                }
            }
        }
    }

    #[test]
    fn lone_surrogates_are_refused_and_pairs_accepted() {
        for body in [
            r#"{"event":"a\udc00"}"#,
            r#"{"event":"job.updated","data":{"NAME":"\ud800"}}"#,
            r#"{"event":"job.updated","data":{"\udc00":1}}"#,
            r#"{"export_key":"\ud83d x"}"#,
        ] {
            let err = parse(body).unwrap_err().to_string();
            assert!(
                err.contains("surrogate") || err.contains("hex escape"),
                "{body}: {err}"
            );
            assert!(serde_json::from_str::<serde_json::Value>(body).is_err());
        }
        let envelope = parse(r#"{"event":"a\ud83c\udfaa","data":"\ud83c\udfaa"}"#).unwrap();
        assert_eq!(envelope.event.as_deref(), Some("a🎪"));
    }

    #[test]
    fn numbers_beyond_f64_are_refused_and_large_ones_within_it_accepted() {
        let huge_digits = "9".repeat(900_000);
        for body in [
            r#"{"event":"a","data":1e999999}"#.to_owned(),
            r#"{"event":"a","data":[-1e309]}"#.to_owned(),
            r#"{"user_id":1e400,"event":"a"}"#.to_owned(),
            format!(r#"{{"event":"a","data":{huge_digits}}}"#),
        ] {
            let err = parse(&body).unwrap_err().to_string();
            assert!(err.contains("number out of range"), "{err}");
            assert!(serde_json::from_str::<serde_json::Value>(&body).is_err());
        }
        let within = format!(
            r#"{{"event":"a","data":[{},1e308,0.1e-999]}}"#,
            "9".repeat(300)
        );
        assert!(parse(&within).is_ok());
    }

    #[test]
    fn bad_company_id_is_refused() {
        for body in [
            r#"{"company_id":"abc"}"#,
            r#"{"company_id":-1}"#,
            r#"{"company_id":1.5}"#,
            r#"{"company_id":{}}"#,
            r#"{"company_id":""}"#,
        ] {
            assert!(
                matches!(parse(body), Err(EnvelopeError::NotAnId("company_id"))),
                "{body:?}"
            );
        }
    }
}
