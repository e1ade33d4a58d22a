//! [`InMemoryPagableStorage`]: the whole contract on a concurrent map, nothing on disk.

use std::sync::Arc;

use dashmap::DashMap;

use crate::cache::ArcCache;
use crate::data::PagableData;
use crate::erase::ArcEraseDyn;
use crate::error::Error;
use crate::key::{DataKey, KeyHasherBuilder};
use crate::paging::PagingQueue;
use crate::session::SessionContext;
use crate::storage::PagableStorage;

/// A [`PagableStorage`] that keeps every node in memory.
///
/// For tests, for short-lived graphs and as the model the other backends are checked against.
/// `store_data` of content already stored keeps the first copy; `flush` has nothing to do.
///
/// ```
/// use pagestore::{InMemoryPagableStorage, PagableData, PagableStorage};
///
/// let storage = InMemoryPagableStorage::new();
/// let leaf = storage.store_data(PagableData { data: b"leaf".to_vec(), arcs: vec![] })?;
/// let root = storage.store_data(PagableData { data: b"root".to_vec(), arcs: vec![leaf, leaf] })?;
/// assert_eq!(storage.fetch_data_blocking(&root)?.arcs, [leaf, leaf]);
/// assert_eq!(storage.len(), 2);
/// # anyhow::Ok(())
/// ```
#[derive(Default)]
pub struct InMemoryPagableStorage {
    nodes: DashMap<DataKey, Arc<PagableData>, KeyHasherBuilder>,
    arc_cache: ArcCache,
    paging: PagingQueue,
    session: SessionContext,
}

impl InMemoryPagableStorage {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of distinct nodes stored.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether no node is stored.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Whether a node is stored under `key`.
    pub fn contains(&self, key: &DataKey) -> bool {
        self.nodes.contains_key(key)
    }

    /// Takes the values scheduled for paging that are still alive, oldest first.
    pub fn take_scheduled_for_paging(&self) -> Vec<Box<dyn ArcEraseDyn>> {
        self.paging.drain()
    }
}

#[async_trait::async_trait]
impl PagableStorage for InMemoryPagableStorage {
    fn store_data(&self, data: PagableData) -> anyhow::Result<DataKey> {
        let key = data.compute_key();
        self.nodes.entry(key).or_insert_with(|| Arc::new(data));
        Ok(key)
    }

    fn flush(&self) -> anyhow::Result<()> {
        Ok(())
    }

    fn fetch_data_blocking(&self, key: &DataKey) -> anyhow::Result<Arc<PagableData>> {
        match self.nodes.get(key) {
            Some(node) => Ok(Arc::clone(&node)),
            None => Err(Error::NotFound(*key).into()),
        }
    }

    async fn fetch_data(&self, key: &DataKey) -> anyhow::Result<Arc<PagableData>> {
        // A map lookup never blocks on I/O.
        self.fetch_data_blocking(key)
    }

    fn arc_cache(&self) -> &ArcCache {
        &self.arc_cache
    }

    fn schedule_for_paging(&self, arc: Box<dyn ArcEraseDyn>) {
        self.paging.push(&*arc);
    }

    fn session_context(&self) -> &SessionContext {
        &self.session
    }
}

impl std::fmt::Debug for InMemoryPagableStorage {
    /// Counts only: payloads are never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryPagableStorage")
            .field("nodes", &self.nodes.len())
            .field("arc_cache", &self.arc_cache)
            .field("paging", &self.paging)
            .finish()
    }
}
