//! Properties of the envelope reader and the event-name rules, on generated input: the reader
//! agrees with serde_json on what it reads, never panics, and the routing-key rules accept
//! exactly what their definition says.

use hirehop_relay::envelope::{Envelope, EnvelopeError};
use hirehop_relay::routing::RoutingKey;
use proptest::prelude::*;
use std::collections::HashMap;

use serde_json::value::RawValue;
use serde_json::{Map, Value};

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(Value::from),
        "\\PC{0,20}".prop_map(Value::from),
        "[a-z0-9]{1,12}(\\.[a-z0-9]{1,12}){0,3}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("\\PC{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// The definition of a valid event name, written independently of the implementation.
fn valid_event(event: &str) -> bool {
    !event.is_empty()
        && event.len() <= 255
        && !event.contains('*')
        && !event.contains('#')
        && !event.chars().any(char::is_control)
        && event.split('.').all(|segment| !segment.is_empty())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn the_reader_agrees_with_serde_json(
        fields in prop::collection::btree_map("[a-z_]{1,12}", json_value(), 0..8),
        event in prop::option::of(json_value()),
        key in prop::option::of(json_value()),
        company in prop::option::of(prop_oneof![
            json_value(),
            any::<u64>().prop_map(|n| Value::from(n.to_string())),
        ]),
        pretty in any::<bool>(),
    ) {
        let mut object: Map<String, Value> = fields.into_iter().collect();
        if let Some(event) = event {
            object.insert("event".into(), event);
        }
        if let Some(key) = key {
            object.insert("export_key".into(), key);
        }
        if let Some(company) = company {
            object.insert("company_id".into(), company);
        }
        let document = Value::Object(object);
        let body = if pretty {
            serde_json::to_vec_pretty(&document).unwrap()
        } else {
            serde_json::to_vec(&document).unwrap()
        };
        match Envelope::parse(&body) {
            Ok(envelope) => {
                prop_assert_eq!(envelope.event.as_deref(), document["event"].as_str());
                prop_assert_eq!(envelope.export_key.as_deref(), document["export_key"].as_str());
                let id = &document["company_id"];
                let expected = id.as_u64().or_else(|| id.as_str().and_then(|s| s.parse().ok()));
                prop_assert_eq!(envelope.company_id, expected);
                if let Some(span) = envelope.export_key_span {
                    let raw: Value = serde_json::from_slice(&body[span]).unwrap();
                    prop_assert_eq!(&raw, &document["export_key"]);
                }
            }
            // Only a company_id that is neither an integer nor a string of digits is refused.
            Err(EnvelopeError::NotAnId("company_id")) => {
                let id = &document["company_id"];
                let digits = id.as_str().is_some_and(|s| s.parse::<u64>().is_ok());
                prop_assert!(id.as_u64().is_none() && !id.is_null() && !digits, "{id}");
            }
            Err(err) => prop_assert!(false, "refused a valid object: {err}"),
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = Envelope::parse(&bytes);
    }

    #[test]
    fn event_rules_match_their_definition(
        event in prop_oneof!["\\PC{0,40}", "[a-z.*#]{0,12}", "[a-z]{250,260}", "[a-z\\x00-\\x1f.]{0,8}"],
    ) {
        let key = RoutingKey::new("", &event);
        prop_assert_eq!(key.is_ok(), valid_event(&event), "{:?}", event);
        if let Ok(key) = key {
            prop_assert_eq!(key.as_str(), event.as_str());
        }
    }
}

/// The fuzz seed corpus: real-shaped HireHop payloads.
fn seeds() -> Vec<Vec<u8>> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/envelope");
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(dir)
        .expect("the seed corpus is in the repository")
        .map(|entry| std::fs::read(entry.unwrap().path()).unwrap())
        .collect();
    seeds.sort();
    seeds
}

/// One edit of a byte string: flip, insert, delete or truncate.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for mutation in mutations {
        let len = bytes.len().max(1);
        match *mutation {
            Mutation::Flip(at, mask) => {
                if let Some(byte) = bytes.get_mut(at % len) {
                    *byte ^= mask;
                }
            }
            Mutation::Insert(at, byte) => bytes.insert((at % len).min(bytes.len()), byte),
            Mutation::Delete(at) => {
                if !bytes.is_empty() {
                    bytes.remove(at % len);
                }
            }
            Mutation::Truncate(at) => bytes.truncate(at % len),
        }
    }
    bytes
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, mask)| Mutation::Flip(at, mask)),
        (
            any::<usize>(),
            prop::sample::select(b"{}[]\",:\\0123456789 aeu".to_vec())
        )
            .prop_map(|(at, byte)| Mutation::Insert(at, byte)),
        any::<usize>().prop_map(Mutation::Delete),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

proptest! {
    // The CI-sized version of the `envelope` fuzz target: mutated real payloads, a fixed
    // number of cases.
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn mutated_hirehop_payloads_never_fool_the_reader(
        seed in any::<prop::sample::Index>(),
        mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        let seeds = seeds();
        let body = mutate(seeds[seed.index(seeds.len())].clone(), &mutations);
        if let Ok(envelope) = Envelope::parse(&body) {
            // A JSON object by JSON's grammar, which sets no limit on numbers: members kept as
            // raw text, so a seed's `3.2e581642` (beyond `Value`'s f64) is compared too.
            let document: HashMap<String, &RawValue> =
                serde_json::from_slice(&body).expect("accepted means a valid JSON object");
            let string = |name: &str| {
                let raw = document.get(name)?;
                serde_json::from_str::<String>(raw.get()).ok()
            };
            let read = |field: &Option<std::borrow::Cow<str>>| field.as_deref().map(str::to_owned);
            prop_assert_eq!(read(&envelope.event), string("event"));
            prop_assert_eq!(read(&envelope.export_key), string("export_key"));
        }
    }
}
