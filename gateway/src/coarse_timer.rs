//! Coarse deadlines for the waits on the request path: the keep-alive wait for a connection's
//! next request, the reads of a head or body, the wait for an upstream's answer, and the writes.
//!
//! Why: a tokio timer is entered into the runtime's timer wheel under the time driver's lock when
//! its wait starts, and taken out again, under the lock, when the work wins; with the clock reads
//! and deadline arithmetic around it that was about a twentieth of the instructions of a proxied
//! request, for bounds (seconds long) that almost never fire. Here work that is ready at its
//! first poll touches nothing; a wait that has to block takes a slot in its thread's list (a
//! vector index, no lock, no allocation once the list has grown), and one sweeper task per thread
//! wakes the overdue ones every [`TICK`]. A bound therefore ends between its deadline and one
//! tick after it, and a connection waiting for its next request holds a few words of wait state
//! rather than a timer entry.
//!
//! The list is per thread, so it serves only current-thread runtimes (each edge worker thread
//! runs one), on which a task never changes threads. Anywhere else (a work-stealing runtime, a
//! thread without a runtime) a wait falls back to tokio's timer. The list remembers which runtime
//! its sweeper runs on: a wait under another one (the thread now drives a new runtime) starts a
//! sweeper there, and the old one ends when it sees it was replaced.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::runtime::{Handle, Id, RuntimeFlavor};
use tokio::time::{Instant, Sleep};

/// The work did not finish within its bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Elapsed;

/// How often a thread's overdue waits are woken: how late a bound may end.
pub const TICK: Duration = Duration::from_millis(50);
/// Ticks a sweeper goes on with nothing waiting before it stops (the next wait restarts it), so
/// an idle process does not wake every tick.
const IDLE_TICKS: u32 = 20;

/// `work`, unless it is still waiting `limit` after its first wait began. Work that is ready at
/// its first poll never touches the list.
pub fn timeout<F: Future>(limit: Duration, work: F) -> Bounded<F> {
    within(Due::After(limit), work)
}

/// `work`, unless it is still waiting at `deadline`. Work that is ready at its first poll is not
/// cut, even when the deadline has passed.
pub fn timeout_at<F: Future>(deadline: Instant, work: F) -> Bounded<F> {
    within(Due::At(deadline), work)
}

/// `work` bounded by `due`.
pub fn within<F: Future>(due: Due, work: F) -> Bounded<F> {
    Bounded {
        work,
        wait: Wait::Unregistered(due),
    }
}

/// When a bound ends.
#[derive(Clone, Copy, Debug)]
pub enum Due {
    At(Instant),
    /// Counted from the first poll that finds the work waiting.
    After(Duration),
}

pin_project_lite::pin_project! {
    /// A future bounded in time: its work and where its wait stands, nothing else (an idle
    /// connection holds one).
    pub struct Bounded<F> {
        #[pin]
        work: F,
        wait: Wait,
    }
}

enum Wait {
    /// The work has not had to wait yet.
    Unregistered(Due),
    Slot(Slot),
    /// Not on a swept thread: tokio's timer. Boxed: rare, and it would size every bound.
    Fallback(Pin<Box<Sleep>>),
}

impl<F: Future> Future for Bounded<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.work.poll(cx) {
            return Poll::Ready(Ok(output));
        }
        let expired = match this.wait {
            Wait::Slot(slot) => slot.expired(cx.waker()),
            Wait::Fallback(sleep) => sleep.as_mut().poll(cx).is_ready(),
            Wait::Unregistered(due) => match register(*due, cx.waker()) {
                Registered::Slot(slot) => {
                    *this.wait = Wait::Slot(slot);
                    false
                }
                Registered::Overdue => true,
                Registered::Unswept(deadline) => {
                    let mut sleep = Box::pin(tokio::time::sleep_until(deadline));
                    let ready = sleep.as_mut().poll(cx).is_ready();
                    *this.wait = Wait::Fallback(sleep);
                    ready
                }
            },
        };
        if expired {
            Poll::Ready(Err(Elapsed))
        } else {
            Poll::Pending
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Free,
    Waiting,
    Fired,
}

struct Entry {
    due: Instant,
    waker: Option<Waker>,
    state: State,
    /// Bumped when the slot is freed, so a stale handle never touches its next user.
    generation: u32,
}

#[derive(Default)]
struct Wheel {
    entries: Vec<Entry>,
    free: Vec<u32>,
    waiting: usize,
    /// The runtime the current sweeper runs on; `None`: no sweeper.
    runtime: Option<Id>,
    /// The current sweeper (unique in the process); an older one that wakes up finds another
    /// number and ends.
    sweeper: u64,
    idle_ticks: u32,
    /// Wakers of overdue waits, kept to be woken outside the borrow (reused between ticks).
    overdue: Vec<Waker>,
}

