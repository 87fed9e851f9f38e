//! Telling a broker that stopped answering from one that is slow: the stall watch of one
//! connection.
//!
//! A hung broker (a GC pause, a stuck disk, a frozen VM, a network that drops packets instead
//! of resetting) keeps its TCP connection open and simply stops answering, so nothing fails:
//! publishes wait for confirms that do not come. The watch calls a connection stalled when
//! a publish has waited its threshold and the broker has answered nothing on that connection
//! since the publish was handed to it. The threshold is the wait's own: a webhook's publish,
//! which its HTTP client waits for, has `amqp.stall_timeout_ms`; replay of the spool, which no
//! client waits for, is more patient (see [`Patience`]). A broker that is slow but alive keeps
//! confirming *something* (confirms come in batches, as its disk commits), so a long queue
//! of publishes behind a slow commit is not a stall; a broker that blocked publishing
//! (`connection.blocked`: a resource alarm) has said why it is silent, so neither is that,
//! though a publish waiting on it gives up after the threshold all the same (its webhook goes
//! to the spool) instead of holding its request until the alarm clears.
//!
//! The oldest waiting publish is the first to see the silence; it marks the connection
//! stalled, which fails every other publish waiting on it at once (their webhooks go to the
//! spool) and wakes the supervisor, which abandons the connection. An idle connection has no
//! publish to notice anything: the heartbeat covers that case (see `connect`).

use std::future::Future;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures_lite::future::poll_once;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What the broker has answered on one connection, and whether it stopped.
pub(crate) struct StallWatch {
    opened: Instant,
    /// When the broker last answered a publish on this connection, in µs since `opened`.
    last_answer_us: AtomicU64,
    /// Publishes waiting for the broker on this connection right now.
    waiting: AtomicUsize,
    stalled: CancellationToken,
    stall: OnceLock<Stall>,
}

/// A stall as it was noticed, for the log and `/readyz`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stall {
    /// How long the broker had been silent with a publish waiting.
    pub silent_for: Duration,
    /// Publishes that were waiting on the connection when the stall was noticed: each went
    /// to the spool and may reach the broker twice.
    pub waiting: usize,
}

/// How long one wait for the broker may last.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Patience {
    /// The silence (nothing answered on the connection since the publish was handed over)
    /// after which the wait calls the connection stalled.
    pub(crate) stall: Duration,
    /// When the wait ends all the same; with `None`, only a silence ends it.
    pub(crate) deadline: Option<Instant>,
}

/// What a wait is for: what its end means, and whether it is looked at once more when the
/// connection is stalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Awaiting {
    /// Handing a publish over (`basic.publish`). Its end is not an answer from the broker,
    /// and on a stalled connection it is left alone: what it sent could arrive twice.
    HandOver,
    /// The broker's confirm of a publish already handed over.
    Confirm,
    /// Both, one after the other, in one future. Not begun on a stalled connection.
    Publish,
}

/// Why waiting for the broker ended without an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Silence {
    /// The deadline of the publish passed first.
    Deadline,
    /// The broker has blocked publishing (a resource alarm) and did not answer within the
    /// threshold. The connection is not stalled.
    Blocked,
    /// The connection is stalled (noticed by this wait or another).
    Stalled(Stall),
}

impl StallWatch {
    pub(crate) fn new() -> StallWatch {
        StallWatch {
            opened: Instant::now(),
            last_answer_us: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
            stalled: CancellationToken::new(),
            stall: OnceLock::new(),
        }
    }

    pub(crate) fn is_stalled(&self) -> bool {
        self.stalled.is_cancelled()
    }

    /// Resolves once the connection is called stalled.
    pub(crate) async fn stalled(&self) -> Stall {
        self.stalled.cancelled().await;
        // Recorded before the token is cancelled (see `call_stalled`).
        self.stall.get().copied().unwrap_or_default()
    }

