//! [`ArcCache`]: `(TypeId, DataKey)` → the live `Arc` deserialized from that key, if any.
//!
//! It is what makes paging in preserve sharing: a node that two parents point to is
//! deserialized once and both parents get the same `Arc`.
//!
//! Entries are **weak**: the cache never keeps a value alive. When the last strong handle
//! elsewhere is dropped the value is freed, and its entry is pruned later (amortized over
//! insertions, or at once by [`ArcCache::prune`]), so the map stays proportional to the values
//! that are alive.

use std::any::TypeId;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use dashmap::DashMap;

use crate::erase::{ArcEraseDyn, WeakEraseDyn};
use crate::key::{DataKey, KeyHasherBuilder};

/// Entries created between two automatic prunes, at the least.
const MIN_PRUNE_INTERVAL: usize = 1024;

/// Held by the thread loading a key; the others wait on it instead of loading again.
type LoadLock = Arc<Mutex<()>>;

/// One `(TypeId, DataKey)`'s entry, stored inline in the map so a hit costs one lookup and
/// one `Weak::upgrade`, with no lock beyond the map shard's read lock.
#[derive(Default)]
struct Slot {
    value: Option<Box<dyn WeakEraseDyn>>,
    /// Present while some thread loads this key (shared by the threads waiting for it).
    loading: Option<LoadLock>,
}

impl Slot {
    fn live(&self) -> Option<Box<dyn ArcEraseDyn>> {
        self.value.as_ref()?.upgrade()
    }

    fn live_typed<T: ?Sized + Send + Sync + 'static>(&self) -> Option<Arc<T>> {
        self.value
            .as_ref()?
            .as_any()
            .downcast_ref::<Weak<T>>()?
            .upgrade()
    }

    /// Whether pruning may remove it: its value is gone and nobody is loading it. A load
    /// lock only the entry holds is an orphan (its loader panicked) and does not count;
    /// pruning holds the shard's write lock, so nobody can join it meanwhile.
    fn is_dead(&self) -> bool {
        self.loading
            .as_ref()
            .is_none_or(|lock| Arc::strong_count(lock) == 1)
            && self.value.as_ref().is_none_or(|weak| weak.is_expired())
    }
}

/// A map from `(TypeId, DataKey)` to a **weak** handle of the `Arc` deserialized from that key.
///
/// - The first value registered for a key wins; later registrations get the winner back.
/// - A lookup returns a live `Arc` or nothing: an entry never keeps its value alive.
/// - [`get_or_load`](Self::get_or_load) runs its loader at most once at a time per key:
///   concurrent callers for the same key wait and share its result.
/// - Dead entries are pruned (amortized over insertions), so the map stays proportional to
///   the live values.
///
/// The `TypeId` distinguishes views of the same content: `Arc<T>` and `Arc<dyn Trait>`
/// loaded from one key are two entries. The typed helpers use `TypeId::of::<T>()` of the
/// pointee `T`.
///
/// ```
/// use std::sync::Arc;
/// use pagestore::{ArcCache, DataKey};
///
/// let cache = ArcCache::new();
/// let key: DataKey = "0123456789abcdef0123456789abcdef".parse().unwrap();
/// let first = cache.get_or_load_typed(key, || Ok(Arc::new(String::from("loaded"))))?;
/// let again = cache.get_or_load_typed::<String>(key, || unreachable!("still alive"))?;
/// assert!(Arc::ptr_eq(&first, &again));
/// drop((first, again));
/// assert!(cache.get_typed::<String>(key).is_none(), "weak: dropped values are gone");
/// # anyhow::Ok(())
/// ```
pub struct ArcCache {
    slots: DashMap<(TypeId, DataKey), Slot, KeyHasherBuilder>,
    created_since_prune: AtomicUsize,
    prune_interval: AtomicUsize,
    pruning: AtomicBool,
}

