//! Where the inference rate limits are counted: per edge ([`RateLimiter`], the default) or in
//! Redis, shared by every edge ([`RedisLimiter`], `[limits] backend = "redis"`).
//!
//! The Redis limiter works with leases so that most requests cost no round trip: an edge takes
//! a slice of a key's per-minute request budget at a time (one Lua script: read what the fleet
//! used, grant `min(slice, what is left)`, add it) and spends it locally. The last slices of a
//! minute are cut to what is left, so the fleet never admits more than the limit; a slice that
//! an edge took but did not spend before the minute ends is lost to that minute, which is how
//! the fleet can admit slightly less. Windows are wall-clock minutes, the same on every edge.
//!
//! Tokens are charged after the response (as with the local limiter): each charge is added in
//! Redis, and the fleet-wide total it returns (also returned with every lease) is what the next
//! admission checks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use meridian_config::inference::RateLimit;
use meridian_config::{LimitsSection, OnBackendError};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::ratelimit::{KeyHash, Limit, RateLimiter, Reservation, WINDOW_MS};

/// A refusal: which limit, and in how many seconds its window resets.
pub type Refusal = (Limit, u64);

/// What the request path needs of a limit store.
#[async_trait]
pub trait LimitBackend: Send + Sync {
    /// Counts one request and reserves `reserve` tokens for it, or says which limit is exhausted.
    async fn admit(
        &self,
        route: &str,
        key: &KeyHash,
        limit: &RateLimit,
        reserve: u64,
        now_ms: u64,
    ) -> Result<Reservation, Refusal>;

    /// Settles a finished request: `used` tokens instead of its reservation (never blocks).
    fn settle(&self, route: &str, key: &KeyHash, reservation: &Reservation, used: u64, now_ms: u64);
}

#[async_trait]
impl LimitBackend for RateLimiter {
    async fn admit(
        &self,
        route: &str,
        key: &KeyHash,
        limit: &RateLimit,
        reserve: u64,
        now_ms: u64,
    ) -> Result<Reservation, Refusal> {
        RateLimiter::admit(self, route, key, limit, reserve, now_ms).await
    }

    fn settle(&self, _: &str, _: &KeyHash, reservation: &Reservation, used: u64, now_ms: u64) {
        RateLimiter::settle(reservation, used, now_ms);
    }
}

/// Counters in Redis live this long past their minute (so a late charge still finds them).
const KEY_TTL_MS: u64 = 2 * WINDOW_MS;
/// After a Redis error, the backend is not asked again for this long: requests get the
/// `on_backend_error` answer at once instead of each waiting for a timeout.
const BACKOFF_MS: u64 = 1_000;
/// Longest a Redis call may take before it counts as an error.
const CALL_TIMEOUT: Duration = Duration::from_millis(250);
/// Leases kept at most; beyond, the least recently used go first.
const MAX_LEASES: u64 = 200_000;

/// Grants `min(slice, limit - used)` of the requests budget and returns the grant with the
/// tokens used so far in the same minute. KEYS: requests counter, tokens counter.
/// ARGV: limit, slice, ttl in ms.
const LEASE_SCRIPT: &str = r"
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local grant = math.min(tonumber(ARGV[2]), tonumber(ARGV[1]) - used)
if grant > 0 then
  redis.call('INCRBY', KEYS[1], grant)
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
else
  grant = 0
end
local tokens = tonumber(redis.call('GET', KEYS[2]) or '0')
return {grant, tokens}
";

/// `meridian_limits_*`: the Redis limiter's own health.
#[derive(Clone)]
pub struct LimiterMetrics {
    /// `meridian_limits_backend_seconds`
    latency: Histogram,
    /// `meridian_limits_backend_errors_total`
    errors: IntCounter,
    /// `meridian_limits_lease_refills_total`
    refills: IntCounter,
    /// `meridian_limits_backend_error_decisions_total{decision}`
    decisions: IntCounterVec,
}

impl LimiterMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let latency = Histogram::with_opts(
            HistogramOpts::new(
                "meridian_limits_backend_seconds",
                "Round trips to the shared rate-limit backend (Redis): lease refills and token charges.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
            ]),
        )?;
        let errors = IntCounter::with_opts(Opts::new(
            "meridian_limits_backend_errors_total",
            "Calls to the shared rate-limit backend (Redis) that failed or timed out.",
        ))?;
        let refills = IntCounter::with_opts(Opts::new(
            "meridian_limits_lease_refills_total",
            "Slices of a key's shared budget taken from Redis (one round trip each).",
        ))?;
        let decisions = IntCounterVec::new(
            Opts::new(
                "meridian_limits_backend_error_decisions_total",
                "Requests decided by [limits] on_backend_error because Redis could not be asked, by decision (allow, deny).",
            ),
            &["decision"],
        )?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(refills.clone()))?;
        registry.register(Box::new(decisions.clone()))?;
        Ok(Self {
            latency,
            errors,
            refills,
            decisions,
        })
    }
}

