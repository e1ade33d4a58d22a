//! [`ArcCache`]: `(TypeId, DataKey)` → the live `Arc` deserialized from that key, if any.
//!
//! It is what makes paging in preserve sharing: a node that two parents point to is
//! deserialized once and both parents get the same `Arc`.
//!
//! Entries are **weak**: the cache never keeps a value alive. When the last strong handle
//! elsewhere is dropped the value is dropped, and its entry is pruned later (amortized over
//! insertions, or at once by [`ArcCache::prune`]), so the map stays proportional to the values
//! that are alive.
//!
//! A `Weak` keeps its allocation, though, and an `Arc<[u8]>` or `Arc<str>` holds its bytes
//! *in* the allocation: a dead entry of a 64 KiB slice keeps 64 KiB. So entries whose value
//! occupies [`HEAVY_BYTES`] or more inline are also listed apart, and a sweeper thread (started
//! when the first one is registered, gone once none is left) removes them within about
//! [`SWEEP_INTERVAL`] of their value's death: dropping a graph frees its bytes without anyone
//! calling anything.

use std::any::TypeId;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use dashmap::DashMap;

use crate::erase::{ArcEraseDyn, WeakEraseDyn};
use crate::key::{DataKey, KeyHasherBuilder};

/// Entries created between two automatic prunes, at the least.
const MIN_PRUNE_INTERVAL: usize = 1024;

/// How many view types [`ArcCache::is_live`] looks a key up under: the first ones registered.
const LISTED_TYPES: usize = 16;

/// A value at least this large inline (`size_of_val`) is swept soon after it dies instead of
/// waiting for an amortized prune: its dead entry's `Weak` would keep that many bytes.
const HEAVY_BYTES: usize = 4096;

/// How often the sweeper looks at the heavy entries.
const SWEEP_INTERVAL: Duration = Duration::from_millis(50);

/// Held by the thread loading a key; the others wait on it instead of loading again.
type LoadLock = Arc<Mutex<()>>;

/// A cache entry's identity: the view type and the key.
type EntryId = (TypeId, DataKey);

/// One entry, stored inline in the map so a hit costs one lookup and one `Weak::upgrade`,
/// with no lock beyond the map shard's read lock.
#[derive(Default)]
struct Slot {
    value: Option<Box<dyn WeakEraseDyn>>,
    /// The address of `value`'s allocation ([`ArcEraseDyn::identity`]): `value` keeps the
    /// allocation, so no other value can have this address while the slot holds it.
    address: usize,
    /// Present while some thread loads this key (shared by the threads waiting for it).
    loading: Option<LoadLock>,
}

