//! The names of the settings, read from the structs' `Deserialize` impls so that the names
//! in errors cannot drift from the structs; and the setting nearest to a misspelt one.

use serde::de::{self, Deserialize, Deserializer, Visitor};

use super::{
    AmqpConfig, AuthConfig, CompanyKeys, HistoryConfig, HttpConfig, LogConfig, MetricsConfig,
    QueueConfig, Sections, SpoolConfig, TlsConfig,
};

/// The sections: `http`, `amqp`, ...
pub(super) fn sections() -> &'static [&'static str] {
    fields::<Sections>()
}

/// The settings of `section`, if there is such a section.
fn section_keys(section: &str) -> Option<&'static [&'static str]> {
    Some(match section {
        "http" => fields::<HttpConfig>(),
        "amqp" => fields::<AmqpConfig>(),
        "auth" => fields::<AuthConfig>(),
        "spool" => fields::<SpoolConfig>(),
        "tls" => fields::<TlsConfig>(),
        "metrics" => fields::<MetricsConfig>(),
        "log" => fields::<LogConfig>(),
        "history" => fields::<HistoryConfig>(),
        _ => return None,
    })
}

/// The keys of an entry of the list setting `setting` (`[[amqp.queues]]`,
/// `[[auth.companies]]`), which has keys of its own.
pub(super) fn entry_keys(setting: &str) -> Option<&'static [&'static str]> {
    match setting {
        "amqp.queues" => Some(fields::<QueueConfig>()),
        "auth.companies" => Some(fields::<CompanyKeys>()),
        _ => None,
    }
}

/// Whether `section.key` is a setting; if not, the nearest one, if any is near.
pub(super) fn known_setting(setting: &str) -> Result<(), Option<String>> {
    let (section, key) = setting.split_once('.').unwrap_or((setting, ""));
    let Some(keys) = section_keys(section) else {
        let near = nearest(section, sections());
        return Err(near.map(|s| format!("{s}.{key}")));
    };
    if keys.contains(&key) {
        return Ok(());
    }
    Err(nearest(key, keys).map(|k| format!("{section}.{k}")))
}

/// The candidate most like `name`, if one is close enough to be a typo of it.
pub(super) fn nearest<'a>(name: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (strsim::jaro_winkler(name, c), *c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// The fields `T` (a struct deriving `Deserialize`) reads.
fn fields<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
    let mut fields = None;
    let _ = T::deserialize(Recorder(&mut fields));
    fields.unwrap_or_default()
}

/// Answers `deserialize_struct` by noting the field names, and fails every call.
struct Recorder<'a>(&'a mut Option<&'static [&'static str]>);

impl<'de> Deserializer<'de> for Recorder<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = Some(fields);
        Err(de::Error::custom("fields noted"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
        byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
        identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_section_knows_its_settings() {
        for section in sections() {
            let fields = section_keys(section)
                .unwrap_or_else(|| panic!("schema::section_keys has no {section}"));
            assert!(!fields.is_empty(), "{section}");
        }
        assert!(fields::<HttpConfig>().contains(&"listen"));
    }
}
