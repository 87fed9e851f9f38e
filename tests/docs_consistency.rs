//! The docs checked against the code and against themselves; needs no broker.
//!
//! - The configuration reference (the tables of `docs/operating.md` whose columns are `key`,
//!   `env var`, `default`, `meaning`) and `deploy/relay.toml` list every setting the code
//!   has, no setting it lacks, and each setting's default as the code has it. A default is
//!   checked by loading it, as the documented value of its key, through
//!   [`Config::load_from`], and comparing the result with the configuration loaded without it
//!   (serialized, secrets redacted as `check-config` prints them, so a broker URL's password
//!   is the one part of a default this cannot see); the environment variable likewise, by
//!   loading the default through it. So a key added to the code without docs, a default
//!   changed on one side only, or a key the code no longer has, fails here. The fields of
//!   `[[amqp.queues]]` and `[[auth.companies]]` entries are found by loading the example
//!   entries of `deploy/relay.toml`.
//! - The metrics reference (the table of `docs/operating.md` whose columns are `metric`,
//!   `type`, `labels`, `what`) lists, for each label of a fixed set of values, exactly the
//!   values the code exports.
//! - The README shows, once, the test command `.ci/run` runs, and it runs every test target.
//! - Every relative link and `#anchor` in every markdown file resolves, and every repository
//!   path written as code (`src/...`, `tests/...`, `deploy/...`) exists.
//!
//! Only the library's public API is used, so moving code inside `src/` does not touch this
//! test.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use hirehop_relay::config::Config;
use hirehop_relay::metrics::{
    ConnectionErrorKind, PublishOutcome, RejectionReason, Route, TlsFailure,
};
use pulldown_cmark::{Event, Options, Parser, Tag, TagEnd};
use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(root().join(relative))
        .unwrap_or_else(|err| panic!("cannot read {relative}: {err}"))
}

const REFERENCE: &str = "docs/operating.md";
const EXAMPLE: &str = "deploy/relay.toml";

/// Settings whose default is worked out at startup, so the reference describes it in words.
/// `spool.dir`: from systemd's `$STATE_DIRECTORY`, `$XDG_STATE_HOME` or `$HOME`.
const COMPUTED_DEFAULTS: [&str; 1] = ["spool.dir"];

// Loading a configuration.

/// The export key every configuration is loaded with: the relay refuses to start without one.
const KEY: &str = "docs-check-key";

/// Where that key comes from: never from the setting under test, which would override or
/// clear it.
#[derive(Clone, Copy)]
enum KeyFrom {
    Environment,
    File,
}

fn key_from(setting: &str) -> KeyFrom {
    if setting.starts_with("auth.export_keys") {
        KeyFrom::File
    } else {
        KeyFrom::Environment
    }
}

