//! Log lines for what strangers can repeat at will: rejected requests and refused
//! connections. A flood must not become a flood of log lines, yet the operator must see that
//! it happens, from where, and why.
//!
//! So the first rejection of each source and reason in an interval is logged in full (with
//! its request id and error, at the level its reason deserves); the rest of that interval
//! are only counted, and when the interval ends each count becomes one summary line:
//! "rejected 19873 more requests from 203.0.113.9 in the last 10 s: bad_key". At most two
//! lines per source and reason per interval, for at most [`MAX_TALLIES`] of them; sources
//! beyond that are counted together as "other sources".

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::Level;
use tracing::level_filters::LevelFilter;

use crate::access::Source;

/// How long rejections are counted before their summary lines are written.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// Most (source, reason) pairs counted in one interval.
pub const MAX_TALLIES: usize = 1024;

/// Where a rejection came from, as the summary names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Origin {
    Source(Source),
    /// Sources beyond [`MAX_TALLIES`], counted together.
    Others,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Source(source) => source.fmt(f),
            Origin::Others => f.write_str("other sources"),
        }
    }
}

/// The rejections of the current interval.
#[derive(Debug)]
pub struct RejectionLog {
    interval: Mutex<Interval>,
}

#[derive(Debug)]
struct Interval {
    started: Instant,
    tallies: HashMap<(Origin, &'static str), Tally>,
}

#[derive(Debug)]
struct Tally {
    level: Level,
    /// What was rejected: "requests", "connections", "TLS handshakes".
    noun: &'static str,
    /// Rejections after the first, which was logged in full.
    more: u64,
}

/// Writes one event at a level known only at run time (tracing's macros want a constant).
macro_rules! event_at {
    ($level:expr, $($rest:tt)+) => {
        match $level {
            Level::ERROR => tracing::error!($($rest)+),
            Level::WARN => tracing::warn!($($rest)+),
            Level::INFO => tracing::info!($($rest)+),
            Level::DEBUG => tracing::debug!($($rest)+),
            _ => tracing::trace!($($rest)+),
        }
    };
}
pub(crate) use event_at;

impl Default for RejectionLog {
    fn default() -> RejectionLog {
        RejectionLog {
            interval: Mutex::new(Interval {
                started: Instant::now(),
                tallies: HashMap::new(),
            }),
        }
    }
}

impl RejectionLog {
    pub fn new() -> RejectionLog {
        RejectionLog::default()
    }

    /// Counts one rejection of `reason` from `source` (of a request, a connection, ...: the
    /// `noun` the summary uses), to be logged at `level`. True when it
    /// is the first of its source and reason in this interval: the caller then logs it in
    /// full. False for the rest, which the interval's summary line counts, and for every
    /// rejection whose level is not logged at all.
    pub fn first(
        &self,
        source: Source,
        reason: &'static str,
        level: Level,
        noun: &'static str,
    ) -> bool {
        if LevelFilter::current() < level {
            return false;
        }
        let mut interval = self.interval.lock().unwrap_or_else(|p| p.into_inner());
        let tallies = &mut interval.tallies;
        let from = if tallies.len() < MAX_TALLIES
            || tallies.contains_key(&(Origin::Source(source), reason))
        {
            Origin::Source(source)
        } else {
            Origin::Others
        };
        match tallies.get_mut(&(from, reason)) {
            Some(tally) => {
                tally.more += 1;
                false
            }
            None => {
                tallies.insert(
                    (from, reason),
                    Tally {
                        level,
                        noun,
                        more: 0,
                    },
                );
                true
            }
        }
    }

    /// Writes the summary line of every source and reason rejected more than once in the
    /// interval that ends now, and starts the next one.
    pub fn flush(&self) {
        let ended = {
            let mut interval = self.interval.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(
                &mut *interval,
                Interval {
                    started: Instant::now(),
                    tallies: HashMap::new(),
                },
            )
        };
        // Whole seconds, at least one: the last interval, at shutdown, is a short one.
        let secs = ended.started.elapsed().as_secs().max(1);
        let tallies = ended.tallies;
        for ((from, reason), tally) in tallies {
            if tally.more == 0 {
                continue;
            }
            let (more, noun) = (tally.more, tally.noun);
            event_at!(
                tally.level,
                source = %from,
                reason,
                count = more,
                "rejected {more} more {noun} from {from} in the last {secs} s: {reason}"
            );
        }
    }

    /// Flushes every [`INTERVAL`] until `stop`, and once more then.
    pub async fn run(&self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(INTERVAL);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => self.flush(),
                () = stop.cancelled() => {
                    self.flush();
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(ip: &str) -> Source {
        Source::of(ip.parse().unwrap())
    }

    #[test]
    fn the_first_of_each_source_and_reason_is_logged_and_the_rest_counted() {
        let _level = tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_max_level(Level::DEBUG)
                .finish(),
        );
        let log = RejectionLog::new();
        let a = source("203.0.113.9");
        assert!(log.first(a, "bad_key", Level::WARN, "requests"));
        for _ in 0..1000 {
            assert!(!log.first(a, "bad_key", Level::WARN, "requests"));
        }
        assert!(log.first(a, "bad_json", Level::WARN, "requests"));
        assert!(log.first(source("203.0.113.10"), "bad_key", Level::WARN, "requests"));
        // Two addresses of one IPv6 /64 are one source.
        assert!(log.first(
            source("2001:db8:1:2::1"),
            "bad_key",
            Level::WARN,
            "requests"
        ));
        assert!(!log.first(
            source("2001:db8:1:2:ffff::7"),
            "bad_key",
            Level::WARN,
            "requests"
        ));
        {
            let interval = log.interval.lock().unwrap();
            assert_eq!(interval.tallies[&(Origin::Source(a), "bad_key")].more, 1000);
        }
        log.flush();
        assert!(
            log.first(a, "bad_key", Level::WARN, "requests"),
            "a new interval"
        );
    }

    #[test]
    fn sources_beyond_the_table_are_counted_together() {
        let _level = tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_max_level(Level::DEBUG)
                .finish(),
        );
        let log = RejectionLog::new();
        for i in 0..MAX_TALLIES as u32 {
            let source = Source::of(std::net::Ipv4Addr::from(i).into());
            assert!(log.first(source, "x", Level::WARN, "requests"));
        }
        // One more line for all the others, then counts.
        assert!(log.first(source("198.51.100.1"), "x", Level::WARN, "requests"));
        assert!(!log.first(source("198.51.100.2"), "x", Level::WARN, "requests"));
        let interval = log.interval.lock().unwrap();
        assert_eq!(interval.tallies.len(), MAX_TALLIES + 1);
        assert_eq!(interval.tallies[&(Origin::Others, "x")].more, 1);
    }
}
