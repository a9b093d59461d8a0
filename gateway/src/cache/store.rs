//! The byte-weighted entry store (moka, TinyLFU admission) plus the small secondary indexes that
//! purge and `Vary` need: primary key → vary names and variants, URL → primary keys (ordered, for
//! prefix purge), tag → keys. The eviction listener keeps the indexes and the gauges in step.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName};
use moka::future::Cache;
use moka::notification::RemovalCause;
use moka::Expiry;
use prometheus::{IntCounter, IntGauge};

use super::key::{CacheKey, PrimaryKey};
use super::policy::Freshness;

/// Fixed per-entry overhead counted in the weight (struct, index entries).
const ENTRY_OVERHEAD: u64 = 256;

/// One stored response variant. Bodies are shared `Bytes` chunks: serving a hit clones refcounts.
#[derive(Debug)]
pub struct CachedResponse {
    /// Unique per insert: lets the eviction listener tell a replaced entry from its replacement.
    pub id: u64,
    pub key: CacheKey,
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<Bytes>,
    pub body_len: u64,
    pub freshness: Freshness,
    pub vary: Vec<HeaderName>,
    /// From `Cache-Tag` and `Surrogate-Key` (comma / space separated).
    pub tags: Vec<String>,
    /// How long the store keeps it at all (fresh + stale windows + revalidation grace).
    pub keep_for: Duration,
    /// The stored header lines in HTTP/1.1 form, made on the first hit that can use them (`None`
    /// inside: this response's head is always built from its header map).
    pub prepared_h1: std::sync::OnceLock<Option<PreparedHead>>,
}

/// A stored response's header lines as HTTP/1.1 writes them (`name: value\r\n` each).
#[derive(Debug)]
pub struct PreparedHead {
    /// The fields left out because the route hides them: the lines serve a hit only while the
    /// route still hides exactly these.
    pub hidden: Vec<HeaderName>,
    pub lines: Box<[u8]>,
}

impl CachedResponse {
    pub fn weight(&self) -> u64 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len())
            .sum();
        let tags: usize = self.tags.iter().map(String::len).sum();
        self.body_len + (headers + tags + self.key.weight()) as u64 + ENTRY_OVERHEAD
    }

    pub fn has_validators(&self) -> bool {
        self.headers.contains_key(http::header::ETAG)
            || self.headers.contains_key(http::header::LAST_MODIFIED)
    }
}

/// Tags named by `Cache-Tag` and `Surrogate-Key` (deduplicated, at most 64 of 128 bytes each).
pub fn tags_of(headers: &HeaderMap) -> Vec<String> {
    let mut tags: Vec<String> = Vec::new();
    for name in ["cache-tag", "surrogate-key"] {
        for value in headers.get_all(name) {
            let Ok(text) = value.to_str() else { continue };
            for tag in text
                .split([',', ' '])
                .map(str::trim)
                .filter(|t| !t.is_empty())
            {
                if tag.len() <= 128 && tags.len() < 64 && !tags.iter().any(|t| t == tag) {
                    tags.push(tag.to_string());
                }
            }
        }
    }
    tags
}

#[derive(Clone)]
pub struct StoreGauges {
    pub bytes: IntGauge,
    pub entries: IntGauge,
    pub evictions: IntCounter,
}

#[derive(Default)]
struct Variants {
    vary: Arc<[HeaderName]>,
    /// variant string → id of the entry stored under it.
    ids: HashMap<String, u64>,
}

/// Seeded per table like SipHash, at a fraction of its cost: every lookup (hit or miss) hashes a
/// key made of the client's URL, in this table and in the entry cache.
type KeyHash = foldhash::fast::RandomState;

#[derive(Default)]
struct Index {
    primaries: HashMap<PrimaryKey, Variants, KeyHash>,
    urls: BTreeMap<String, HashSet<PrimaryKey>>,
    tags: HashMap<String, HashMap<CacheKey, u64>>,
}

impl Index {
    fn add(&mut self, entry: &CachedResponse) {
        let primary = &entry.key.primary;
        let variants = self.primaries.entry(primary.clone()).or_default();
        variants.vary = entry.vary.clone().into();
        variants.ids.insert(entry.key.variant.clone(), entry.id);
        self.urls
            .entry(primary.url.clone())
            .or_default()
            .insert(primary.clone());
        for tag in &entry.tags {
            self.tags
                .entry(tag.clone())
                .or_default()
                .insert(entry.key.clone(), entry.id);
        }
    }

    /// Forgets `entry` unless a newer entry has taken its key.
    fn remove(&mut self, entry: &CachedResponse) {
        let primary = &entry.key.primary;
        if let Some(variants) = self.primaries.get_mut(primary) {
            if variants.ids.get(&entry.key.variant) == Some(&entry.id) {
                variants.ids.remove(&entry.key.variant);
            }
            if variants.ids.is_empty() {
                self.primaries.remove(primary);
                if let Some(set) = self.urls.get_mut(&primary.url) {
                    set.remove(primary);
                    if set.is_empty() {
                        self.urls.remove(&primary.url);
                    }
                }
            }
        }
        for tag in &entry.tags {
            if let Some(keys) = self.tags.get_mut(tag) {
                if keys.get(&entry.key) == Some(&entry.id) {
                    keys.remove(&entry.key);
                }
                if keys.is_empty() {
                    self.tags.remove(tag);
                }
            }
        }
    }

