//! [`PagableArc<T>`]: a value that leaves memory under the storage's byte budget and comes
//! back when it is pinned.

use std::any::TypeId;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::out::{self, OutNode};
use super::page_in;
use super::session::StorageHandle;
use crate::error::Error;
use crate::key::DataKey;
use crate::runtime::PagableStorage;
use crate::runtime::pager::{Account, Evictable, Eviction};

/// A handle to one value that is either resident in memory or paged out to its storage (then
/// only its key is in memory), and comes back when pinned.
///
/// - [`pin`](Self::pin) returns an `Arc<T>`, faulting the value in from the storage if it was
///   paged out. **Holding that `Arc` is the pin**: while any `Arc` from `pin` is alive the value
///   is never evicted; once they are all dropped it may be.
/// - Under the storage's memory budget (e.g. [`SqliteOptions::memory_budget`]), the storage's
///   pager evicts unpinned values when resident ones weigh more than the budget, least
///   recently pinned first (CLOCK); [`WithRuntime::page_out_unpinned`] evicts all of them now.
///   A value with a key is dropped with no I/O; one without is serialized and stored first,
///   once: it keeps its key for life.
/// - Clones are cheap and share one slot: one value, one key.
/// - Inside a graph paged by [`page_out`](crate::page_out), a `PagableArc` field is a child
///   key, written without touching the value if it already has one; [`page_in`](crate::page_in)
///   gives back paged-out handles, which load nothing until pinned.
///
/// `T` may be unsized: `PagableArc<str>`, `PagableArc<[u8]>`, and `PagableArc<dyn Trait>` for a
/// `#[typetag::serde]` trait ([`from_arc`](Self::from_arc)).
///
/// ```
/// use std::sync::Arc;
/// use pagestore::{InMemoryPagableStorage, PagableArc};
///
/// let storage = Arc::new(InMemoryPagableStorage::new());
/// let big = PagableArc::new(vec![7u8; 1 << 20], &storage);
/// assert!(big.is_resident() && big.key().is_none());
///
/// storage.page_out_unpinned()?;           // nothing pins it: serialized, stored, dropped
/// assert!(!big.is_resident() && big.key().is_some());
///
/// let pinned: Arc<Vec<u8>> = big.pin()?;  // faulted back in
/// assert_eq!(pinned.len(), 1 << 20);
/// assert_eq!(storage.page_out_unpinned()?.pinned, 1, "a pinned value stays");
/// # anyhow::Ok(())
/// ```
///
/// [`SqliteOptions::memory_budget`]: crate::SqliteOptions
/// [`WithRuntime::page_out_unpinned`]: crate::WithRuntime::page_out_unpinned
pub struct PagableArc<T: ?Sized + 'static> {
    slot: Arc<Slot<T>>,
}

/// The state all clones of one [`PagableArc`] share.
struct Slot<T: ?Sized + 'static> {
    state: Mutex<State<T>>,
    /// Set on every pin; the pager's CLOCK hand clears it and skips the value once.
    referenced: AtomicBool,
    /// Held weakly: a handle must never keep a store (and its directory) alive.
    storage: Weak<dyn PagableStorage>,
    /// The storage's [`storage_identity`](PagableStorage::storage_identity): a key this
    /// slot holds is a key in that storage only.
    storage_identity: usize,
}

struct State<T: ?Sized> {
    value: Option<Arc<T>>,
    key: Option<DataKey>,
    /// The value's weight while resident: its record's length once known, else 0.
    weight: usize,
    /// The pager account this value is counted in while resident (`None`: not counted).
    account: Option<Arc<Account>>,
    /// The weight it is counted with.
    counted: usize,
}

impl<T: ?Sized> State<T> {
    /// Stops counting the value as resident.
    fn uncount(&mut self) {
        if let Some(account) = self.account.take() {
            account.remove(self.counted);
        }
    }
}