#[derive(Default)]
struct LeaseState {
    /// Wall-clock minute this state is about.
    window: u64,
    /// Requests granted to this edge and not yet admitted.
    left: u64,
    /// The fleet has used the whole request budget of this minute.
    exhausted: bool,
    /// Fleet-wide tokens charged this minute, as last seen.
    tokens_seen: u64,
}

impl LeaseState {
    fn current(&mut self, window: u64) -> &mut Self {
        if self.window != window {
            *self = LeaseState {
                window,
                ..LeaseState::default()
            };
        }
        self
    }
}

/// One key's lease on one route. The async mutex makes refills single-flight: requests that
/// find the lease empty wait for the one refill instead of each asking Redis.
type Lease = Arc<tokio::sync::Mutex<LeaseState>>;

pub struct RedisLimiter {
    settings: LimitsSection,
    shards: Vec<ConnectionManager>,
    /// Bounded and concurrent: a flood of distinct keys evicts idle leases (their unspent slices
    /// are lost to the minute, as when a lease ages out) and never stalls a request.
    leases: moka::future::Cache<(String, KeyHash), Lease>,
    /// Unix ms before which Redis is not asked (after an error).
    backoff_until_ms: AtomicU64,
    script: redis::Script,
    metrics: Option<LimiterMetrics>,
}

#[derive(Debug, thiserror::Error)]
#[error("redis limiter: {0}")]
pub struct SetupError(String);

