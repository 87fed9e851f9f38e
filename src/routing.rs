//! Event names become routing keys here, checked once; after this module a routing key is a
//! [`RoutingKey`], never a loose `&str`.
//!
//! Any well-formed name is accepted: HireHop publishes no complete list of events, and a new
//! one must reach the broker without a release. "Well-formed" means it can be used as a topic
//! routing key without surprising anyone: no wildcard characters (a consumer binding `job.*`
//! must not be matched by a literal `*`), no empty dot-segments, no control characters, and
//! it fits in an AMQP short string together with the configured prefix.

use std::fmt::Write as _;

/// Longest routing key AMQP allows (a short string).
const MAX_ROUTING_KEY_BYTES: usize = 255;

/// Why an event name cannot be a routing key. Messages go into 400 answers, so they describe
/// the rule, never echo the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventNameError {
    #[error("event is empty")]
    Empty,
    #[error("event is longer than {max} bytes")]
    TooLong { max: usize },
    #[error("event contains a wildcard character ('*' or '#')")]
    Wildcard,
    #[error("event contains an empty dot-separated segment")]
    EmptySegment,
    #[error("event contains a control character")]
    ControlCharacter,
}

/// A routing key built from a checked event name (and the configured prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingKey(String);

impl RoutingKey {
    /// Checks `event` and prepends `prefix` (already checked by [`check_prefix`]).
    pub fn new(prefix: &str, event: &str) -> Result<RoutingKey, EventNameError> {
        check_event(event, MAX_ROUTING_KEY_BYTES - prefix.len())?;
        let mut key = String::with_capacity(prefix.len() + event.len());
        key.push_str(prefix);
        key.push_str(event);
        Ok(RoutingKey(key))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn check_event(event: &str, max: usize) -> Result<(), EventNameError> {
    if event.is_empty() {
        return Err(EventNameError::Empty);
    }
    if event.len() > max {
        return Err(EventNameError::TooLong { max });
    }
    check_characters(event)?;
    if event.split('.').any(str::is_empty) {
        return Err(EventNameError::EmptySegment);
    }
    Ok(())
}

fn check_characters(s: &str) -> Result<(), EventNameError> {
    // One pass (this runs for every webhook); a wildcard is named before a control character.
    let mut control = false;
    for c in s.chars() {
        match c {
            '*' | '#' => return Err(EventNameError::Wildcard),
            c => control |= c.is_control(),
        }
    }
    if control {
        return Err(EventNameError::ControlCharacter);
    }
    Ok(())
}

/// Checks `amqp.routing_key_prefix`: empty, or dot-separated segments optionally ending in a
/// dot (`hirehop.` gives `hirehop.job.updated`), leaving room for an event name.
pub fn check_prefix(prefix: &str) -> Result<(), EventNameError> {
    if prefix.is_empty() {
        return Ok(());
    }
    // Keep at least 64 bytes for the event itself.
    if prefix.len() > MAX_ROUTING_KEY_BYTES - 64 {
        return Err(EventNameError::TooLong {
            max: MAX_ROUTING_KEY_BYTES - 64,
        });
    }
    check_characters(prefix)?;
    let body = prefix.strip_suffix('.').unwrap_or(prefix);
    if body.split('.').any(str::is_empty) {
        return Err(EventNameError::EmptySegment);
    }
    Ok(())
}

/// Checks a binding pattern: wildcards allowed, otherwise the routing-key rules.
pub fn check_binding(pattern: &str) -> Result<(), EventNameError> {
    if pattern.is_empty() {
        return Err(EventNameError::Empty);
    }
    if pattern.len() > MAX_ROUTING_KEY_BYTES {
        return Err(EventNameError::TooLong {
            max: MAX_ROUTING_KEY_BYTES,
        });
    }
    if pattern.chars().any(char::is_control) {
        return Err(EventNameError::ControlCharacter);
    }
    if pattern.split('.').any(str::is_empty) {
        return Err(EventNameError::EmptySegment);
    }
    Ok(())
}

/// A topic pattern (`job.#`, `*.invoice.*`) matched as RabbitMQ's topic exchange matches a
/// binding: words split on `.`, `*` stands for exactly one word, `#` for zero or more. The
/// tools filter with it (`replay --event`, `requeue --event`, `tail --since`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern(Vec<String>);

impl TopicPattern {
    pub fn parse(pattern: &str) -> Result<TopicPattern, EventNameError> {
        check_binding(pattern)?;
        Ok(TopicPattern(
            pattern.split('.').map(str::to_owned).collect(),
        ))
    }

    pub fn matches(&self, key: &str) -> bool {
        let words: Vec<&str> = key.split('.').collect();
        // matched[j]: the pattern's words so far can match the key's first j words. One row
        // per pattern word keeps it linear in both lengths, whatever the number of `#`.
        let mut matched = vec![false; words.len() + 1];
        matched[0] = true;
        for part in &self.0 {
            let mut next = vec![false; words.len() + 1];
            for j in 0..=words.len() {
                next[j] = match part.as_str() {
                    "#" => matched[j] || (j > 0 && next[j - 1]),
                    "*" => j > 0 && matched[j - 1],
                    word => j > 0 && matched[j - 1] && words[j - 1] == word,
                };
            }
            matched = next;
        }
        matched[words.len()]
    }
}

impl std::str::FromStr for TopicPattern {
    type Err = EventNameError;

    fn from_str(pattern: &str) -> Result<TopicPattern, EventNameError> {
        TopicPattern::parse(pattern)
    }
}

impl std::fmt::Display for TopicPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("."))
    }
}