impl Slot {
    fn live(&self) -> Option<Box<dyn ArcEraseDyn>> {
        self.value.as_ref()?.upgrade()
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

/// What the cache and its sweeper thread share.
struct Inner {
    slots: DashMap<EntryId, Slot, KeyHasherBuilder>,
    /// `(view type, address)` → key: which key a live value was registered under. An entry is
    /// valid only while the slot of `(view type, key)` holds that address.
    keys: DashMap<(TypeId, usize), DataKey, KeyHasherBuilder>,
    created_since_prune: AtomicUsize,
    prune_interval: AtomicUsize,
    pruning: AtomicBool,
    /// Entries whose value is heavy (see [`HEAVY_BYTES`]), for the sweeper.
    heavy: Mutex<HashSet<EntryId, KeyHasherBuilder>>,
    sweeper_running: AtomicBool,
    /// The first [`LISTED_TYPES`] view types entries were created for, read without a lock.
    types: [std::sync::OnceLock<TypeId>; LISTED_TYPES],
    /// Taken to list a new type.
    listing: Mutex<()>,
}

impl Inner {
    fn heavy(&self) -> MutexGuard<'_, HashSet<EntryId, KeyHasherBuilder>> {
        // A set of ids: no invariant a panic elsewhere could break.
        self.heavy.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes the heavy entries whose value died; returns whether any heavy entry is left.
    fn sweep_heavy(&self) -> bool {
        let ids: Vec<EntryId> = self.heavy().iter().copied().collect();
        let gone: Vec<EntryId> = ids
            .into_iter()
            .filter(|id| {
                // Removed when dead; an entry that is absent, or alive again under a light
                // value, is no longer heavy either.
                if let Some((_, slot)) = self.slots.remove_if(id, |_, slot| slot.is_dead()) {
                    self.keys
                        .remove_if(&(id.0, slot.address), |_, key| *key == id.1);
                }
                self.slots
                    .get(id)
                    .is_none_or(|slot| slot.value.as_ref().is_none_or(|weak| weak.is_expired()))
            })
            .collect();
        let mut heavy = self.heavy();
        for id in gone {
            heavy.remove(&id);
        }
        !heavy.is_empty()
    }
}

/// A map from `(TypeId, DataKey)` to a **weak** handle of the `Arc` deserialized from that key.
///
/// - The first value registered for a key wins; later registrations get the winner back.
/// - A lookup returns a live `Arc` or nothing: an entry never keeps its value alive.
/// - [`get_or_load`](Self::get_or_load) runs its loader at most once at a time per key:
///   concurrent callers for the same key wait and share its result.
/// - Dead entries are pruned (amortized over insertions; heavy ones by the sweeper), so the
///   map stays proportional to the live values.
/// - No user code (a value's `Drop`, a loader) runs while a shard of the map is locked, so a
///   `Drop` that uses the cache cannot deadlock it.
///
/// The `TypeId` distinguishes views of the same content: `Arc<T>` and `Arc<dyn Trait>`
/// loaded from one key are two entries.
pub(crate) struct ArcCache {
    inner: Arc<Inner>,
}

impl Default for ArcCache {
    fn default() -> Self {
        Self::new()
    }
}

impl ArcCache {
    /// An empty cache.
    pub(crate) fn new() -> Self {
        ArcCache {
            inner: Arc::new(Inner {
                slots: DashMap::with_hasher(KeyHasherBuilder),
                keys: DashMap::with_hasher(KeyHasherBuilder),
                created_since_prune: AtomicUsize::new(0),
                prune_interval: AtomicUsize::new(MIN_PRUNE_INTERVAL),
                pruning: AtomicBool::new(false),
                heavy: Mutex::new(HashSet::default()),
                sweeper_running: AtomicBool::new(false),
                types: Default::default(),
                listing: Mutex::new(()),
            }),
        }
    }

    /// The live value for `(type_id, key)`, if any. Never waits for a load in progress.
    pub(crate) fn get(&self, type_id: TypeId, key: DataKey) -> Option<Box<dyn ArcEraseDyn>> {
        self.inner.slots.get(&(type_id, key))?.live()
    }

    /// Registers `value` as the value of `(type_id, key)` unless a live one is there already.
    ///
    /// Returns `None` when `value` was registered, and `Some(winner)` when another live value
    /// was registered first: the caller should then use (and return to its callers) the
    /// winner, so that every holder of `key` shares one `Arc`.
    pub(crate) fn register(
        &self,
        type_id: TypeId,
        key: DataKey,
        value: Box<dyn ArcEraseDyn>,
    ) -> Option<Box<dyn ArcEraseDyn>> {
        let weight = value.inline_size();
        let address = value.identity();
        let winner = self.register_with(type_id, key, None, |slot| match slot.live() {
            Some(winner) => Some(winner),
            None => {
                slot.value = Some(value.downgrade());
                slot.address = address;
                None
            }
        });
        if winner.is_none() {
            self.inner.keys.insert((type_id, address), key);
            self.note_weight((type_id, key), weight);
        }
        // `value` is dropped here, after the shard lock: it may be the last handle of a value
        // whose `Drop` uses this cache.
        winner
    }

    /// The live value of `(type_id, key)`, or the value `load` returns, which is registered.
    ///
    /// While one caller runs `load` for a key, other callers for the same key wait and then
    /// share its value, so a value is loaded at most once at a time. If `load` fails, its
    /// error is returned to its caller and the next waiter tries again.
    ///
    /// `load` may load *other* keys (a node's children) through this cache, but must not
    /// load the key it is loading: that would wait for itself. (A content address cannot be
    /// its own descendant; the graph layer reports a stored cycle before it gets here.)
    pub(crate) fn get_or_load(
        &self,
        type_id: TypeId,
        key: DataKey,
        load: impl FnOnce() -> anyhow::Result<Box<dyn ArcEraseDyn>>,
    ) -> anyhow::Result<Box<dyn ArcEraseDyn>> {
        if let Some(hit) = self.get(type_id, key) {
            return Ok(hit);
        }
        // Join (or start) the key's load lock; the slot's shard lock is held only briefly,
        // never while loading: the loader inserts its children's entries.
        let lock = match self.register_with(type_id, key, None, |slot| match slot.live() {
            Some(hit) => Err(hit),
            None => Ok(Arc::clone(
                slot.loading.get_or_insert_with(LoadLock::default),
            )),
        }) {
            Ok(lock) => lock,
            Err(hit) => return Ok(hit),
        };
        let guard = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let loaded = match self.get(type_id, key) {
            Some(winner) => Ok(winner),
            None => load(),
        };
        let mut weight = 0;
        let mut registered = None;
        let outcome = self.register_with(type_id, key, Some(&lock), |slot| {
            let value = loaded.as_ref().map_err(|_| ())?;
            Ok(match slot.live() {
                Some(winner) => winner,
                None => {
                    slot.value = Some(value.downgrade());
                    slot.address = value.identity();
                    registered = Some(slot.address);
                    weight = value.inline_size();
                    value.clone_dyn()
                }
            })
        });
        if let Some(address) = registered {
            self.inner.keys.insert((type_id, address), key);
        }
        drop(guard);
        // `loaded` is dropped after the shard lock (see `register`).
        match (outcome, loaded) {
            (Ok(value), _) => {
                self.note_weight((type_id, key), weight);
                Ok(value)
            }
            (Err(()), Err(err)) => Err(err),
            (Err(()), Ok(_)) => unreachable!("the closure fails only on a failed load"),
        }
    }

    /// The key the live value of view `type_id` at `address` was registered under, if any.
    pub(crate) fn key_of(&self, type_id: TypeId, address: usize) -> Option<DataKey> {
        let key = *self.inner.keys.get(&(type_id, address))?;
        let slot = self.inner.slots.get(&(type_id, key))?;
        let alive = slot.value.as_ref().is_some_and(|weak| !weak.is_expired());
        (alive && slot.address == address).then_some(key)
    }

    /// Whether a live value is registered for `key` under any of the first
    /// [`LISTED_TYPES`] view types (all of them, in most programs). Never waits for a load.
    pub(crate) fn is_live(&self, key: DataKey) -> bool {
        self.inner
            .types
            .iter()
            .map_while(|listed| listed.get())
            .any(|&type_id| {
                self.inner
                    .slots
                    .get(&(type_id, key))
                    .is_some_and(|slot| slot.value.as_ref().is_some_and(|weak| !weak.is_expired()))
            })
    }

    /// Lists `type_id` for [`is_live`](Self::is_live) if it is new and there is room: a few
    /// lock-free reads when it is listed already.
    fn list_type(&self, type_id: TypeId) {
        let types = &self.inner.types;
        for listed in types {
            match listed.get() {
                Some(&known) if known == type_id => return,
                Some(_) => {}
                None => break,
            }
        }
        let _listing = self.inner.listing.lock().unwrap_or_else(|p| p.into_inner());
        for listed in types {
            match listed.get() {
                Some(&known) if known == type_id => return,
                Some(_) => {}
                None => {
                    let _ = listed.set(type_id);
                    return;
                }
            }
        }
    }

    /// The number of entries, dead ones not yet pruned included.
    pub(crate) fn len(&self) -> usize {
        self.inner.slots.len()
    }

    /// Hands the key of every entry whose value is alive to `keep`.
    pub(crate) fn for_each_live_key(&self, keep: &mut dyn FnMut(DataKey)) {
        for entry in self.inner.slots.iter() {
            if entry.value.as_ref().is_some_and(|weak| !weak.is_expired()) {
                keep(entry.key().1);
            }
        }
    }

    /// Forgets that the value of view `type_id` at `address` was loaded from `key` (the key
    /// is no longer stored): [`key_of`](Self::key_of) no longer names it, so the value is
    /// serialized again the next time it is paged out.
    pub(crate) fn forget_key(&self, type_id: TypeId, address: usize, key: DataKey) {
        self.inner
            .keys
            .remove_if(&(type_id, address), |_, known| *known == key);
    }

    /// Removes every entry whose value has been dropped; returns how many it removed.
    pub(crate) fn prune(&self) -> usize {
        let slots = &self.inner.slots;
        let before = slots.len();
        slots.retain(|_, slot| !slot.is_dead());
        let after = slots.len();
        self.inner.keys.retain(|&(type_id, address), key| {
            slots
                .get(&(type_id, *key))
                .is_some_and(|slot| slot.address == address)
        });
        self.inner.created_since_prune.store(0, Ordering::Relaxed);
        self.inner
            .prune_interval
            .store((2 * after).max(MIN_PRUNE_INTERVAL), Ordering::Relaxed);
        before.saturating_sub(after)
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
            let mut slot = self.inner.slots.entry((type_id, key)).or_insert_with(|| {
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
            self.list_type(type_id);
            self.maybe_prune();
        }
        result
    }

    /// Prunes once the entries created since the last prune reach the interval (twice the
    /// live entries then), so pruning costs O(1) amortized per entry created.
    fn maybe_prune(&self) {
        let inner = &self.inner;
        let created = inner.created_since_prune.fetch_add(1, Ordering::Relaxed) + 1;
        if created < inner.prune_interval.load(Ordering::Relaxed) {
            return;
        }
        if inner
            .pruning
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            self.prune();
            inner.pruning.store(false, Ordering::Release);
        }
    }

    /// Lists a just-registered value that weighs [`HEAVY_BYTES`] or more for the sweeper,
    /// starting the sweeper if it is not running.
    fn note_weight(&self, id: EntryId, weight: usize) {
        if weight < HEAVY_BYTES {
            return;
        }
        self.inner.heavy().insert(id);
        if self
            .inner
            .sweeper_running
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        let inner = Arc::downgrade(&self.inner);
        let spawned = std::thread::Builder::new()
            .name("pagestore-cache-sweeper".into())
            .spawn(move || sweep(inner));
        if let Err(err) = spawned {
            // Only memory is at stake: heavy dead entries then wait for a prune.
            self.inner.sweeper_running.store(false, Ordering::Release);
            log::warn!("pagestore: could not start the arc-cache sweeper: {err}");
        }
    }
}

/// The sweeper thread: while the cache lives and lists heavy entries, removes the dead ones
/// every [`SWEEP_INTERVAL`]. It holds the cache weakly, so it never keeps it alive.
fn sweep(inner: Weak<Inner>) {
    loop {
        std::thread::sleep(SWEEP_INTERVAL);
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if inner.sweep_heavy() {
            continue;
        }
        inner.sweeper_running.store(false, Ordering::Release);
        // A heavy entry listed between the sweep and the flag going down found the flag up
        // and started no sweeper: take the job back unless one has started since.
        let more = !inner.heavy().is_empty();
        if !more
            || inner
                .sweeper_running
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
    }
}

impl std::fmt::Debug for ArcCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArcCache")
            .field("entries", &self.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;
    use std::sync::atomic::AtomicU32;

    /// Typed `get_or_load` for entry `(TypeId::of::<T>(), key)`.
    fn load<T: ?Sized + Send + Sync + 'static>(
        cache: &ArcCache,
        key: DataKey,
        load: impl FnOnce() -> anyhow::Result<Arc<T>>,
    ) -> anyhow::Result<Arc<T>> {
        let erased = cache.get_or_load(TypeId::of::<T>(), key, || {
            load().map(|arc| Box::new(arc) as Box<dyn ArcEraseDyn>)
        })?;
        Ok(crate::erase::downcast_arc::<T>(&*erased).expect("the entry's type"))
    }

    /// Typed `get` of entry `(TypeId::of::<T>(), key)`.
    fn get<T: ?Sized + Send + Sync + 'static>(cache: &ArcCache, key: DataKey) -> Option<Arc<T>> {
        let erased = cache.get(TypeId::of::<T>(), key)?;
        crate::erase::downcast_arc::<T>(&*erased)
    }

