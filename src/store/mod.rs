//! The node-store layer: [`NodeStore`], bytes by key, and its two implementations.
//!
//! A node store knows nothing of Rust types, `Arc`s, `TypeId`s or paging: it keeps
//! [`PagableData`] nodes under their [`DataKey`]s. Everything about live values (the arc
//! cache, the pager, the session context) is the runtime's, written once in
//! [`WithRuntime`](crate::WithRuntime) and attached to any node store.

use std::sync::Arc;

use crate::codec::{self, RecordRef};
use crate::data::PagableData;
use crate::error::Error;
use crate::key::DataKey;

pub(crate) mod gc;
pub(crate) mod memory;
#[cfg(feature = "sqlite")]
pub(crate) mod sqlite;
pub(crate) mod stats;

pub use gc::{GcOptions, GcPhase, GcProgress, GcReport, LiveKeys};
pub use stats::StoreStats;

/// Parses the record stored under `key` and checks that it hashes to `key`; anything else is
/// [`Error::Corrupt`] naming the key. Every check of a record against its key is this one.
pub(crate) fn checked_record<'r>(key: &DataKey, record: &'r [u8]) -> Result<RecordRef<'r>, Error> {
    let corrupt = |reason: String| Error::Corrupt { key: *key, reason };
    let view = codec::parse(record).map_err(|e| corrupt(e.to_string()))?;
    let actual = view.compute_key();
    if actual != *key {
        return Err(corrupt(format!("its content hashes to {actual}")));
    }
    Ok(view)
}