/// Defaults, then `file` as the TOML file, then `env`, with an export key from `key`; the
/// configuration serialized as `check-config` prints it.
fn load(file: &str, env: &[(&str, &str)], key: KeyFrom) -> Result<Value, String> {
    static FILES: AtomicUsize = AtomicUsize::new(0);
    let mut file = file.to_owned();
    let mut env: HashMap<String, String> = env
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
    match key {
        KeyFrom::Environment => {
            env.entry("RELAY_AUTH__EXPORT_KEYS".into())
                .or_insert_with(|| KEY.into());
        }
        KeyFrom::File => {
            file.push_str(&format!(
                "\n[[auth.companies]]\ncompany_id = 1\nexport_keys = [\"{KEY}\"]\n"
            ));
        }
    }
    let path = std::env::temp_dir().join(format!(
        "docs-consistency-{}-{}.toml",
        std::process::id(),
        FILES.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, &file).unwrap();
    let loaded = Config::load_from(Some(&path), Some(env));
    let _ = std::fs::remove_file(&path);
    let config = loaded.map_err(|err| format!("{err}\nin:\n{file}"))?;
    Ok(serde_json::to_value(&config).expect("a configuration serializes"))
}

/// `section.key` of every setting, with its default.
fn settings(config: &Value) -> BTreeMap<String, Value> {
    let mut found = BTreeMap::new();
    for (section, table) in config.as_object().expect("sections") {
        for (key, value) in table.as_object().expect("settings") {
            found.insert(format!("{section}.{key}"), value.clone());
        }
    }
    found
}

/// A value as the docs write it: a TOML value (`1048576`, `true`, `[]`, `""`), or else a bare
/// string (`hirehop`, `0.0.0.0:8080`, `{event}`, `7d`).
fn literal(text: &str) -> toml::Value {
    match toml::from_str::<toml::Table>(&format!("v = {text}")) {
        Ok(mut table) => table.remove("v").expect("parsed"),
        Err(_) => toml::Value::String(text.to_owned()),
    }
}

/// `[section]` with `key = value`, as a file.
fn setting_file(setting: &str, value: toml::Value) -> String {
    let (section, key) = setting.split_once('.').expect("section.key");
    let mut settings = toml::Table::new();
    settings.insert(key.to_owned(), value);
    let mut file = toml::Table::new();
    file.insert(section.to_owned(), toml::Value::Table(settings));
    toml::to_string(&file).expect("a table serializes")
}

/// How a value is written in a `RELAY_*` variable, for the values the docs give as defaults.
fn env_text(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(text) => Some(text.clone()),
        toml::Value::Integer(_) | toml::Value::Boolean(_) => Some(value.to_string()),
        toml::Value::Array(items) => items
            .iter()
            .map(|item| item.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .map(|items| items.join(",")),
        _ => None,
    }
}

fn env_name(setting: &str) -> String {
    let (section, key) = setting.split_once('.').expect("section.key");
    format!("RELAY_{}__{}", section.to_uppercase(), key.to_uppercase())
}

// The reference in docs/operating.md.

/// One row of the configuration reference.
#[derive(Debug)]
struct Row {
    key: String,
    /// `None` for "(file only)".
    env: Option<String>,
    default: Documented,
}

#[derive(Debug)]
enum Documented {
    /// `none`: the setting is unset unless configured.
    Nothing,
    /// `required` (a field of an entry, such as `amqp.queues[].name`).
    Required,
    /// A value written as code: `1048576`, `hirehop`.
    Value(String),
    /// Words: a default worked out at startup.
    Words(String),
}

/// The rows of every table in `text` whose header is `key | env var | default | meaning`.
fn reference_rows(text: &str) -> Vec<Row> {
    table_rows(text, &["key", "env var", "default", "meaning"])
        .iter()
        .map(|cells| row(cells))
        .collect()
}

/// The body rows of every table in `text` whose header is `header`, each cell as its code
/// spans and text.
fn table_rows<'a>(text: &'a str, header: &[&str]) -> Vec<Vec<Vec<Event<'a>>>> {
    let mut rows = Vec::new();
    let mut cells: Vec<Vec<Event>> = Vec::new();
    let mut in_table = false;
    let mut in_head = false;
    for event in Parser::new_ext(text, Options::ENABLE_TABLES) {
        match event {
            Event::Start(Tag::TableHead) => {
                in_head = true;
                cells.clear();
            }
            Event::End(TagEnd::TableHead) => {
                in_head = false;
                let found: Vec<String> = cells.iter().map(|cell| plain(cell)).collect();
                in_table = found == header;
            }
            Event::Start(Tag::TableRow) => cells.clear(),
            Event::Start(Tag::TableCell) => cells.push(Vec::new()),
            Event::End(TagEnd::TableRow) if in_table && !in_head => {
                rows.push(std::mem::take(&mut cells));
            }
            Event::End(TagEnd::Table) => in_table = false,
            Event::Code(_) | Event::Text(_) => {
                if let Some(cell) = cells.last_mut() {
                    cell.push(event);
                }
            }
            _ => {}
        }
    }
    rows
}

fn plain(cell: &[Event]) -> String {
    cell.iter()
        .map(|event| match event {
            Event::Code(text) | Event::Text(text) => text.as_ref(),
            _ => "",
        })
        .collect::<String>()
        .trim()
        .to_owned()
}

/// The single code span a cell holds, if that is all it holds.
fn code(cell: &[Event]) -> Option<String> {
    match cell {
        [Event::Code(text)] => Some(text.to_string()),
        _ => None,
    }
}

