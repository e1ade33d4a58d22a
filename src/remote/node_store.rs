//! [`RemoteNodeStore`]: any [`RemoteStore`] used directly as a [`NodeStore`].
//!
//! This is for sharing one store between machines with no local copy at all: every read and
//! write goes to the remote (a thin client, a job that runs once, a check of what the remote
//! holds). It is also how the node-store contract runs on a remote, so a remote is held to
//! the same rules as the local stores. A program that reads the same nodes again wants a
//! local cache in front of the remote: `TieredStorage` adds one.
//!
//! The remote is not trusted: every record read is decoded and hashed, and one that does
//! not hash to its key is [`Error::Corrupt`], never data.

use std::sync::Arc;

use super::RemoteStore;
use crate::codec;
use crate::data::PagableData;
use crate::error::Error;
use crate::key::DataKey;
use crate::store::NodeStore;

/// A [`NodeStore`] whose nodes live only on a [`RemoteStore`].
///
/// Writes are synchronous (a `put` that returns has stored the record remotely), so
/// [`flush`](NodeStore::flush) has nothing to do. `put` refuses a node whose children the
/// remote does not hold ([`Error::MissingChild`]), one `find_missing` round trip per node
/// with children. Garbage collection is not supported: the remote is shared, and what
/// other machines still need is not known here.
///
/// On a remote that evicts (a Redis with an evicting `maxmemory-policy`), a node read may be
/// [`Error::NotFound`] although its parent was read: contract item 4 holds only on a remote
/// that keeps what it is given.
#[derive(Debug)]
pub struct RemoteNodeStore<R: RemoteStore> {
    remote: Arc<R>,
}

impl<R: RemoteStore> RemoteNodeStore<R> {
    /// A node store on `remote`.
    pub fn new(remote: R) -> Self {
        RemoteNodeStore {
            remote: Arc::new(remote),
        }
    }

    /// The remote it reads and writes.
    pub fn remote(&self) -> &R {
        &self.remote
    }

    /// The remote back, if no read on the blocking pool still holds it.
    pub fn into_remote(self) -> Result<R, Self> {
        Arc::try_unwrap(self.remote).map_err(|remote| RemoteNodeStore { remote })
    }
}

/// The node the remote described as `remote` returned for `key`, checked against its key.
fn check(remote: &str, key: DataKey, record: Option<Vec<u8>>) -> anyhow::Result<PagableData> {
    let record = record.ok_or(Error::NotFound(key))?;
    Ok(super::verified(remote, key, &record)?.to_data())
}

/// Reads `keys` in one `get_many` call (one round trip per batch) and checks every record;
/// the first missing or damaged one fails the whole read.
fn read_many<R: RemoteStore + ?Sized>(
    remote: &R,
    keys: &[DataKey],
) -> anyhow::Result<Vec<Arc<PagableData>>> {
    let records = remote.get_many(keys)?;
    let described = remote.describe();
    if records.len() != keys.len() {
        return Err(anyhow::anyhow!(
            "the remote store {described} returned {} records for {} keys",
            records.len(),
            keys.len()
        ));
    }
    keys.iter()
        .zip(records)
        .map(|(key, record)| check(&described, *key, record).map(Arc::new))
        .collect()
}

#[async_trait::async_trait]
impl<R: RemoteStore> NodeStore for RemoteNodeStore<R> {
    fn put(&self, node: PagableData) -> anyhow::Result<DataKey> {
        let key = node.compute_key();
        if !node.arcs.is_empty()
            && let Some(child) = self.remote.find_missing(&node.arcs)?.first()
        {
            return Err(Error::MissingChild { key, child: *child }.into());
        }
        let record = codec::encode(&node);
        self.remote.put_many(&[(key, &record)])?;
        Ok(key)
    }

    fn get(&self, key: &DataKey) -> anyhow::Result<Arc<PagableData>> {
        let mut nodes = read_many(&*self.remote, std::slice::from_ref(key))?;
        nodes
            .pop()
            .ok_or_else(|| anyhow::anyhow!("no record returned for {key}"))
    }

    async fn get_async(&self, key: &DataKey) -> anyhow::Result<Arc<PagableData>> {
        let mut nodes = self.get_many_async(std::slice::from_ref(key)).await?;
        nodes
            .pop()
            .ok_or_else(|| anyhow::anyhow!("no record returned for {key}"))
    }

    /// One `get_many` call for the whole batch, on tokio's blocking pool when there is a
    /// runtime (the network wait must not stall a runtime worker), inline otherwise.
    async fn get_many_async(&self, keys: &[DataKey]) -> anyhow::Result<Vec<Arc<PagableData>>> {
        #[cfg(feature = "tokio")]
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (remote, keys) = (Arc::clone(&self.remote), keys.to_vec());
            return runtime
                .spawn_blocking(move || read_many(&*remote, &keys))
                .await
                .map_err(|e| anyhow::anyhow!("a batched remote read did not complete: {e}"))?;
        }
        read_many(&*self.remote, keys)
    }

    fn contains(&self, key: &DataKey) -> anyhow::Result<bool> {
        Ok(self
            .remote
            .find_missing(std::slice::from_ref(key))?
            .is_empty())
    }

    fn flush(&self) -> anyhow::Result<()> {
        Ok(())
    }

    /// Lists the keys with `for_each_key` and reads them in batches of the remote's
    /// [`limits`](RemoteStore::limits). A key evicted between the listing and the read is
    /// not visited (it is no longer stored).
    fn scan(
        &self,
        visit: &mut dyn FnMut(DataKey, anyhow::Result<PagableData>) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let batch_keys = self.remote.limits().max_keys.max(1);
        let described = self.remote.describe();
        let mut pending = Vec::with_capacity(batch_keys);
        let mut read_batch = |pending: &mut Vec<DataKey>| -> anyhow::Result<()> {
            let records = self.remote.get_many(pending)?;
            for (key, record) in pending.drain(..).zip(records) {
                if record.is_some() {
                    visit(key, check(&described, key, record))?;
                }
            }
            Ok(())
        };
        self.remote.for_each_key(&mut |key| {
            pending.push(key);
            if pending.len() >= batch_keys {
                read_batch(&mut pending)?;
            }
            Ok(())
        })?;
        if !pending.is_empty() {
            read_batch(&mut pending)?;
        }
        Ok(())
    }

    fn set_root(&self, name: &str, key: DataKey) -> anyhow::Result<()> {
        if !self.contains(&key)? {
            return Err(Error::NotFound(key).into());
        }
        self.remote.set_root(name, key)
    }

    fn root(&self, name: &str) -> anyhow::Result<Option<DataKey>> {
        self.remote.root(name)
    }

    fn roots(&self) -> anyhow::Result<Vec<(String, DataKey)>> {
        self.remote.roots()
    }

    fn remove_root(&self, name: &str) -> anyhow::Result<bool> {
        self.remote.remove_root(name)
    }
}
