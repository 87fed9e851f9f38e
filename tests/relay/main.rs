//! Black-box tests of hirehop-relay against a real RabbitMQ.
//!
//! Every test starts its own relay on `127.0.0.1:0` with its own exchange (and so its own
//! `<exchange>.unrouted` queue), reads what arrived with a real AMQP consumer, and deletes
//! what it declared at the end. The broker is `amqp://guest:guest@127.0.0.1:5672/%2f`, or
//! `HIREHOP_TEST_AMQP_URL`; when it cannot be reached the tests fail and say how to start it.
//!
//! Two tests that measure time and memory run in binaries of their own, after this one:
//! `tests/relay_cluster` (three-node clusters while a node fails) and `tests/relay_memory`
//! (memory while spooling). They share `harness`, `proxy`, `load`, `offline`, `local_cluster`
//! and `tmpfs` with this binary through `#[path]` modules.
//!
//! Modules:
//! - `harness`: `eventually` (the one way to wait), starting relays (in-process with
//!   `TestRelay::builder`, or the real binary), HTTP requests, queues, and `TestExchange`, which
//!   deletes what a test declared when it drops, a failed test's too.
//! - `load`: an open-loop load, as HireHop sends, and what of it reached the broker.
//! - `offline`: a relay process whose broker is out of reach, with a spool the test names.
//! - `hostile`: slow clients, header floods, garbage, network rules, redaction, replay window.
//! - `tls`: HTTP/2 over ALPN, renewed and mismatched certificates, stalled handshakes against
//!   the connection caps, plain HTTP to the TLS port.
//! - `operate`: metrics, trace context, overload, keys reloaded on SIGHUP.
//! - `proxy`: a TCP proxy between relay and broker that can cut, refuse, stall, and hold the
//!   broker's replies only.
//! - `local_cluster`: RabbitMQ nodes of a test's own (`deploy/rabbitmq/local-cluster.sh`).
//! - `broker_faults`: faults on such a node that would disturb every other test on the shared
//!   broker: a memory alarm, a frozen node.
//! - `cli`: `--help`, the commands' options, startup errors that name the setting and follow
//!   `log.format`.
//! - `confirms`: a broker that stops confirming; many confirms in flight on one channel.
//! - `deploy`: the deploy files run for real: the documented nginx in front of a relay,
//!   certbot's deploy hook.
//! - `docs`: every code block of the docs run (shell, TOML, the consumer examples), or marked.
//! - `monitoring`: the alert rules, the dashboard and `/metrics` checked by `promtool` and a
//!   real Prometheus scraping live relays and a RabbitMQ node; `status`.
//! - `accept`: what a 202 means: the body byte for byte, the properties, the headers.
//! - `queues`: declared and per-event queues, routing templates, `send`, `tail`, `topology`.
//! - `refused`: a wrong password, a missing or empty vhost: the binary stops and says why.
//! - `reject`: every 4xx, and that none of them publishes anything.
//! - `topology`: alternate exchange, returned messages, topology mismatches, a deleted
//!   exchange declared again, `amqp.declare = false`.
//! - `history`: the history stream, `replay`, `requeue` and `tail --since`.
//! - `faults`: broker connection closed or cut; 503s, never hangs nor false 202s.
//! - `full_disk`: the spool on a 2 MiB tmpfs that fills up: 503s and readiness that say why,
//!   a restart on the full disk, recovery without a webhook, every 202 delivered once.
//! - `floods`: a wrong-key flood and a slow-body attack from one source, while a legitimate
//!   sender keeps getting 202s and the log stays short.
//! - `scale`: two relays behind HAProxy, one killed under load.
//! - `shutdown`: SIGTERM under load loses no accepted webhook and exits 0.
//! - `spool`: broker out of reach, SIGKILL, torn spool tail, full spool, several broker URLs,
//!   the spool replayed on SIGTERM, a pause in the broker's replies during replay.
//! - `stall`: a broker that stops answering under load, held by the proxy.
//! - `tmpfs`: a small real filesystem a test mounts (as root) and unmounts when done.

mod accept;
mod broker_faults;
mod cli;
mod confirms;
mod deploy;
mod docs;
mod faults;
mod floods;
mod full_disk;
mod harness;
mod history;
mod hostile;
mod load;
#[allow(dead_code, reason = "tests/relay_cluster uses the rest of it")]
mod local_cluster;
mod monitoring;
mod offline;
mod operate;
mod proxy;
mod queues;
mod refused;
mod reject;
mod scale;
mod shutdown;
mod spool;
mod stall;
mod tls;
mod tmpfs;
mod topology;