fn row(cells: &[Vec<Event>]) -> Row {
    let key = code(&cells[0]).unwrap_or_else(|| {
        panic!(
            "{REFERENCE}: a key written as code, not {:?}",
            plain(&cells[0])
        )
    });
    let env = match code(&cells[1]) {
        Some(name) => Some(name),
        None if plain(&cells[1]) == "(file only)" => None,
        None => panic!(
            "{REFERENCE}, {key}: the env var written as code, or (file only), not {:?}",
            plain(&cells[1])
        ),
    };
    let default = match (code(&cells[2]), plain(&cells[2]).as_str()) {
        (Some(value), _) => Documented::Value(value),
        (None, "none") => Documented::Nothing,
        (None, "required") => Documented::Required,
        (None, words) => Documented::Words(words.to_owned()),
    };
    Row { key, env, default }
}

// deploy/relay.toml.

/// A commented-out `key = value` line of deploy/relay.toml.
struct ExampleLine {
    setting: String,
    line: usize,
    value: toml::Value,
    /// Its comment says `Default: ...`: the value is an example, not the default.
    example: bool,
}

/// A commented-out `[[section.key]]` block, uncommented.
struct ExampleEntry {
    setting: String,
    line: usize,
    text: String,
    /// Its fields, in the order written.
    fields: Vec<String>,
}

/// `line` without its `# `, when it is a setting (`key = value`, a trailing comment allowed).
fn commented_setting(line: &str) -> Option<(String, toml::Value)> {
    let rest = line.strip_prefix("# ")?;
    let table = toml::from_str::<toml::Table>(rest).ok()?;
    if table.len() != 1 {
        return None;
    }
    let (key, value) = table.into_iter().next()?;
    // A `[table]` header or a sentence never parses as one key with a plain value.
    (!value.is_table()).then_some((key, value))
}

fn example_file(text: &str) -> (Vec<ExampleLine>, Vec<ExampleEntry>) {
    let mut lines = Vec::new();
    let mut entries: Vec<ExampleEntry> = Vec::new();
    let mut section = String::new();
    let mut paragraph_says_default = false;
    let mut entry: Option<ExampleEntry> = None;
    for (index, line) in text.lines().enumerate() {
        if let Some(open) = entry.as_mut() {
            if let Some(rest) = line.strip_prefix('#') {
                let rest = rest.strip_prefix(' ').unwrap_or(rest);
                if let Some((key, _)) = commented_setting(line) {
                    open.fields.push(key);
                }
                open.text.push_str(rest);
                open.text.push('\n');
                continue;
            }
            entries.extend(entry.take());
        }
        let trimmed = line.trim();
        if trimmed.is_empty() {
            paragraph_says_default = false;
        } else if let Some(name) = trimmed.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
            section = name.to_owned();
            paragraph_says_default = false;
        } else if let Some(name) = line
            .strip_prefix("# [[")
            .and_then(|rest| rest.strip_suffix("]]"))
        {
            entry = Some(ExampleEntry {
                setting: name.to_owned(),
                line: index + 1,
                text: format!("[[{name}]]\n"),
                fields: Vec::new(),
            });
        } else if let Some((key, value)) = commented_setting(line) {
            lines.push(ExampleLine {
                setting: format!("{section}.{key}"),
                line: index + 1,
                value,
                example: paragraph_says_default,
            });
        } else if line.contains("Default:") {
            paragraph_says_default = true;
        }
    }
    entries.extend(entry);
    (lines, entries)
}

// The checks.

/// The defaults, loaded with the export key from either place.
struct Defaults {
    key_in_environment: Value,
    key_in_file: Value,
}

impl Defaults {
    fn load() -> Defaults {
        Defaults {
            key_in_environment: load("", &[], KeyFrom::Environment).expect("the defaults load"),
            key_in_file: load("", &[], KeyFrom::File).expect("the defaults load"),
        }
    }

    /// What a configuration that sets nothing loads as, with the key from `key`.
    fn with(&self, key: KeyFrom) -> &Value {
        match key {
            KeyFrom::Environment => &self.key_in_environment,
            KeyFrom::File => &self.key_in_file,
        }
    }

    /// Whether setting `setting` to `value` (in the file, or through `env`) changes nothing.
    fn is_default(&self, setting: &str, file: &str, env: &[(&str, &str)]) -> Result<bool, String> {
        let key = key_from(setting);
        Ok(&load(file, env, key)? == self.with(key))
    }
}

