//! [`MemoryNodeStore`]: the node-store contract on a concurrent map, nothing on disk.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use dashmap::DashMap;

use crate::data::PagableData;
use crate::error::Error;
use crate::key::{DataKey, KeyHasherBuilder};
use crate::store::gc::{self, Collectable, GcGate, StoredKey};
use crate::store::{GcOptions, GcReport, NodeStore, StoreStats};

/// A [`NodeStore`] that keeps every node in memory.
///
/// For tests, for short-lived graphs and as the model the other stores are checked against.
/// Storing content already stored keeps the first copy; `flush` has nothing to do.
/// Most users want [`InMemoryPagableStorage`](crate::InMemoryPagableStorage), which attaches the runtime to it.
#[derive(Default)]
pub struct MemoryNodeStore {
    nodes: DashMap<DataKey, Arc<PagableData>, KeyHasherBuilder>,
    roots: Mutex<BTreeMap<String, DataKey>>,
    gc: GcGate,
}

impl MemoryNodeStore {
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

    /// The store's figures: records and their encoded bytes ([`codec`](crate::codec)
    /// length, computed from each node without encoding it), roots. Nothing is pending and
    /// there are no files or pages, so those figures are 0 or `None`. O(records): visits
    /// every entry of the map, one shard's read lock at a time.
    pub fn stats(&self) -> StoreStats {
        let mut records = 0u64;
        let mut data_bytes = 0u64;
        for entry in self.nodes.iter() {
            records += 1;
            data_bytes += crate::codec::encoded_len(entry.value()) as u64;
        }
        StoreStats {
            records,
            data_bytes,
            roots: self.roots_map().len() as u64,
            ..StoreStats::default()
        }
    }

    /// Deletes every node no root reaches (see [`NodeStore::collect_garbage`]; for a store
    /// with a runtime attached, call [`WithRuntime::gc`](crate::WithRuntime::gc), which also
    /// keeps the values the runtime holds).
    pub fn gc(&self) -> anyhow::Result<GcReport> {
        self.collect_garbage(&GcOptions::new())
    }

    /// What [`gc`](Self::gc) would delete, deleting nothing.
    pub fn gc_dry_run(&self) -> anyhow::Result<GcReport> {
        self.collect_garbage(&GcOptions::new().dry_run(true))
    }

    /// Stores `node` without checking its children (see `testing::store_unchecked`).
    #[cfg(feature = "testing")]
    pub(crate) fn put_unchecked(&self, node: PagableData) -> DataKey {
        let key = node.compute_key();
        self.nodes.entry(key).or_insert_with(|| Arc::new(node));
        key
    }

    fn roots_map(&self) -> MutexGuard<'_, BTreeMap<String, DataKey>> {
        // Every critical section leaves the map consistent.
        self.roots.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait::async_trait]
impl NodeStore for MemoryNodeStore {
    fn put(&self, node: PagableData) -> anyhow::Result<DataKey> {
        let key = node.compute_key();
        let entered = self.gc.enter();
        self.gc.vouch(
            &entered,
            std::iter::once(key).chain(node.arcs.iter().copied()),
        );
        if let Some(child) = node
            .arcs
            .iter()
            .find(|child| !self.nodes.contains_key(child))
        {
            return Err(Error::MissingChild { key, child: *child }.into());
        }
        self.nodes.entry(key).or_insert_with(|| Arc::new(node));
        Ok(key)
    }

    fn get(&self, key: &DataKey) -> anyhow::Result<Arc<PagableData>> {
        match self.nodes.get(key) {
            Some(node) => Ok(Arc::clone(&node)),
            None => Err(Error::NotFound(*key).into()),
        }
    }

    fn contains(&self, key: &DataKey) -> anyhow::Result<bool> {
        Ok(self.nodes.contains_key(key))
    }

    fn flush(&self) -> anyhow::Result<()> {
        Ok(())
    }

