//! The remote tier: a store shared by many machines, behind [`RemoteStore`].
//!
//! A remote store is an existing distributed engine (Redis first; an object store can follow)
//! that keeps the same records as the local store, under the same keys, plus named roots.
//! Its interface is batched: every method takes many keys and costs one round trip per
//! batch of at most [`BatchLimits`], never one per key.
//!
//! The remote is not trusted: [`get_many`](RemoteStore::get_many) returns bytes, and the
//! caller checks that they decode and hash to the key they were asked for before using them.

use crate::codec::RecordRef;
use crate::error::Error;
use crate::key::DataKey;

mod memory;
mod node_store;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "sqlite")]
pub(crate) mod tiered;

#[cfg(feature = "redis")]
pub use self::redis::{RedisOptions, RedisStore};
pub use memory::MemoryRemoteStore;
pub use node_store::RemoteNodeStore;
#[cfg(feature = "sqlite")]
pub use tiered::{BreakerState, TieredNodeStore, TieredOptions, TieredStats};

/// How much one round trip to a remote carries: at most `max_keys` keys and, for the
/// records sent or expected back, about `max_bytes` bytes (a single record larger than that
/// travels alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Keys per round trip. Default 512.
    pub max_keys: usize,
    /// Record bytes per round trip. Default 4 MiB.
    pub max_bytes: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            max_keys: 512,
            max_bytes: 4 << 20,
        }
    }
}

impl BatchLimits {
    /// Splits `items` into consecutive batches within these limits, `bytes_of` giving each
    /// item's size. Never yields an empty batch; an item over `max_bytes` goes alone.
    pub fn split<'a, T>(
        self,
        items: &'a [T],
        bytes_of: impl Fn(&T) -> usize + 'a,
    ) -> impl Iterator<Item = &'a [T]> + 'a {
        let max_keys = self.max_keys.max(1);
        let mut rest = items;
        std::iter::from_fn(move || {
            if rest.is_empty() {
                return None;
            }
            let mut bytes = 0usize;
            let mut len = 0;
            while len < rest.len() && len < max_keys {
                let next = bytes_of(&rest[len]);
                if len > 0 && bytes.saturating_add(next) > self.max_bytes {
                    break;
                }
                bytes = bytes.saturating_add(next);
                len += 1;
            }
            let (batch, tail) = rest.split_at(len);
            rest = tail;
            Some(batch)
        })
    }
}

/// A content-addressed store on other machines: records by [`DataKey`] and named roots.
///
/// Records are the bytes of the local store's `value` column ([`codec::encode`]
/// of the node); a remote stores them as given and returns them as stored. Every method is
/// blocking and may be called from many threads at once; each takes any number of keys and
/// makes one round trip per batch of at most [`limits`](Self::limits), never one per key.
/// Errors come as [`anyhow::Error`], a [`pagestore::Error::Remote`](crate::Error::Remote)
/// inside it for a failed operation (connection, timeout, server error).
///
/// The caller, not the remote, keeps the graph whole: it stores a node's children in an
/// earlier [`put_many`](Self::put_many) call than the node (a remote may write one call's
/// records in any order, or in parallel across shards) and sets a root only once its graph
/// is stored. A remote that can lose records (an evicting cache) loses whole keys, which
/// readers see as missing, never as wrong data.
pub trait RemoteStore: Send + Sync + 'static {
    /// Where the remote is, for messages and stats: a URL and namespace, no password.
    fn describe(&self) -> String;

    /// The size of one round trip. The default is [`BatchLimits::default`].
    fn limits(&self) -> BatchLimits {
        BatchLimits::default()
    }

    /// The keys among `keys` that the remote does not hold, in the order given.
    fn find_missing(&self, keys: &[DataKey]) -> anyhow::Result<Vec<DataKey>>;

    /// The record stored under each of `keys`, in their order; `None` for a key the remote
    /// does not hold. The bytes are unchecked.
    fn get_many(&self, keys: &[DataKey]) -> anyhow::Result<Vec<Option<Vec<u8>>>>;

    /// Stores each `(key, record)`. Idempotent: storing a key again with its (same) record
    /// changes nothing, so a retried call is safe. When it returns `Ok`, every record is
    /// stored; after an error some may be.
    fn put_many(&self, records: &[(DataKey, &[u8])]) -> anyhow::Result<()>;

    /// Names `key` as the root `name`, replacing what it named before.
    fn set_root(&self, name: &str, key: DataKey) -> anyhow::Result<()>;

    /// The key the root `name` names, if there is such a root.
    fn root(&self, name: &str) -> anyhow::Result<Option<DataKey>>;

    /// Every root, sorted by name.
    fn roots(&self) -> anyhow::Result<Vec<(String, DataKey)>>;

    /// Removes the root `name`; returns whether it existed.
    fn remove_root(&self, name: &str) -> anyhow::Result<bool>;

    /// One cheap round trip that succeeds when the remote answers (a circuit breaker's probe).
    fn ping(&self) -> anyhow::Result<()>;

    /// Visits every stored key once, in no particular order, for maintenance and tests.
    /// Keys stored while it runs may or may not be visited. An error from `visit` stops it.
    fn for_each_key(
        &self,
        visit: &mut dyn FnMut(DataKey) -> anyhow::Result<()>,
    ) -> anyhow::Result<()>;
}

