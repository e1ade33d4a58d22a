//! The pager: the byte budget of resident paged values, the CLOCK ring that picks what to
//! evict, and the worker thread that evicts when the budget is exceeded.
//!
//! A paged value (a [`PagableArc`](crate::PagableArc)'s slot) reaches the pager through
//! [`PagableStorage::schedule_for_paging`](crate::PagableStorage::schedule_for_paging) whenever
//! it becomes resident (created, or faulted back in). From then on its weight counts in
//! [`Account::resident_bytes`] until it is evicted or dropped; the slot itself keeps the count
//! exact, so the ring never needs to know weights.
//!
//! Eviction is CLOCK (second chance): the hand walks the ring; a value whose referenced bit is
//! set (it was pinned since the hand last passed) gets the bit cleared and is skipped once; a
//! pinned value is skipped; anything else is evicted: dropped at once if it has a key, else
//! serialized and stored first. An eviction that fails leaves the value resident, counts the
//! failure and logs it.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use super::storage::PagableStorage;

/// How often an idle worker checks the budget even without being woken.
const WORKER_TICK: Duration = Duration::from_millis(200);

/// Evictions go below the budget by `budget / SLACK`, so a resident set at the budget does
/// not wake the worker (or a helper) for every fault; and a thread that makes a value resident
/// while resident bytes are over the budget by more than that evicts itself, so threads that
/// create values faster than the worker pages them out cannot push memory far past the budget.
const SLACK: usize = 16;

/// A resident paged value, as the pager sees it.
pub(crate) trait Evictable: Send + Sync + 'static {
    /// Starts counting the value against `account` if it is resident and not counted yet;
    /// returns whether it was (so the ring holds each resident value once).
    fn track(&self, account: &Arc<Account>) -> bool;

    /// Clears the referenced bit and returns what it was.
    fn take_referenced(&self) -> bool;

    /// Pages the value out unless it is pinned; a value without a key is stored in `storage`.
    fn evict(&self, storage: &Arc<dyn PagableStorage>) -> Eviction;
}

/// What [`Evictable::evict`] did.
pub(crate) enum Eviction {
    /// Someone holds the value: it stays.
    Pinned,
    /// The value is no longer resident (it was dropped or evicted meanwhile).
    NotResident,
    /// Dropped from memory; `serialized` says whether it had to be serialized and stored first.
    Evicted { serialized: bool },
    /// Serializing or storing it failed; it stays resident.
    Failed(anyhow::Error),
}

/// The pager's figures, shared with the paged values that count themselves in it.
#[derive(Default)]
pub(crate) struct Account {
    /// Weight of the values that are resident and tracked.
    pub(crate) resident_bytes: AtomicUsize,
    /// Values resident and tracked.
    pub(crate) resident_values: AtomicUsize,
    pub(crate) faults: AtomicU64,
    pub(crate) evictions: AtomicU64,
    pub(crate) clean_evictions: AtomicU64,
    pub(crate) serializations: AtomicU64,
    pub(crate) eviction_failures: AtomicU64,
}

impl Account {
    /// Counts a value of `weight` bytes as resident.
    pub(crate) fn add(&self, weight: usize) {
        self.resident_bytes.fetch_add(weight, Ordering::AcqRel);
        self.resident_values.fetch_add(1, Ordering::AcqRel);
    }

