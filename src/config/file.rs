//! The TOML file given with `--config`: every key in it must be a setting.

use std::path::Path;

use super::{ConfigError, schema};

/// Every key of `file` must be a setting: refused by name otherwise, with the nearest one. A
/// file that is not TOML is left to the loader, which says where it fails to parse.
pub(super) fn check_keys(path: &Path) -> Result<(), ConfigError> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let Ok(table) = text.parse::<toml::Table>() else {
        return Ok(());
    };
    let origin = format!("in {}", path.display());
    let unknown = |setting: String, suggestion| ConfigError::Unknown {
        setting,
        origin: origin.clone(),
        suggestion,
    };
    for (section, value) in &table {
        let Some(keys) = value.as_table() else {
            let known = schema::known_setting(section);
            return Err(unknown(section.clone(), known.err().flatten()));
        };
        for (key, value) in keys {
            let setting = format!("{section}.{key}");
            schema::known_setting(&setting)
                .map_err(|suggestion| unknown(setting.clone(), suggestion))?;
            let Some(entry_keys) = schema::entry_keys(&setting) else {
                continue;
            };
            for entry in value
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e.as_table())
            {
                let unknown_key = entry
                    .keys()
                    .find(|name| !entry_keys.contains(&name.as_str()));
                if let Some(name) = unknown_key {
                    let suggestion =
                        schema::nearest(name, entry_keys).map(|k| format!("{setting}.{k}"));
                    return Err(unknown(format!("{setting}.{name}"), suggestion));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;
    use crate::config::tests::{env, write_file};

    #[test]
    fn unknown_key_in_file_is_an_error_naming_it() {
        let file = write_file("[http]\nlisten_port = 80\n[auth]\nexport_keys = [\"k\"]\n");
        let message = Config::load_from(Some(file.path()), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(message.contains("listen_port"), "{message}");
    }

    #[test]
    fn an_unknown_key_in_the_file_is_named_with_the_one_meant() {
        for (text, setting, meant) in [
            ("[http]\nlistne = \"x\"\n", "http.listne", "http.listen"),
            ("[htp]\nlisten = \"x\"\n", "htp.listen", "http.listen"),
            (
                "[[amqp.queues]]\nname = \"q\"\nbindngs = [\"a\"]\n",
                "amqp.queues.bindngs",
                "amqp.queues.bindings",
            ),
        ] {
            let file = write_file(&format!("[auth]\nexport_keys = [\"k\"]\n{text}"));
            let err = Config::load_from(Some(file.path()), env(&[]))
                .unwrap_err()
                .to_string();
            let expected = format!(
                "unknown setting {setting} in {}; did you mean {meant}?",
                file.path().display()
            );
            assert_eq!(err, expected);
        }
    }

    #[test]
    fn missing_file_is_an_error_naming_it() {
        let message = Config::load_from(Some(Path::new("/nonexistent/relay.toml")), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(message.contains("/nonexistent/relay.toml"), "{message}");
    }
}
