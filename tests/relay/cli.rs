//! The binary as a newcomer meets it: `--help`, the commands' options, and errors at startup
//! that say what to fix, in the log format asked for.

use std::process::Output;

use crate::harness::{KEY, RelayProcess, env, spool_dir};

fn relay(args: &[&str], env: &[(&str, &str)]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_hirehop-relay"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("the relay binary runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn help_explains_configuration_to_someone_with_only_the_binary() {
    let output = relay(&["--help"], &[]);
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for needle in [
        "--config",
        "RELAY_HTTP__LISTEN",
        "RELAY_AUTH__EXPORT_KEYS",
        "check-config",
        "deploy/relay.toml",
        "RUST_LOG",
    ] {
        assert!(
            help.contains(needle),
            "--help does not mention {needle}:\n{help}"
        );
    }
}

#[test]
fn send_takes_no_config_option_it_would_ignore() {
    for args in [
        &["send", "--config", "relay.toml", "--key", "k"][..],
        &["--config", "relay.toml", "send", "--key", "k"][..],
    ] {
        let output = relay(args, &[]);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
    }
    // The commands that read the configuration take it before or after their name.
    for args in [
        &["--config", "/nonexistent/relay.toml", "check-config"][..],
        &["check-config", "--config", "/nonexistent/relay.toml"][..],
    ] {
        let output = relay(args, &[("RELAY_AUTH__EXPORT_KEYS", KEY)]);
        assert!(!output.status.success());
        assert!(
            stderr(&output).contains("/nonexistent/relay.toml"),
            "{}",
            stderr(&output)
        );
    }
}

#[test]
fn a_misspelled_variable_is_refused_with_the_one_meant() {
    let output = relay(
        &["check-config"],
        &[
            ("RELAY_AUTH__EXPORT_KEYS", KEY),
            ("RELAY_HTTP__LISTNE", "127.0.0.1:1"),
        ],
    );
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains(
            "unknown setting http.listne from RELAY_HTTP__LISTNE; did you mean RELAY_HTTP__LISTEN?"
        ),
        "{}",
        stderr(&output)
    );
}

#[test]
fn a_fatal_error_is_a_json_line_when_json_logs_are_asked_for() {
    let output = relay(&[], &[("RELAY_LOG__FORMAT", "json")]);
    assert!(!output.status.success());
    let text = stderr(&output);
    let line: serde_json::Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|err| panic!("not one JSON line ({err}): {text}"));
    assert_eq!(line["level"], "ERROR", "{line}");
    let error = line["fields"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("no export key configured"), "{line}");

    // And a plain line otherwise.
    let output = relay(&[], &[]);
    assert!(
        stderr(&output).starts_with("hirehop-relay: invalid configuration: no export key"),
        "{}",
        stderr(&output)
    );
}

#[tokio::test]
async fn without_a_spool_the_log_says_the_port_waits_for_the_broker() {
    // A name only, not a `TestExchange`: with the broker nowhere, nothing is ever declared.
    let exchange = format!("relay-test-{}", uuid::Uuid::now_v7().simple());
    let spool = spool_dir(&exchange);
    let spool_str = spool.to_string_lossy().into_owned();
    let nowhere = "amqp://guest:guest@127.0.0.1:1/%2f";
    let mut relay_env = env(&exchange, nowhere);
    relay_env.extend([
        ("RELAY_SPOOL__ENABLED", "false"),
        ("RELAY_SPOOL__DIR", &spool_str),
    ]);
    let mut relay = RelayProcess::start(&[], &relay_env);
    let line = relay
        .wait_for("the webhook port stays closed until the broker answers")
        .await;
    assert!(line.contains("spool.enabled = false"), "{line}");
    relay.wait_for("broker not available yet").await;
    let log = relay.terminate().await;
    assert!(!log.contains("listening"), "{log}");
    assert!(
        !spool.exists(),
        "a relay without a spool made {}",
        spool.display()
    );
}

/// The commands at the top of `deploy/relay.toml` work on that file as they are written.
#[test]
fn the_commands_in_the_example_configs_header_work() {
    let root = env!("CARGO_MANIFEST_DIR");
    let file = format!("{root}/deploy/relay.toml");
    let text = std::fs::read_to_string(&file).expect("deploy/relay.toml");
    let command = text
        .lines()
        .find_map(|line| {
            line.trim_start_matches('#')
                .trim()
                .strip_prefix("RELAY_AUTH__EXPORT_KEYS=")
        })
        .expect("the header shows a command");
    let (key, rest) = command.split_once(' ').expect("KEY hirehop-relay ...");
    let args: Vec<&str> = rest
        .split_whitespace()
        .skip(1) // hirehop-relay
        .map(|arg| {
            if arg == "deploy/relay.toml" {
                file.as_str()
            } else {
                arg
            }
        })
        .collect();
    assert!(args.contains(&"check-config"), "{command}");
    let output = relay(&args, &[("RELAY_AUTH__EXPORT_KEYS", key)]);
    assert!(output.status.success(), "{command}: {}", stderr(&output));
}
