//! What a phase counts: outcomes, latencies, the measured window, and medians over repeats.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Latencies are kept in microseconds; anything above a minute is clamped to a minute.
const MAX_LATENCY_US: u64 = 60_000_000;

/// The measured part of a phase. Before it the load warms up; after it the requests still in
/// flight are finished (and counted for verification) but not measured.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// When the load starts (the warm-up begins).
    pub begin: Instant,
    pub start: Instant,
    pub end: Instant,
}

impl Window {
    /// A window starting `warmup` from now and lasting `duration`.
    pub fn after_warmup(warmup: Duration, duration: Duration) -> Window {
        let begin = Instant::now();
        let start = begin + warmup;
        Window {
            begin,
            start,
            end: start + duration,
        }
    }

    pub fn contains(&self, at: Instant) -> bool {
        self.start <= at && at < self.end
    }

    pub fn secs(&self) -> f64 {
        (self.end - self.start).as_secs_f64()
    }
}

/// How one request (or one raw publish) ended.
#[derive(Debug)]
pub enum Outcome {
    /// A 2xx answer, or a broker Ack for the raw publisher.
    Accepted,
    /// Anything else the other side answered: an HTTP status, a nack, a returned message.
    Rejected(String),
    /// No answer at all: connection error, timeout.
    Failed(String),
}

/// Everything one worker saw during a phase; tallies of all workers are merged.
///
/// Latencies are kept as raw samples (a few hundred thousand `u32` per phase at most) so that
/// recording is a push with no shared state, and go into an HDR histogram once at the end.
#[derive(Debug, Default)]
pub struct Tally {
    /// From the intended send time (the actual send time in a closed loop), accepted only.
    /// Open loop: requests intended within the window; closed loop: answered within it.
    latency_us: Vec<u32>,
    /// From the actual send time, accepted only.
    service_us: Vec<u32>,
    /// Accepted requests whose answer came within the window (in both loops).
    pub accepted_in_window: u64,
    /// Accepted requests over the whole phase: what must be found on the broker.
    pub accepted_total: u64,
    /// Non-2xx answers (or nacks) over the whole phase, by status.
    pub rejected: BTreeMap<String, u64>,
    /// Requests without an answer over the whole phase.
    pub failed: u64,
    pub last_failure: Option<String>,
}

impl Tally {
    /// Records one outcome. `answered_in_window` says whether it counts toward throughput (the
    /// answer came within the window), `timed` whether its latency is recorded (the caller
    /// decides: answered in the window for a closed loop, intended in it for an open one).
    pub fn record(
        &mut self,
        answered_in_window: bool,
        timed: bool,
        intended: Instant,
        sent: Instant,
        done: Instant,
        outcome: Outcome,
    ) {
        match outcome {
            Outcome::Accepted => {
                self.accepted_total += 1;
                if answered_in_window {
                    self.accepted_in_window += 1;
                }
                if timed {
                    self.latency_us.push(micros(done - intended));
                    self.service_us.push(micros(done - sent));
                }
            }
            Outcome::Rejected(status) => *self.rejected.entry(status).or_default() += 1,
            Outcome::Failed(why) => {
                self.failed += 1;
                self.last_failure = Some(why);
            }
        }
    }

    pub fn merge(&mut self, other: Tally) {
        self.latency_us.extend(other.latency_us);
        self.service_us.extend(other.service_us);
        self.accepted_in_window += other.accepted_in_window;
        self.accepted_total += other.accepted_total;
        for (status, n) in other.rejected {
            *self.rejected.entry(status).or_default() += n;
        }
        self.failed += other.failed;
        if other.last_failure.is_some() {
            self.last_failure = other.last_failure;
        }
    }

    /// Non-2xx answers plus requests that got no answer.
    pub fn not_accepted(&self) -> u64 {
        self.rejected.values().sum::<u64>() + self.failed
    }

    pub fn latency(&self) -> Latency {
        Latency::of(&self.latency_us)
    }

    pub fn service_time(&self) -> Latency {
        Latency::of(&self.service_us)
    }
}

fn micros(elapsed: Duration) -> u32 {
    u32::try_from(elapsed.as_micros().min(u128::from(MAX_LATENCY_US))).unwrap_or(u32::MAX)
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Latency {
    fn of(samples_us: &[u32]) -> Latency {
        let mut histogram = Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_US, 3)
            .expect("constant histogram bounds are valid");
        for &us in samples_us {
            histogram.saturating_record(u64::from(us).max(1));
        }
        if histogram.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            p50: ms(histogram.value_at_quantile(0.50)),
            p90: ms(histogram.value_at_quantile(0.90)),
            p99: ms(histogram.value_at_quantile(0.99)),
            max: ms(histogram.max()),
        }
    }
}

/// The median of `values` (the mean of the middle two for an even count); `None` if empty.
pub fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut values: Vec<f64> = values.into_iter().filter(|v| v.is_finite()).collect();
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    })
}