    /// Waits for `answer`, the broker's answer to a publish handed to it at `since` (its
    /// confirm), until `patience.deadline`. Gives up at once when the connection is stalled
    /// (unless the answer is already there), and calls it stalled when the broker answers
    /// nothing for `patience.stall` after `since`. `blocked` says whether the broker has
    /// blocked publishing, which explains a silence: the wait then ends after that long
    /// without calling the connection stalled.
    pub(crate) async fn answer<T, E>(
        &self,
        since: Instant,
        patience: Patience,
        answer: impl Future<Output = Result<T, E>>,
        blocked: impl Fn() -> bool,
    ) -> Result<Result<T, E>, Silence> {
        self.wait(since, patience, answer, blocked, Awaiting::Confirm)
            .await
    }

    /// As [`Self::answer`], for handing the publish over (`basic.publish`), which can wait on
    /// a full socket. Its end is not an answer from the broker.
    pub(crate) async fn send<T, E>(
        &self,
        since: Instant,
        patience: Patience,
        sending: impl Future<Output = Result<T, E>>,
        blocked: impl Fn() -> bool,
    ) -> Result<Result<T, E>, Silence> {
        self.wait(since, patience, sending, blocked, Awaiting::HandOver)
            .await
    }

    /// As [`Self::answer`], for a publish handed over and confirmed in one future: one wait,
    /// one timer, where a webhook's publish would otherwise take two.
    pub(crate) async fn publish<T, E>(
        &self,
        since: Instant,
        patience: Patience,
        publishing: impl Future<Output = Result<T, E>>,
        blocked: impl Fn() -> bool,
    ) -> Result<Result<T, E>, Silence> {
        self.wait(since, patience, publishing, blocked, Awaiting::Publish)
            .await
    }

    async fn wait<T, E>(
        &self,
        since: Instant,
        patience: Patience,
        answer: impl Future<Output = Result<T, E>>,
        blocked: impl Fn() -> bool,
        awaiting: Awaiting,
    ) -> Result<Result<T, E>, Silence> {
        tokio::pin!(answer);
        if let Some(stall) = self.stall.get().copied() {
            // A publish that has not begun is not begun now: it would be handed over.
            return match awaiting {
                Awaiting::Confirm => self.unless_answered(answer, stall).await,
                Awaiting::HandOver | Awaiting::Publish => Err(Silence::Stalled(stall)),
            };
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.waiting);
        let Patience {
            stall: threshold,
            deadline,
        } = patience;
        loop {
            let silence_ends = since.max(self.last_answer()) + threshold;
            let check = deadline.map_or(silence_ends, |deadline| silence_ends.min(deadline));
            tokio::select! {
                // An answer that is already there wins over a timer that fired with it.
                biased;
                answered = &mut answer => {
                    // A confirm (or a nack) is the broker answering; an error is the
                    // connection's, and handing over is ours.
                    if awaiting != Awaiting::HandOver && answered.is_ok() {
                        self.answered();
                    }
                    return Ok(answered);
                }
                stall = self.stalled() => {
                    return match awaiting {
                        Awaiting::Confirm | Awaiting::Publish => {
                            self.unless_answered(answer, stall).await
                        }
                        Awaiting::HandOver => Err(Silence::Stalled(stall)),
                    };
                }
                () = tokio::time::sleep_until(check) => {}
            }
            let now = Instant::now();
            let silent_for = now - since.max(self.last_answer());
            let silent_throughout = since >= self.last_answer();
            let past_deadline = deadline.is_some_and(|deadline| now >= deadline);
            if (silent_for >= threshold || past_deadline) && blocked() {
                return Err(Silence::Blocked);
            }
            // A deadline shorter than the threshold still proves a silence that long.
            if silent_for >= threshold || (past_deadline && silent_throughout) {
                return Err(Silence::Stalled(self.call_stalled(silent_for)));
            }
            if past_deadline {
                return Err(Silence::Deadline);
            }
        }
    }

