//! The runtime: everything about live values, written once and attached to any node store.
//!
//! [`WithRuntime`] pairs a [`NodeStore`] with the arc cache (`(TypeId, DataKey)` → weak
//! `Arc`, load-once), the pager (memory budget, CLOCK ring, worker) and the session context,
//! and implements [`PagableStorage`] over them. Nothing here does I/O of its own: bytes go
//! through the node store.

mod builtin;
mod cache;
pub(crate) mod held_keys;
mod in_flight;
mod memo;
pub(crate) mod pager;
mod session;
mod storage;

use std::any::TypeId;
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use either::Either;

pub use builtin::InMemoryPagableStorage;
#[cfg(feature = "sqlite")]
pub use builtin::{SqliteBackedPagableStorage, TieredStorage};
use cache::ArcCache;
use memo::KeyMemo;
use pager::{Evictable, Pager};
pub use pager::{PageOutReport, PagingStats};
pub use session::SessionContext;
pub use storage::PagableStorage;

use crate::data::PagableData;
use crate::erase::ArcEraseDyn;
use crate::key::DataKey;
use crate::store::{GcOptions, GcReport, NodeStore, StoreStats};

/// A snapshot of a [`WithRuntime`]'s figures: its store's and its runtime's, from
/// [`WithRuntime::stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StorageStats {
    /// The node store's figures ([`NodeStore::store_stats`]); `None` for a store that keeps
    /// none.
    pub store: Option<StoreStats>,
    /// Entries in the arc cache (live values by type and key), dead ones not yet pruned
    /// included.
    pub arc_cache_entries: usize,
    /// The pager's figures, as [`WithRuntime::paging_stats`] returns them.
    pub paging: PagingStats,
}

/// A [`NodeStore`] with pagestore's runtime attached: the [`PagableStorage`] the graph layer
/// and users work with.
///
/// [`InMemoryPagableStorage`](crate::InMemoryPagableStorage) and
/// `SqliteBackedPagableStorage` are this type over the built-in stores. It dereferences to
/// the node store, so a store's own methods (`verify`, `len`, …) are called on it directly.
///
/// ```
/// use std::sync::Arc;
/// use pagestore::{page_in, page_out, MemoryNodeStore, Shared, WithRuntime};
///
/// // Any NodeStore works the same way; MemoryNodeStore stands in for your own backend.
/// let storage = Arc::new(WithRuntime::attach(MemoryNodeStore::new()));
/// let word = Shared::new(String::from("shared"));
/// let key = page_out(&storage, &vec![word.clone(), word])?;
/// let back: Vec<Shared<String>> = page_in(&storage, key)?;
/// assert!(Shared::ptr_eq(&back[0], &back[1]));
/// assert_eq!(storage.len(), 2, "the list and one string");
/// # anyhow::Ok(())
/// ```
pub struct WithRuntime<S> {
    /// First, so the worker has stopped before the runtime (and its store) is dropped.
    worker: Worker,
    runtime: Arc<Runtime<S>>,
}

/// The store and the runtime's state. Only [`WithRuntime`] holds it strongly, apart from the
/// pager's worker during one pass: dropping the `WithRuntime` joins the worker, then drops
/// this, so the store closes (and its directory is free) by the time the drop returns.
struct Runtime<S> {
    pager: Arc<Pager>,
    arc_cache: ArcCache,
    memo: KeyMemo,
    /// The batched reads in flight, which concurrent `fetch_data_many` calls share.
    in_flight: in_flight::InFlight,
    /// Roots `page_out` returned lately, oldest first, with when: kept by collections for
    /// `gc_grace` after that.
    fresh: Mutex<Fresh>,
    session: SessionContext,
    store: S,
}

/// How long the root a `page_out` returned is kept by garbage collection, by default.
pub const DEFAULT_GC_GRACE: Duration = Duration::from_secs(60);

/// Roots `page_out` returned lately (see [`WithRuntime::gc_grace`]).
struct Fresh {
    /// Oldest first.
    keys: std::collections::VecDeque<(DataKey, Instant)>,
    grace: Duration,
}