/// A content-addressed store of [`PagableData`] nodes: the contract a backend keeps.
///
/// Implement it for a new backend and attach the runtime with
/// [`WithRuntime::attach`](crate::WithRuntime::attach): the result is a
/// [`PagableStorage`](crate::PagableStorage) with the arc cache, the pager and the
/// graph layer. The suite in [`testing`](crate::testing) (feature `testing`) checks every
/// sentence below; run it on your backend.
///
/// Errors come as [`anyhow::Error`]; the conditions named here must be a
/// [`pagestore::Error`](crate::Error) inside it, so callers can `downcast_ref` them. No
/// method panics on bad data or bad input.
///
/// # The contract
///
/// 1. **Content addressing.** [`put`](Self::put) returns `node.compute_key()`. Storing equal
///    content twice keeps one entry.
/// 2. **Read-your-writes.** Once `put` returns `Ok`, [`get`](Self::get),
///    [`get_async`](Self::get_async), [`get_many_async`](Self::get_many_async),
///    [`contains`](Self::contains) and [`scan`](Self::scan)
///    see the node, from every thread, before any flush.
/// 3. **Durability at flush.** When [`flush`](Self::flush) returns `Ok`, every node whose
///    `put` returned before it is committed: a new instance on the same location reads them
///    (for persistent stores; what survives a crash is the backend's documented setting).
/// 4. **Children first.** `put` refuses a node that names a child not stored with
///    [`Error::MissingChild`](crate::Error::MissingChild), storing nothing, and a node is
///    never committed before the nodes its `arcs` name (the store keeps the order in which
///    they were stored), so no node points to a missing one, after a crash either.
/// 5. **Typed errors.** A key that is not stored is [`Error::NotFound`](crate::Error::NotFound);
///    a record that is damaged is [`Error::Corrupt`](crate::Error::Corrupt), never the damaged
///    bytes. Both name the key.
/// 6. **Concurrency.** Every method may be called from many threads at once; nothing stored
///    is lost and nothing deadlocks.
/// 7. **Named roots.** [`set_root`](Self::set_root) names a key (any UTF-8 name, the empty
///    one included; setting a name again replaces its key), [`root`](Self::root) reads it,
///    [`roots`](Self::roots) lists every root sorted by name, [`remove_root`](Self::remove_root)
///    removes one and says whether it existed. Like nodes they are read-your-writes (once
///    `set_root` or `remove_root` returns, every thread sees the change, before any flush)
///    and durable at flush (a persistent store's new instance reads the roots set before a
///    `flush` that returned). `set_root` refuses a key that is not stored with
///    [`Error::NotFound`](crate::Error::NotFound): a root never names a missing node.
/// 8. **Roots after nodes.** A root change is committed no earlier than every node whose
///    `put` returned before the change was made, so a root that survives a crash names a
///    complete graph when its nodes were stored before it: `set_root` right after storing a
///    graph, with no flush in between, is safe.
/// 9. **Garbage collection** (for a store that supports it,
///    [`collect_garbage`](Self::collect_garbage)): deletes exactly the stored nodes that no
///    root, no live key given to it, no node stored while it runs and no key
///    [`protect`](Self::protect)ed while it runs reaches. A `put` that returns during a
///    collection has left its node stored, and a root set during one keeps its graph.
#[async_trait::async_trait]
pub trait NodeStore: Send + Sync + 'static {
    /// Stores `node` and returns its key, `node.compute_key()`. Idempotent; may buffer the
    /// write (see the contract, items 2–4).
    fn put(&self, node: PagableData) -> anyhow::Result<DataKey>;

    /// The node stored under `key`; [`Error::NotFound`](crate::Error::NotFound) if there is
    /// none, [`Error::Corrupt`](crate::Error::Corrupt) if its record is damaged.
    fn get(&self, key: &DataKey) -> anyhow::Result<Arc<PagableData>>;

    /// [`get`](Self::get) for async callers: the same result, without blocking the async
    /// runtime's worker thread on I/O. The default runs `get` inline, which suits stores
    /// that never block.
    async fn get_async(&self, key: &DataKey) -> anyhow::Result<Arc<PagableData>> {
        self.get(key)
    }

    /// The nodes stored under `keys`, in the order of `keys`, for async callers that read
    /// many at once (`page_in_async` reads a graph a level at a time through it). The same
    /// result as [`get_async`](Self::get_async) of each key: the first key that is not stored
    /// or whose record is damaged fails the whole call with the error `get` gives for it
    /// ([`Error::NotFound`](crate::Error::NotFound) or
    /// [`Error::Corrupt`](crate::Error::Corrupt), naming that key).
    ///
    /// The default calls `get_async` for each key in turn. A store with I/O overrides it to
    /// read the batch in one go (the SQLite store reads it on one connection, in one call on
    /// tokio's blocking pool).
    async fn get_many_async(&self, keys: &[DataKey]) -> anyhow::Result<Vec<Arc<PagableData>>> {
        let mut nodes = Vec::with_capacity(keys.len());
        for key in keys {
            nodes.push(self.get_async(key).await?);
        }
        Ok(nodes)
    }

    /// Whether a node is stored under `key` (committed or not), without reading its record.
    fn contains(&self, key: &DataKey) -> anyhow::Result<bool>;

    /// Commits every node whose [`put`](Self::put) returned before this call.
    fn flush(&self) -> anyhow::Result<()>;

    /// Visits every stored node once, in no particular order, for maintenance (verification,
    /// garbage collection). A node whose record is damaged is visited as an
    /// [`Error::Corrupt`](crate::Error::Corrupt) naming its key; the scan goes on. An error
    /// from `visit` stops the scan and is returned.
    ///
    /// Nodes stored while the scan runs may or may not be visited; the scan must not stop
    /// other threads from storing and reading for its whole duration.
    fn scan(
        &self,
        visit: &mut dyn FnMut(DataKey, anyhow::Result<PagableData>) -> anyhow::Result<()>,
    ) -> anyhow::Result<()>;

    /// Names `key` as the root `name`, replacing the key it named before (contract items 7
    /// and 8); [`Error::NotFound`](crate::Error::NotFound) if `key` is not stored. Garbage
    /// collection keeps what roots reach.
    fn set_root(&self, name: &str, key: DataKey) -> anyhow::Result<()>;

    /// The key the root `name` names, if there is such a root.
    fn root(&self, name: &str) -> anyhow::Result<Option<DataKey>>;

    /// Every root, sorted by name.
    fn roots(&self) -> anyhow::Result<Vec<(String, DataKey)>>;

    /// Removes the root `name`; returns whether it existed. The nodes it named stay stored.
    fn remove_root(&self, name: &str) -> anyhow::Result<bool>;

    /// Drops memory that can be rebuilt (caches); stored data is unaffected. The default
    /// does nothing.
    fn release_memory(&self) {}

    /// Deletes every stored node that nothing needs (contract item 9) and reports what it
    /// did; with [`GcOptions::dry_run`], only reports. Other threads may store, set roots
    /// and read meanwhile.
    ///
    /// What is kept: everything reachable from the roots, from the keys
    /// [`GcOptions::live_keys`] hands over, from the nodes not yet committed, and from every
    /// key stored or [`protect`](Self::protect)ed while the collection runs. A node stored
    /// *before* the collection began and reachable from none of those is garbage, even if a
    /// thread is about to store a parent naming it: such a thread protects (or stores again)
    /// the children it relies on. [`WithRuntime`](crate::WithRuntime)'s `gc` does that for
    /// every value this process holds.
    ///
    /// The default returns [`Error::Unsupported`](crate::Error::Unsupported).
    fn collect_garbage(&self, options: &GcOptions<'_>) -> anyhow::Result<GcReport> {
        let _ = options;
        Err(gc::unsupported())
    }

    /// A counter of garbage collections: 0 if none ever began on this store, odd while one
    /// runs, even otherwise (it goes up at each start and end). A layer that remembers keys
    /// reads it after recording one: if it changed since before the key was stored or
    /// read, a collection may have deleted the key meanwhile. The default is 0 (a store
    /// that never collects).
    fn gc_epoch(&self) -> u64 {
        0
    }

    /// Tells a garbage collection running now (if any) that the caller relies on `key` from
    /// now on: the collection keeps it and what it reaches, unless it had deleted it already
    /// (then [`contains`](Self::contains) says so afterwards). Cheap when none runs: one
    /// atomic read. The default does nothing.
    fn protect(&self, key: &DataKey) {
        let _ = key;
    }

    /// The store's figures, if it keeps any: `Ok(None)` (the default) for a store that does
    /// not. [`MemoryNodeStore`](crate::MemoryNodeStore) and
    /// [`SqliteNodeStore`](crate::SqliteNodeStore) return their `stats()`. Meant to be
    /// cheap: no record is decoded or re-hashed (see each store's `stats` for its cost).
    fn store_stats(&self) -> anyhow::Result<Option<StoreStats>> {
        Ok(None)
    }
}
