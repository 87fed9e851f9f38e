//! A broker that refuses the relay's login or vhost: at startup a configuration error that
//! stops the real binary with the URL (password hidden) and the fix, in the relay's own
//! words rather than the AMQP library's.

use crate::harness::{self, RelayProcess, amqp_url, broker_addr, env, unique_exchange};

/// The test broker's user and password.
fn login() -> (String, String) {
    let uri: lapin::uri::AMQPUri = amqp_url().parse().expect("the test URL parses");
    (
        uri.authority.userinfo.username,
        uri.authority.userinfo.password,
    )
}

/// Starts the binary with `url` (spool on or off) and waits for it to exit; returns its log.
async fn refused(url: &str, spool: &str) -> String {
    let exchange = unique_exchange();
    let mut relay_env = env(&exchange, url);
    relay_env.push(("RELAY_SPOOL__ENABLED", spool));
    let relay = RelayProcess::start(&[], &relay_env);
    let (status, log) = relay.exit().await;
    assert!(!status.success(), "the relay ran with {url}; log:\n{log}");
    // lapin's own lines ("Exponential backoff attempts exhausted, aborting recovery" at
    // ERROR after each attempt) are translated, not passed on.
    assert!(!log.contains("lapin"), "{log}");
    assert!(!log.contains("Exponential backoff"), "{log}");
    log
}

#[tokio::test]
async fn a_wrong_password_stops_the_relay_with_the_url_and_the_fix() {
    let (user, _) = login();
    let url = format!("amqp://{user}:wr0ng-pa55@{}/%2f", broker_addr());
    for spool in ["true", "false"] {
        let log = refused(&url, spool).await;
        assert!(
            log.contains(&format!("amqp://{user}:***@{}/%2f", broker_addr())),
            "{log}"
        );
        assert!(log.contains("refused the login"), "{log}");
        assert!(log.contains("check the user and password"), "{log}");
        assert!(
            !log.contains("wr0ng-pa55"),
            "the password is in the log:\n{log}"
        );
    }
}

#[tokio::test]
async fn a_missing_vhost_stops_the_relay_with_the_url_and_the_fix() {
    let (user, password) = login();
    let vhost = format!("relay-test-no-vhost-{}", uuid::Uuid::now_v7().simple());
    let url = format!("amqp://{user}:{password}@{}/{vhost}", broker_addr());
    for spool in ["true", "false"] {
        let log = refused(&url, spool).await;
        assert!(log.contains(&format!("refused vhost \"{vhost}\"")), "{log}");
        assert!(
            log.contains(&format!("rabbitmqctl add_vhost {vhost}")) && log.contains("%2f"),
            "{log}"
        );
        assert!(log.contains(&format!("{user}:***@")), "{log}");
    }
}

#[tokio::test]
async fn an_empty_vhost_is_refused_at_load_with_the_way_to_write_the_default_one() {
    let (user, password) = login();
    let url = format!("amqp://{user}:{password}@{}/", broker_addr());
    let log = refused(&url, "true").await;
    assert!(log.contains("invalid configuration"), "{log}");
    assert!(log.contains("empty vhost") && log.contains("%2f"), "{log}");
    // Refused before anything started: no port, no connection attempt.
    assert!(!log.contains("listening"), "{log}");
    let check = harness::RelayProcess::start(&["check-config"], &env("x", &url));
    let (status, log) = check.exit().await;
    assert!(!status.success() && log.contains("empty vhost"), "{log}");
}