impl Default for ArcCache {
    fn default() -> Self {
        Self::new()
    }
}

impl ArcCache {
    /// An empty cache.
    pub fn new() -> Self {
        ArcCache {
            slots: DashMap::with_hasher(KeyHasherBuilder),
            created_since_prune: AtomicUsize::new(0),
            prune_interval: AtomicUsize::new(MIN_PRUNE_INTERVAL),
            pruning: AtomicBool::new(false),
        }
    }

    /// The live value for `(type_id, key)`, if any. Never waits for a load in progress.
    pub fn get(&self, type_id: TypeId, key: DataKey) -> Option<Box<dyn ArcEraseDyn>> {
        self.slots.get(&(type_id, key))?.live()
    }

    /// The live `Arc<T>` for `key`, if any (entry `TypeId::of::<T>()`). Allocates nothing.
    pub fn get_typed<T: ?Sized + Send + Sync + 'static>(&self, key: DataKey) -> Option<Arc<T>> {
        self.slots.get(&(TypeId::of::<T>(), key))?.live_typed::<T>()
    }

    /// Registers `value` as the value of `(type_id, key)` unless a live one is there already.
    ///
    /// Returns `None` when `value` was registered, and `Some(winner)` when another live value
    /// was registered first: the caller should then use (and return to its callers) the
    /// winner, so that every holder of `key` shares one `Arc`.
    pub fn register(
        &self,
        type_id: TypeId,
        key: DataKey,
        value: Box<dyn ArcEraseDyn>,
    ) -> Option<Box<dyn ArcEraseDyn>> {
        self.register_with(type_id, key, None, |slot| match slot.live() {
            Some(winner) => Some(winner),
            None => {
                slot.value = Some(value.downgrade());
                None
            }
        })
    }

    /// The live value of `(type_id, key)`, or the value `load` returns, which is registered.
    ///
    /// While one caller runs `load` for a key, other callers for the same key wait and then
    /// share its value, so a value is loaded at most once at a time. If `load` fails, its
    /// error is returned to its caller and the next waiter tries again.
    ///
    /// `load` may load *other* keys (a node's children) through this cache, but must not
    /// load the key it is loading: that would wait for itself. (A content address cannot be
    /// its own descendant, so a graph loader never does.)
    pub fn get_or_load(
        &self,
        type_id: TypeId,
        key: DataKey,
        load: impl FnOnce() -> anyhow::Result<Box<dyn ArcEraseDyn>>,
    ) -> anyhow::Result<Box<dyn ArcEraseDyn>> {
        self.load_once(
            type_id,
            key,
            Slot::live,
            load,
            |value| value.downgrade(),
            |value| value.clone_dyn(),
        )
    }

    /// Typed [`get_or_load`](Self::get_or_load) for entry `(TypeId::of::<T>(), key)`.
    pub fn get_or_load_typed<T: ?Sized + Send + Sync + 'static>(
        &self,
        key: DataKey,
        load: impl FnOnce() -> anyhow::Result<Arc<T>>,
    ) -> anyhow::Result<Arc<T>> {
        self.load_once(
            TypeId::of::<T>(),
            key,
            Slot::live_typed::<T>,
            load,
            |value| Box::new(Arc::downgrade(value)),
            Arc::clone,
        )
    }

    /// The number of entries, dead ones not yet pruned included.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the cache has no entries.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Removes every entry whose value has been dropped; returns how many it removed.
    pub fn prune(&self) -> usize {
        let before = self.slots.len();
        self.slots.retain(|_, slot| !slot.is_dead());
        let after = self.slots.len();
        self.created_since_prune.store(0, Ordering::Relaxed);
        self.prune_interval
            .store((2 * after).max(MIN_PRUNE_INTERVAL), Ordering::Relaxed);
        before.saturating_sub(after)
    }

    /// Removes every entry that no load is using. Values stay alive as long as their
    /// holders keep them.
    pub fn clear(&self) {
        self.slots.retain(|_, slot| slot.loading.is_some());
    }

    /// The load-once protocol shared by the erased and typed entry points.
    fn load_once<V>(
        &self,
        type_id: TypeId,
        key: DataKey,
        live: impl Fn(&Slot) -> Option<V>,
        load: impl FnOnce() -> anyhow::Result<V>,
        downgrade: impl FnOnce(&V) -> Box<dyn WeakEraseDyn>,
        share: impl FnOnce(&V) -> V,
    ) -> anyhow::Result<V> {
        if let Some(hit) = self.slots.get(&(type_id, key)).and_then(|slot| live(&slot)) {
            return Ok(hit);
        }
        // Join (or start) the key's load lock; the slot's shard lock is held only briefly,
        // never while loading: the loader inserts its children's entries.
        let lock = match self.register_with(type_id, key, None, |slot| match live(slot) {
            Some(hit) => Err(hit),
            None => Ok(Arc::clone(
                slot.loading.get_or_insert_with(LoadLock::default),
            )),
        }) {
            Ok(lock) => lock,
            Err(hit) => return Ok(hit),
        };
        let guard = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let result = match self.slots.get(&(type_id, key)).and_then(|slot| live(&slot)) {
            Some(winner) => Ok(winner),
            None => load(),
        };
        let outcome = self.register_with(type_id, key, Some(&lock), |slot| {
            let value = result?;
            match live(slot) {
                Some(winner) => Ok(winner),
                None => {
                    slot.value = Some(downgrade(&value));
                    Ok(share(&value))
                }
            }
        });
        drop(guard);
        outcome
    }

    /// Runs `update` on the entry of `(type_id, key)` (created if absent) under the shard's
    /// write lock. If `leaving` is given, that load lock is dropped from the entry when no
    /// other thread holds it, so the entry can be pruned once its value dies.
    fn register_with<R>(
        &self,
        type_id: TypeId,
        key: DataKey,
        leaving: Option<&LoadLock>,
        update: impl FnOnce(&mut Slot) -> R,
    ) -> R {
        let mut created = false;
        let result = {
            let mut slot = self.slots.entry((type_id, key)).or_insert_with(|| {
                created = true;
                Slot::default()
            });
            let result = update(&mut slot);
            if let Some(lock) = leaving {
                // Two handles: the entry's and the leaver's. Anyone else holding one is still
                // waiting and will clear it; nobody can take a new one while we hold the shard.
                let last = slot
                    .loading
                    .as_ref()
                    .is_some_and(|held| Arc::ptr_eq(held, lock) && Arc::strong_count(held) == 2);
                if last {
                    slot.loading = None;
                }
            }
            result
        };
        if created {
            self.maybe_prune();
        }
        result
    }

    /// Prunes once the entries created since the last prune reach the interval (twice the
    /// live entries then), so pruning costs O(1) amortized per entry created.
    fn maybe_prune(&self) {
        let created = self.created_since_prune.fetch_add(1, Ordering::Relaxed) + 1;
        if created < self.prune_interval.load(Ordering::Relaxed) {
            return;
        }
        if self
            .pruning
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            self.prune();
            self.pruning.store(false, Ordering::Release);
        }
    }
}

