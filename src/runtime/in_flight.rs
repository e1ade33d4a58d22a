//! Reads in flight, shared: while one batched fetch reads a key, a concurrent fetch of the
//! same key (another `page_in_async` over an overlapping graph) waits for that read instead
//! of reading it again.
//!
//! A fetch claims the keys nobody is reading, reads them, and publishes each node to the
//! waiters. It publishes its own claims before it waits for anyone else's, so no two fetches
//! wait for each other. A claim whose read failed, or whose fetch was dropped before the read
//! ended, is published as "read it yourself": the waiter then reads the key on its own and
//! gets the store's own error for it.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use dashmap::DashMap;

use crate::data::PagableData;
use crate::key::{DataKey, KeyHasherBuilder};

/// The keys being read now, each with the slot its reader publishes to.
#[derive(Default)]
pub(super) struct InFlight {
    reads: DashMap<DataKey, Arc<Slot>, KeyHasherBuilder>,
}

/// One key's read: its outcome once published, and the tasks waiting for it.
#[derive(Default)]
pub(super) struct Slot {
    state: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    /// `Some(Some(node))` once read, `Some(None)` if the reader failed or gave up.
    outcome: Option<Option<Arc<PagableData>>>,
    wakers: Vec<Waker>,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, outcome: Option<Arc<PagableData>>) {
        let wakers = {
            let mut state = self.lock();
            if state.outcome.is_some() {
                return;
            }
            state.outcome = Some(outcome);
            std::mem::take(&mut state.wakers)
        };
        for waker in wakers {
            waker.wake();
        }
    }

    /// The node once its reader publishes it; `None` if the waiter must read it itself.
    pub(super) fn wait(self: Arc<Self>) -> impl Future<Output = Option<Arc<PagableData>>> {
        Wait(self)
    }
}

struct Wait(Arc<Slot>);

impl Future for Wait {
    type Output = Option<Arc<PagableData>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.0.lock();
        if let Some(outcome) = &state.outcome {
            return Poll::Ready(outcome.clone());
        }
        if !state.wakers.iter().any(|w| w.will_wake(cx.waker())) {
            state.wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// The keys one fetch claimed. Dropping it releases every claim, publishing "read it
/// yourself" for any not published yet (a failed read, or a fetch dropped mid-read).
pub(super) struct Claims<'a> {
    in_flight: &'a InFlight,
    claimed: Vec<(DataKey, Arc<Slot>)>,
}

impl InFlight {
    /// Claims every key of `keys` nobody is reading; returns the claims and, for the others,
    /// their index in `keys` and the slot to wait on.
    pub(super) fn claim<'a>(
        &'a self,
        keys: &[DataKey],
    ) -> (Claims<'a>, Vec<usize>, Vec<(usize, Arc<Slot>)>) {
        let mut claimed = Vec::with_capacity(keys.len());
        let mut mine = Vec::with_capacity(keys.len());
        let mut theirs = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            match self.reads.entry(*key) {
                dashmap::mapref::entry::Entry::Occupied(read) => {
                    theirs.push((i, Arc::clone(read.get())))
                }
                dashmap::mapref::entry::Entry::Vacant(vacant) => {
                    let slot = Arc::new(Slot::default());
                    vacant.insert(Arc::clone(&slot));
                    claimed.push((*key, slot));
                    mine.push(i);
                }
            }
        }
        let claims = Claims {
            in_flight: self,
            claimed,
        };
        (claims, mine, theirs)
    }
}

impl Claims<'_> {
    /// Publishes the nodes read for the claimed keys, in the order they were claimed.
    pub(super) fn publish(&self, nodes: &[Arc<PagableData>]) {
        for ((_, slot), node) in self.claimed.iter().zip(nodes) {
            slot.publish(Some(Arc::clone(node)));
        }
    }
}

impl Drop for Claims<'_> {
    fn drop(&mut self) {
        for (key, slot) in self.claimed.drain(..) {
            self.in_flight
                .reads
                .remove_if(&key, |_, current| Arc::ptr_eq(current, &slot));
            slot.publish(None);
        }
    }
}
