//! The envelope reader on arbitrary bytes: it never panics, it accepts only valid JSON, and
//! it reads the same `event` and `export_key` that serde_json reads from the full document.
#![no_main]

// Only part of the module is exercised here.
#[allow(dead_code)]
#[path = "../../src/envelope.rs"]
mod envelope;

use envelope::Envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let Ok(envelope) = Envelope::parse(body) else {
        return;
    };
    // Valid by JSON's grammar, which sets no limit on numbers.
    serde_json::from_slice::<serde::de::IgnoredAny>(body).expect("an accepted body is valid JSON");
    // serde_json's `Value` holds numbers within f64's range only: a body with `1e999` in it
    // is valid JSON the relay passes on as it came, and leaves nothing to compare with here.
    let Ok(document) = serde_json::from_slice::<serde_json::Value>(body) else {
        return;
    };
    assert!(document.is_object());
    assert_eq!(envelope.event.as_deref(), document["event"].as_str());
    assert_eq!(envelope.export_key.as_deref(), document["export_key"].as_str());
    if let Some(span) = envelope.export_key_span {
        let raw: serde_json::Value = serde_json::from_slice(&body[span]).unwrap();
        assert_eq!(raw.as_str(), envelope.export_key.as_deref());
    }
});