impl<T: ?Sized> Drop for Slot<T> {
    fn drop(&mut self) {
        let mut state = lock(&self.state);
        state.uncount();
        let value = state.value.take();
        if let Some(value) = &value {
            holders::release(value);
        }
        let key = state.key;
        drop(state);
        drop(value);
        if let Some(key) = key {
            crate::runtime::held_keys::release(self.storage_identity, key);
        }
    }
}

/// How many slots hold each resident value, by the address of its allocation.
///
/// Two handles with one key (two page-ins of a graph, a child referenced twice in one graph,
/// `from_key`, or equal values stored separately) are two slots, and faulting both in gives
/// them one shared `Arc` through the arc cache. A slot's own reference is not a pin: a value
/// is pinned when something other than the slots holding it does (`Arc::strong_count` minus
/// this count). Counting only `strong_count > 1` made each such slot pin the other, so
/// neither was ever evicted.
///
/// A slot counts itself after its reference exists and uncounts itself before dropping it,
/// always under the entry's lock, under which [`pinned`](holders::pinned) also reads both
/// counts: a slot in between is seen as a pin, never the other way round.
mod holders {
    use std::sync::{Arc, LazyLock};

    use dashmap::DashMap;

    static HOLDERS: LazyLock<DashMap<usize, usize>> = LazyLock::new(DashMap::default);

    /// The allocation's address: unique while the slot counted in it keeps it alive.
    fn address<T: ?Sized>(value: &Arc<T>) -> usize {
        Arc::as_ptr(value) as *const u8 as usize
    }

    /// Counts a slot that now holds `value`.
    pub(super) fn adopt<T: ?Sized>(value: &Arc<T>) {
        *HOLDERS.entry(address(value)).or_insert(0) += 1;
    }

    /// Uncounts a slot about to drop its `value`.
    pub(super) fn release<T: ?Sized>(value: &Arc<T>) {
        if let dashmap::Entry::Occupied(mut entry) = HOLDERS.entry(address(value)) {
            *entry.get_mut() -= 1;
            if *entry.get() == 0 {
                entry.remove();
            }
        }
    }

    /// Whether anything besides the slots holding `value` holds it: a pin.
    pub(super) fn pinned<T: ?Sized>(value: &Arc<T>) -> bool {
        let slots = HOLDERS.get(&address(value));
        let slots = slots.as_deref().copied().unwrap_or(1);
        Arc::strong_count(value) > slots
    }
}

impl<T> PagableArc<T>
where
    T: Serialize + Send + Sync + 'static,
    Box<T>: DeserializeOwned,
{
    /// A resident value, not stored yet, paged by `storage` (an `Arc` of a storage type, or an
    /// `Arc<dyn PagableStorage>`).
    pub fn new(value: T, storage: &impl StorageHandle) -> Self {
        Self::from_arc(Arc::new(value), storage)
    }
}

