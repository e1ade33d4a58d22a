//! [`MemoryRemoteStore`]: a remote held in this process, for examples and tests of the tiers
//! above it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{BatchLimits, RemoteStore};
use crate::key::DataKey;

/// A [`RemoteStore`] in this process's memory: what a remote does, without the network.
///
/// Shared by cloning an `Arc` of it, it stands in for one server that several local stores
/// use. It counts its round trips ([`round_trips`](Self::round_trips)) with the same
/// batching a network remote has, so tests can check that callers batch.
#[derive(Debug, Default)]
pub struct MemoryRemoteStore {
    records: Mutex<HashMap<DataKey, Vec<u8>>>,
    roots: Mutex<BTreeMap<String, DataKey>>,
    limits: BatchLimits,
    round_trips: AtomicU64,
}

impl MemoryRemoteStore {
    /// An empty remote with the default [`BatchLimits`].
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty remote that splits calls into round trips of at most `limits`.
    pub fn with_limits(limits: BatchLimits) -> Self {
        MemoryRemoteStore {
            limits,
            ..Self::default()
        }
    }

    /// The round trips made so far: one per batch of each call.
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    /// The number of records held.
    pub fn len(&self) -> usize {
        self.records.lock().unwrap().len()
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Replaces the bytes stored under `key`, as a damaged or hostile remote would.
    pub fn overwrite(&self, key: DataKey, record: Vec<u8>) {
        self.records.lock().unwrap().insert(key, record);
    }

    /// Forgets `key`'s record, as an evicting remote would.
    pub fn evict(&self, key: &DataKey) -> bool {
        self.records.lock().unwrap().remove(key).is_some()
    }

    fn count_batches(&self, batches: usize) {
        self.round_trips
            .fetch_add(batches.max(1) as u64, Ordering::Relaxed);
    }
}

impl RemoteStore for MemoryRemoteStore {
    fn describe(&self) -> String {
        "memory".to_owned()
    }

    fn limits(&self) -> BatchLimits {
        self.limits
    }

    fn find_missing(&self, keys: &[DataKey]) -> anyhow::Result<Vec<DataKey>> {
        self.count_batches(self.limits.split(keys, |_| 0).count());
        let records = self.records.lock().unwrap();
        Ok(keys
            .iter()
            .filter(|key| !records.contains_key(key))
            .copied()
            .collect())
    }

    fn get_many(&self, keys: &[DataKey]) -> anyhow::Result<Vec<Option<Vec<u8>>>> {
        self.count_batches(self.limits.split(keys, |_| 0).count());
        let records = self.records.lock().unwrap();
        Ok(keys.iter().map(|key| records.get(key).cloned()).collect())
    }

    fn put_many(&self, records: &[(DataKey, &[u8])]) -> anyhow::Result<()> {
        self.count_batches(self.limits.split(records, |(_, r)| r.len()).count());
        let mut stored = self.records.lock().unwrap();
        for (key, record) in records {
            stored.insert(*key, record.to_vec());
        }
        Ok(())
    }

    fn set_root(&self, name: &str, key: DataKey) -> anyhow::Result<()> {
        self.count_batches(1);
        self.roots.lock().unwrap().insert(name.to_owned(), key);
        Ok(())
    }

    fn root(&self, name: &str) -> anyhow::Result<Option<DataKey>> {
        self.count_batches(1);
        Ok(self.roots.lock().unwrap().get(name).copied())
    }

    fn roots(&self) -> anyhow::Result<Vec<(String, DataKey)>> {
        self.count_batches(1);
        let roots = self.roots.lock().unwrap();
        Ok(roots.iter().map(|(n, k)| (n.clone(), *k)).collect())
    }

    fn remove_root(&self, name: &str) -> anyhow::Result<bool> {
        self.count_batches(1);
        Ok(self.roots.lock().unwrap().remove(name).is_some())
    }

    fn ping(&self) -> anyhow::Result<()> {
        self.count_batches(1);
        Ok(())
    }

    fn for_each_key(
        &self,
        visit: &mut dyn FnMut(DataKey) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let keys: Vec<DataKey> = self.records.lock().unwrap().keys().copied().collect();
        keys.into_iter().try_for_each(visit)
    }
}