thread_local! {
    static WHEEL: RefCell<Wheel> = RefCell::new(Wheel::default());
}

/// A wait's place in its thread's list; freed when dropped.
struct Slot {
    index: u32,
    generation: u32,
    /// The address of the list it is in: the thread's identity.
    wheel: usize,
}

enum Registered {
    Slot(Slot),
    /// The deadline has already passed.
    Overdue,
    /// No sweeper can run on this thread: wait with tokio's timer instead.
    Unswept(Instant),
}

fn wheel_id(wheel: &RefCell<Wheel>) -> usize {
    std::ptr::from_ref(wheel) as usize
}

fn register(due: Due, waker: &Waker) -> Registered {
    let now = Instant::now();
    let deadline = match due {
        Due::At(deadline) => deadline,
        Due::After(limit) => now + limit,
    };
    if deadline <= now {
        return Registered::Overdue;
    }
    let registered = WHEEL.try_with(|cell| {
        let mut wheel = cell.borrow_mut();
        if !wheel.swept() {
            return None;
        }
        let index = wheel.insert(deadline, waker.clone());
        let generation = wheel.entries[index as usize].generation;
        Some(Slot {
            index,
            generation,
            wheel: wheel_id(cell),
        })
    });
    match registered {
        Ok(Some(slot)) => Registered::Slot(slot),
        _ => Registered::Unswept(deadline),
    }
}

impl Slot {
    /// Whether the sweeper found this wait overdue; otherwise it will wake `waker` when it does.
    fn expired(&self, waker: &Waker) -> bool {
        let seen = WHEEL.try_with(|cell| {
            if wheel_id(cell) != self.wheel {
                // Polled on another thread than it was registered on (a task moved between
                // runtimes): nothing would ever wake it here, so the bound ends now rather than
                // never.
                return (true, None);
            }
            let mut wheel = cell.borrow_mut();
            let Some(entry) = wheel.entries.get_mut(self.index as usize) else {
                return (true, None);
            };
            if entry.generation != self.generation || entry.state != State::Waiting {
                return (true, None);
            }
            if entry.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
                return (false, None);
            }
            (false, entry.waker.replace(waker.clone()))
        });
        // A replaced waker is dropped here, outside the borrow: dropping the last one of a task
        // frees it.
        seen.map_or(true, |(expired, _replaced)| expired)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // The waker is dropped outside the borrow, as in `expired`.
        let _waker = WHEEL.try_with(|cell| {
            if wheel_id(cell) == self.wheel {
                cell.borrow_mut().release(self.index, self.generation)
            } else {
                None
            }
        });
    }
}

impl Wheel {
    /// Whether a sweeper runs on this thread's runtime, starting one if that is a current-thread
    /// runtime and none does.
    fn swept(&mut self) -> bool {
        let Ok(runtime) = Handle::try_current() else {
            return false;
        };
        if runtime.runtime_flavor() != RuntimeFlavor::CurrentThread {
            return false;
        }
        let id = runtime.id();
        if self.runtime == Some(id) {
            return true;
        }
        static SWEEPERS: AtomicU64 = AtomicU64::new(0);
        self.sweeper = SWEEPERS.fetch_add(1, Ordering::Relaxed) + 1;
        self.runtime = Some(id);
        self.idle_ticks = 0;
        runtime.spawn(sweep(self.sweeper));
        true
    }

    fn insert(&mut self, due: Instant, waker: Waker) -> u32 {
        self.waiting += 1;
        if let Some(index) = self.free.pop() {
            let entry = &mut self.entries[index as usize];
            entry.due = due;
            entry.waker = Some(waker);
            entry.state = State::Waiting;
            return index;
        }
        let index = u32::try_from(self.entries.len()).unwrap_or(u32::MAX);
        self.entries.push(Entry {
            due,
            waker: Some(waker),
            state: State::Waiting,
            generation: 0,
        });
        index
    }

    /// Frees a slot; returns its waker, to be dropped once the list is no longer borrowed.
    fn release(&mut self, index: u32, generation: u32) -> Option<Waker> {
        let entry = self.entries.get_mut(index as usize)?;
        if entry.generation != generation || entry.state == State::Free {
            return None;
        }
        if entry.state == State::Waiting {
            self.waiting -= 1;
        }
        entry.state = State::Free;
        entry.generation = entry.generation.wrapping_add(1);
        let waker = entry.waker.take();
        self.free.push(index);
        waker
    }