/// A `amqp.routing_key_template` that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("unknown placeholder {{{0}}}: use {{event}} or {{company_id}}")]
    Unknown(String),
    #[error("a '{{' is not closed")]
    Unclosed,
    #[error("must contain {{event}}")]
    NoEvent,
    #[error("does not make a valid routing key: {0}")]
    Invalid(EventNameError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Event,
    CompanyId,
}

/// How a routing key is built from a webhook: `amqp.routing_key_prefix`, then the template,
/// e.g. `{company_id}.{event}`. Everything constant is settled here, once, so a request only
/// checks its event and writes one string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingTemplate {
    /// The prefix is the first literal, when there is one.
    parts: Vec<Part>,
    /// How many times the event appears in a key.
    events: usize,
    /// Longest key allowed: an AMQP short string, less what names built from the key add.
    max_key: usize,
}

impl RoutingTemplate {
    pub fn parse(template: &str) -> Result<RoutingTemplate, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_owned()));
            }
            let close = rest[open..].find('}').ok_or(TemplateError::Unclosed)? + open;
            parts.push(match &rest[open + 1..close] {
                "event" => Part::Event,
                "company_id" => Part::CompanyId,
                other => return Err(TemplateError::Unknown(other.to_owned())),
            });
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_owned()));
        }
        let events = parts.iter().filter(|p| **p == Part::Event).count();
        if events == 0 {
            return Err(TemplateError::NoEvent);
        }
        let template = RoutingTemplate {
            parts,
            events,
            max_key: MAX_ROUTING_KEY_BYTES,
        };
        // The literal parts must make a valid key around any valid event and company.
        let sample = template.render("event", Some(1));
        check_event(&sample, MAX_ROUTING_KEY_BYTES).map_err(TemplateError::Invalid)?;
        Ok(template)
    }

    /// Puts `prefix` (checked by [`check_prefix`]) in front of every key.
    pub fn with_prefix(mut self, prefix: &str) -> RoutingTemplate {
        if !prefix.is_empty() {
            self.parts.insert(0, Part::Literal(prefix.to_owned()));
        }
        self
    }

    /// Keeps every key `bytes` shorter than AMQP allows, so that a name made of the key and
    /// `bytes` more (a per-event queue's) still fits in a short string.
    pub fn leaving_room(mut self, bytes: usize) -> RoutingTemplate {
        self.max_key = MAX_ROUTING_KEY_BYTES.saturating_sub(bytes);
        self
    }

    /// Checks `event` and builds its routing key. A missing `company_id` renders as
    /// `unknown`, so the webhook still has a route.
    pub fn routing_key(
        &self,
        event: &str,
        company_id: Option<u64>,
    ) -> Result<RoutingKey, EventNameError> {
        let key = self.render(event, company_id);
        // The event may appear more than once; the limit is on the whole key.
        let around = key.len() - self.events * event.len();
        check_event(event, self.max_key.saturating_sub(around) / self.events)?;
        Ok(RoutingKey(key))
    }

    fn render(&self, event: &str, company_id: Option<u64>) -> String {
        let mut key = String::with_capacity(MAX_ROUTING_KEY_BYTES.min(64 + event.len()));
        for part in &self.parts {
            match part {
                Part::Literal(text) => key.push_str(text),
                Part::Event => key.push_str(event),
                Part::CompanyId => match company_id {
                    Some(id) => {
                        let _ = write!(key, "{id}");
                    }
                    None => key.push_str("unknown"),
                },
            }
        }
        key
    }
}