    /// Stops counting a value of `weight` bytes.
    pub(crate) fn remove(&self, weight: usize) {
        self.resident_bytes.fetch_sub(weight, Ordering::AcqRel);
        self.resident_values.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What [`WithRuntime::page_out_unpinned`](crate::WithRuntime::page_out_unpinned) did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PageOutReport {
    /// Values dropped from memory.
    pub evicted: u64,
    /// Of those, values that had to be serialized and stored first (the rest had a key).
    pub serialized: u64,
    /// Values left resident because they are pinned.
    pub pinned: u64,
    /// Values left resident because their eviction failed (see the log for why).
    pub failed: u64,
}

/// A snapshot of a storage's paging figures.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PagingStats {
    /// The budget for resident paged values, in bytes (`usize::MAX`: none).
    pub budget_bytes: usize,
    /// Bytes of paged values resident now (each weighs its serialized size once known, else
    /// its inline size).
    pub resident_bytes: usize,
    /// Paged values resident now.
    pub resident_values: usize,
    /// Paged-out values faulted back in.
    pub faults: u64,
    /// Values dropped from memory by the worker or `page_out_unpinned`.
    pub evictions: u64,
    /// Of those, values that had a key and cost no I/O.
    pub clean_evictions: u64,
    /// Values serialized to be paged out (an unchanged value is serialized at most once).
    pub serializations: u64,
    /// Evictions that failed and left the value resident.
    pub eviction_failures: u64,
}

/// Inbox entries that make `track` move them into the ring and look for dead ones.
const INBOX_CLEANUP: usize = 4096;

/// The ring of tracked values and the hand that walks it.
#[derive(Default)]
struct Ring {
    slots: Vec<Weak<dyn Evictable>>,
    hand: usize,
    /// Entries left by the last cleanup of dead ones.
    live_after_cleanup: usize,
}

/// Signals for the worker.
#[derive(Default)]
struct Signal {
    wake: bool,
    shutdown: bool,
}

/// One storage's pager: shared by the runtime, its worker thread and nothing else.
pub(crate) struct Pager {
    /// The storage evictions store into, held weakly (see `WithRuntime`'s drop order).
    storage: Weak<dyn PagableStorage>,
    budget: AtomicUsize,
    account: Arc<Account>,
    /// Values tracked since the worker last looked: pushing never waits for an eviction.
    inbox: Mutex<Vec<Weak<dyn Evictable>>>,
    ring: Mutex<Ring>,
    signal: Mutex<Signal>,
    wakeup: Condvar,
    worker_started: AtomicBool,
}

impl Pager {
    pub(crate) fn new(budget: usize, storage: Weak<dyn PagableStorage>) -> Self {
        Self {
            storage,
            budget: AtomicUsize::new(budget),
            account: Arc::default(),
            inbox: Mutex::default(),
            ring: Mutex::default(),
            signal: Mutex::default(),
            wakeup: Condvar::new(),
            worker_started: AtomicBool::new(false),
        }
    }

    pub(crate) fn set_budget(&self, budget: usize) {
        self.budget.store(budget, Ordering::Release);
    }

    pub(crate) fn budget(&self) -> usize {
        self.budget.load(Ordering::Acquire)
    }

    /// Tracks `slot` if it is resident and not tracked yet; wakes the worker when the budget
    /// is exceeded. Never blocks on an eviction.
    pub(crate) fn track(&self, slot: Arc<dyn Evictable>) -> bool {
        if !slot.track(&self.account) {
            return false;
        }
        let arrived = {
            let mut inbox = lock(&self.inbox);
            inbox.push(Arc::downgrade(&slot));
            inbox.len()
        };
        // Values that were dropped without an eviction leave dead entries; without a budget
        // nothing walks the ring, so clean it whenever it has doubled since the last time.
        if arrived >= INBOX_CLEANUP {
            if let Ok(ring) = self.ring.try_lock() {
                let mut ring = self.with_arrivals(ring);
                if ring.slots.len() >= 2 * ring.live_after_cleanup.max(INBOX_CLEANUP / 2) {
                    ring.slots.retain(|slot| slot.strong_count() > 0);
                    ring.live_after_cleanup = ring.slots.len();
                }
            }
        }
        if self.over_budget() {
            self.wake();
        }
        true
    }

    fn over_budget(&self) -> bool {
        self.account.resident_bytes.load(Ordering::Acquire) > self.budget()
    }

    /// Whether the worker thread should be started: the first time the budget is exceeded.
    pub(crate) fn needs_worker(&self) -> bool {
        self.over_budget() && !self.worker_started.load(Ordering::Acquire)
    }