    fn key(n: u8) -> DataKey {
        DataKey::from_bytes([n.max(1); 16]).unwrap()
    }

    #[test]
    fn is_live_finds_a_live_value_of_any_listed_type() {
        let cache = ArcCache::new();
        let number = load::<u32>(&cache, key(1), || Ok(Arc::new(7))).unwrap();
        let text = load::<String>(&cache, key(2), || Ok(Arc::new("seven".into()))).unwrap();
        assert!(cache.is_live(key(1)) && cache.is_live(key(2)));
        assert!(!cache.is_live(key(3)));
        drop(number);
        assert!(!cache.is_live(key(1)), "dead");
        assert!(cache.is_live(key(2)));
        drop(text);
        assert!(!cache.is_live(key(2)));
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
        assert!(Arc::ptr_eq(&get::<u32>(&cache, key(1)).unwrap(), &second));
    }

    #[test]
    fn type_ids_separate_views_of_one_key() {
        let cache = ArcCache::new();
        let a = load(&cache, key(1), || Ok(Arc::new(1u32))).unwrap();
        let b = load(&cache, key(1), || Ok(Arc::new(1u64))).unwrap();
        assert_eq!((*a, *b), (1, 1));
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn a_failed_load_is_retried() {
        let cache = ArcCache::new();
        assert!(load::<u32>(&cache, key(1), || anyhow::bail!("no")).is_err());
        let value = load(&cache, key(1), || Ok(Arc::new(7u32))).unwrap();
        assert_eq!(*value, 7);
    }

    #[test]
    fn a_panicking_loader_leaves_a_usable_prunable_entry() {
        let cache = ArcCache::new();
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            load::<u32>(&cache, key(1), || panic!("loader bug"))
        }));
        assert!(panicked.is_err());
        assert_eq!(cache.prune(), 1, "the orphaned entry is pruned");
        let value = load(&cache, key(1), || Ok(Arc::new(5u32))).unwrap();
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
                        load(&cache, key(9), || {
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
        let parent = load(&cache, key(1), || {
            let child = load(&cache, key(2), || Ok(Arc::new(2u32)))?;
            Ok(Arc::new(*child + 1))
        })
        .unwrap();
        assert_eq!(*parent, 3);
    }

    #[test]
    fn dead_entries_are_pruned_and_growth_is_bounded() {
        let cache = ArcCache::new();
        let keep = load(&cache, key(1), || Ok(Arc::new(0u64))).unwrap();
        for n in 0..20_000u64 {
            let mut bytes = [0u8; 16];
            bytes[..8].copy_from_slice(&(n + 10).to_le_bytes());
            let k = DataKey::from_bytes(bytes).unwrap();
            drop(load(&cache, k, || Ok(Arc::new(n))).unwrap());
        }
        assert!(
            cache.len() <= 2 * MIN_PRUNE_INTERVAL + 1,
            "len {}",
            cache.len()
        );
        cache.prune();
        assert_eq!(cache.len(), 1);
        assert!(Arc::ptr_eq(&get::<u64>(&cache, key(1)).unwrap(), &keep));
    }
}

