//! The envelope reader on arbitrary bytes: it never panics, it accepts only valid JSON, and
//! it reads the same `event` and `export_key` that serde_json reads from the full document.
#![no_main]

// Only part of the module is exercised here.
#[allow(dead_code)]
#[path = "../../src/envelope.rs"]
mod envelope;

use std::collections::HashMap;

use envelope::Envelope;
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;

fuzz_target!(|body: &[u8]| {
    let Ok(envelope) = Envelope::parse(body) else {
        return;
    };
    // A JSON object by JSON's grammar, which sets no limit on numbers: its members are kept
    // as raw text, so a `1e999` that serde_json's `Value` could not hold is still compared.
    let document: HashMap<String, &RawValue> =
        serde_json::from_slice(body).expect("an accepted body is a valid JSON object");
    let string = |name: &str| {
        let raw = document.get(name)?;
        serde_json::from_str::<String>(raw.get()).ok()
    };
    assert_eq!(envelope.event.as_deref().map(str::to_owned), string("event"));
    assert_eq!(envelope.export_key.as_deref().map(str::to_owned), string("export_key"));
    if let Some(span) = envelope.export_key_span {
        let raw: serde_json::Value = serde_json::from_slice(&body[span]).unwrap();
        assert_eq!(raw.as_str(), envelope.export_key.as_deref());
    }
});