impl RedisLimiter {
    /// Clients for every server of `settings.redis`; connections are made on first use (and
    /// remade after failures), so an edge starts while Redis is down.
    pub fn new(
        settings: LimitsSection,
        metrics: Option<LimiterMetrics>,
    ) -> Result<RedisLimiter, SetupError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CALL_TIMEOUT))
            .set_response_timeout(Some(CALL_TIMEOUT))
            .set_number_of_retries(1);
        let shards = settings
            .redis
            .iter()
            .map(|url| {
                let client =
                    redis::Client::open(url.as_str()).map_err(|e| SetupError(e.to_string()))?;
                ConnectionManager::new_lazy_with_config(client, config.clone())
                    .map_err(|e| SetupError(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if shards.is_empty() {
            return Err(SetupError("no Redis server configured".into()));
        }
        Ok(RedisLimiter {
            settings,
            shards,
            leases: moka::future::Cache::builder()
                .max_capacity(MAX_LEASES)
                .time_to_idle(Duration::from_millis(KEY_TTL_MS))
                .build(),
            backoff_until_ms: AtomicU64::new(0),
            script: redis::Script::new(LEASE_SCRIPT),
            metrics,
        })
    }

    pub fn settings(&self) -> &LimitsSection {
        &self.settings
    }

    fn shard(&self, key: &KeyHash) -> ConnectionManager {
        self.shards[usize::from(key[0]) % self.shards.len()].clone()
    }

    async fn lease(
        leases: &moka::future::Cache<(String, KeyHash), Lease>,
        route: &str,
        key: &KeyHash,
    ) -> Lease {
        leases
            .get_with((route.to_string(), *key), async { Lease::default() })
            .await
    }

    /// Redis keys of a (route, key, minute): a hash tag keeps the pair on one cluster slot.
    fn keys(route: &str, key: &KeyHash, window: u64) -> (String, String) {
        let hex: String = key[..16].iter().map(|b| format!("{b:02x}")).collect();
        let base = format!("meridian:rl:{{{route}:{hex}}}:{window}");
        (format!("{base}:r"), format!("{base}:t"))
    }

    fn slice(&self, max: u32) -> u64 {
        match self.settings.lease {
            0 => u64::from(max / 100).max(1),
            n => u64::from(n),
        }
    }

    fn on_error(&self) -> Result<(), Refusal> {
        let decision = self.settings.on_backend_error;
        if let Some(m) = &self.metrics {
            let label = match decision {
                OnBackendError::Allow => "allow",
                OnBackendError::Deny => "deny",
            };
            m.decisions.with_label_values(&[label]).inc();
        }
        match decision {
            OnBackendError::Allow => Ok(()),
            // Retry soon: the backend is asked again after the back-off, not after the window.
            OnBackendError::Deny => Err((Limit::Requests, 1)),
        }
    }

    fn failed(&self, now_ms: u64, error: &dyn std::fmt::Display) {
        if let Some(m) = &self.metrics {
            m.errors.inc();
        }
        let until = now_ms + BACKOFF_MS;
        if self.backoff_until_ms.swap(until, Ordering::Relaxed) <= now_ms {
            tracing::warn!(%error, "rate-limit backend (Redis) unavailable; applying on_backend_error");
        }
    }

    async fn take_slice(
        &self,
        route: &str,
        key: &KeyHash,
        window: u64,
        max: u32,
    ) -> Result<(u64, u64), redis::RedisError> {
        let (requests_key, tokens_key) = Self::keys(route, key, window);
        let mut connection = self.shard(key);
        let started = Instant::now();
        let mut invocation = self.script.key(requests_key);
        invocation
            .key(tokens_key)
            .arg(max)
            .arg(self.slice(max))
            .arg(KEY_TTL_MS);
        let call = invocation.invoke_async::<(u64, u64)>(&mut connection);
        let result = match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(result) => result,
            Err(_) => Err(redis::RedisError::from((redis::ErrorKind::Io, "timed out"))),
        };
        if let Some(m) = &self.metrics {
            m.latency.observe(started.elapsed().as_secs_f64());
            m.refills.inc();
        }
        result
    }
}

#[async_trait]
impl LimitBackend for RedisLimiter {
    /// Tokens are charged in Redis once a request ends (a reservation would cost a round trip per
    /// request); the fleet-wide total gates the next admissions.
    async fn admit(
        &self,
        route: &str,
        key: &KeyHash,
        limit: &RateLimit,
        _reserve: u64,
        now_ms: u64,
    ) -> Result<Reservation, Refusal> {
        self.admit_request(route, key, limit, now_ms)
            .await
            .map(|()| Reservation::none())
    }

    fn settle(&self, route: &str, key: &KeyHash, _: &Reservation, used: u64, now_ms: u64) {
        if used > 0 {
            self.charge(route, key, used, now_ms);
        }
    }
}

impl RedisLimiter {
    async fn admit_request(
        &self,
        route: &str,
        key: &KeyHash,
        limit: &RateLimit,
        now_ms: u64,
    ) -> Result<(), Refusal> {
        let window = now_ms / WINDOW_MS;
        let retry_after = ((window + 1) * WINDOW_MS)
            .saturating_sub(now_ms)
            .div_ceil(1000)
            .max(1);
        let lease = Self::lease(&self.leases, route, key).await;
        let mut state = lease.lock().await;
        let state = state.current(window);
        if limit
            .tokens_per_minute
            .is_some_and(|max| state.tokens_seen >= max)
        {
            return Err((Limit::Tokens, retry_after));
        }
        let Some(max) = limit.requests_per_minute else {
            return Ok(());
        };
        if state.left > 0 {
            state.left -= 1;
            return Ok(());
        }
        if state.exhausted {
            return Err((Limit::Requests, retry_after));
        }
        if now_ms < self.backoff_until_ms.load(Ordering::Relaxed) {
            return self.on_error();
        }
        match self.take_slice(route, key, window, max).await {
            Ok((granted, tokens)) => {
                state.tokens_seen = state.tokens_seen.max(tokens);
                if granted == 0 {
                    state.exhausted = true;
                    return Err((Limit::Requests, retry_after));
                }
                state.left = granted - 1;
                if limit
                    .tokens_per_minute
                    .is_some_and(|max| state.tokens_seen >= max)
                {
                    return Err((Limit::Tokens, retry_after));
                }
                Ok(())
            }
            Err(e) => {
                self.failed(now_ms, &e);
                self.on_error()
            }
        }
    }

    fn charge(&self, route: &str, key: &KeyHash, tokens: u64, now_ms: u64) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let window = now_ms / WINDOW_MS;
        let leases = self.leases.clone();
        let lease_key = (route.to_string(), *key);
        let (_, tokens_key) = Self::keys(route, key, window);
        let mut connection = self.shard(key);
        let metrics = self.metrics.clone();
        let skip = now_ms < self.backoff_until_ms.load(Ordering::Relaxed);
        runtime.spawn(async move {
            let total = if skip {
                None
            } else {
                let started = Instant::now();
                let mut pipe = redis::pipe();
                pipe.atomic()
                    .incr(&tokens_key, tokens)
                    .pexpire(&tokens_key, KEY_TTL_MS as i64)
                    .ignore();
                let call = pipe.query_async::<(u64,)>(&mut connection);
                let result = tokio::time::timeout(CALL_TIMEOUT, call).await;
                if let Some(m) = &metrics {
                    m.latency.observe(started.elapsed().as_secs_f64());
                }
                match result {
                    Ok(Ok((total,))) => Some(total),
                    _ => {
                        if let Some(m) = &metrics {
                            m.errors.inc();
                        }
                        None
                    }
                }
            };
            let lease = Self::lease(&leases, &lease_key.0, &lease_key.1).await;
            let mut state = lease.lock().await;
            let state = state.current(window);
            state.tokens_seen = match total {
                Some(total) => state.tokens_seen.max(total),
                // Redis missed it: at least this edge remembers what it used.
                None => state.tokens_seen.saturating_add(tokens),
            };
        });
    }
}
