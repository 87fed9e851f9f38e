//! Everything that speaks AMQP. (Outside it, `config` only borrows lapin's URL parser to
//! check broker URLs at load.)
//!
//! - [`publisher`]: publishing with confirms, and the supervisor that keeps a connection.
//! - [`properties`](mod@properties): the properties and headers of a published webhook, the consumer
//!   contract (`docs/consumers.md`).
//! - [`connect`](mod@connect): which node to try next, and one connection to it: heartbeat, topology
//!   check, channels, refusals, close.
//! - [`error`](mod@error): why talking to the broker failed, and which failures no retry fixes.
//! - [`stall`]: telling a broker that stopped answering from a slow one.
//! - [`topology`]: the exchanges, queues, bindings and history stream the config describes,
//!   declared at the first connection and printed by `hirehop-relay topology`.
//! - [`tail`]: a temporary queue that prints what arrives (`hirehop-relay tail`), or the
//!   history stream from a point in time on (`tail --since`).
//! - [`history`]: reading the history stream, with the filters the tools share.
//! - [`replay`]: republishing from the history stream (`hirehop-relay replay`).
//! - [`requeue`]: moving messages from `<exchange>.unrouted` or a dead-letter queue back
//!   through the exchange (`hirehop-relay requeue`).

pub mod connect;
mod error;
pub mod history;
pub mod properties;
pub mod publisher;
pub mod replay;
pub mod requeue;
pub mod stall;
pub mod tail;
pub mod topology;

use lapin::types::AMQPValue;

pub use connect::{ConnectError, backoff, connect, connect_any, declare_topology_once};
pub use properties::properties;
pub use publisher::{Outage, PublishError, Publisher};

/// An AMQP string (header or argument value).
fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

/// An AMQP integer. RabbitMQ takes no unsigned 64-bit field; ids and sizes fit in an i64.
fn integer(n: u64) -> AMQPValue {
    AMQPValue::LongLongInt(i64::try_from(n).unwrap_or(i64::MAX))
}
