//! Request coalescing: the first miss for a primary key becomes the leader and fetches; identical
//! misses that arrive meanwhile follow, waiting (bounded) for the leader's stored entry. A leader
//! that cannot store (error, not storable, too large) releases its followers at once, and they
//! fetch on their own. The same mechanism makes stale-while-revalidate refresh only once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

use super::key::PrimaryKey;
use super::store::CachedResponse;

#[derive(Clone, Debug)]
pub enum Outcome {
    Pending,
    Stored(Arc<CachedResponse>),
    /// The leader fetched nothing storable: fetch yourself.
    Failed,
}

type Flights = Arc<Mutex<HashMap<PrimaryKey, watch::Sender<Outcome>>>>;

#[derive(Default)]
pub struct Coalescer {
    flights: Flights,
}

pub enum Join {
    Leader(LeaderGuard),
    Follower(watch::Receiver<Outcome>),
}

fn lock(
    flights: &Mutex<HashMap<PrimaryKey, watch::Sender<Outcome>>>,
) -> MutexGuard<'_, HashMap<PrimaryKey, watch::Sender<Outcome>>> {
    flights
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Coalescer {
    /// Leads a new flight for `key`, or follows the one in progress.
    pub fn join(&self, key: &PrimaryKey) -> Join {
        let mut flights = lock(&self.flights);
        if let Some(tx) = flights.get(key) {
            return Join::Follower(tx.subscribe());
        }
        let (tx, _) = watch::channel(Outcome::Pending);
        flights.insert(key.clone(), tx.clone());
        Join::Leader(LeaderGuard {
            flights: Arc::clone(&self.flights),
            key: key.clone(),
            tx,
            done: false,
        })
    }

    /// Leads only if nobody else is fetching `key` (background refresh: at most one at a time).
    pub fn try_lead(&self, key: &PrimaryKey) -> Option<LeaderGuard> {
        match self.join(key) {
            Join::Leader(guard) => Some(guard),
            Join::Follower(_) => None,
        }
    }

    pub fn in_flight(&self) -> usize {
        lock(&self.flights).len()
    }
}

/// Waits up to `timeout` for the leader. `None`: timed out, or the leader could not store.
pub async fn follow(
    mut rx: watch::Receiver<Outcome>,
    timeout: Duration,
) -> Option<Arc<CachedResponse>> {
    let waited =
        tokio::time::timeout(timeout, rx.wait_for(|o| !matches!(o, Outcome::Pending))).await;
    match waited {
        Ok(Ok(outcome)) => match &*outcome {
            Outcome::Stored(entry) => Some(Arc::clone(entry)),
            Outcome::Pending | Outcome::Failed => None,
        },
        // Timed out, or the leader vanished without a word (its guard always sends; belt and braces).
        _ => None,
    }
}

/// Held by the request that fetches. Dropping it without [`LeaderGuard::complete`] releases the
/// followers with `Failed`.
pub struct LeaderGuard {
    flights: Flights,
    key: PrimaryKey,
    tx: watch::Sender<Outcome>,
    done: bool,
}

impl LeaderGuard {
    pub fn key(&self) -> &PrimaryKey {
        &self.key
    }

    /// Publishes the outcome. Call after the entry is in the store, so a request arriving between
    /// the flight ending and the publish finds it there instead of starting a second fetch.
    pub fn complete(mut self, entry: Option<Arc<CachedResponse>>) {
        self.finish(entry.map_or(Outcome::Failed, Outcome::Stored));
    }

    fn finish(&mut self, outcome: Outcome) {
        if self.done {
            return;
        }
        self.done = true;
        {
            let mut flights = lock(&self.flights);
            if flights
                .get(&self.key)
                .is_some_and(|tx| tx.same_channel(&self.tx))
            {
                flights.remove(&self.key);
            }
        }
        self.tx.send_replace(outcome);
    }
}

impl Drop for LeaderGuard {
    fn drop(&mut self) {
        self.finish(Outcome::Failed);
    }
}