#[test]
fn the_configuration_reference_and_the_example_file_match_the_code() {
    let defaults = Defaults::load();
    let code = settings(&defaults.key_in_environment);
    let example_text = read(EXAMPLE);
    let (example_lines, example_entries) = example_file(&example_text);
    let rows = reference_rows(&read(REFERENCE));
    let mut problems = Vec::new();

    // docs/operating.md: one row per setting, its default and variable as the code has them.
    let mut documented = HashSet::new();
    for row in &rows {
        if !documented.insert(row.key.as_str()) {
            problems.push(format!("{REFERENCE}: {} has two rows", row.key));
        }
    }
    for (setting, default) in &code {
        if !documented.contains(setting.as_str()) {
            problems.push(format!(
                "{REFERENCE}: the configuration reference has no row for {setting} \
                 (default {default})"
            ));
        }
    }
    for row in rows.iter().filter(|row| !row.key.contains("[].")) {
        if let Some(problem) = check_setting_row(row, &code, &defaults) {
            problems.push(format!("{REFERENCE}, {}: {problem}", row.key));
        }
    }

    // The entries of lists such as [[amqp.queues]]: their fields, from deploy/relay.toml's
    // example entries loaded (a field shows when serialized, set or not), each with a row.
    let mut entry_settings = HashSet::new();
    for entry in &example_entries {
        entry_settings.insert(entry.setting.as_str());
        let at = format!("{EXAMPLE}:{}", entry.line);
        match check_entry(entry, &rows) {
            Ok(entry_problems) => problems.extend(entry_problems),
            Err(err) => problems.push(format!("{at}: [[{}]]: {err}", entry.setting)),
        }
    }
    for row in rows.iter().filter(|row| row.key.contains("[].")) {
        let setting = row.key.split_once("[].").expect("a field").0;
        if !entry_settings.contains(setting) {
            problems.push(format!(
                "{REFERENCE}, {}: {EXAMPLE} has no example [[{setting}]] to check it with",
                row.key
            ));
        }
    }

    // deploy/relay.toml: every setting once, at its default unless its comment says
    // `Default: ...` (an example value), with its environment variable named.
    let mut shown: HashMap<&str, usize> = HashMap::new();
    for line in &example_lines {
        let at = format!("{EXAMPLE}:{}", line.line);
        *shown.entry(&line.setting).or_default() += 1;
        if !code.contains_key(&line.setting) {
            problems.push(format!("{at}: {} is not a setting", line.setting));
            continue;
        }
        if line.example {
            continue;
        }
        let file = setting_file(&line.setting, line.value.clone());
        match defaults.is_default(&line.setting, &file, &[]) {
            Ok(true) => {}
            Ok(false) => problems.push(format!(
                "{at}: {} = {} is not its default, {}: show the default, or say \
                 `Default: ...` in its comment when the value is an example",
                line.setting, line.value, code[&line.setting]
            )),
            Err(err) => problems.push(format!("{at}: {} does not load: {err}", line.setting)),
        }
    }
    for entry in &example_entries {
        *shown.entry(&entry.setting).or_default() += 1;
    }
    for setting in code.keys() {
        let (section, key) = setting.split_once('.').expect("section.key");
        match shown.get(setting.as_str()) {
            Some(1) => {}
            Some(n) => problems.push(format!("{EXAMPLE}: {setting} is shown {n} times")),
            None => problems.push(format!(
                "{EXAMPLE}: {setting} is not shown: a commented-out `# {key} = ...` under [{section}]"
            )),
        }
        if !entry_settings.contains(setting.as_str()) && !example_text.contains(&env_name(setting))
        {
            problems.push(format!(
                "{EXAMPLE}: the comment on {setting} does not name {}",
                env_name(setting)
            ));
        }
    }

    assert!(
        problems.is_empty(),
        "the docs and the code disagree:\n{}",
        problems.join("\n")
    );
    // The scans must have found what we know is there, or they prove nothing.
    assert!(code.len() > 50, "only {} settings in the code?", code.len());
    assert!(
        rows.len() > code.len(),
        "only {} rows in {REFERENCE}",
        rows.len()
    );
    assert!(
        example_lines.len() > 50,
        "only {} settings in {EXAMPLE}",
        example_lines.len()
    );
    for setting in ["amqp.queues", "auth.companies"] {
        assert!(
            entry_settings.contains(setting),
            "no example [[{setting}]] in {EXAMPLE}"
        );
    }
}