impl<T> PagableArc<T>
where
    T: ?Sized + Serialize + Send + Sync + 'static,
    Box<T>: DeserializeOwned,
{
    /// A resident value from an existing `Arc` (for unsized values: `Arc<str>`, `Arc<[u8]>`,
    /// `Arc<dyn Trait>`). The `Arc` you keep is a pin until you drop it.
    pub fn from_arc(value: Arc<T>, storage: &impl StorageHandle) -> Self {
        let storage = storage.to_dyn();
        let handle = Self::with_state(
            &storage,
            State {
                value: Some(value),
                key: None,
                weight: 0,
                account: None,
                counted: 0,
            },
        );
        handle.schedule(&*storage);
        handle
    }

    /// A paged-out handle to the value stored under `key` in `storage`: nothing is read until
    /// it is pinned (then a key that is not stored is [`Error::NotFound`]).
    pub fn from_key(key: DataKey, storage: &impl StorageHandle) -> Self {
        Self::paged_out(key, &storage.to_dyn())
    }

    pub(crate) fn paged_out(key: DataKey, storage: &Arc<dyn PagableStorage>) -> Self {
        // Garbage collection keeps what a handle names. Whether the key is still stored
        // shows when the handle is pinned.
        storage.hold_key(key);
        Self::with_state(
            storage,
            State {
                value: None,
                key: Some(key),
                weight: 0,
                account: None,
                counted: 0,
            },
        )
    }

    fn with_state(storage: &Arc<dyn PagableStorage>, state: State<T>) -> Self {
        if let Some(value) = &state.value {
            holders::adopt(value);
        }
        Self {
            slot: Arc::new(Slot {
                state: Mutex::new(state),
                referenced: AtomicBool::new(true),
                storage: Arc::downgrade(storage),
                storage_identity: storage.storage_identity(),
            }),
        }
    }

    /// The value, faulted in from the storage if it is paged out. Holding the returned `Arc`
    /// pins the value in memory.
    ///
    /// A fault goes through the storage's arc cache: a value still alive elsewhere comes back
    /// with no I/O and the same identity, and concurrent faults load it once.
    ///
    /// # Errors
    ///
    /// [`Error::StoreClosed`] if the value is paged out and its storage was dropped; the
    /// storage's errors ([`Error::NotFound`], [`Error::Corrupt`], …) naming the key.
    pub fn pin(&self) -> anyhow::Result<Arc<T>> {
        if let Some(value) = self.try_pin() {
            return Ok(value);
        }
        let storage = self.storage()?;
        self.fault_in(storage, None)
    }

    /// [`pin`](Self::pin) for async callers: the value's record (and the records it reaches)
    /// are fetched with the storage's async reads, so an async runtime's worker never blocks
    /// on I/O; only the deserialization runs on the calling task.
    ///
    /// # Errors
    ///
    /// As [`pin`](Self::pin).
    pub async fn pin_async(&self) -> anyhow::Result<Arc<T>> {
        if let Some(value) = self.try_pin() {
            return Ok(value);
        }
        let storage = self.storage()?;
        let Some(key) = self.key() else {
            // Not resident and no key cannot happen; pin reports it if it ever does.
            return self.pin();
        };
        let records = page_in::prefetch(&*storage, key).await?;
        // An async caller must not wait for another thread's eviction.
        crate::runtime::pager::without_waiting(|| self.fault_in(storage, Some(records)))
    }

    /// Makes the value resident (loading it, from `records` if given, unless another thread
    /// did meanwhile), marks it referenced and hands it to the pager.
    fn fault_in(
        &self,
        storage: Arc<dyn PagableStorage>,
        records: Option<page_in::Records>,
    ) -> anyhow::Result<Arc<T>> {
        let mut state = self.slot.lock();
        let value = match &state.value {
            // Faulted in by another thread meanwhile.
            Some(value) => Arc::clone(value),
            None => {
                let key = state.key.expect("a paged-out value has a key");
                let (value, weight) = page_in::load_arc::<T>(&storage, key, records)?;
                state.value = Some(Arc::clone(&value));
                holders::adopt(&value);
                if weight > 0 {
                    state.weight = weight;
                }
                value
            }
        };
        drop(state);
        self.slot.referenced.store(true, Ordering::Relaxed);
        self.schedule(&*storage);
        Ok(value)
    }

    /// The value if it is resident now; never does I/O.
    pub fn try_pin(&self) -> Option<Arc<T>> {
        let value = self.slot.lock().value.clone()?;
        self.slot.referenced.store(true, Ordering::Relaxed);
        Some(value)
    }

    fn storage(&self) -> anyhow::Result<Arc<dyn PagableStorage>> {
        self.slot.storage.upgrade().ok_or_else(|| {
            Error::StoreClosed {
                key: self.key(),
                type_name: std::any::type_name::<T>(),
            }
            .into()
        })
    }

    /// Hands the slot to the storage's pager (`schedule_for_paging`), which counts it against
    /// the budget while it is resident.
    fn schedule(&self, storage: &dyn PagableStorage) {
        let slot: Arc<dyn Evictable> = self.slot.clone();
        storage.schedule_for_paging(Box::new(slot));
    }
}