    /// Marks every wait due by `now` as fired and moves its waker to `self.overdue`.
    fn sweep(&mut self, now: Instant) {
        if self.waiting == 0 {
            return;
        }
        for entry in &mut self.entries {
            if entry.state == State::Waiting && entry.due <= now {
                entry.state = State::Fired;
                self.waiting -= 1;
                if let Some(waker) = entry.waker.take() {
                    self.overdue.push(waker);
                }
            }
        }
    }
}

/// The sweeper of this thread's list: wakes overdue waits every [`TICK`]; ends when a newer one
/// took over, or after [`IDLE_TICKS`] with nothing waiting.
async fn sweep(id: u64) {
    let mut overdue = Vec::new();
    loop {
        tokio::time::sleep(TICK).await;
        let now = Instant::now();
        let go_on = WHEEL
            .try_with(|cell| {
                let mut wheel = cell.borrow_mut();
                if wheel.sweeper != id {
                    return false;
                }
                if wheel.waiting == 0 {
                    wheel.idle_ticks += 1;
                    if wheel.idle_ticks > IDLE_TICKS {
                        wheel.runtime = None;
                        return false;
                    }
                    return true;
                }
                wheel.idle_ticks = 0;
                std::mem::swap(&mut wheel.overdue, &mut overdue);
                wheel.sweep(now);
                std::mem::swap(&mut wheel.overdue, &mut overdue);
                true
            })
            .unwrap_or(false);
        // Woken outside the borrow: a waker may run code that waits again.
        for waker in overdue.drain(..) {
            waker.wake();
        }
        if !go_on {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting_here() -> usize {
        WHEEL.with(|cell| cell.borrow().waiting)
    }

    #[tokio::test(start_paused = true)]
    async fn ready_work_takes_no_slot_and_waiting_work_is_cut_within_a_tick() {
        assert_eq!(timeout(Duration::ZERO, async { 7 }).await, Ok(7));
        assert_eq!(
            timeout_at(Instant::now(), async { 8 }).await,
            Ok(8),
            "a deadline already passed does not cut work that is ready"
        );
        assert_eq!(waiting_here(), 0);

        let started = Instant::now();
        let never = std::future::pending::<()>();
        assert_eq!(timeout(Duration::from_secs(5), never).await, Err(Elapsed));
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(5) && waited <= Duration::from_secs(5) + TICK,
            "cut after {waited:?}"
        );
        assert_eq!(waiting_here(), 0, "a fired wait leaves the list");

        let soon = tokio::time::sleep(Duration::from_secs(2));
        assert_eq!(timeout(Duration::from_secs(3), soon).await, Ok(()));
        assert_eq!(waiting_here(), 0, "a finished wait frees its slot");

        let due = Instant::now() + Duration::from_secs(3);
        let late = tokio::time::sleep(Duration::from_secs(4));
        assert_eq!(timeout_at(due, late).await, Err(Elapsed));
    }

    #[tokio::test(start_paused = true)]
    async fn many_waits_each_end_at_their_own_deadline_and_slots_are_reused() {
        let started = Instant::now();
        let mut waits = tokio::task::JoinSet::new();
        for i in 1..=20u64 {
            waits.spawn(async move {
                let limit = Duration::from_millis(300 * i);
                let result = timeout(limit, std::future::pending::<()>()).await;
                (i, result, started.elapsed())
            });
        }
        while let Some(ended) = waits.join_next().await {
            let (i, result, at) = ended.expect("wait task");
            let limit = Duration::from_millis(300 * i);
            assert_eq!(result, Err(Elapsed));
            assert!(at >= limit && at <= limit + TICK, "wait {i} cut at {at:?}");
        }
        let grown = WHEEL.with(|cell| cell.borrow().entries.len());
        for _ in 0..3 {
            let _ = timeout(Duration::from_millis(100), std::future::pending::<()>()).await;
        }
        assert_eq!(
            WHEEL.with(|cell| cell.borrow().entries.len()),
            grown,
            "freed slots are taken again"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_work_stealing_runtime_falls_back_to_tokio_timers() {
        let never = std::future::pending::<()>();
        assert_eq!(
            timeout(Duration::from_millis(20), never).await,
            Err(Elapsed)
        );
        assert_eq!(waiting_here(), 0);
        assert_eq!(timeout(Duration::from_secs(5), async { 1 }).await, Ok(1));
    }

    #[test]
    fn a_dropped_runtime_does_not_strand_the_next_one_on_the_thread() {
        let first = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime");
        first.block_on(async {
            let never = std::future::pending::<()>();
            assert_eq!(timeout(Duration::from_secs(1), never).await, Err(Elapsed));
        });
        drop(first);
        let second = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime");
        second.block_on(async {
            let never = std::future::pending::<()>();
            assert_eq!(timeout(Duration::from_secs(1), never).await, Err(Elapsed));
        });
    }
}