/// A row of a setting: its default, loaded as the setting's value, and its environment
/// variable, loaded with the default.
fn check_setting_row(
    row: &Row,
    code: &BTreeMap<String, Value>,
    defaults: &Defaults,
) -> Option<String> {
    let Some(default) = code.get(&row.key) else {
        return Some("not a setting: the code has no such key".to_owned());
    };
    let value = match &row.default {
        Documented::Nothing if default.is_null() => None,
        Documented::Nothing => {
            return Some(format!("documented as none, the default is {default}"));
        }
        Documented::Required => return Some("only a field of an entry can be required".to_owned()),
        Documented::Words(_) if COMPUTED_DEFAULTS.contains(&row.key.as_str()) => None,
        Documented::Words(words) => {
            return Some(format!(
                "the default {words:?} is words: write it as code, `{default}`"
            ));
        }
        Documented::Value(text) => {
            let value = literal(text);
            match defaults.is_default(&row.key, &setting_file(&row.key, value.clone()), &[]) {
                Ok(true) => Some(value),
                Ok(false) => {
                    return Some(format!(
                        "documented default `{text}`, the code's is {default}"
                    ));
                }
                Err(err) => {
                    return Some(format!(
                        "the documented default `{text}` does not load: {err}"
                    ));
                }
            }
        }
    };
    match &row.env {
        None if default.is_array() => None,
        None => Some("(file only), but it is not a list of entries".to_owned()),
        Some(name) if *name != env_name(&row.key) => Some(format!(
            "the env var is `{}`, not `{name}`",
            env_name(&row.key)
        )),
        Some(name) => {
            // The variable is read: the default given through it changes nothing.
            let text = value.as_ref().and_then(env_text)?;
            match defaults.is_default(&row.key, "", &[(name, &text)]) {
                Ok(true) => None,
                Ok(false) => Some(format!("{name}={text} is not the default")),
                Err(err) => Some(format!("{name}={text} does not load: {err}")),
            }
        }
    }
}