impl Fresh {
    /// Drops the roots older than the grace.
    fn expire(&mut self) {
        while let Some(&(_, returned)) = self.keys.front() {
            if returned.elapsed() < self.grace {
                break;
            }
            self.keys.pop_front();
        }
    }
}

thread_local! {
    /// The runtime (its address) and the store's garbage-collection epoch read just before
    /// this thread's latest `store_data`: `remember_key`, which follows it, checks that no
    /// collection began since.
    static PUT_EPOCH: std::cell::Cell<(usize, u64)> = const { std::cell::Cell::new((0, u64::MAX)) };
}

impl<S: NodeStore> Runtime<S> {
    /// Called after recording (in the memo, the arc cache or the held keys) that `key` is
    /// stored, knowing it was stored at garbage-collection epoch `before`: whether it still
    /// is. Free unless a collection began since `before` or runs now; then the key is
    /// protected from the running one and looked up (a key deleted meanwhile is `false`,
    /// and the caller forgets it).
    ///
    /// The record comes first and the epoch is read after it, while a collection moves the
    /// epoch before it lists the live keys: either the collection sees the record, or this
    /// sees the collection.
    fn still_stored(&self, key: &DataKey, before: u64) -> bool {
        let now = self.store.gc_epoch();
        if now == 0 || (now == before && now % 2 == 0) {
            return true;
        }
        if now % 2 == 1 {
            self.store.protect(key);
        }
        self.store.contains(key).unwrap_or(false)
    }

    fn fresh(&self) -> std::sync::MutexGuard<'_, Fresh> {
        self.fresh.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The collection epoch read before this thread's latest `store_data` on this runtime;
    /// `u64::MAX` (never current) if its latest was on another one.
    fn epoch_before_last_put(&self) -> u64 {
        match PUT_EPOCH.get() {
            (runtime, epoch) if runtime == self.storage_identity() => epoch,
            _ => u64::MAX,
        }
    }

    /// Hands every key the runtime relies on to `keep`: live arc-cache values, remembered
    /// keys of live values, keys of paged-out `PagableArc`s, roots `page_out` returned lately.
    fn live_keys(&self, keep: &mut dyn FnMut(DataKey)) {
        self.arc_cache.for_each_live_key(keep);
        self.memo.for_each_live_key(keep);
        held_keys::for_each(self.storage_identity(), keep);
        let mut fresh = self.fresh();
        fresh.expire();
        for (key, _) in &fresh.keys {
            keep(*key);
        }
    }
}

/// The pager's worker thread, started the first time resident values exceed the budget and
/// stopped (and joined) when the runtime is dropped.
struct Worker {
    pager: Arc<Pager>,
    handle: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.pager.shutdown();
        let handle = self
            .handle
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(handle) = handle {
            // A panic in the worker was already reported by the panic hook.
            let _ = handle.join();
        }
    }
}

impl<S: NodeStore> WithRuntime<S> {
    /// Attaches a fresh runtime (empty arc cache, no memory budget, an empty session context)
    /// to `store`.
    pub fn attach(store: S) -> Self {
        let runtime = Arc::new_cyclic(|runtime: &Weak<Runtime<S>>| {
            // The worker reaches the storage through this, never keeping it alive.
            let storage: Weak<dyn PagableStorage> = runtime.clone();
            Runtime {
                pager: Arc::new(Pager::new(usize::MAX, storage)),
                arc_cache: ArcCache::new(),
                memo: KeyMemo::default(),
                in_flight: in_flight::InFlight::default(),
                fresh: Mutex::new(Fresh {
                    keys: std::collections::VecDeque::new(),
                    grace: DEFAULT_GC_GRACE,
                }),
                session: SessionContext::new(),
                store,
            }
        });
        Self {
            worker: Worker {
                pager: Arc::clone(&runtime.pager),
                handle: Mutex::new(None),
            },
            runtime,
        }
    }

