//! The envelope reader on arbitrary bytes: it never panics, and whenever it accepts a body,
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
    let document: serde_json::Value =
        serde_json::from_slice(body).expect("an accepted body is valid JSON");
    assert!(document.is_object());
    assert_eq!(envelope.event.as_deref(), document["event"].as_str());
    assert_eq!(envelope.export_key.as_deref(), document["export_key"].as_str());
    if let Some(span) = envelope.export_key_span {
        let raw: serde_json::Value = serde_json::from_slice(&body[span]).unwrap();
        assert_eq!(raw.as_str(), envelope.export_key.as_deref());
    }
});