/// The fields of the kind of entry `entry` shows: each has a row and a line in the example,
/// the fields documented `required` are those an entry cannot do without, and the others
/// default to what their row says.
fn check_entry(entry: &ExampleEntry, rows: &[Row]) -> Result<Vec<String>, String> {
    let (section, key) = entry.setting.split_once('.').ok_or("not section.key")?;
    let key_source = key_from(&entry.setting);
    // The entry's fields as the code serializes them, given `fields` (errors as they are).
    let load_entry = |fields: &toml::Table| -> Result<serde_json::Map<String, Value>, String> {
        let mut table = toml::Table::new();
        table.insert(
            key.to_owned(),
            toml::Value::Array(vec![toml::Value::Table(fields.clone())]),
        );
        let mut file = toml::Table::new();
        file.insert(section.to_owned(), toml::Value::Table(table));
        let loaded = load(
            &toml::to_string(&file).map_err(|e| e.to_string())?,
            &[],
            key_source,
        )?;
        loaded[section][key][0]
            .as_object()
            .cloned()
            .ok_or_else(|| "not a list of tables".to_owned())
    };
    let example: toml::Table = toml::from_str::<toml::Table>(&entry.text)
        .map_err(|err| err.to_string())?
        .get(section)
        .and_then(|s| s.get(key))
        .and_then(|list| list.as_array()?.first()?.as_table().cloned())
        .ok_or("no entry")?;
    let serialized = load_entry(&example).map_err(|err| format!("does not load: {err}"))?;

    let mut problems = Vec::new();
    let prefix = format!("{}[].", entry.setting);
    let documented: BTreeMap<&str, &Row> = rows
        .iter()
        .filter_map(|row| Some((row.key.strip_prefix(&prefix)?, row)))
        .collect();
    for field in serialized.keys() {
        if !entry.fields.contains(field) {
            problems.push(format!(
                "{EXAMPLE}:{}: the example [[{}]] does not show {field}",
                entry.line, entry.setting
            ));
        }
        if !documented.contains_key(field.as_str()) {
            problems.push(format!("{REFERENCE}: no row for {prefix}{field}"));
        }
    }
    let required: toml::Table = example
        .iter()
        .filter(|(field, _)| {
            matches!(
                documented.get(field.as_str()),
                Some(Row {
                    default: Documented::Required,
                    ..
                })
            )
        })
        .map(|(field, value)| (field.clone(), value.clone()))
        .collect();
    let minimal = load_entry(&required)
        .map_err(|err| format!("the fields documented as required are not enough: {err}"))?;
    for (field, row) in documented {
        let at = format!("{REFERENCE}, {}", row.key);
        if !serialized.contains_key(field) {
            problems.push(format!("{at}: not a field of [[{}]]", entry.setting));
            continue;
        }
        if row.env.is_some() {
            problems.push(format!(
                "{at}: a field of an entry has no env var: (file only)"
            ));
        }
        match &row.default {
            Documented::Required => {
                let mut without = required.clone();
                without.remove(field);
                if load_entry(&without).is_ok() {
                    problems.push(format!(
                        "{at}: documented as required, an entry loads without it"
                    ));
                }
            }
            Documented::Nothing if minimal[field].is_null() => {}
            Documented::Nothing => problems.push(format!(
                "{at}: documented as none, the default is {}",
                minimal[field]
            )),
            Documented::Words(words) => problems.push(format!(
                "{at}: the default {words:?} is words: write it as code"
            )),
            Documented::Value(text) => {
                let mut with = required.clone();
                with.insert(field.to_owned(), literal(text));
                match load_entry(&with) {
                    Ok(loaded) if loaded == minimal => {}
                    Ok(_) => problems.push(format!(
                        "{at}: documented default `{text}`, the code's is {}",
                        minimal[field]
                    )),
                    Err(err) => problems.push(format!(
                        "{at}: the documented default `{text}` does not load: {err}"
                    )),
                }
            }
        }
    }
    Ok(problems)
}

// Links.

/// Every markdown file of the repository, but what builds and tools leave in it.
fn markdown_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap_or_else(|err| panic!("cannot list {}: {err}", dir.display()))
            .map(|entry| entry.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            let name = path.file_name().unwrap().to_string_lossy();
            if path.is_dir() {
                if !matches!(
                    &*name,
                    "target" | ".git" | "node_modules" | "corpus" | "artifacts"
                ) {
                    walk(&path, found);
                }
            } else if name.ends_with(".md") {
                found.push(path);
            }
        }
    }
    let mut found = Vec::new();
    walk(root(), &mut found);
    found
}

/// What a markdown file offers and points at.
#[derive(Default)]
struct Markdown {
    /// The anchors of its headings, as GitHub makes them.
    anchors: HashSet<String>,
    /// Link targets, with their line.
    links: Vec<(usize, String)>,
    /// Inline code, with its line.
    code: Vec<(usize, String)>,
}

fn scan(text: &str) -> Markdown {
    let line_of = |offset: usize| text[..offset].matches('\n').count() + 1;
    let mut found = Markdown::default();
    let mut heading: Option<String> = None;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (event, range) in Parser::new_ext(text, Options::ENABLE_TABLES).into_offset_iter() {
        match event {
            Event::Start(Tag::Heading { .. }) => heading = Some(String::new()),
            Event::End(TagEnd::Heading(_)) => {
                let slug = slug(&heading.take().unwrap_or_default());
                // A repeated heading gets `-1`, `-2`, ... after its first.
                let n = seen.entry(slug.clone()).or_default();
                found.anchors.insert(match *n {
                    0 => slug,
                    n => format!("{slug}-{n}"),
                });
                *n += 1;
            }
            Event::Start(Tag::Link { dest_url, .. } | Tag::Image { dest_url, .. }) => {
                found
                    .links
                    .push((line_of(range.start), dest_url.to_string()));
            }
            Event::Text(piece) => heading.iter_mut().for_each(|h| h.push_str(&piece)),
            Event::Code(piece) => {
                heading.iter_mut().for_each(|h| h.push_str(&piece));
                found.code.push((line_of(range.start), piece.to_string()));
            }
            _ => {}
        }
    }
    found
}