    /// The end of a wait for a confirm on a stalled connection: `stall`, unless the answer
    /// is already there. A confirm can arrive after the wait last looked but before the stall
    /// was seen, or before the wait even began (a batch's later confirms, waited for one
    /// after the other); thrown away, its webhook would be published again. A publish still
    /// being handed over is left as it is, though (see [`Awaiting`]).
    async fn unless_answered<T, E>(
        &self,
        answer: impl Future<Output = Result<T, E>>,
        stall: Stall,
    ) -> Result<Result<T, E>, Silence> {
        match poll_once(answer).await {
            Some(answered) => {
                if answered.is_ok() {
                    self.answered();
                }
                Ok(answered)
            }
            None => Err(Silence::Stalled(stall)),
        }
    }

    /// Marks the connection stalled (once): every wait on it ends now.
    fn call_stalled(&self, silent_for: Duration) -> Stall {
        let stall = *self.stall.get_or_init(|| Stall {
            silent_for,
            waiting: self.waiting.load(Ordering::Relaxed),
        });
        self.stalled.cancel();
        stall
    }

    fn answered(&self) {
        let us = u64::try_from(self.opened.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.last_answer_us.fetch_max(us, Ordering::Relaxed);
    }

    fn last_answer(&self) -> Instant {
        self.opened + Duration::from_micros(self.last_answer_us.load(Ordering::Relaxed))
    }
}

/// Counts one wait for as long as it lasts, however it ends (dropped included).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use super::*;

    const THRESHOLD: Duration = Duration::from_millis(1000);
    const LONG: Duration = Duration::from_secs(5);
    /// Replay's waits: the broker silent for `LONG`, and no deadline.
    const PATIENT: Patience = Patience {
        stall: LONG,
        deadline: None,
    };

    /// A webhook's publish handed over at `since`: the threshold, and a deadline.
    fn live(since: Instant) -> Patience {
        Patience {
            stall: THRESHOLD,
            deadline: Some(since + LONG),
        }
    }

    fn never() -> impl Future<Output = Result<(), ()>> {
        std::future::pending()
    }

