//! Reads in flight, shared: while one batched fetch reads a key, a concurrent fetch of the
//! same key (another `page_in_async` over an overlapping graph) waits for that read instead
//! of reading it again; and while the node it read is still held (by the records a
//! `page_in_async` prefetched, say), a later fetch of the key takes it without reading.
//!
//! A fetch claims the keys nobody is reading, reads them, and publishes each node (weakly:
//! the map never keeps a node alive) to the waiters. It publishes its own claims before it
//! waits for anyone else's, so no two fetches wait for each other. A claim whose read failed,
//! or whose fetch was dropped before the read ended, is published as "read it yourself": the
//! waiter then reads the key on its own and gets the store's own error for it. So is a node
//! dropped before a waiter took it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use crate::data::PagableData;
use crate::key::{DataKey, KeyHasherBuilder};

/// The keys being read now, or read lately, each with the slot its reader publishes to.
#[derive(Default)]
pub(super) struct InFlight {
    reads: DashMap<DataKey, Arc<Slot>, KeyHasherBuilder>,
    /// The map's length after its last pruning of dropped nodes.
    pruned_at: AtomicUsize,
}

/// The map is pruned of dropped nodes when it has grown by this many entries, and by as many
/// as it kept, since the last pruning: amortized, a few map operations per fetched key.
const PRUNE_SLACK: usize = 4096;

/// One key's read: its outcome once published, and the tasks waiting for it.
#[derive(Default)]
pub(super) struct Slot {
    state: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    /// `Some(Some(node))` once read (the node held weakly), `Some(None)` if the reader
    /// failed or gave up.
    outcome: Option<Option<Weak<PagableData>>>,
    wakers: Vec<Waker>,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, outcome: Option<Weak<PagableData>>) {
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

    /// `Some(node)` if the read is done and its node still alive, `Some(None)` if it is done
    /// and nothing can be taken from it, `None` while it runs.
    fn done(&self) -> Option<Option<Arc<PagableData>>> {
        let state = self.lock();
        let outcome = state.outcome.as_ref()?;
        Some(outcome.as_ref().and_then(Weak::upgrade))
    }
}

struct Wait(Arc<Slot>);

impl Future for Wait {
    type Output = Option<Arc<PagableData>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.0.lock();
        if let Some(outcome) = &state.outcome {
            return Poll::Ready(outcome.as_ref().and_then(Weak::upgrade));
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
    /// Claims every key of `keys` nobody is reading and no live node holds; returns the
    /// claims, the indexes (in `keys`) of the claimed keys, the nodes found alive, and for
    /// the keys being read, the slots to wait on.
    #[allow(clippy::type_complexity)]
    pub(super) fn claim<'a>(
        &'a self,
        keys: &[DataKey],
    ) -> (
        Claims<'a>,
        Vec<usize>,
        Vec<(usize, Arc<PagableData>)>,
        Vec<(usize, Arc<Slot>)>,
    ) {
        self.prune_if_grown();
        let mut claimed = Vec::with_capacity(keys.len());
        let mut mine = Vec::with_capacity(keys.len());
        let mut alive = Vec::new();
        let mut theirs = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let claim = |claimed: &mut Vec<(DataKey, Arc<Slot>)>| {
                let slot = Arc::new(Slot::default());
                claimed.push((*key, Arc::clone(&slot)));
                slot
            };
            match self.reads.entry(*key) {
                Entry::Occupied(mut read) => match read.get().done() {
                    None => theirs.push((i, Arc::clone(read.get()))),
                    Some(Some(node)) => alive.push((i, node)),
                    Some(None) => {
                        read.insert(claim(&mut claimed));
                        mine.push(i);
                    }
                },
                Entry::Vacant(vacant) => {
                    vacant.insert(claim(&mut claimed));
                    mine.push(i);
                }
            }
        }
        let claims = Claims {
            in_flight: self,
            claimed,
        };
        (claims, mine, alive, theirs)
    }

    /// Drops the entries whose node is gone, if the map grew enough since the last time.
    fn prune_if_grown(&self) {
        let last = self.pruned_at.load(Ordering::Relaxed);
        if self.reads.len() <= 2 * last + PRUNE_SLACK {
            return;
        }
        self.prune();
    }

    /// Drops the entries whose node is gone (or whose read failed).
    pub(super) fn prune(&self) {
        self.reads
            .retain(|_, slot| !matches!(slot.done(), Some(None)));
        self.pruned_at.store(self.reads.len(), Ordering::Relaxed);
    }
}

impl Claims<'_> {
    /// Publishes the nodes read for the claimed keys, in the order they were claimed.
    pub(super) fn publish(&self, nodes: &[Arc<PagableData>]) {
        for ((_, slot), node) in self.claimed.iter().zip(nodes) {
            slot.publish(Some(Arc::downgrade(node)));
        }
    }
}

impl Drop for Claims<'_> {
    /// Releases the claims not published: their waiters read for themselves.
    fn drop(&mut self) {
        for (key, slot) in self.claimed.drain(..) {
            if slot.done().is_none() {
                self.in_flight
                    .reads
                    .remove_if(&key, |_, current| Arc::ptr_eq(current, &slot));
                slot.publish(None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use super::*;

    fn data(n: u8) -> PagableData {
        PagableData {
            data: vec![n; 8],
            arcs: vec![],
        }
    }

    fn key(n: u8) -> DataKey {
        data(n).compute_key()
    }

    fn node(n: u8) -> Arc<PagableData> {
        Arc::new(data(n))
    }

    fn poll<F: Future>(future: &mut Pin<Box<F>>) -> Poll<F::Output> {
        future
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn a_waiter_gets_the_published_node_and_a_later_claim_takes_it_while_held() {
        let in_flight = InFlight::default();
        let (claims, mine, alive, theirs) = in_flight.claim(&[key(1), key(2)]);
        assert_eq!((mine, alive.len(), theirs.len()), (vec![0, 1], 0, 0));
        let (second, mine, _, theirs) = in_flight.claim(&[key(2), key(3)]);
        assert_eq!((mine, theirs.len()), (vec![1], 1));
        let mut wait = Box::pin(Arc::clone(&theirs[0].1).wait());
        assert!(poll(&mut wait).is_pending());
        let read = [node(1), node(2)];
        claims.publish(&read);
        drop(claims);
        match poll(&mut wait) {
            Poll::Ready(Some(got)) => assert!(Arc::ptr_eq(&got, &read[1])),
            _ => panic!("the published node"),
        }
        drop(second);
        // Held by `read`: taken unread; once dropped, claimed again.
        let (_claims, mine, alive, _) = in_flight.claim(&[key(1)]);
        assert!(mine.is_empty() && Arc::ptr_eq(&alive[0].1, &read[0]));
        drop((alive, read));
        let (_claims, mine, alive, _) = in_flight.claim(&[key(1)]);
        assert_eq!((mine, alive.len()), (vec![0], 0));
    }

    #[test]
    fn a_dropped_claim_tells_its_waiters_to_read_for_themselves() {
        let in_flight = InFlight::default();
        let (claims, _, _, _) = in_flight.claim(&[key(1)]);
        let (_other, mine, _, theirs) = in_flight.claim(&[key(1)]);
        assert!(mine.is_empty());
        let mut wait = Box::pin(Arc::clone(&theirs[0].1).wait());
        assert!(poll(&mut wait).is_pending());
        drop(claims);
        assert!(matches!(poll(&mut wait), Poll::Ready(None)));
        let (_claims, mine, _, _) = in_flight.claim(&[key(1)]);
        assert_eq!(mine, vec![0], "free to claim again");
    }
}
