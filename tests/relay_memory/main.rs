//! The real binary's memory while it spools bursts of large webhooks, against the formula in
//! `docs/operating.md` (Memory).
//!
//! A test binary of its own: cargo runs test binaries one after the other, this one after
//! `--test relay`, whose ~130 tests otherwise ran beside it: there, on a busy 2-core machine,
//! the measurement failed. It needs root (a tmpfs), not a broker: the relay's broker stays out
//! of reach.
//!
//! Modules:
//! - `memory`: five bursts of 1 MiB webhooks into the spool, `VmHWM` and `VmRSS` against the
//!   formula.
//! - `harness`, `proxy`, `offline`, `tmpfs`: shared with `tests/relay`, which lists them.

#[allow(dead_code, reason = "shared with tests/relay; used here in part")]
#[path = "../relay/harness.rs"]
mod harness;
#[allow(dead_code, reason = "shared with tests/relay; used here in part")]
#[path = "../relay/offline.rs"]
mod offline;
#[allow(dead_code, reason = "shared with tests/relay; used here in part")]
#[path = "../relay/proxy.rs"]
mod proxy;
#[allow(dead_code, reason = "shared with tests/relay; used here in part")]
#[path = "../relay/tmpfs.rs"]
mod tmpfs;

mod memory;