#[cfg(test)]
mod regression {
    use super::*;
    use std::sync::mpsc;

    fn key(n: u8) -> DataKey {
        DataKey::from_bytes([n.max(1); 16]).unwrap()
    }

    /// A value whose `Drop` reads the cache entry it was offered for.
    struct Reentrant {
        cache: Arc<ArcCache>,
        key: DataKey,
    }

    impl Drop for Reentrant {
        fn drop(&mut self) {
            let _ = self.cache.get(TypeId::of::<Reentrant>(), self.key);
        }
    }

    /// Was a deadlock: the losing value of a registration was dropped under the shard's write
    /// lock, so a `Drop` that touched the cache waited for itself.
    #[test]
    fn a_drop_that_uses_the_cache_does_not_deadlock_it() {
        let cache = Arc::new(ArcCache::new());
        let (done_tx, done_rx) = mpsc::channel();
        let worker = {
            let cache = Arc::clone(&cache);
            std::thread::spawn(move || {
                let id = TypeId::of::<Reentrant>();
                let first = Arc::new(Reentrant {
                    cache: Arc::clone(&cache),
                    key: key(3),
                });
                assert!(
                    cache
                        .register(id, key(3), Box::new(first.clone()))
                        .is_none()
                );
                let loser = Arc::new(Reentrant {
                    cache: Arc::clone(&cache),
                    key: key(3),
                });
                // `loser`'s only handle goes in: it is dropped by the cache.
                assert!(cache.register(id, key(3), Box::new(loser)).is_some());
                let loaded = cache.get_or_load(id, key(4), || {
                    Ok(Box::new(Arc::new(Reentrant {
                        cache: Arc::clone(&cache),
                        key: key(4),
                    })))
                });
                drop(loaded);
                drop(first);
                done_tx.send(()).unwrap();
            })
        };
        done_rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("a Drop that uses the cache deadlocked it");
        worker.join().unwrap();
    }

    /// Was a leak until the next prune: the dead entry's `Weak` kept a 64 KiB slice allocated.
    #[test]
    fn heavy_values_leave_the_cache_soon_after_they_die() {
        let cache = ArcCache::new();
        let id = TypeId::of::<[u8]>();
        let values: Vec<Arc<[u8]>> = (1..=20).map(|n| Arc::from(vec![n; 64 << 10])).collect();
        for (n, value) in values.iter().enumerate() {
            assert!(
                cache
                    .register(id, key(n as u8 + 1), Box::new(value.clone()))
                    .is_none()
            );
        }
        let light = Arc::new(7u64);
        cache.register(TypeId::of::<u64>(), key(200), Box::new(light.clone()));
        assert_eq!(cache.len(), 21);
        drop(values);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        // The bytes themselves are counted in tests/memory_release.rs; here, the entries.
        while cache.len() > 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "the sweeper did not run"
            );
            std::thread::sleep(SWEEP_INTERVAL);
        }
        assert!(cache.get(TypeId::of::<u64>(), key(200)).is_some());
    }
}