    async fn after(delay: Duration) -> Result<(), ()> {
        tokio::time::sleep(delay).await;
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn silence_past_the_threshold_is_a_stall_that_ends_every_wait() {
        let watch = Arc::new(StallWatch::new());
        let start = Instant::now();
        // A later publish waits too; it must end when the first one notices.
        let later = {
            let watch = Arc::clone(&watch);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let since = Instant::now();
                (
                    watch.answer(since, live(since), never(), || false).await,
                    since.elapsed(),
                )
            })
        };
        let first = watch.answer(start, live(start), never(), || false).await;
        assert_eq!(start.elapsed(), THRESHOLD);
        let Err(Silence::Stalled(stall)) = first else {
            panic!("{first:?}");
        };
        assert_eq!(stall.silent_for, THRESHOLD);
        assert_eq!(stall.waiting, 2);
        let (second, waited) = later.await.unwrap();
        assert_eq!(second, Err(Silence::Stalled(stall)));
        assert_eq!(waited, Duration::from_millis(700));
        assert!(watch.is_stalled());
        // A publish that comes after the stall does not wait at all.
        let now = Instant::now();
        assert!(matches!(
            watch.answer(now, live(now), never(), || false).await,
            Err(Silence::Stalled(_))
        ));
        assert_eq!(now.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_already_there_wins_over_a_stall_noticed_elsewhere() {
        let watch = StallWatch::new();
        let start = Instant::now();
        let first = watch.answer(start, live(start), never(), || false).await;
        assert!(matches!(first, Err(Silence::Stalled(_))), "{first:?}");
        // A confirm that arrived meanwhile (the next of a batch, say) is taken, not thrown
        // away with the connection...
        let now = Instant::now();
        let there = std::future::ready(Ok::<_, ()>(()));
        assert_eq!(
            watch.answer(now, live(now), there, || false).await,
            Ok(Ok(()))
        );
        // ...but one still to come is not waited for, and nothing more is handed over.
        let waited = watch
            .answer(now, live(now), after(Duration::from_millis(1)), || false)
            .await;
        assert!(matches!(waited, Err(Silence::Stalled(_))), "{waited:?}");
        let handed_over = std::future::ready(Ok::<_, ()>(()));
        let sent = watch.send(now, live(now), handed_over, || false).await;
        assert!(matches!(sent, Err(Silence::Stalled(_))), "{sent:?}");
        assert_eq!(now.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_publish_is_not_begun_on_a_stalled_connection() {
        let watch = StallWatch::new();
        let start = Instant::now();
        let first = watch.answer(start, live(start), never(), || false).await;
        assert!(matches!(first, Err(Silence::Stalled(_))), "{first:?}");
        let begun = AtomicBool::new(false);
        let publishing = std::future::poll_fn(|_| {
            begun.store(true, Ordering::Relaxed);
            std::task::Poll::Ready(Ok::<_, ()>(()))
        });
        let now = Instant::now();
        let published = watch.publish(now, live(now), publishing, || false).await;
        assert!(
            matches!(published, Err(Silence::Stalled(_))),
            "{published:?}"
        );
        assert!(
            !begun.load(Ordering::Relaxed),
            "handed over on a stalled connection"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_is_not_the_broker_answering() {
        let watch = Arc::new(StallWatch::new());
        let start = Instant::now();
        // A publish whose wait ends in an error halfway (its channel closed, say)...
        let failed = {
            let watch = Arc::clone(&watch);
            tokio::spawn(async move {
                let failing = async {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    Err::<(), ()>(())
                };
                watch.answer(start, live(start), failing, || false).await
            })
        };
        // ...does not tell another, waiting since the same moment, that the broker is alive.
        let waiting = watch.answer(start, live(start), never(), || false).await;
        assert!(matches!(waiting, Err(Silence::Stalled(_))), "{waiting:?}");
        assert_eq!(start.elapsed(), THRESHOLD);
        assert_eq!(failed.await.unwrap(), Ok(Err(())));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_broker_that_keeps_answering_is_not_stalled() {
        let watch = Arc::new(StallWatch::new());
        let start = Instant::now();
        // Publishes every 200 ms, answered every 500 ms from 0.8 s on: a backlog grows, and
        // the later ones wait up to 3.5 s, far over the threshold, but the broker is never
        // silent for that long.
        let answers: Vec<_> = (0..10u32)
            .map(|i| {
                let watch = Arc::clone(&watch);
                tokio::spawn(async move {
                    let since = start + Duration::from_millis(200) * i;
                    tokio::time::sleep_until(since).await;
                    let answered_at = start + Duration::from_millis(800 + 500 * u64::from(i));
                    let answer = async move {
                        tokio::time::sleep_until(answered_at).await;
                        Ok::<_, ()>(())
                    };
                    watch.answer(since, live(since), answer, || false).await
                })
            })
            .collect();
        for answer in answers {
            assert_eq!(answer.await.unwrap(), Ok(Ok(())));
        }
        assert!(!watch.is_stalled());
    }

    #[tokio::test(start_paused = true)]
    async fn a_blocked_broker_is_silent_for_a_reason_and_not_waited_out() {
        let watch = StallWatch::new();
        let blocked = AtomicBool::new(true);
        let start = Instant::now();
        let waited = watch
            .answer(start, live(start), never(), || {
                blocked.load(Ordering::SeqCst)
            })
            .await;
        assert_eq!(waited, Err(Silence::Blocked));
        assert_eq!(start.elapsed(), THRESHOLD);
        assert!(!watch.is_stalled());
        // Once the alarm clears, publishes are answered as before.
        blocked.store(false, Ordering::SeqCst);
        let now = Instant::now();
        let answered = watch
            .answer(now, live(now), after(Duration::from_millis(200)), || false)
            .await;
        assert_eq!(answered, Ok(Ok(())));
    }

    #[tokio::test(start_paused = true)]
    async fn handing_publishes_over_is_not_an_answer() {
        let watch = Arc::new(StallWatch::new());
        let start = Instant::now();
        // A hung broker's socket still takes bytes for a while: sends keep completing.
        let sends = {
            let watch = Arc::clone(&watch);
            tokio::spawn(async move {
                for _ in 0..9 {
                    let since = Instant::now();
                    let sent = after(Duration::from_millis(100));
                    let _ = watch.send(since, live(since), sent, || false).await;
                }
            })
        };
        let waited = watch.answer(start, live(start), never(), || false).await;
        assert!(matches!(waited, Err(Silence::Stalled(_))), "{waited:?}");
        assert_eq!(start.elapsed(), THRESHOLD);
        sends.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_before_the_threshold_with_no_answer_is_a_stall_too() {
        let watch = StallWatch::new();
        let start = Instant::now();
        let patience = Patience {
            stall: Duration::from_secs(10),
            ..live(start)
        };
        let waited = watch.answer(start, patience, never(), || false).await;
        assert!(matches!(waited, Err(Silence::Stalled(s)) if s.silent_for == LONG));
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_after_answers_to_others_is_only_a_deadline() {
        let watch = Arc::new(StallWatch::new());
        let start = Instant::now();
        let patience = Patience {
            stall: Duration::from_secs(10),
            ..live(start)
        };
        let other = {
            let watch = Arc::clone(&watch);
            tokio::spawn(async move {
                let answer = after(Duration::from_secs(1));
                watch.answer(start, patience, answer, || false).await
            })
        };
        let waited = watch.answer(start, patience, never(), || false).await;
        assert_eq!(waited, Err(Silence::Deadline));
        assert_eq!(other.await.unwrap(), Ok(Ok(())));
        assert!(!watch.is_stalled());
    }

    #[tokio::test(start_paused = true)]
    async fn a_patient_wait_outlasts_a_pause_but_not_a_hang() {
        let watch = StallWatch::new();
        let start = Instant::now();
        // Silent for longer than a webhook's threshold, then answering: slow, not hung.
        let paused = after(Duration::from_millis(1500));
        assert_eq!(
            watch.answer(start, PATIENT, paused, || false).await,
            Ok(Ok(()))
        );
        assert!(!watch.is_stalled());
        let now = Instant::now();
        let waited = watch.answer(now, PATIENT, never(), || false).await;
        assert!(matches!(waited, Err(Silence::Stalled(s)) if s.silent_for == LONG));
        assert_eq!(now.elapsed(), LONG);
    }

    #[tokio::test(start_paused = true)]
    async fn a_patient_batch_is_not_cut_short_while_the_broker_confirms() {
        let watch = StallWatch::new();
        let start = Instant::now();
        // 100 publishes handed over at once, confirmed one every 200 ms: the last one 20 s
        // later, far past any deadline the batch could have had.
        for i in 1..=100 {
            let confirmed = start + Duration::from_millis(200) * i;
            let answer = async move {
                tokio::time::sleep_until(confirmed).await;
                Ok::<_, ()>(())
            };
            assert_eq!(
                watch.answer(start, PATIENT, answer, || false).await,
                Ok(Ok(()))
            );
        }
        assert_eq!(start.elapsed(), Duration::from_secs(20));
        assert!(!watch.is_stalled());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_a_webhook_notices_ends_a_patient_wait_at_once() {
        let watch = Arc::new(StallWatch::new());
        let start = Instant::now();
        let replay = {
            let watch = Arc::clone(&watch);
            tokio::spawn(async move { watch.answer(start, PATIENT, never(), || false).await })
        };
        let webhook = watch.answer(start, live(start), never(), || false).await;
        assert!(matches!(webhook, Err(Silence::Stalled(_))), "{webhook:?}");
        let replayed = replay.await.unwrap();
        assert!(matches!(replayed, Err(Silence::Stalled(_))), "{replayed:?}");
        assert_eq!(start.elapsed(), THRESHOLD);
    }
}
