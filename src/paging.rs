//! [`PagingQueue`]: arcs scheduled for page-out, held weakly and bounded.

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::erase::{ArcEraseDyn, WeakEraseDyn};

/// The queue behind [`PagableStorage::schedule_for_paging`](crate::PagableStorage::schedule_for_paging).
///
/// It holds **weak** handles: scheduling a value for page-out must not keep it in memory, and
/// a value dropped before the page-out worker reaches it needs no paging. The queue is bounded:
/// when full, entries whose value is gone are dropped first, then the oldest.
pub struct PagingQueue {
    queue: Mutex<VecDeque<Box<dyn WeakEraseDyn>>>,
    capacity: usize,
}

impl PagingQueue {
    /// The capacity of [`PagingQueue::default`].
    pub const DEFAULT_CAPACITY: usize = 1 << 16;

    /// An empty queue that holds at most `capacity` entries (at least one).
    pub fn with_capacity(capacity: usize) -> Self {
        PagingQueue {
            queue: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
        }
    }

    /// Schedules `arc`; never blocks on I/O and never panics.
    pub fn push(&self, arc: &dyn ArcEraseDyn) {
        let weak = arc.downgrade();
        let mut queue = self.lock();
        if queue.len() >= self.capacity {
            queue.retain(|entry| !entry.is_expired());
            if queue.len() >= self.capacity {
                queue.pop_front();
            }
        }
        queue.push_back(weak);
    }

    /// Takes every scheduled value that is still alive, oldest first.
    pub fn drain(&self) -> Vec<Box<dyn ArcEraseDyn>> {
        let taken = std::mem::take(&mut *self.lock());
        taken
            .into_iter()
            .filter_map(|weak| weak.upgrade())
            .collect()
    }

    /// The number of entries, including values dropped since they were scheduled.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing is scheduled.
    pub fn is_empty(&self) -> bool {
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
        let queue = PagingQueue::with_capacity(2);
        let a = Arc::new(1u8);
        let b = Arc::new(2u8);
        queue.push(&a);
        queue.push(&Arc::new(0u8)); // dropped at once
        queue.push(&b); // full: the dead entry goes, `a` stays
        assert_eq!(queue.len(), 2);
        let live = queue.drain();
        assert_eq!(live.len(), 2);
        assert_eq!(live[0].identity(), Arc::as_ptr(&a) as usize);
        assert!(queue.is_empty());
    }
}
