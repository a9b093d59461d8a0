//! Timeouts whose timer is armed only when the work has to wait.
//!
//! Most socket writes on the request path, and the read of a head whose bytes already arrived,
//! complete at their first poll. `tokio::time::timeout` reads the clock and sets up a timer entry
//! for each of them anyway (and removes it again when dropped), which was about half of the timer
//! work a proxied request did. These poll the work once first and only arm the timer when it is
//! not ready; the bound is then counted from that first wait, a difference of one poll.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use tokio::time::Instant;

/// The work did not finish within its bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Elapsed;

/// `work`, unless it waits longer than `limit`.
pub async fn lazy_timeout<F: Future>(limit: Duration, work: F) -> Result<F::Output, Elapsed> {
    let mut work = std::pin::pin!(work);
    if let Some(output) = ready_now(work.as_mut()).await {
        return Ok(output);
    }
    tokio::time::timeout(limit, work).await.map_err(|_| Elapsed)
}

/// `work`, unless it is still waiting at `deadline`.
pub async fn lazy_timeout_at<F: Future>(deadline: Instant, work: F) -> Result<F::Output, Elapsed> {
    let mut work = std::pin::pin!(work);
    if let Some(output) = ready_now(work.as_mut()).await {
        return Ok(output);
    }
    tokio::time::timeout_at(deadline, work)
        .await
        .map_err(|_| Elapsed)
}

/// Polls `work` once: its output if it is ready, `None` (with its waker registered) if not.
async fn ready_now<F: Future>(mut work: Pin<&mut F>) -> Option<F::Output> {
    std::future::poll_fn(|cx| match work.as_mut().poll(cx) {
        Poll::Ready(output) => Poll::Ready(Some(output)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ready_work_needs_no_timer_and_waiting_work_is_bounded() {
        assert_eq!(lazy_timeout(Duration::ZERO, async { 7 }).await, Ok(7));
        assert_eq!(
            lazy_timeout_at(Instant::now(), async { 8 }).await,
            Ok(8),
            "a deadline already passed does not cut work that is ready"
        );
        let never = std::future::pending::<()>();
        assert_eq!(
            lazy_timeout(Duration::from_secs(5), never).await,
            Err(Elapsed)
        );
        let due = Instant::now() + Duration::from_secs(3);
        let late = tokio::time::sleep(Duration::from_secs(4));
        assert_eq!(lazy_timeout_at(due, late).await, Err(Elapsed));
        let started = Instant::now();
        let soon = tokio::time::sleep(Duration::from_secs(2));
        assert_eq!(lazy_timeout(Duration::from_secs(3), soon).await, Ok(()));
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }
}