    fn keys_of<'a>(&'a self, primary: &'a PrimaryKey) -> impl Iterator<Item = CacheKey> + 'a {
        self.primaries.get(primary).into_iter().flat_map(move |v| {
            v.ids.keys().map(move |variant| CacheKey {
                primary: primary.clone(),
                variant: variant.clone(),
            })
        })
    }
}

struct KeepFor;

impl Expiry<CacheKey, Arc<CachedResponse>> for KeepFor {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Arc<CachedResponse>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.keep_for)
    }

    fn expire_after_update(
        &self,
        _key: &CacheKey,
        value: &Arc<CachedResponse>,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.keep_for)
    }
}

pub struct Store {
    cache: Cache<CacheKey, Arc<CachedResponse>, KeyHash>,
    index: Arc<Mutex<Index>>,
    max_object_bytes: u64,
    next_id: AtomicU64,
}

fn lock(index: &Mutex<Index>) -> MutexGuard<'_, Index> {
    // The index holds no invariant a panicking holder could break halfway in a harmful way:
    // stale entries only make purge try keys that are already gone.
    index
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Store {
    pub fn new(max_bytes: u64, max_object_bytes: u64, gauges: StoreGauges) -> Self {
        let index: Arc<Mutex<Index>> = Arc::default();
        let listener_index = Arc::clone(&index);
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_k: &CacheKey, v: &Arc<CachedResponse>| {
                u32::try_from(v.weight()).unwrap_or(u32::MAX)
            })
            .expire_after(KeepFor)
            .eviction_listener(
                move |_key: Arc<CacheKey>, value: Arc<CachedResponse>, cause| {
                    lock(&listener_index).remove(&value);
                    gauges
                        .bytes
                        .sub(i64::try_from(value.weight()).unwrap_or(i64::MAX));
                    gauges.entries.dec();
                    if cause == RemovalCause::Size {
                        gauges.evictions.inc();
                    }
                },
            )
            .build_with_hasher(KeyHash::default());
        Self {
            cache,
            index,
            max_object_bytes,
            next_id: AtomicU64::new(1),
        }
    }

    pub fn max_object_bytes(&self) -> u64 {
        self.max_object_bytes
    }

    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The `Vary` names of the newest stored variant of `primary` (empty: no `Vary`); `None` when
    /// nothing is stored for it.
    pub fn vary_of(&self, primary: &PrimaryKey) -> Option<Arc<[HeaderName]>> {
        lock(&self.index)
            .primaries
            .get(primary)
            .map(|v| Arc::clone(&v.vary))
    }

    pub async fn get(&self, key: &CacheKey) -> Option<Arc<CachedResponse>> {
        self.cache.get(key).await
    }

    /// Stores `entry` unless its body is over `max_object_bytes`. Returns whether it was offered to
    /// the cache (moka's admission policy may still decline it under pressure).
    pub async fn insert(&self, entry: Arc<CachedResponse>, gauges: &StoreGauges) -> bool {
        if entry.body_len > self.max_object_bytes {
            return false;
        }
        lock(&self.index).add(&entry);
        gauges
            .bytes
            .add(i64::try_from(entry.weight()).unwrap_or(i64::MAX));
        gauges.entries.inc();
        self.cache.insert(entry.key.clone(), entry).await;
        true
    }

    pub async fn remove(&self, key: &CacheKey) -> bool {
        self.cache.remove(key).await.is_some()
    }

    /// Every variant of every key whose normalised URL equals `url`.
    pub async fn purge_url(&self, url: &str) -> usize {
        let keys: Vec<CacheKey> = {
            let index = lock(&self.index);
            index
                .urls
                .get(url)
                .into_iter()
                .flatten()
                .flat_map(|p| index.keys_of(p))
                .collect()
        };
        self.remove_all(keys).await
    }

    /// Every entry whose normalised URL starts with `prefix` (e.g. `https://host/static/`).
    pub async fn purge_prefix(&self, prefix: &str) -> usize {
        let keys: Vec<CacheKey> = {
            let index = lock(&self.index);
            index
                .urls
                .range(prefix.to_string()..)
                .take_while(|(url, _)| url.starts_with(prefix))
                .flat_map(|(_, primaries)| primaries.iter())
                .flat_map(|p| index.keys_of(p))
                .collect()
        };
        self.remove_all(keys).await
    }

    pub async fn purge_tag(&self, tag: &str) -> usize {
        let keys: Vec<CacheKey> = lock(&self.index)
            .tags
            .get(tag)
            .map(|keys| keys.keys().cloned().collect())
            .unwrap_or_default();
        self.remove_all(keys).await
    }

    async fn remove_all(&self, keys: Vec<CacheKey>) -> usize {
        let mut removed = 0;
        for key in keys {
            if self.cache.remove(&key).await.is_some() {
                removed += 1;
            }
        }
        removed
    }

    /// Applies pending evictions and listener calls now (tests, and before reading gauges).
    pub async fn sync(&self) {
        self.cache.run_pending_tasks().await;
    }

    pub fn weighted_size(&self) -> u64 {
        self.cache.weighted_size()
    }
}