/// Checks `record`, returned by the remote described as `remote` for `key`: it must decode
/// and hash to `key`. Anything else is [`Error::Corrupt`] naming the key and the remote.
pub(crate) fn verified<'a>(
    remote: &str,
    key: DataKey,
    record: &'a [u8],
) -> Result<RecordRef<'a>, Error> {
    crate::store::checked_record(&key, record).map_err(|e| match e {
        Error::Corrupt { key, reason } => Error::Corrupt {
            key,
            reason: format!("the record read from the remote store {remote} is damaged: {reason}"),
        },
        other => other,
    })
}

impl<R: RemoteStore + ?Sized> RemoteStore for std::sync::Arc<R> {
    fn describe(&self) -> String {
        (**self).describe()
    }
    fn limits(&self) -> BatchLimits {
        (**self).limits()
    }
    fn find_missing(&self, keys: &[DataKey]) -> anyhow::Result<Vec<DataKey>> {
        (**self).find_missing(keys)
    }
    fn get_many(&self, keys: &[DataKey]) -> anyhow::Result<Vec<Option<Vec<u8>>>> {
        (**self).get_many(keys)
    }
    fn put_many(&self, records: &[(DataKey, &[u8])]) -> anyhow::Result<()> {
        (**self).put_many(records)
    }
    fn set_root(&self, name: &str, key: DataKey) -> anyhow::Result<()> {
        (**self).set_root(name, key)
    }
    fn root(&self, name: &str) -> anyhow::Result<Option<DataKey>> {
        (**self).root(name)
    }
    fn roots(&self) -> anyhow::Result<Vec<(String, DataKey)>> {
        (**self).roots()
    }
    fn remove_root(&self, name: &str) -> anyhow::Result<bool> {
        (**self).remove_root(name)
    }
    fn ping(&self) -> anyhow::Result<()> {
        (**self).ping()
    }
    fn for_each_key(
        &self,
        visit: &mut dyn FnMut(DataKey) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        (**self).for_each_key(visit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_respects_both_limits_and_never_yields_empty_batches() {
        let limits = BatchLimits {
            max_keys: 3,
            max_bytes: 10,
        };
        let sizes = [4usize, 4, 4, 20, 1, 1, 1, 1];
        let batches: Vec<&[usize]> = limits.split(&sizes, |&s| s).collect();
        assert_eq!(
            batches,
            [&[4, 4][..], &[4][..], &[20][..], &[1, 1, 1][..], &[1][..]]
        );
        assert_eq!(limits.split(&[] as &[usize], |&s| s).count(), 0);
    }
}