impl Default for RoutingTemplate {
    fn default() -> Self {
        RoutingTemplate {
            parts: vec![Part::Event],
            events: 1,
            max_key: MAX_ROUTING_KEY_BYTES,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_and_unknown_events_are_accepted() {
        for event in [
            "invoice.status.updated",
            "job.status.updated",
            "job.updated",
            "contact.person.created",
            "brand_new.event-name.v2",
            "ünïcode.événement",
            "single",
        ] {
            assert_eq!(RoutingKey::new("", event).unwrap().as_str(), event);
        }
    }

    #[test]
    fn prefix_is_prepended() {
        let key = RoutingKey::new("hirehop.", "job.updated").unwrap();
        assert_eq!(key.as_str(), "hirehop.job.updated");
    }

    #[test]
    fn malformed_events_are_refused_with_the_rule_they_break() {
        use EventNameError::*;
        let cases = [
            ("", Empty),
            ("job.*", Wildcard),
            ("job.#", Wildcard),
            ("#", Wildcard),
            (".job", EmptySegment),
            ("job.", EmptySegment),
            ("job..updated", EmptySegment),
            ("job\nupdated", ControlCharacter),
            ("job\u{0}", ControlCharacter),
            ("job\u{7f}", ControlCharacter),
        ];
        for (event, expected) in cases {
            assert_eq!(RoutingKey::new("", event), Err(expected), "{event:?}");
        }
    }

    #[test]
    fn length_limit_counts_bytes_and_the_prefix() {
        let max = "a".repeat(255);
        assert!(RoutingKey::new("", &max).is_ok());
        assert_eq!(
            RoutingKey::new("", &"a".repeat(256)),
            Err(EventNameError::TooLong { max: 255 })
        );
        assert_eq!(
            RoutingKey::new("p.", &max),
            Err(EventNameError::TooLong { max: 253 })
        );
        // 128 two-byte characters are 256 bytes.
        assert!(RoutingKey::new("", &"é".repeat(128)).is_err());
    }

    #[test]
    fn templates_route_companies_apart() {
        let template = RoutingTemplate::parse("{company_id}.{event}").unwrap();
        let key = template.routing_key("job.updated", Some(42)).unwrap();
        assert_eq!(key.as_str(), "42.job.updated");
        let prefixed = template.clone().with_prefix("hh.");
        let key = prefixed.routing_key("job.updated", None).unwrap();
        assert_eq!(key.as_str(), "hh.unknown.job.updated");
        assert_eq!(
            template.routing_key("job.*", Some(1)),
            Err(EventNameError::Wildcard)
        );
        let default = RoutingTemplate::parse("{event}").unwrap();
        assert_eq!(default, RoutingTemplate::default());
        assert_eq!(default.routing_key("a.b", Some(1)).unwrap().as_str(), "a.b");
        // The whole key must fit in 255 bytes.
        let long = "a".repeat(250);
        assert!(template.routing_key(&long, Some(123_456)).is_err());
    }

    #[test]
    fn keys_leave_room_for_names_built_from_them() {
        let template = RoutingTemplate::default()
            .with_prefix("p.")
            .leaving_room("hirehop.".len());
        // 255 - 8 for the queue name's prefix, less the 2 of the key's own prefix.
        assert!(template.routing_key(&"a".repeat(245), None).is_ok());
        assert_eq!(
            template.routing_key(&"a".repeat(246), None),
            Err(EventNameError::TooLong { max: 245 })
        );
        // An event used twice counts twice.
        let twice = RoutingTemplate::parse("{event}.{event}").unwrap();
        assert!(twice.routing_key(&"a".repeat(127), None).is_ok());
        assert_eq!(
            twice.routing_key(&"a".repeat(128), None),
            Err(EventNameError::TooLong { max: 127 })
        );
    }

    #[test]
    fn bad_templates_are_refused() {
        assert_eq!(
            RoutingTemplate::parse("{company_id}"),
            Err(TemplateError::NoEvent)
        );
        assert_eq!(
            RoutingTemplate::parse("{company}.{event}"),
            Err(TemplateError::Unknown("company".into()))
        );
        assert_eq!(
            RoutingTemplate::parse("{event"),
            Err(TemplateError::Unclosed)
        );
        assert!(matches!(
            RoutingTemplate::parse("{company_id}..{event}"),
            Err(TemplateError::Invalid(EventNameError::EmptySegment))
        ));
        assert!(matches!(
            RoutingTemplate::parse("#.{event}"),
            Err(TemplateError::Invalid(EventNameError::Wildcard))
        ));
    }

    #[test]
    fn bindings_allow_wildcards_but_not_empty_segments() {
        assert!(check_binding("invoice.#").is_ok());
        assert!(check_binding("*.job.updated").is_ok());
        assert!(check_binding("#").is_ok());
        assert!(check_binding("").is_err());
        assert!(check_binding("a..b").is_err());
    }

    #[test]
    fn prefixes_are_checked() {
        assert!(check_prefix("").is_ok());
        assert!(check_prefix("hirehop.").is_ok());
        assert!(check_prefix("hirehop.eu.").is_ok());
        assert!(check_prefix("hirehop").is_ok());
        assert!(check_prefix(".").is_err());
        assert!(check_prefix("a..").is_err());
        assert!(check_prefix("a.*.").is_err());
        assert!(check_prefix(&"a".repeat(200)).is_err());
    }

    #[test]
    fn topic_patterns_match_as_rabbitmq_binds() {
        let matches = |pattern: &str, key: &str| TopicPattern::parse(pattern).unwrap().matches(key);
        for (pattern, key) in [
            ("#", "job.updated"),
            ("job.#", "job"),
            ("job.#", "job.status.updated"),
            ("*.updated", "job.updated"),
            ("#.updated", "job.status.updated"),
            ("job.*.updated", "job.status.updated"),
            ("#.status.#", "job.status.updated"),
            ("job.status.updated", "job.status.updated"),
            ("#.#", "a"),
        ] {
            assert!(matches(pattern, key), "{pattern} should match {key}");
        }
        for (pattern, key) in [
            ("job.*", "job"),
            ("job.*", "job.status.updated"),
            ("*.updated", "updated"),
            ("job.updated", "job.updated.x"),
            ("invoice.#", "job.updated"),
            ("job.#.x", "job.status.updated"),
        ] {
            assert!(!matches(pattern, key), "{pattern} should not match {key}");
        }
        assert!(TopicPattern::parse("job..#").is_err());
    }
}
