//! [`KeyMemo`]: which key a live value was paged out under, so the next page-out of a graph
//! that still holds it writes it by key instead of serializing it (and its subgraph) again.

use std::any::TypeId;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;

use crate::erase::{ArcEraseDyn, WeakEraseDyn};
use crate::key::{DataKey, KeyHasherBuilder};

/// Entries added between two prunes, at the least.
const MIN_PRUNE_INTERVAL: usize = 1024;

/// Values this large inline or larger are not remembered: a `Weak` keeps its allocation, and
/// with it every byte of an `Arc<[u8]>`, until the entry is pruned. Such values are leaves in
/// practice; re-serializing one costs its bytes, not a subgraph.
const MAX_INLINE: usize = 4096;

/// A remembered value: a weak handle (so its address stays its own) and its key.
type Remembered = (Box<dyn WeakEraseDyn>, DataKey);

/// `(view type, allocation address)` → the key the value was stored under, held weakly.
///
/// The entry's `Weak` keeps the allocation (not the value), so its address cannot be reused
/// by another value while the entry exists: a live entry always names the value it was made
/// for. Dead entries are pruned, amortized over insertions.
#[derive(Default)]
pub(crate) struct KeyMemo {
    entries: DashMap<(TypeId, usize), Remembered, KeyHasherBuilder>,
    added_since_prune: AtomicUsize,
    prune_interval: AtomicUsize,
}

impl KeyMemo {
    /// Remembers that `value` (viewed as `type_id`) was stored under `key`.
    pub(crate) fn remember(&self, type_id: TypeId, key: DataKey, value: &dyn ArcEraseDyn) {
        if value.inline_size() >= MAX_INLINE {
            return;
        }
        let old = self
            .entries
            .insert((type_id, value.identity()), (value.downgrade(), key));
        // A replaced entry was dead (its address is ours now): dropping its `Weak` runs no
        // user code.
        drop(old);
        let added = self.added_since_prune.fetch_add(1, Ordering::Relaxed) + 1;
        if added
            >= self
                .prune_interval
                .load(Ordering::Relaxed)
                .max(MIN_PRUNE_INTERVAL)
        {
            self.prune();
        }
    }

    /// The key the live value of view `type_id` at `address` was stored under, if remembered.
    pub(crate) fn key_of(&self, type_id: TypeId, address: usize) -> Option<DataKey> {
        let entry = self.entries.get(&(type_id, address))?;
        (!entry.0.is_expired()).then_some(entry.1)
    }

    /// Hands the key of every entry whose value is alive to `keep`.
    pub(crate) fn for_each_live_key(&self, keep: &mut dyn FnMut(DataKey)) {
        for entry in self.entries.iter() {
            if !entry.0.is_expired() {
                keep(entry.1);
            }
        }
    }

    /// Forgets the entry of the value of view `type_id` at `address` if it names `key`.
    pub(crate) fn forget(&self, type_id: TypeId, address: usize, key: DataKey) {
        self.entries
            .remove_if(&(type_id, address), |_, (_, known)| *known == key);
    }

    /// Drops the entries whose value is gone.
    pub(crate) fn prune(&self) {
        self.entries.retain(|_, (weak, _)| !weak.is_expired());
        self.added_since_prune.store(0, Ordering::Relaxed);
        self.prune_interval
            .store(2 * self.entries.len(), Ordering::Relaxed);
    }

    /// The number of entries, dead ones not yet pruned included.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn key(n: u8) -> DataKey {
        DataKey::from_bytes([n.max(1); 16]).unwrap()
    }

    #[test]
    fn remembers_live_values_by_view_and_allocation() {
        let memo = KeyMemo::default();
        let value = Arc::new(String::from("x"));
        let id = TypeId::of::<String>();
        memo.remember(id, key(1), &value);
        let address = Arc::as_ptr(&value) as usize;
        assert_eq!(memo.key_of(id, address), Some(key(1)));
        assert_eq!(
            memo.key_of(TypeId::of::<u8>(), address),
            None,
            "another view"
        );
        drop(value);
        assert_eq!(memo.key_of(id, address), None, "a dead value is forgotten");
        memo.prune();
        assert_eq!(memo.len(), 0);
    }

    #[test]
    fn large_inline_values_are_not_held() {
        let memo = KeyMemo::default();
        let bytes: Arc<[u8]> = Arc::from(vec![0u8; MAX_INLINE]);
        memo.remember(TypeId::of::<[u8]>(), key(2), &bytes);
        assert_eq!(memo.len(), 0);
    }

    #[test]
    fn dead_entries_are_pruned_as_entries_are_added() {
        let memo = KeyMemo::default();
        for n in 0..10_000u32 {
            memo.remember(TypeId::of::<u32>(), key(3), &Arc::new(n));
        }
        assert!(memo.len() <= 2 * MIN_PRUNE_INTERVAL, "len {}", memo.len());
    }
}
