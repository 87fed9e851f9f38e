//! Event names, prefixes and routing templates on arbitrary text: no panics, and every
//! accepted key is a valid, wildcard-free AMQP routing key that leaves the room asked for.
#![no_main]

// Only part of the module is exercised here.
#[allow(dead_code)]
#[path = "../../src/routing.rs"]
mod routing;

use libfuzzer_sys::fuzz_target;
use routing::{RoutingKey, RoutingTemplate};

fuzz_target!(|input: (&str, &str, &str, u8, Option<u64>)| {
    let (event, template, prefix, room, company) = input;
    if let Ok(key) = RoutingKey::new("", event) {
        check(key.as_str(), 255);
    }
    if routing::check_prefix(prefix).is_ok()
        && let Ok(template) = RoutingTemplate::parse(template)
    {
        let template = template.with_prefix(prefix).leaving_room(room.into());
        if let Ok(key) = template.routing_key(event, company) {
            check(key.as_str(), 255 - usize::from(room));
        }
    }
});

fn check(key: &str, max: usize) {
    assert!(!key.is_empty() && key.len() <= max, "{} bytes", key.len());
    assert!(!key.contains(['*', '#']));
    assert!(!key.chars().any(char::is_control));
    assert!(key.split('.').all(|segment| !segment.is_empty()));
}
