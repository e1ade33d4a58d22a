//! The runtime: everything about live values, written once and attached to any node store.
//!
//! [`WithRuntime`] pairs a [`NodeStore`] with the arc cache (`(TypeId, DataKey)` → weak
//! `Arc`, load-once), the paging queue and the session context, and implements
//! [`PagableStorage`] over them. Nothing here does I/O of its own: bytes go through the
//! node store.

mod builtin;
mod cache;
mod paging;
mod session;
mod storage;

use std::any::TypeId;
use std::sync::Arc;

use either::Either;

pub use builtin::InMemoryPagableStorage;
#[cfg(feature = "sqlite")]
pub use builtin::SqliteBackedPagableStorage;
use cache::ArcCache;
use paging::PagingQueue;
pub use session::SessionContext;
pub use storage::PagableStorage;

use crate::data::PagableData;
use crate::erase::ArcEraseDyn;
use crate::key::DataKey;
use crate::store::NodeStore;

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
    store: S,
    arc_cache: ArcCache,
    paging: PagingQueue,
    session: SessionContext,
}

impl<S: NodeStore> WithRuntime<S> {
    /// Attaches a fresh runtime (empty arc cache, paging queue and session context) to
    /// `store`.
    pub fn attach(store: S) -> Self {
        Self {
            store,
            arc_cache: ArcCache::new(),
            paging: PagingQueue::default(),
            session: SessionContext::new(),
        }
    }

    /// The node store underneath.
    pub fn node_store(&self) -> &S {
        &self.store
    }

    /// Detaches the runtime (dropping its cache and queue) and returns the node store.
    pub fn into_node_store(self) -> S {
        self.store
    }

    /// The number of entries in the arc cache, dead ones not yet pruned included.
    pub fn arc_cache_len(&self) -> usize {
        self.arc_cache.len()
    }
}

impl<S> std::ops::Deref for WithRuntime<S> {
    type Target = S;

    fn deref(&self) -> &S {
        &self.store
    }
}

#[async_trait::async_trait]
impl<S: NodeStore> PagableStorage for WithRuntime<S> {
    fn store_data(&self, data: PagableData) -> anyhow::Result<DataKey> {
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

    /// Load-once: while one caller fetches and deserializes `(type_id, key)`, the others wait
    /// for it and share its value.
    fn resolve_arc(
        &self,
        type_id: TypeId,
        key: DataKey,
        prefetched: Option<Arc<PagableData>>,
        deserialize: &mut dyn FnMut(Arc<PagableData>) -> anyhow::Result<Box<dyn ArcEraseDyn>>,
    ) -> anyhow::Result<Box<dyn ArcEraseDyn>> {
        self.arc_cache.get_or_load(type_id, key, || {
            let node = match prefetched {
                Some(node) => node,
                None => self.store.get(&key)?,
            };
            deserialize(node)
        })
    }

    fn schedule_for_paging(&self, arc: Box<dyn ArcEraseDyn>) {
        self.paging.push(&*arc);
    }

    fn session_context(&self) -> &SessionContext {
        &self.session
    }

    /// Prunes dead arc-cache and paging-queue entries, then releases the node store's caches.
    fn release_memory(&self) {
        self.arc_cache.prune();
        self.paging.prune();
        self.store.release_memory();
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for WithRuntime<S> {
    /// The store's own `Debug` and the runtime's counts; payloads are never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WithRuntime")
            .field("store", &self.store)
            .field("arc_cache", &self.arc_cache)
            .field("paging", &self.paging)
            .finish()
    }
}
