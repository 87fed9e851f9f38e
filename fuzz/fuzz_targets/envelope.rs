//! The envelope reader on arbitrary bytes: it never panics, and it agrees with serde_json's
//! `Value`: what it accepts is a JSON object `Value` reads (no lone surrogate, no number
//! beyond f64, no nesting past the limit), with the same `event` and `export_key`; what it
//! refuses and `Value` reads as an object breaks one of its own rules (a duplicated field it
//! reads, a `company_id` that is not an id).
#![no_main]

// Only part of the module is exercised here.
#[allow(dead_code)]
#[path = "../../src/envelope.rs"]
mod envelope;

use envelope::{Envelope, EnvelopeError};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|body: &[u8]| {
    let value = serde_json::from_slice::<Value>(body);
    match (Envelope::parse(body), value) {
        (Ok(envelope), Ok(Value::Object(document))) => {
            let string = |name: &str| document.get(name).and_then(Value::as_str);
            assert_eq!(envelope.event.as_deref(), string("event"));
            assert_eq!(envelope.export_key.as_deref(), string("export_key"));
            if let Some(span) = envelope.export_key_span {
                let raw: Value = serde_json::from_slice(&body[span]).unwrap();
                assert_eq!(raw.as_str(), envelope.export_key.as_deref());
            }
        }
        (Ok(_), value) => panic!("accepted what serde_json reads as {value:?}"),
        (Err(EnvelopeError::NotAnId(_)), Ok(Value::Object(_))) => {}
        (Err(EnvelopeError::Json(err)), Ok(Value::Object(_))) => {
            assert!(err.to_string().contains("duplicate field"), "{err}");
        }
        (Err(err), Ok(Value::Object(_))) => panic!("refused an object: {err}"),
        (Err(_), _) => {}
    }
});
