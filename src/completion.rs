//! A future that always runs to its end, in its caller's task while the caller waits for it.
//!
//! A webhook's delivery must not stop halfway when its client hangs up (hyper then drops the
//! request's handler, and everything it awaits): HireHop never waits for the answer, so a
//! publish or a spool write cut short is a webhook lost. Spawning every delivery as a task of
//! its own would guarantee that, at the price of a task, a hand-off to it and a wake-up back
//! for every webhook, paid by the common case, a client that waits. [`RunToCompletion`] pays
//! it only when the client is gone: it polls the delivery in place, and if it is dropped
//! before the delivery ends, spawns what is left of it (a boxed future does not move, so it
//! picks up where it was). A panic in the future is caught and returned, as a task's
//! `JoinError` would be, so the webhook gets its 503 rather than a reset connection.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::{Instrument, Span};

type Boxed<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// `future`, run in the caller's task, or in a task of its own once the caller drops it.
pub struct RunToCompletion<T: Send + 'static> {
    /// `None` once it has finished.
    future: Option<Boxed<T>>,
    /// Where the rest is spawned, so that shutdown waits for it.
    tracker: TaskTracker,
    /// Counts as a task of `tracker` while the future runs here.
    _running: TaskTrackerToken,
    /// The span the rest runs in.
    span: Span,
}

impl<T: Send + 'static> RunToCompletion<T> {
    /// Wraps `future`, counted by `tracker` until it ends, whoever runs it.
    pub fn new(tracker: &TaskTracker, future: impl Future<Output = T> + Send + 'static) -> Self {
        RunToCompletion {
            future: Some(Box::pin(future)),
            tracker: tracker.clone(),
            _running: tracker.token(),
            span: Span::current(),
        }
    }
}

/// The future panicked (a bug); what it said.
#[derive(Debug, thiserror::Error)]
#[error("panicked: {0}")]
pub struct Panicked(String);

impl<T: Send + 'static> Future for RunToCompletion<T> {
    type Output = Result<T, Panicked>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T, Panicked>> {
        let this = self.get_mut();
        let future = this
            .future
            .as_mut()
            .expect("RunToCompletion polled after it finished");
        let output = match catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx))) {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(output)) => Ok(output),
            Err(panic) => Err(Panicked(
                panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default(),
            )),
        };
        this.future = None;
        Poll::Ready(output)
    }
}

impl<T: Send + 'static> Drop for RunToCompletion<T> {
    fn drop(&mut self) {
        let Some(future) = self.future.take() else {
            return;
        };
        // Without a runtime (it is shutting down) there is nowhere to run it, as for a task.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let rest = async move {
                future.await;
            };
            runtime
                .spawn(self.tracker.track_future(
                    rest.instrument(std::mem::replace(&mut self.span, Span::none())),
                ));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    #[tokio::test]
    async fn finishes_in_place_while_awaited() {
        let tracker = TaskTracker::new();
        let value = RunToCompletion::new(&tracker, async { 7 }).await;
        assert_eq!(value.unwrap(), 7);
        tracker.close();
        assert!(tracker.is_empty(), "nothing left behind");
    }

    #[tokio::test]
    async fn dropped_halfway_it_finishes_in_a_task_that_shutdown_waits_for() {
        let tracker = TaskTracker::new();
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let finished = Arc::new(AtomicBool::new(false));
        let mut running = Box::pin(RunToCompletion::new(&tracker, {
            let finished = Arc::clone(&finished);
            async move {
                let _ = wait.await;
                finished.store(true, Ordering::SeqCst);
            }
        }));
        // Started (it is waiting for `go`), then abandoned by its caller.
        assert!(
            futures_lite::future::poll_once(&mut running)
                .await
                .is_none()
        );
        drop(running);
        tracker.close();
        assert_eq!(tracker.len(), 1, "the rest is tracked");
        go.send(()).unwrap();
        tracker.wait().await;
        assert!(finished.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn shutdown_waits_for_it_while_it_runs_in_place() {
        let tracker = TaskTracker::new();
        let running = RunToCompletion::new(&tracker, async {});
        tracker.close();
        assert!(!tracker.is_empty());
        running.await.unwrap();
        tracker.wait().await;
    }

    #[tokio::test]
    async fn a_panic_is_returned_not_propagated() {
        let tracker = TaskTracker::new();
        let bug = async { panic!("a bug") };
        let panicked: Panicked = RunToCompletion::<()>::new(&tracker, bug).await.unwrap_err();
        assert_eq!(panicked.to_string(), "panicked: a bug");
    }
}