    /// Sets the byte budget for resident [`PagableArc`](crate::PagableArc) values: when the
    /// ones that are resident weigh more, a background worker pages out unpinned ones (least
    /// recently pinned first) until they fit. A value weighs its record's length. Default =
    /// no budget (`usize::MAX`): values leave memory only through
    /// [`page_out_unpinned`](Self::page_out_unpinned).
    #[must_use]
    pub fn memory_budget(self, bytes: usize) -> Self {
        self.runtime.pager.set_budget(bytes);
        self
    }

    /// Sets how long garbage collection keeps the root a [`page_out`](crate::page_out) just
    /// returned (and what it reaches), so that the caller can name it a root
    /// ([`NodeStore::set_root`]) or otherwise hold it first: a `set_root` within that time
    /// names a stored graph even with collections running back to back. Default
    /// [`DEFAULT_GC_GRACE`] (60 s); zero keeps nothing (then a collection that runs between
    /// a `page_out` and its `set_root` may delete the graph, and `set_root` fails with
    /// [`Error::NotFound`](crate::Error::NotFound)). Costs one key and a timestamp per
    /// `page_out` within the grace.
    #[must_use]
    pub fn gc_grace(self, grace: Duration) -> Self {
        self.runtime.fresh().grace = grace;
        self
    }

    /// Pages out every [`PagableArc`](crate::PagableArc) value of this storage that is not
    /// pinned now (for idle time): values with a key are dropped, the others serialized and
    /// stored first. Pinned values and values whose page-out fails stay (the report counts
    /// them; failures are logged).
    ///
    /// # Errors
    ///
    /// None today: a failed page-out is counted in the report and leaves the value resident.
    /// The `Result` leaves room for store-wide failures.
    pub fn page_out_unpinned(&self) -> anyhow::Result<PageOutReport> {
        let storage: Arc<dyn PagableStorage> = self.runtime.clone();
        Ok(self.runtime.pager.page_out_unpinned(&storage))
    }

    /// The paging figures: budget, resident bytes and values, faults, evictions,
    /// serializations.
    pub fn paging_stats(&self) -> PagingStats {
        self.runtime.pager.stats()
    }

    /// The node store underneath.
    pub fn node_store(&self) -> &S {
        &self.runtime.store
    }

    /// Detaches the runtime (stopping its worker, dropping its cache and pager) and returns
    /// the node store.
    pub fn into_node_store(self) -> S {
        let WithRuntime { worker, runtime } = self;
        drop(worker);
        // The joined worker held the only other strong handle.
        match Arc::try_unwrap(runtime) {
            Ok(runtime) => runtime.store,
            Err(_) => unreachable!("only the worker shares the runtime, and it was joined"),
        }
    }

    /// The store's figures ([`NodeStore::store_stats`]) with the runtime's: arc-cache
    /// entries and the paging figures. Shadows the store's own `stats` (reached through
    /// [`node_store`](Self::node_store)); costs what the store's figures cost.
    pub fn stats(&self) -> anyhow::Result<StorageStats> {
        Ok(StorageStats {
            store: self.runtime.store.store_stats()?,
            arc_cache_entries: self.arc_cache_len(),
            paging: self.paging_stats(),
        })
    }

    /// Deletes every stored node that neither a root nor this process needs, and gives the
    /// space back: [`NodeStore::collect_garbage`] with the runtime's live keys (values alive
    /// in the arc cache, keys remembered for live values, paged-out
    /// [`PagableArc`](crate::PagableArc)s). Safe while other threads page out, page in,
    /// store and set roots (see the store's contract, item 9).
    ///
    /// A value whose key a collection deleted while this process loaded or stored it is not
    /// lost: the runtime forgets that key, so the next page-out stores the value again. The
    /// root a [`page_out`](crate::page_out) returns is kept for a grace period
    /// ([`gc_grace`](Self::gc_grace), 60 s by default), so that `set_root` right after
    /// `page_out` names a stored graph even with collections running.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use pagestore::{page_out, InMemoryPagableStorage, NodeStore, Shared};
    ///
    /// let storage = Arc::new(InMemoryPagableStorage::new());
    /// let kept = page_out(&storage, &Shared::new(String::from("named")))?;
    /// storage.set_root("latest", kept)?;
    /// page_out(&storage, &String::from("temporary"))?;
    ///
    /// // A root page_out returned is kept for a grace period (60 s by default), for its
    /// // caller to name; a collection then deletes what nothing holds.
    /// assert_eq!(storage.gc()?.deleted, 0);
    /// let storage = Arc::new(Arc::into_inner(storage).unwrap().gc_grace(Duration::ZERO));
    /// assert_eq!(storage.gc()?.deleted, 1, "the temporary string");
    /// assert!(storage.contains(&kept)?);
    /// # anyhow::Ok(())
    /// ```
    pub fn gc(&self) -> anyhow::Result<GcReport> {
        self.gc_with(&GcOptions::new())
    }

