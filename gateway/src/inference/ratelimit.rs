//! Per-caller request and token limits of inference routes, counted in this edge (the default
//! backend; `[limits] backend = "redis"` shares them across edges, see `limiter`). Fixed one-minute
//! windows per (route, caller).
//!
//! The windows live in a bounded concurrent cache: finding a caller's window never takes a lock
//! shared with other callers and never walks the other windows, so a flood of distinct callers
//! costs memory up to the bound (idle windows are evicted first) and no time on anyone's request.
//! Each window has its own small lock, held for a few comparisons.
//!
//! Tokens: a call reserves its estimate when it is admitted, so concurrent calls see each other,
//! and the reservation is settled to what the response reported when it ends — or kept whole when
//! the client went away before any usage arrived. A call admitted under the limit may still end
//! above it; the next one then waits for the window.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use meridian_config::inference::RateLimit;

pub const WINDOW_MS: u64 = 60_000;
/// Windows kept at most (about 100 bytes each); beyond, the least recently used go first.
const MAX_WINDOWS: u64 = 200_000;

/// The caller: sha256 of its bearer token, or of its address when it is anonymous.
pub type KeyHash = [u8; 32];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Requests,
    Tokens,
}

impl Limit {
    pub fn label(self) -> &'static str {
        match self {
            Limit::Requests => "requests",
            Limit::Tokens => "tokens",
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Window {
    start_ms: u64,
    requests: u32,
    /// Tokens used plus tokens reserved by calls still running.
    tokens: u64,
}

impl Window {
    fn current(&mut self, now_ms: u64) -> &mut Self {
        if now_ms.saturating_sub(self.start_ms) >= WINDOW_MS {
            *self = Window {
                start_ms: now_ms,
                requests: 0,
                tokens: 0,
            };
        }
        self
    }
}

pub(crate) type Slot = Arc<Mutex<Window>>;

/// Tokens a running call holds in its caller's window until it is settled.
pub struct Reservation {
    pub tokens: u64,
    /// The window the tokens were added to (local counting only).
    pub(crate) slot: Option<(Slot, u64)>,
}

impl Reservation {
    pub fn none() -> Self {
        Reservation {
            tokens: 0,
            slot: None,
        }
    }
}

pub struct RateLimiter {
    windows: moka::future::Cache<(String, KeyHash), Slot>,
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self::with_capacity(MAX_WINDOWS)
    }
}

impl RateLimiter {
    fn with_capacity(windows: u64) -> Self {
        Self {
            windows: moka::future::Cache::builder()
                .max_capacity(windows)
                .time_to_idle(Duration::from_millis(2 * WINDOW_MS))
                .build(),
        }
    }

    async fn slot(&self, route: &str, key: &KeyHash) -> Slot {
        self.windows
            .get_with((route.to_string(), *key), async { Slot::default() })
            .await
    }

    /// Counts one request and reserves `reserve` tokens, or says which limit is exhausted and in
    /// how many seconds it resets.
    pub async fn admit(
        &self,
        route: &str,
        key: &KeyHash,
        limit: &RateLimit,
        reserve: u64,
        now_ms: u64,
    ) -> Result<Reservation, (Limit, u64)> {
        let slot = self.slot(route, key).await;
        let start = {
            let mut window = slot.lock().unwrap_or_else(|p| p.into_inner());
            let window = window.current(now_ms);
            let retry_after = (window.start_ms + WINDOW_MS)
                .saturating_sub(now_ms)
                .div_ceil(1000)
                .max(1);
            if limit
                .requests_per_minute
                .is_some_and(|max| window.requests >= max)
            {
                return Err((Limit::Requests, retry_after));
            }
            if limit
                .tokens_per_minute
                .is_some_and(|max| window.tokens >= max)
            {
                return Err((Limit::Tokens, retry_after));
            }
            window.requests = window.requests.saturating_add(1);
            window.tokens = window.tokens.saturating_add(reserve);
            window.start_ms
        };
        Ok(Reservation {
            tokens: reserve,
            slot: Some((slot, start)),
        })
    }