    /// Marks the worker as started; false if another caller already did.
    pub(crate) fn claim_worker(&self) -> bool {
        self.worker_started
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    fn wake(&self) {
        lock(&self.signal).wake = true;
        self.wakeup.notify_one();
    }

    fn stopping(&self) -> bool {
        lock(&self.signal).shutdown
    }

    /// Asks the worker to stop; it does within one eviction.
    pub(crate) fn shutdown(&self) {
        lock(&self.signal).shutdown = true;
        self.wakeup.notify_all();
    }

    pub(crate) fn stats(&self) -> PagingStats {
        let a = &self.account;
        PagingStats {
            budget_bytes: self.budget(),
            resident_bytes: a.resident_bytes.load(Ordering::Acquire),
            resident_values: a.resident_values.load(Ordering::Acquire),
            faults: a.faults.load(Ordering::Relaxed),
            evictions: a.evictions.load(Ordering::Relaxed),
            clean_evictions: a.clean_evictions.load(Ordering::Relaxed),
            serializations: a.serializations.load(Ordering::Relaxed),
            eviction_failures: a.eviction_failures.load(Ordering::Relaxed),
        }
    }

    /// Where evictions stop: a little below the budget (see [`SLACK`]).
    fn low_watermark(&self) -> usize {
        let budget = self.budget();
        budget - budget / SLACK
    }

    /// Whether resident bytes are so far over the budget that the thread adding more should
    /// evict itself (see [`SLACK`]).
    fn far_over_budget(&self) -> bool {
        let budget = self.budget();
        let resident = self.account.resident_bytes.load(Ordering::Acquire);
        resident > budget.saturating_add(budget / SLACK)
    }

    /// Evicts on the calling thread, down to the low watermark, if resident bytes are far over
    /// the budget (waiting for an eviction in progress on another thread first). Does nothing
    /// on a thread that is evicting already: a `Serialize` impl run by an eviction that creates
    /// values would otherwise wait for itself.
    /// `storage` is called only when the thread does help (the common case costs nothing).
    pub(crate) fn help(&self, storage: impl FnOnce() -> Arc<dyn PagableStorage>) {
        if !self.far_over_budget() || EVICTING.get() {
            return;
        }
        let ring = if NO_WAIT.get() {
            // An async caller (or code under a slot's lock): help only if nobody evicts.
            match self.ring.try_lock() {
                Ok(ring) => ring,
                Err(_) => return,
            }
        } else {
            lock(&self.ring)
        };
        self.evict_to(self.low_watermark(), &storage(), ring);
    }

    /// The worker's pass: evicts down to the low watermark.
    fn evict_to_budget(&self) {
        let Some(storage) = self.storage.upgrade() else {
            return;
        };
        let ring = lock(&self.ring);
        self.evict_to(self.low_watermark(), &storage, ring);
    }

    /// Evicts by CLOCK until resident bytes are at most `target` or every value was looked at
    /// twice (the rest are pinned, referenced twice, or failed).
    fn evict_to(
        &self,
        target: usize,
        storage: &Arc<dyn PagableStorage>,
        ring: MutexGuard<'_, Ring>,
    ) {
        let _evicting = Evicting::enter();
        let mut ring = self.with_arrivals(ring);
        let mut steps = 2 * ring.slots.len();
        let above = |pager: &Pager| pager.account.resident_bytes.load(Ordering::Acquire) > target;
        while above(self) && steps > 0 && !ring.slots.is_empty() && !self.stopping() {
            steps -= 1;
            let at = ring.hand % ring.slots.len();
            let Some(slot) = ring.slots[at].upgrade() else {
                ring.slots.swap_remove(at);
                continue;
            };
            if slot.take_referenced() {
                ring.hand = at + 1;
                continue;
            }
            match self.evict_one(&*slot, storage) {
                Eviction::Evicted { .. } | Eviction::NotResident => {
                    ring.slots.swap_remove(at);
                }
                Eviction::Pinned | Eviction::Failed(_) => ring.hand = at + 1,
            }
        }
    }

    /// Evicts every tracked value that is not pinned now, ignoring referenced bits.
    pub(crate) fn page_out_unpinned(&self, storage: &Arc<dyn PagableStorage>) -> PageOutReport {
        let _evicting = Evicting::enter();
        let mut report = PageOutReport::default();
        let mut ring = self.ring();
        let slots = std::mem::take(&mut ring.slots);
        for weak in slots {
            let Some(slot) = weak.upgrade() else { continue };
            match self.evict_one(&*slot, storage) {
                Eviction::Evicted { serialized } => {
                    report.evicted += 1;
                    report.serialized += u64::from(serialized);
                }
                Eviction::NotResident => {}
                Eviction::Pinned => {
                    report.pinned += 1;
                    ring.slots.push(weak);
                }
                Eviction::Failed(_) => {
                    report.failed += 1;
                    ring.slots.push(weak);
                }
            }
        }
        ring.hand = 0;
        report
    }

    /// Evicts `slot`, counting the outcome.
    fn evict_one(&self, slot: &dyn Evictable, storage: &Arc<dyn PagableStorage>) -> Eviction {
        let outcome = slot.evict(storage);
        let a = &self.account;
        match &outcome {
            Eviction::Evicted { serialized } => {
                a.evictions.fetch_add(1, Ordering::Relaxed);
                if !serialized {
                    a.clean_evictions.fetch_add(1, Ordering::Relaxed);
                }
            }
            Eviction::Failed(err) => {
                a.eviction_failures.fetch_add(1, Ordering::Relaxed);
                log::warn!("pagestore: a value stays in memory, its page-out failed: {err:#}");
            }
            Eviction::Pinned | Eviction::NotResident => {}
        }
        outcome
    }

    /// The ring, with the values tracked since the last look moved in.
    fn ring(&self) -> MutexGuard<'_, Ring> {
        self.with_arrivals(lock(&self.ring))
    }

