//! Properties of the envelope reader and the event-name rules, on generated input: the reader
//! agrees with serde_json on what it reads and on what is JSON at all (lone surrogates,
//! numbers beyond f64, deep nesting), never panics, and the routing-key rules accept exactly
//! what their definition says.

use hirehop_relay::envelope::{Envelope, EnvelopeError};
use hirehop_relay::routing::RoutingKey;
use proptest::prelude::*;

use serde_json::{Map, Value};

/// Checks that `Envelope::parse` agrees with serde_json's `Value` on `body`: what the reader
/// accepts is a JSON object `Value` reads, with the same `event` and `export_key`; what it
/// refuses and `Value` reads as an object breaks one of the reader's own rules (a field it
/// reads appears twice, or `company_id` is not an id).
fn agrees_with_serde_json(body: &[u8]) -> Result<(), TestCaseError> {
    let value = serde_json::from_slice::<Value>(body);
    match (Envelope::parse(body), value) {
        (Ok(envelope), Ok(Value::Object(document))) => {
            let string = |name: &str| document.get(name).and_then(Value::as_str);
            prop_assert_eq!(envelope.event.as_deref(), string("event"));
            prop_assert_eq!(envelope.export_key.as_deref(), string("export_key"));
            if let Some(span) = envelope.export_key_span {
                let raw: Value = serde_json::from_slice(&body[span]).unwrap();
                prop_assert_eq!(raw.as_str(), string("export_key"));
            }
        }
        (Ok(_), value) => prop_assert!(false, "accepted what serde_json reads as {value:?}"),
        (Err(EnvelopeError::NotAnId(_)), Ok(Value::Object(_))) => {}
        (Err(EnvelopeError::Json(err)), Ok(Value::Object(_))) => {
            prop_assert!(err.to_string().contains("duplicate field"), "{err}");
        }
        (Err(err), Ok(Value::Object(_))) => prop_assert!(false, "refused an object: {err}"),
        (Err(_), _) => {}
    }
    Ok(())
}

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

/// A member name: one the reader reads (so duplicates happen), or another.
fn member_name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec!["event", "export_key", "company_id", "user_id", "time"])
            .prop_map(str::to_owned),
        "[a-z]{1,6}",
        escaped_text(),
    ]
}

/// String contents with `\u` escapes anywhere in UTF-16's range, lone surrogates included.
fn escaped_text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            "[a-z.]{1,4}",
            (0xd780u32..0xe020).prop_map(|unit| format!("\\u{unit:04x}")),
            any::<u16>().prop_map(|unit| format!("\\u{unit:04X}")),
        ],
        0..4,
    )
    .prop_map(|parts| parts.concat())
}

/// JSON text at the edges of what serde_json reads: numbers near and beyond f64's range,
/// long digit strings, escaped strings, nesting around the recursion limit.
fn edge_value() -> impl Strategy<Value = String> {
    prop_oneof![
        escaped_text().prop_map(|text| format!("\"{text}\"")),
        (any::<bool>(), 0u32..400, -400i32..400).prop_map(
            |(negative, mantissa, exponent)| format!(
                "{}{mantissa}e{exponent}",
                if negative { "-" } else { "" }
            )
        ),
        (1usize..400).prop_map(|digits| "7".repeat(digits)),
        (1usize..400).prop_map(|digits| format!("0.{}e-300", "3".repeat(digits))),
        (120usize..136).prop_map(|depth| format!("{}{}", "[".repeat(depth), "]".repeat(depth))),
        escaped_text().prop_map(|text| format!("{{\"{text}\":[1]}}")),
    ]
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
    fn escapes_and_numbers_at_the_edges_agree_with_serde_json(
        members in prop::collection::vec((member_name(), edge_value()), 0..6),
    ) {
        let members: Vec<String> = members
            .into_iter()
            .map(|(name, value)| format!("\"{name}\":{value}"))
            .collect();
        agrees_with_serde_json(format!("{{{}}}", members.join(",")).as_bytes())?;
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
        agrees_with_serde_json(&body)?;
    }
}
