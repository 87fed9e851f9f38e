//! A broker that refuses the relay's login or vhost: at startup a configuration error that
//! stops the real binary with the URL (password hidden) and the fix, in the relay's own
//! words rather than the AMQP library's; after a first connection, an outage the relay
//! rides out on its spool.

use hyper::{Method, StatusCode};

use crate::harness::{
    self, RelayProcess, amqp_url, broker_addr, env, message_id, request, unique_exchange, webhook,
};

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

/// After a first connection, a refusal (here: the relay's password changed on the broker) is
/// an outage, not a configuration error: the relay keeps serving from the spool, says why in
/// its log and on `/readyz`, and delivers everything once the password is right again. On a
/// node of the test's own, whose users the test may change.
#[tokio::test]
async fn a_login_refused_after_the_first_connection_keeps_the_relay_spooling() {
    let node = crate::local_cluster::LocalCluster::up(1);
    node.ctl(1, &["add_user", "relay", "first-pa55"]);
    node.ctl(
        1,
        &["set_permissions", "-p", "/", "relay", ".*", ".*", ".*"],
    );
    let port = node.amqp_port(1);
    let url = format!("amqp://relay:first-pa55@127.0.0.1:{port}/%2f");
    let exchange = harness::TestExchange::on_own_broker();
    let mut relay_env = env(&exchange, &url);
    relay_env.push(("RELAY_AMQP__RECONNECT_MAX_BACKOFF_MS", "500"));
    let mut relay = RelayProcess::spawn(&relay_env).await;
    relay.wait_for("connected to the broker").await;

    node.ctl(1, &["change_password", "relay", "second-pa55"]);
    node.ctl(1, &["close_all_connections", "password changed"]);
    let line = relay.wait_for("refused the login").await;
    assert!(
        line.contains("ERROR") && line.contains("relay:***@"),
        "{line}"
    );
    // The test's own connection, after the broker closed them all.
    let watcher = harness::broker_at(&node.url(1)).await;
    let mut queue = harness::catch_all(&watcher, &exchange).await;
    let readyz = harness::send(relay.addr(), request(Method::GET, "/readyz", ""))
        .await
        .unwrap();
    assert_eq!(readyz.status, StatusCode::OK, "{readyz:?}");
    let body = readyz.json();
    assert_eq!(body["status"], "degraded", "{body}");
    assert!(
        body["broker_error"]
            .as_str()
            .is_some_and(|e| e.contains("refused the login")),
        "{body}"
    );
    let reply = harness::send(
        relay.addr(),
        request(Method::POST, "/webhooks/hirehop", webhook("job.updated")),
    )
    .await
    .unwrap();
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    assert_eq!(reply.json()["status"], "spooled");

    node.ctl(1, &["change_password", "relay", "first-pa55"]);
    relay.wait_for("reconnected to the broker").await;
    assert_eq!(message_id(&queue.next().await), reply.message_id());
    let log = relay.terminate().await;
    assert!(!log.contains("pa55"), "a password is in the log:\n{log}");
    assert!(!log.contains("lapin"), "{log}");
}
