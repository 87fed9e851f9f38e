//! Everything that speaks AMQP, and the only place `lapin` is imported.
//!
//! - [`publisher`]: the connection, confirm-mode channels, reconnects, publishing.
//! - [`topology`]: the exchanges, queues and bindings the config describes, declared on
//!   every (re)connect and printed by `hirehop-relay topology`.
//! - [`tail`]: a temporary queue that prints what arrives (`hirehop-relay tail`).

pub mod publisher;
pub mod tail;
pub mod topology;

pub use publisher::{ConnectError, PublishError, Publisher, backoff, declare_topology_once};