impl<T: ?Sized + 'static> PagableArc<T> {
    /// The key the value is stored under: `Some` once it was paged out (or written inside a
    /// paged-out graph), or if the handle was paged in; it never changes after that.
    pub fn key(&self) -> Option<DataKey> {
        self.slot.lock().key
    }

    /// Whether the value is in memory now.
    pub fn is_resident(&self) -> bool {
        self.slot.lock().value.is_some()
    }

    /// Whether `a` and `b` are clones of one handle (one slot).
    pub fn ptr_eq(a: &Self, b: &Self) -> bool {
        Arc::ptr_eq(&a.slot, &b.slot)
    }
}

impl<T: ?Sized> Slot<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Every critical section leaves the state consistent before anything can panic.
        lock(&self.state)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl<T> Evictable for Slot<T>
where
    T: ?Sized + Serialize + Send + Sync + 'static,
{
    fn track(&self, account: &Arc<Account>) -> bool {
        let mut state = self.lock();
        if state.value.is_none() || state.account.is_some() {
            return false;
        }
        if state.weight == 0 {
            // Never serialized: weigh it by its record's length, measured without storing.
            let value = state.value.as_deref().expect("checked above");
            // The user's `Serialize` runs under this slot's lock: it must not wait for the
            // pager's ring (an eviction holding it may be waiting for this slot).
            state.weight = crate::runtime::pager::without_waiting(|| {
                out::record_len(value).unwrap_or(std::mem::size_of_val(value))
            });
        }
        if state.key.is_some() {
            // Resident again with a key: it was paged out and faulted back in.
            account.faults.fetch_add(1, Ordering::Relaxed);
        }
        account.add(state.weight);
        state.counted = state.weight;
        state.account = Some(Arc::clone(account));
        true
    }

    fn take_referenced(&self) -> bool {
        self.referenced.swap(false, Ordering::Relaxed)
    }

    fn evict(&self, storage: &Arc<dyn PagableStorage>) -> Eviction {
        let mut state = self.lock();
        let Some(value) = &state.value else {
            return Eviction::NotResident;
        };
        // Only slots hold it (this one, and others with its key): nobody pins it.
        if holders::pinned(value) {
            return Eviction::Pinned;
        }
        let serialized = state.key.is_none();
        if serialized {
            let value = Arc::clone(value);
            match out::page_out_sized(storage, &*value) {
                Ok((key, _)) if !storage.hold_key(key) => {
                    // A garbage collection deleted it right after it was stored: keep the
                    // value (the next eviction stores it again).
                    crate::runtime::held_keys::release(self.storage_identity, key);
                    return Eviction::Failed(anyhow::anyhow!(
                        "{key} was deleted by a garbage collection while it was paged out"
                    ));
                }
                Ok((key, len)) => {
                    state.key = Some(key);
                    state.weight = len;
                    if let Some(account) = &state.account {
                        account.serializations.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(err) => return Eviction::Failed(err),
            }
        }
        let value = state.value.take();
        if let Some(value) = &value {
            holders::release(value);
        }
        state.uncount();
        drop(state);
        // Dropped outside the slot's lock: a `Drop` of the value may use this handle.
        drop(value);
        Eviction::Evicted { serialized }
    }
}

/// A `PagableArc` met while its parent is paged out: serialized as a child node once, after
/// which the slot keeps the key.
struct UnstoredChild<T: ?Sized + 'static> {
    value: Arc<T>,
    slot: Arc<Slot<T>>,
}

impl<T: ?Sized + Serialize + Send + Sync + 'static> OutNode for UnstoredChild<T> {
    fn encode(&self) -> Result<Vec<u8>, postcard::Error> {
        self.value.encode()
    }

    fn failure_message(&self) -> String {
        self.value.failure_message()
    }

    fn type_name(&self) -> &'static str {
        std::any::type_name::<T>()
    }

    fn stored(&self, key: DataKey) {
        let mut state = self.slot.lock();
        if state.key.is_none() {
            if let Some(storage) = self.slot.storage.upgrade() {
                // Stored by the walk that is storing the parent: protected by that store.
                storage.hold_key(key);
            }
            state.key = Some(key);
            if let Some(account) = &state.account {
                account.serializations.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// A `PagableArc` that already has a key: written by key.
struct StoredChild {
    key: DataKey,
    /// Keeps the slot's address this handle's for the walk (see `serialize`).
    _slot: Arc<dyn std::any::Any + Send + Sync>,
}

impl OutNode for StoredChild {
    fn encode(&self) -> Result<Vec<u8>, postcard::Error> {
        unreachable!("a stored child is written by key")
    }

    fn failure_message(&self) -> String {
        String::new()
    }

    fn type_name(&self) -> &'static str {
        "a stored PagableArc"
    }

    fn known_key(&self) -> Option<DataKey> {
        Some(self.key)
    }
}

impl<T> Serialize for PagableArc<T>
where
    T: ?Sized + Serialize + Send + Sync + 'static,
    Box<T>: DeserializeOwned,
{
    /// Inside [`page_out`](crate::page_out): a child reference, by key if the value has one
    /// (its value is not touched), else to the value, which is stored once and keeps the key.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let (key, value) = {
            let state = self.slot.lock();
            (state.key, state.value.clone())
        };
        let identity = (
            TypeId::of::<Slot<T>>(),
            Arc::as_ptr(&self.slot) as *const u8 as usize,
        );
        let home = out::target_storage().is_none_or(|target| target == self.slot.storage_identity);
        let recorded = match (key, value) {
            // The slot is held by the entry for the whole walk, so its address cannot be
            // reused by another (temporary) handle and alias this entry.
            (Some(key), _) if home => out::record_node(identity, false, || {
                Box::new(StoredChild {
                    key,
                    _slot: self.slot.clone(),
                })
            }),
            (None, Some(value)) if home => out::record_node(identity, false, || {
                Box::new(UnstoredChild {
                    value,
                    slot: Arc::clone(&self.slot),
                })
            }),
            // Written into another storage: its key (if any) means nothing there, and a key
            // the walk finds there must not become this slot's. Its value is serialized as a
            // plain shared value (faulted in from its own storage first if it is paged out).
            (_, value) => {
                let value = match value {
                    Some(value) => value,
                    None => self
                        .pin()
                        .map_err(|err| serde::ser::Error::custom(format!("{err:#}")))?,
                };
                out::record_child(&value)
            }
        };
        recorded.map_err(serde::ser::Error::custom)?;
        serializer.serialize_unit()
    }
}

impl<'de, T> Deserialize<'de> for PagableArc<T>
where
    T: ?Sized + Serialize + Send + Sync + 'static,
    Box<T>: DeserializeOwned,
{
    /// Inside [`page_in`](crate::page_in): a paged-out handle to the child, loaded when pinned.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        <()>::deserialize(deserializer)?;
        let (key, storage) = page_in::next_child_key().map_err(serde::de::Error::custom)?;
        Ok(Self::paged_out(key, &storage))
    }
}

impl<T: ?Sized + 'static> Clone for PagableArc<T> {
    fn clone(&self) -> Self {
        Self {
            slot: Arc::clone(&self.slot),
        }
    }
}

impl<T: ?Sized + 'static> fmt::Debug for PagableArc<T> {
    /// The key and residency; never the value (printing it could fault it in).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.slot.lock();
        f.debug_struct("PagableArc")
            .field("type", &std::any::type_name::<T>())
            .field("key", &state.key)
            .field("resident", &state.value.is_some())
            .finish()
    }
}