/// GitHub's anchor for a heading: lower case, spaces to `-`, punctuation but `-` and `_` gone.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn the_anchor_of_a_heading_is_githubs() {
    let found = scan(
        "# A broker that hangs\n## `[[amqp.queues]]` entries\n## Order\n## Order\n```sh\n# not a heading\n```\n",
    );
    let mut anchors: Vec<&str> = found.anchors.iter().map(String::as_str).collect();
    anchors.sort();
    assert_eq!(
        anchors,
        [
            "a-broker-that-hangs",
            "amqpqueues-entries",
            "order",
            "order-1"
        ]
    );
}

/// Files whose paths in code describe the repository as it was: dated reports and the
/// changelog.
fn historical(file: &Path) -> bool {
    file == Path::new("CHANGELOG.md") || file.starts_with("docs/benchmarks")
}

/// Where code written in the docs is a path in the repository.
const REPOSITORY_DIRS: [&str; 8] = [
    "src/",
    "tests/",
    "deploy/",
    "docs/",
    "examples/",
    "tools/",
    "fuzz/",
    ".ci/",
];

#[test]
fn every_relative_link_anchor_and_repository_path_in_the_docs_resolves() {
    let files: BTreeMap<PathBuf, Markdown> = markdown_files()
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()));
            (path.strip_prefix(root()).unwrap().to_owned(), scan(&text))
        })
        .collect();
    let mut problems = Vec::new();
    let mut checked = 0;
    for (file, markdown) in &files {
        let dir = file.parent().unwrap_or(Path::new(""));
        for (line, target) in &markdown.links {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let at = format!("{}:{line}", file.display());
            let (path, anchor) = match target.split_once('#') {
                Some((path, anchor)) => (path, Some(anchor)),
                None => (target.as_str(), None),
            };
            let linked = if path.is_empty() {
                file.clone()
            } else {
                normalize(&dir.join(path))
            };
            if !root().join(&linked).exists() {
                problems.push(format!(
                    "{at}: {target}: {} does not exist",
                    linked.display()
                ));
                continue;
            }
            let Some(anchor) = anchor else { continue };
            match files.get(&linked) {
                Some(target_file) if target_file.anchors.contains(anchor) => {}
                Some(_) => problems.push(format!(
                    "{at}: {target}: {} has no heading whose anchor is #{anchor}",
                    linked.display()
                )),
                None => problems.push(format!(
                    "{at}: {target}: an anchor into a file that is not markdown"
                )),
            }
        }
        if historical(file) {
            continue;
        }
        for (line, code) in &markdown.code {
            let path_like = REPOSITORY_DIRS.iter().any(|dir| code.starts_with(dir))
                && code
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_./-".contains(c));
            if !path_like {
                continue;
            }
            checked += 1;
            if !root().join(code).exists() {
                problems.push(format!(
                    "{}:{line}: `{code}` is not a path in the repository",
                    file.display()
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(
        checked > 100,
        "only {checked} links and paths found: is the scan broken?"
    );
}

/// `a/b/../c` as `a/c`, without touching the filesystem.
fn normalize(path: &Path) -> PathBuf {
    let mut normal = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::ParentDir => {
                normal.pop();
            }
            std::path::Component::CurDir => {}
            other => normal.push(other),
        }
    }
    normal
}

// The metrics reference.

/// The label values a metric's row documents: the code spans of its `what` cell written as
/// values (lowercase words joined by `_`: not a setting such as `http.max_connections_per_ip`),
/// other than the names of its labels.
fn documented_values(rows: &[Vec<Vec<Event>>], metric: &str) -> BTreeSet<String> {
    let cells = rows
        .iter()
        .find(|cells| code(&cells[0]).as_deref() == Some(metric))
        .unwrap_or_else(|| panic!("{REFERENCE}: no row for the metric {metric}"));
    let spans = |cell: &[Event]| -> Vec<String> {
        cell.iter()
            .filter_map(|event| match event {
                Event::Code(text) => Some(text.to_string()),
                _ => None,
            })
            .collect()
    };
    let labels = spans(&cells[2]);
    spans(&cells[3])
        .into_iter()
        .filter(|span| span.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .filter(|span| !labels.contains(span))
        .collect()
}

/// What the docs say each `reason`, `outcome`, `kind` or `route` can be is what the code
/// exports: a value added to a label's enum fails here until the docs show it.
/// The values of a label, as exported.
fn exported<L: Copy>(values: &[L], as_str: fn(L) -> &'static str) -> BTreeSet<String> {
    values
        .iter()
        .map(|&value| as_str(value).to_owned())
        .collect()
}

/// What the docs say each `route`, `reason`, `outcome` or `kind` can be is what the code
/// exports: a value added to a label's enum fails here until the docs show it.
#[test]
fn the_metrics_reference_lists_every_label_value_the_code_exports() {
    let reference = read(REFERENCE);
    let rows = table_rows(&reference, &["metric", "type", "labels", "what"]);
    for (metric, values) in [
        (
            "hirehop_relay_http_requests_total",
            exported(Route::ALL, Route::as_str),
        ),
        (
            "hirehop_relay_rejections_total",
            exported(RejectionReason::ALL, RejectionReason::as_str),
        ),
        (
            "hirehop_relay_publishes_total",
            exported(PublishOutcome::ALL, PublishOutcome::as_str),
        ),
        (
            "hirehop_relay_connection_errors_total",
            exported(ConnectionErrorKind::ALL, ConnectionErrorKind::as_str),
        ),
        (
            "hirehop_relay_tls_handshake_failures_total",
            exported(TlsFailure::ALL, TlsFailure::as_str),
        ),
    ] {
        assert_eq!(
            documented_values(&rows, metric),
            values,
            "{REFERENCE}: the label values of {metric}"
        );
    }
}

// CI's test command.

/// CI runs the README's test command, found by the marker `.ci/run` names; a README edited
/// without it fails here, before CI.
#[test]
fn the_readme_shows_the_test_command_ci_runs() {
    let ci = read(".ci/run");
    let marker = ci
        .lines()
        .find_map(|line| line.strip_prefix("TEST_MARKER='")?.strip_suffix('\''))
        .expect(".ci/run names its TEST_MARKER in one line");
    let readme = read("README.md");
    let lines: Vec<&str> = readme.lines().collect();
    let at: Vec<usize> = (0..lines.len()).filter(|&i| lines[i] == marker).collect();
    assert_eq!(
        at.len(),
        1,
        "README.md must show the line {marker:?} once, right before its test command"
    );
    let mut after = lines[at[0] + 1..].iter().skip_while(|line| line.is_empty());
    assert_eq!(
        after.next(),
        Some(&"```sh"),
        "README.md: an sh block must follow {marker:?}"
    );
    let command: Vec<&&str> = after.take_while(|line| **line != "```").collect();
    assert!(
        command.iter().any(|line| line.starts_with("cargo test")),
        "README.md: the test command after {marker:?} runs no `cargo test`: {command:?}"
    );
    // A `cargo test` that picks targets runs only those: then it must pick each of tests/.
    let words: Vec<&str> = command
        .iter()
        .flat_map(|line| line.split_whitespace())
        .collect();
    let picks = [
        "--lib",
        "--bins",
        "--test",
        "--tests",
        "--examples",
        "--doc",
    ];
    if words.iter().any(|word| picks.contains(word)) {
        let picked: Vec<&str> = words
            .windows(2)
            .filter(|pair| pair[0] == "--test")
            .map(|pair| pair[1])
            .collect();
        for target in test_targets() {
            assert!(
                picked.contains(&target.as_str()),
                "README.md: the test command after {marker:?} leaves out `--test {target}`"
            );
        }
    }
}

/// The integration test targets cargo finds: `tests/NAME.rs` and `tests/NAME/main.rs`.
fn test_targets() -> Vec<String> {
    let mut targets: Vec<String> = std::fs::read_dir(root().join("tests"))
        .expect("tests/ lists")
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let name = path.file_stem()?.to_str()?.to_owned();
            let target =
                path.extension().is_some_and(|ext| ext == "rs") || path.join("main.rs").is_file();
            target.then_some(name)
        })
        .collect();
    targets.sort();
    assert!(
        targets.iter().any(|t| t == "relay"),
        "no test target found in tests/: {targets:?}"
    );
    targets
}