    /// What [`gc`](Self::gc) would delete, deleting nothing.
    pub fn gc_dry_run(&self) -> anyhow::Result<GcReport> {
        self.gc_with(&GcOptions::new().dry_run(true))
    }

    /// [`gc`](Self::gc) with options: a dry run, more live keys (added to the runtime's),
    /// progress reports.
    pub fn gc_with(&self, options: &GcOptions<'_>) -> anyhow::Result<GcReport> {
        let runtime = &*self.runtime;
        let extra = options.live;
        let live = |keep: &mut dyn FnMut(DataKey)| {
            runtime.live_keys(keep);
            if let Some(extra) = extra {
                extra(keep);
            }
        };
        let mut with_runtime = *options;
        with_runtime.live = Some(&live);
        runtime.store.collect_garbage(&with_runtime)
    }

    /// The number of entries in the arc cache, dead ones not yet pruned included.
    pub fn arc_cache_len(&self) -> usize {
        self.runtime.arc_cache.len()
    }

    /// Starts the pager's worker once the budget is first exceeded.
    fn ensure_worker(&self) {
        let pager = &self.runtime.pager;
        if !pager.needs_worker() || !pager.claim_worker() {
            return;
        }
        match pager::spawn_worker(pager) {
            Ok(handle) => {
                *self.worker.handle.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
            }
            Err(err) => log::error!(
                "pagestore: could not start the paging worker ({err}); values stay resident \
                 until page_out_unpinned"
            ),
        }
    }
}

impl<S> std::ops::Deref for WithRuntime<S> {
    type Target = S;

    fn deref(&self) -> &S {
        &self.runtime.store
    }
}

/// The one implementation of the storage contract over a node store.
#[async_trait::async_trait]
impl<S: NodeStore> PagableStorage for Runtime<S> {
    fn store_data(&self, data: PagableData) -> anyhow::Result<DataKey> {
        let before = self.store.gc_epoch();
        PUT_EPOCH.set((self.storage_identity(), before));
        self.store.put(data)
    }

    fn flush(&self) -> anyhow::Result<()> {
        self.store.flush()
    }

    fn fetch_data_blocking(&self, key: &DataKey) -> anyhow::Result<Arc<PagableData>> {
        self.store.get(key)
    }

    async fn fetch_data(&self, key: &DataKey) -> anyhow::Result<Arc<PagableData>> {
        self.store.get_async(key).await
    }

    /// Shares reads: the keys another call is reading now are not read again but waited for
    /// (and read here only if that read fails or is dropped), and a node another call read
    /// and that is still alive (held by a `page_in_async`'s prefetched records, say) is taken
    /// as is.
    async fn fetch_data_many(&self, keys: &[DataKey]) -> anyhow::Result<Vec<Arc<PagableData>>> {
        let (claims, mine, alive, theirs) = self.in_flight.claim(keys);
        let mut found: Vec<Option<Arc<PagableData>>> = vec![None; keys.len()];
        for (i, node) in alive {
            found[i] = Some(node);
        }
        if !mine.is_empty() {
            let wanted: Vec<DataKey> = mine.iter().map(|&i| keys[i]).collect();
            // On an error, dropping the claims tells the waiters to read for themselves.
            let nodes = self.store.get_many_async(&wanted).await?;
            claims.publish(&nodes);
            for (&i, node) in mine.iter().zip(nodes) {
                found[i] = Some(node);
            }
        }
        drop(claims);
        let mut again = Vec::new();
        for (i, slot) in theirs {
            match slot.wait().await {
                Some(node) => found[i] = Some(node),
                None => again.push(i),
            }
        }
        if !again.is_empty() {
            let wanted: Vec<DataKey> = again.iter().map(|&i| keys[i]).collect();
            let nodes = self.store.get_many_async(&wanted).await?;
            for (&i, node) in again.iter().zip(nodes) {
                found[i] = Some(node);
            }
        }
        found
            .into_iter()
            .zip(keys)
            .map(|(node, key)| node.ok_or_else(|| crate::error::Error::NotFound(*key).into()))
            .collect()
    }

