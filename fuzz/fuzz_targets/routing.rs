//! Event names and routing templates on arbitrary text: no panics, and every accepted key is
//! a valid, wildcard-free AMQP routing key.
#![no_main]

// Only part of the module is exercised here.
#[allow(dead_code)]
#[path = "../../src/routing.rs"]
mod routing;

use libfuzzer_sys::fuzz_target;
use routing::{RoutingKey, RoutingTemplate};

fuzz_target!(|input: (&str, &str, Option<u64>)| {
    let (event, template, company) = input;
    if let Ok(key) = RoutingKey::new("", event) {
        check(key.as_str());
    }
    if let Ok(template) = RoutingTemplate::parse(template)
        && let Ok(key) = template.routing_key("", event, company)
    {
        check(key.as_str());
    }
});

fn check(key: &str) {
    assert!(!key.is_empty() && key.len() <= 255);
    assert!(!key.contains(['*', '#']));
    assert!(!key.chars().any(char::is_control));
    assert!(key.split('.').all(|segment| !segment.is_empty()));
}
