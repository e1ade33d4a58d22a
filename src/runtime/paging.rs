//! [`PagingQueue`]: arcs scheduled for page-out, held weakly and bounded.

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::erase::{ArcEraseDyn, WeakEraseDyn};

/// The queue behind [`PagableStorage::schedule_for_paging`](crate::PagableStorage::schedule_for_paging).
///
/// It holds **weak** handles: scheduling a value for page-out must not keep it in memory, and
/// a value dropped before the page-out worker reaches it needs no paging. The queue is bounded:
/// when full, entries whose value is gone are dropped first, then the oldest until it is half
/// full, so a push costs O(1) amortized however long the queue stays full.
pub(crate) struct PagingQueue {
    queue: Mutex<VecDeque<Box<dyn WeakEraseDyn>>>,
    capacity: usize,
}

impl PagingQueue {
    /// The capacity of [`PagingQueue::default`].
    const DEFAULT_CAPACITY: usize = 1 << 16;

    /// An empty queue that holds at most `capacity` entries (at least one).
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        PagingQueue {
            queue: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
        }
    }

    /// Schedules `arc`; never blocks on I/O and never panics.
    pub(crate) fn push(&self, arc: &dyn ArcEraseDyn) {
        let weak = arc.downgrade();
        let mut queue = self.lock();
        if queue.len() >= self.capacity {
            queue.retain(|entry| !entry.is_expired());
            // Leave room for half a queue of pushes before the next O(n) pass.
            let excess = queue.len().saturating_sub(self.capacity / 2);
            queue.drain(..excess);
        }
        queue.push_back(weak);
    }

    /// Drops the entries whose value is gone; returns how many.
    pub(crate) fn prune(&self) -> usize {
        let mut queue = self.lock();
        let before = queue.len();
        queue.retain(|entry| !entry.is_expired());
        queue.shrink_to_fit();
        before - queue.len()
    }

    /// Takes every scheduled value that is still alive, oldest first.
    #[cfg(test)]
    pub(crate) fn drain(&self) -> Vec<Box<dyn ArcEraseDyn>> {
        let taken = std::mem::take(&mut *self.lock());
        taken
            .into_iter()
            .filter_map(|weak| weak.upgrade())
            .collect()
    }

    /// The number of entries, including values dropped since they were scheduled.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing is scheduled.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Box<dyn WeakEraseDyn>>> {
        // Every operation leaves the deque valid, so a panic elsewhere poisons nothing real.
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Default for PagingQueue {
    fn default() -> Self {
        Self::with_capacity(Self::DEFAULT_CAPACITY)
    }
}

impl std::fmt::Debug for PagingQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagingQueue")
            .field("len", &self.len())
            .field("capacity", &self.capacity)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn holds_weakly_and_stays_bounded() {
        let queue = PagingQueue::with_capacity(4);
        let a = Arc::new(1u8);
        let b = Arc::new(2u8);
        queue.push(&a);
        queue.push(&Arc::new(0u8)); // dropped at once
        queue.push(&b);
        queue.push(&Arc::new(0u8));
        assert_eq!(queue.len(), 4);
        let c = Arc::new(3u8);
        queue.push(&c); // full: the dead entries go, and the oldest down to half
        assert_eq!(queue.len(), 3);
        let live = queue.drain();
        assert_eq!(live.len(), 3);
        assert_eq!(live[0].identity(), Arc::as_ptr(&a) as usize);
        assert!(queue.is_empty());
        queue.push(&Arc::new(0u8));
        assert_eq!(queue.prune(), 1);
    }

    #[test]
    fn a_full_queue_is_cut_to_half_not_by_one() {
        // Was O(n) per push once full: every push past the capacity scanned the whole queue
        // and dropped one entry. Cutting to half leaves room for capacity/2 pushes before the
        // next scan, which makes a push O(1) amortized.
        let queue = PagingQueue::with_capacity(1 << 10);
        let alive: Vec<Arc<u32>> = (0..(1 << 10) + 1).map(Arc::new).collect();
        for value in &alive {
            queue.push(value);
        }
        assert_eq!(
            queue.len(),
            (1 << 9) + 1,
            "half the queue, then the new entry"
        );
        let live = queue.drain();
        assert_eq!(
            live.last().unwrap().identity(),
            Arc::as_ptr(alive.last().unwrap()) as usize,
            "the newest entries are kept"
        );
    }
}