    fn fetch_arc_or_data_blocking(
        &self,
        type_id: &TypeId,
        key: &DataKey,
    ) -> anyhow::Result<Either<Box<dyn ArcEraseDyn>, Arc<PagableData>>> {
        match self.arc_cache.get(*type_id, *key) {
            Some(arc) => Ok(Either::Left(arc)),
            None => self.store.get(key).map(Either::Right),
        }
    }

    fn on_arc_deserialized(
        &self,
        type_id: TypeId,
        key: DataKey,
        arc: Box<dyn ArcEraseDyn>,
    ) -> Option<Box<dyn ArcEraseDyn>> {
        self.arc_cache.register(type_id, key, arc)
    }

    /// A live value in the arc cache, of any type it was paged in or out as.
    fn holds_live(&self, key: &DataKey) -> bool {
        self.arc_cache.is_live(*key)
    }

    fn resolve_arc(
        &self,
        type_id: TypeId,
        key: DataKey,
        prefetched: Option<Arc<PagableData>>,
        deserialize: &mut dyn FnMut(Arc<PagableData>) -> anyhow::Result<Box<dyn ArcEraseDyn>>,
    ) -> anyhow::Result<Box<dyn ArcEraseDyn>> {
        // A prefetched record was read at an unknown epoch: checked if any collection ran.
        let before = match prefetched {
            Some(_) => u64::MAX,
            None => self.store.gc_epoch(),
        };
        let value = self.arc_cache.get_or_load(type_id, key, || {
            let node = match prefetched {
                Some(node) => node,
                None => self.store.get(&key)?,
            };
            deserialize(node)
        })?;
        if !self.still_stored(&key, before) {
            self.arc_cache.forget_key(type_id, value.identity(), key);
        }
        Ok(value)
    }

    fn key_of(&self, type_id: &TypeId, identity: usize) -> Option<DataKey> {
        self.memo
            .key_of(*type_id, identity)
            .or_else(|| self.arc_cache.key_of(*type_id, identity))
    }

    fn remember_key(&self, type_id: TypeId, key: DataKey, arc: &dyn ArcEraseDyn) {
        self.memo.remember(type_id, key, arc);
        let before = self.epoch_before_last_put();
        if !self.still_stored(&key, before) {
            self.memo.forget(type_id, arc.identity(), key);
        }
    }

    fn hold_key(&self, key: DataKey) -> bool {
        held_keys::hold(self.storage_identity(), key);
        self.still_stored(&key, u64::MAX)
    }

    fn keep_fresh(&self, key: DataKey) -> bool {
        {
            let mut fresh = self.fresh();
            fresh.expire();
            if fresh.grace > Duration::ZERO {
                fresh.keys.push_back((key, Instant::now()));
            }
        }
        // The root is the last node a page-out stores: `PUT_EPOCH` is from before its put.
        let before = self.epoch_before_last_put();
        self.still_stored(&key, before)
    }

    fn schedule_for_paging(&self, arc: Box<dyn ArcEraseDyn>) {
        if let Some(slot) = arc.as_any().downcast_ref::<Arc<dyn Evictable>>() {
            self.pager.track(Arc::clone(slot));
        }
    }

    fn session_context(&self) -> &SessionContext {
        &self.session
    }