    fn set_root(&self, name: &str, key: DataKey) -> anyhow::Result<()> {
        let entered = self.gc.enter();
        self.gc.vouch(&entered, [key]);
        if !self.nodes.contains_key(&key) {
            return Err(Error::NotFound(key).into());
        }
        self.roots_map().insert(name.to_owned(), key);
        Ok(())
    }

    fn root(&self, name: &str) -> anyhow::Result<Option<DataKey>> {
        Ok(self.roots_map().get(name).copied())
    }

    fn roots(&self) -> anyhow::Result<Vec<(String, DataKey)>> {
        Ok(self
            .roots_map()
            .iter()
            .map(|(name, key)| (name.clone(), *key))
            .collect())
    }

    fn remove_root(&self, name: &str) -> anyhow::Result<bool> {
        Ok(self.roots_map().remove(name).is_some())
    }

    fn store_stats(&self) -> anyhow::Result<Option<StoreStats>> {
        Ok(Some(self.stats()))
    }

    fn collect_garbage(&self, options: &GcOptions<'_>) -> anyhow::Result<GcReport> {
        gc::collect(self, options)
    }

    fn gc_epoch(&self) -> u64 {
        self.gc.epoch()
    }

    fn protect(&self, key: &DataKey) {
        self.gc.protect(key);
    }

    fn scan(
        &self,
        visit: &mut dyn FnMut(DataKey, anyhow::Result<PagableData>) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        // Snapshot the keys first: `visit` may store (a shard lock held across it would
        // deadlock) and iterating the map holds one shard's read lock at a time.
        let keys: Vec<DataKey> = self.nodes.iter().map(|entry| *entry.key()).collect();
        for key in keys {
            if let Some(node) = self.nodes.get(&key).map(|node| Arc::clone(&node)) {
                visit(key, Ok(PagableData::clone(&node)))?;
            }
        }
        Ok(())
    }
}

/// Keys swept per deletion.
const SWEEP_CHUNK: usize = 4096;

impl Collectable for MemoryNodeStore {
    fn gate(&self) -> &GcGate {
        &self.gc
    }

    fn root_keys(&self) -> anyhow::Result<Vec<DataKey>> {
        Ok(self.roots_map().values().copied().collect())
    }

    fn pending_keys(&self, _keep: &mut dyn FnMut(DataKey)) {}

    fn is_pending(&self, _key: &DataKey) -> bool {
        false
    }

    fn children(
        &self,
        keys: &[DataKey],
        found: &mut dyn FnMut(Option<&mut dyn Iterator<Item = DataKey>>),
    ) -> anyhow::Result<()> {
        for key in keys {
            match self.nodes.get(key).map(|node| Arc::clone(&node)) {
                Some(node) => found(Some(&mut node.arcs.iter().copied())),
                None => found(None),
            }
        }
        Ok(())
    }

    fn stored_keys(
        &self,
        visit: &mut dyn FnMut(&[StoredKey]) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        // A snapshot: `visit` deletes, which a shard's read lock held across it would block.
        let keys: Vec<StoredKey> = self
            .nodes
            .iter()
            .map(|entry| {
                (
                    *entry.key(),
                    crate::codec::encoded_len(entry.value()) as u64,
                )
            })
            .collect();
        keys.chunks(SWEEP_CHUNK).try_for_each(visit)
    }

    fn delete(&self, keys: &[DataKey]) -> anyhow::Result<()> {
        for key in keys {
            self.nodes.remove(key);
        }
        Ok(())
    }

    fn release_space(&self) -> anyhow::Result<u64> {
        self.nodes.shrink_to_fit();
        Ok(0)
    }
}

impl std::fmt::Debug for MemoryNodeStore {
    /// Counts only: payloads are never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryNodeStore")
            .field("nodes", &self.nodes.len())
            .field("roots", &self.roots_map().len())
            .finish()
    }
}