    /// Replaces a call's reservation by the `used` tokens it really cost.
    pub fn settle(reservation: &Reservation, used: u64, now_ms: u64) {
        let Some((slot, start)) = &reservation.slot else {
            return;
        };
        let mut window = slot.lock().unwrap_or_else(|p| p.into_inner());
        let window = window.current(now_ms);
        window.tokens = if window.start_ms == *start {
            window
                .tokens
                .saturating_sub(reservation.tokens)
                .saturating_add(used)
        } else {
            // The reservation's window is gone: what was used counts in the current one.
            window.tokens.saturating_add(used)
        };
    }

    /// Windows held (for tests: the bound holds under a flood of callers).
    #[cfg(test)]
    async fn len(&self) -> u64 {
        self.windows.run_pending_tasks().await;
        self.windows.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    }

    #[test]
    fn requests_then_tokens_then_a_new_window() {
        rt().block_on(async {
            let limiter = RateLimiter::default();
            let limit = RateLimit {
                requests_per_minute: Some(2),
                tokens_per_minute: Some(10),
            };
            let key = [1u8; 32];
            assert!(limiter.admit("r", &key, &limit, 0, 0).await.is_ok());
            assert!(limiter.admit("r", &key, &limit, 0, 1).await.is_ok());
            assert_eq!(
                limiter.admit("r", &key, &limit, 0, 30_500).await.err(),
                Some((Limit::Requests, 30))
            );
            assert!(
                limiter.admit("other", &key, &limit, 0, 2).await.is_ok(),
                "per route"
            );
            assert!(
                limiter.admit("r", &[2u8; 32], &limit, 0, 2).await.is_ok(),
                "per key"
            );
            let call = limiter
                .admit("r", &key, &limit, 4, 60_000)
                .await
                .expect("new window");
            RateLimiter::settle(&call, 12, 60_001);
            assert_eq!(
                limiter.admit("r", &key, &limit, 0, 60_002).await.err(),
                Some((Limit::Tokens, 60))
            );
        });
    }

    #[test]
    fn reservations_hold_tokens_until_settled() {
        rt().block_on(async {
            let limiter = RateLimiter::default();
            let limit = RateLimit {
                requests_per_minute: None,
                tokens_per_minute: Some(100),
            };
            let key = [3u8; 32];
            let first = limiter
                .admit("r", &key, &limit, 60, 0)
                .await
                .expect("first");
            let second = limiter
                .admit("r", &key, &limit, 60, 1)
                .await
                .expect("under the limit");
            assert_eq!(
                limiter.admit("r", &key, &limit, 1, 2).await.err(),
                Some((Limit::Tokens, 60)),
                "two running calls hold 120 reserved tokens"
            );
            RateLimiter::settle(&first, 5, 3);
            RateLimiter::settle(&second, 5, 4);
            assert!(
                limiter.admit("r", &key, &limit, 1, 5).await.is_ok(),
                "10 used"
            );
            // Settled after its window ended: the usage lands in the new window.
            let late = limiter.admit("r", &key, &limit, 50, 6).await.expect("late");
            RateLimiter::settle(&late, 120, 61_000);
            assert!(limiter.admit("r", &key, &limit, 1, 61_001).await.is_err());
        });
    }

    #[test]
    fn a_flood_of_callers_stays_bounded() {
        rt().block_on(async {
            const BOUND: u64 = 2_000;
            let limiter = RateLimiter::with_capacity(BOUND);
            let limit = RateLimit {
                requests_per_minute: Some(1),
                tokens_per_minute: None,
            };
            for i in 0..(10 * BOUND) {
                let mut key = [0u8; 32];
                key[..8].copy_from_slice(&i.to_le_bytes());
                assert!(limiter.admit("r", &key, &limit, 0, 0).await.is_ok());
            }
            assert!(limiter.len().await <= BOUND);
        });
    }
}
