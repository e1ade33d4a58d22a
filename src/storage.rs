//! The [`PagableStorage`] trait: the contract every backend keeps.
//!
//! Backends: [`InMemoryPagableStorage`](crate::InMemoryPagableStorage) and
//! [`SqliteBackedPagableStorage`](crate::SqliteBackedPagableStorage). The contract suite in
//! `tests/contract/` checks the sentences below against each of them.

use std::any::TypeId;
use std::sync::Arc;

use either::Either;

use crate::cache::ArcCache;
use crate::data::PagableData;
use crate::erase::ArcEraseDyn;
use crate::key::DataKey;
use crate::session::SessionContext;

pub mod memory;
pub mod sqlite;

/// A content-addressed store of [`PagableData`] nodes plus the arc cache that lets paging in
/// preserve sharing.
///
/// Object-safe (`Arc<dyn PagableStorage>` is the usual handle) and `Send + Sync + 'static`.
/// Errors come as [`anyhow::Error`]; those pagestore raises are an [`Error`](crate::Error)
/// inside it (see [`crate::error`] for how to match them). No method panics on bad data or
/// bad input.
#[async_trait::async_trait]
pub trait PagableStorage: Send + Sync + 'static {
    /// Stores `data` and returns its key, which is always `data.compute_key()`.
    ///
    /// Idempotent: storing content that is already stored keeps one entry and returns the same
    /// key. The write may be buffered, but from the moment this returns `Ok`, every thread's
    /// [`fetch_data_blocking`](Self::fetch_data_blocking) of the key finds it. Persistent
    /// backends make it durable by [`flush`](Self::flush).
    fn store_data(&self, data: PagableData) -> anyhow::Result<DataKey>;

    /// Commits every node whose [`store_data`](Self::store_data) returned before this call.
    /// When it returns `Ok`, a new instance opened on the same location reads them all (for
    /// persistent backends; what survives a crash depends on the backend's durability setting).
    fn flush(&self) -> anyhow::Result<()>;

    /// The node stored under `key`.
    ///
    /// Sees every completed `store_data`, before any flush and from any thread. A key that is
    /// not stored is [`Error::NotFound`](crate::Error::NotFound); a record that is damaged is
    /// [`Error::Corrupt`](crate::Error::Corrupt) (never the damaged bytes). Both name the key.
    fn fetch_data_blocking(&self, key: &DataKey) -> anyhow::Result<Arc<PagableData>>;

    /// [`fetch_data_blocking`](Self::fetch_data_blocking) for async callers: the same result,
    /// without blocking the async runtime's worker thread on I/O.
    async fn fetch_data(&self, key: &DataKey) -> anyhow::Result<Arc<PagableData>>;

    /// The cache of live `Arc`s deserialized from this storage, keyed by `(TypeId, DataKey)`.
    fn arc_cache(&self) -> &ArcCache;

    /// The live `Arc` cached for `(type_id, key)` if there is one (`Left`), otherwise the node
    /// stored under `key` (`Right`), for the caller to deserialize and then hand to
    /// [`on_arc_deserialized`](Self::on_arc_deserialized).
    ///
    /// Errors as [`fetch_data_blocking`](Self::fetch_data_blocking).
    fn fetch_arc_or_data_blocking(
        &self,
        type_id: &TypeId,
        key: &DataKey,
    ) -> anyhow::Result<Either<Box<dyn ArcEraseDyn>, Arc<PagableData>>> {
        match self.arc_cache().get(*type_id, *key) {
            Some(arc) => Ok(Either::Left(arc)),
            None => self.fetch_data_blocking(key).map(Either::Right),
        }
    }

    /// Offers `arc`, just deserialized from `key`, to the arc cache.
    ///
    /// The first live value for `(type_id, key)` wins: returns `None` when `arc` was cached,
    /// or `Some(winner)` when another live value was cached first, in which case the caller
    /// must use the winner so that all holders share one `Arc`. The cache holds values weakly:
    /// it never keeps one alive.
    fn on_arc_deserialized(
        &self,
        type_id: TypeId,
        key: DataKey,
        arc: Box<dyn ArcEraseDyn>,
    ) -> Option<Box<dyn ArcEraseDyn>> {
        self.arc_cache().register(type_id, key, arc)
    }

    /// Queues `arc`, which no caller pins any more, for paging out. Never blocks on I/O and
    /// never panics. The queue holds the value weakly and is bounded.
    fn schedule_for_paging(&self, arc: Box<dyn ArcEraseDyn>);

    /// Per-session state shared by the serializers that use this storage.
    fn session_context(&self) -> &SessionContext;

    /// Drops memory that can be rebuilt: dead arc-cache entries, and backend caches. Stored
    /// data and live values are unaffected.
    fn release_memory(&self) {
        self.arc_cache().prune();
    }
}