impl std::fmt::Debug for ArcCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArcCache")
            .field("entries", &self.slots.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;
    use std::sync::atomic::AtomicU32;

    fn key(n: u8) -> DataKey {
        DataKey::from_bytes([n.max(1); 16]).unwrap()
    }

    #[test]
    fn first_registration_wins() {
        let cache = ArcCache::new();
        let first = Arc::new(1u32);
        let second = Arc::new(1u32);
        let id = TypeId::of::<u32>();
        assert!(
            cache
                .register(id, key(1), Box::new(first.clone()))
                .is_none()
        );
        let winner = cache
            .register(id, key(1), Box::new(second))
            .expect("first is alive");
        assert!(Arc::ptr_eq(
            &crate::erase::downcast_arc::<u32>(&*winner).unwrap(),
            &first
        ));
    }

    #[test]
    fn a_dead_entry_is_replaced() {
        let cache = ArcCache::new();
        let id = TypeId::of::<u32>();
        assert!(
            cache
                .register(id, key(1), Box::new(Arc::new(1u32)))
                .is_none()
        );
        assert!(cache.get(id, key(1)).is_none());
        let second = Arc::new(2u32);
        assert!(
            cache
                .register(id, key(1), Box::new(second.clone()))
                .is_none()
        );
        assert!(Arc::ptr_eq(
            &cache.get_typed::<u32>(key(1)).unwrap(),
            &second
        ));
    }

    #[test]
    fn type_ids_separate_views_of_one_key() {
        let cache = ArcCache::new();
        let a = cache
            .get_or_load_typed(key(1), || Ok(Arc::new(1u32)))
            .unwrap();
        let b = cache
            .get_or_load_typed(key(1), || Ok(Arc::new(1u64)))
            .unwrap();
        assert_eq!((*a, *b), (1, 1));
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn a_failed_load_is_retried() {
        let cache = ArcCache::new();
        assert!(
            cache
                .get_or_load_typed::<u32>(key(1), || anyhow::bail!("no"))
                .is_err()
        );
        let value = cache
            .get_or_load_typed(key(1), || Ok(Arc::new(7u32)))
            .unwrap();
        assert_eq!(*value, 7);
    }

    #[test]
    fn a_panicking_loader_leaves_a_usable_prunable_entry() {
        let cache = ArcCache::new();
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            cache.get_or_load_typed::<u32>(key(1), || panic!("loader bug"))
        }));
        assert!(panicked.is_err());
        assert_eq!(cache.prune(), 1, "the orphaned entry is pruned");
        let value = cache
            .get_or_load_typed(key(1), || Ok(Arc::new(5u32)))
            .unwrap();
        assert_eq!(*value, 5);
    }

    #[test]
    fn concurrent_loaders_load_once() {
        let cache = ArcCache::new();
        let loads = AtomicU32::new(0);
        let barrier = Barrier::new(8);
        let results: Vec<Arc<u32>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        cache
                            .get_or_load_typed(key(9), || {
                                loads.fetch_add(1, Ordering::SeqCst);
                                std::thread::sleep(std::time::Duration::from_millis(20));
                                Ok(Arc::new(9u32))
                            })
                            .unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert!(results.iter().all(|r| Arc::ptr_eq(r, &results[0])));
    }

    #[test]
    fn nested_loads_of_other_keys_do_not_deadlock() {
        let cache = ArcCache::new();
        let parent = cache
            .get_or_load_typed(key(1), || {
                let child = cache.get_or_load_typed(key(2), || Ok(Arc::new(2u32)))?;
                Ok(Arc::new(*child + 1))
            })
            .unwrap();
        assert_eq!(*parent, 3);
    }

    #[test]
    fn dead_entries_are_pruned_and_growth_is_bounded() {
        let cache = ArcCache::new();
        let keep = cache
            .get_or_load_typed(key(1), || Ok(Arc::new(0u64)))
            .unwrap();
        for n in 0..20_000u64 {
            let mut bytes = [0u8; 16];
            bytes[..8].copy_from_slice(&(n + 10).to_le_bytes());
            let k = DataKey::from_bytes(bytes).unwrap();
            drop(cache.get_or_load_typed(k, || Ok(Arc::new(n))).unwrap());
        }
        assert!(
            cache.len() <= 2 * MIN_PRUNE_INTERVAL + 1,
            "len {}",
            cache.len()
        );
        cache.prune();
        assert_eq!(cache.len(), 1);
        assert!(Arc::ptr_eq(&cache.get_typed::<u64>(key(1)).unwrap(), &keep));
    }
}