    /// Moves the values tracked since the last look into `ring`.
    fn with_arrivals<'a>(&self, mut ring: MutexGuard<'a, Ring>) -> MutexGuard<'a, Ring> {
        let arrived = std::mem::take(&mut *lock(&self.inbox));
        ring.slots.extend(arrived);
        ring
    }

    /// Drops ring entries whose value is gone.
    pub(crate) fn prune(&self) {
        let mut ring = self.ring();
        ring.slots.retain(|slot| slot.strong_count() > 0);
        ring.slots.shrink_to_fit();
    }
}

/// Starts the worker of `pager`: it holds the pager weakly and stops when asked or when the
/// pager is gone, so it never keeps a store alive.
pub(crate) fn spawn_worker(pager: &Arc<Pager>) -> std::io::Result<JoinHandle<()>> {
    let weak = Arc::downgrade(pager);
    std::thread::Builder::new()
        .name(WORKER_THREAD.into())
        .spawn(move || run_worker(weak))
}

/// The worker thread's name.
pub(crate) const WORKER_THREAD: &str = "pagestore-pager";

fn run_worker(pager: Weak<Pager>) {
    loop {
        let Some(strong) = pager.upgrade() else {
            return;
        };
        {
            let mut signal = lock(&strong.signal);
            if signal.shutdown {
                return;
            }
            if !signal.wake {
                signal = strong
                    .wakeup
                    .wait_timeout(signal, WORKER_TICK)
                    .map(|(guard, _)| guard)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
            if signal.shutdown {
                return;
            }
            signal.wake = false;
        }
        strong.evict_to_budget();
    }
}

thread_local! {
    /// Whether this thread is evicting (holds a pager's ring).
    static EVICTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Whether this thread must not wait for a pager's ring (see [`without_waiting`]).
    static NO_WAIT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` on a thread that does not wait for another thread's eviction in it: a value made
/// resident inside `f` helps evict only if the ring is free. For async callers (who must not
/// block) and for user code run under a slot's lock (which an eviction may be waiting for).
pub(crate) fn without_waiting<R>(f: impl FnOnce() -> R) -> R {
    let was = NO_WAIT.replace(true);
    let result = f();
    NO_WAIT.set(was);
    result
}

/// Marks this thread as evicting until dropped.
struct Evicting {
    was: bool,
}

impl Evicting {
    fn enter() -> Evicting {
        Evicting {
            was: EVICTING.replace(true),
        }
    }
}

impl Drop for Evicting {
    fn drop(&mut self) {
        EVICTING.set(self.was);
    }
}

/// The pager's mutexes guard plain lists and flags: a panic elsewhere leaves them usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
