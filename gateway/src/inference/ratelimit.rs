//! Per-API-key request and token limits of inference routes, counted in this edge (the default
//! backend; `[limits] backend = "redis"` shares them across edges, see `limiter`). Fixed one-minute
//! windows per (route, key); tokens are charged after the response from its `usage`, so a request
//! that starts under the token limit may end above it, and the next one waits for the window.

use std::collections::HashMap;
use std::sync::Mutex;

use meridian_config::inference::RateLimit;

pub const WINDOW_MS: u64 = 60_000;
/// Windows kept before idle ones are pruned (bounds memory under many distinct keys).
const PRUNE_ABOVE: usize = 10_000;

/// The caller: sha256 of its bearer token (all zeros without one).
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

#[derive(Clone, Copy, Debug)]
struct Window {
    start_ms: u64,
    requests: u32,
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

#[derive(Default)]
pub struct RateLimiter {
    /// key -> route name -> window. The lock is held for a few comparisons only.
    windows: Mutex<HashMap<KeyHash, HashMap<String, Window>>>,
}

impl RateLimiter {
    /// Counts one request, or says which limit is exhausted and in how many seconds it resets.
    pub fn admit(
        &self,
        route: &str,
        key: &KeyHash,
        limit: &RateLimit,
        now_ms: u64,
    ) -> Result<(), (Limit, u64)> {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if windows.len() > PRUNE_ABOVE {
            windows.retain(|_, routes| {
                routes.retain(|_, w| now_ms.saturating_sub(w.start_ms) < WINDOW_MS);
                !routes.is_empty()
            });
        }
        let routes = windows.entry(*key).or_default();
        let window = match routes.get_mut(route) {
            Some(w) => w,
            None => routes.entry(route.to_string()).or_insert(Window {
                start_ms: now_ms,
                requests: 0,
                tokens: 0,
            }),
        }
        .current(now_ms);
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
        Ok(())
    }

    /// Charges `tokens` used by a finished request.
    pub fn charge(&self, route: &str, key: &KeyHash, tokens: u64, now_ms: u64) {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(window) = windows.get_mut(key).and_then(|r| r.get_mut(route)) {
            let window = window.current(now_ms);
            window.tokens = window.tokens.saturating_add(tokens);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_then_tokens_then_a_new_window() {
        let limiter = RateLimiter::default();
        let limit = RateLimit {
            requests_per_minute: Some(2),
            tokens_per_minute: Some(10),
        };
        let key = [1u8; 32];
        assert!(limiter.admit("r", &key, &limit, 0).is_ok());
        assert!(limiter.admit("r", &key, &limit, 1).is_ok());
        assert_eq!(
            limiter.admit("r", &key, &limit, 30_500),
            Err((Limit::Requests, 30))
        );
        assert!(limiter.admit("other", &key, &limit, 2).is_ok(), "per route");
        assert!(limiter.admit("r", &[2u8; 32], &limit, 2).is_ok(), "per key");
        assert!(
            limiter.admit("r", &key, &limit, 60_000).is_ok(),
            "new window"
        );
        limiter.charge("r", &key, 12, 60_001);
        assert_eq!(
            limiter.admit("r", &key, &limit, 60_002),
            Err((Limit::Tokens, 60))
        );
    }
}