    fn release_memory(&self) {
        self.arc_cache.prune();
        self.memo.prune();
        self.pager.prune();
        self.in_flight.prune();
        self.store.release_memory();
    }
}

/// Forwards to the runtime; see [`PagableStorage`] for each method's contract.
#[async_trait::async_trait]
impl<S: NodeStore> PagableStorage for WithRuntime<S> {
    fn store_data(&self, data: PagableData) -> anyhow::Result<DataKey> {
        self.runtime.store_data(data)
    }

    fn flush(&self) -> anyhow::Result<()> {
        self.runtime.flush()
    }

    fn fetch_data_blocking(&self, key: &DataKey) -> anyhow::Result<Arc<PagableData>> {
        self.runtime.fetch_data_blocking(key)
    }

    async fn fetch_data(&self, key: &DataKey) -> anyhow::Result<Arc<PagableData>> {
        self.runtime.fetch_data(key).await
    }

    async fn fetch_data_many(&self, keys: &[DataKey]) -> anyhow::Result<Vec<Arc<PagableData>>> {
        self.runtime.fetch_data_many(keys).await
    }

    fn fetch_arc_or_data_blocking(
        &self,
        type_id: &TypeId,
        key: &DataKey,
    ) -> anyhow::Result<Either<Box<dyn ArcEraseDyn>, Arc<PagableData>>> {
        self.runtime.fetch_arc_or_data_blocking(type_id, key)
    }

    fn on_arc_deserialized(
        &self,
        type_id: TypeId,
        key: DataKey,
        arc: Box<dyn ArcEraseDyn>,
    ) -> Option<Box<dyn ArcEraseDyn>> {
        self.runtime.on_arc_deserialized(type_id, key, arc)
    }

    fn holds_live(&self, key: &DataKey) -> bool {
        self.runtime.holds_live(key)
    }

    /// Load-once: while one caller fetches and deserializes `(type_id, key)`, the others wait
    /// for it and share its value.
    fn resolve_arc(
        &self,
        type_id: TypeId,
        key: DataKey,
        prefetched: Option<Arc<PagableData>>,
        deserialize: &mut dyn FnMut(Arc<PagableData>) -> anyhow::Result<Box<dyn ArcEraseDyn>>,
    ) -> anyhow::Result<Box<dyn ArcEraseDyn>> {
        self.runtime
            .resolve_arc(type_id, key, prefetched, deserialize)
    }

    fn key_of(&self, type_id: &TypeId, identity: usize) -> Option<DataKey> {
        self.runtime.key_of(type_id, identity)
    }

    /// The runtime's address, which the worker's handle (the runtime itself) shares.
    fn storage_identity(&self) -> usize {
        self.runtime.storage_identity()
    }

    fn remember_key(&self, type_id: TypeId, key: DataKey, arc: &dyn ArcEraseDyn) {
        self.runtime.remember_key(type_id, key, arc);
    }

    fn hold_key(&self, key: DataKey) -> bool {
        self.runtime.hold_key(key)
    }

    fn keep_fresh(&self, key: DataKey) -> bool {
        self.runtime.keep_fresh(key)
    }

    /// Tracks a [`PagableArc`](crate::PagableArc)'s value against the memory budget; other
    /// values are ignored (only a `PagableArc` can be paged out and back).
    fn schedule_for_paging(&self, arc: Box<dyn ArcEraseDyn>) {
        self.runtime.schedule_for_paging(arc);
        self.ensure_worker();
        self.runtime.pager.help(|| self.runtime.clone());
    }

    fn session_context(&self) -> &SessionContext {
        self.runtime.session_context()
    }

    /// Prunes dead arc-cache and pager entries, then releases the node store's caches.
    fn release_memory(&self) {
        self.runtime.release_memory();
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for WithRuntime<S> {
    /// The store's own `Debug` and the runtime's counts; payloads are never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WithRuntime")
            .field("store", &self.runtime.store)
            .field("arc_cache", &self.runtime.arc_cache)
            .field("paging", &self.runtime.pager.stats())
            .finish()
    }
}
