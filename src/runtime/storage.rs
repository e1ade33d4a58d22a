//! [`PagableStorage`]: the public face of a node store with the runtime attached.
//!
//! Its method names are those of the seed trait (`pagable` 0.3.3) that users know. It is
//! implemented once, by [`WithRuntime`](crate::WithRuntime), over any
//! [`NodeStore`](crate::NodeStore); [`InMemoryPagableStorage`](crate::InMemoryPagableStorage)
//! and `SqliteBackedPagableStorage` are that implementation over the two built-in stores.

use std::any::TypeId;
use std::sync::Arc;

use either::Either;

use super::session::SessionContext;
use crate::data::PagableData;
use crate::erase::ArcEraseDyn;
use crate::key::DataKey;

/// A content-addressed store of [`PagableData`] nodes plus the live-value runtime that lets
/// paging in preserve sharing.
///
/// Object-safe (`Arc<dyn PagableStorage>` is the usual handle) and `Send + Sync + 'static`.
/// Errors come as [`anyhow::Error`]; those pagestore raises are an [`Error`](crate::Error)
/// inside it (see [`Error`](crate::Error) for how to match them). No method panics on bad
/// data or bad input.
///
/// Implement a new backend as a [`NodeStore`](crate::NodeStore) and attach the runtime
/// ([`WithRuntime::attach`](crate::WithRuntime::attach)) rather than implementing this trait:
/// the arc cache and paging then come for free. A direct implementation (the seed's way)
/// works too: the graph layer reaches live values only through
/// [`fetch_arc_or_data_blocking`](Self::fetch_arc_or_data_blocking),
/// [`on_arc_deserialized`](Self::on_arc_deserialized) and
/// [`resolve_arc`](Self::resolve_arc), which is built on those two.
#[async_trait::async_trait]
pub trait PagableStorage: Send + Sync + 'static {
    /// Stores `data` and returns its key, which is always `data.compute_key()`.
    ///
    /// Idempotent: storing content that is already stored keeps one entry and returns the same
    /// key. Children first: a node naming a child that is not stored is refused with
    /// [`Error::MissingChild`](crate::Error::MissingChild) (by the built-in stores). The write may be buffered, but from the moment this returns `Ok`, every thread's
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

    /// The nodes stored under `keys`, in their order: [`fetch_data`](Self::fetch_data) of
    /// each, read in one batch where the backend can. The first key that fails fails the
    /// call, with the error `fetch_data` gives for it (naming that key).
    ///
    /// [`page_in_async`](crate::page_in_async) reads a graph through it, a level of keys at
    /// a time. The default calls `fetch_data` for each key in turn;
    /// [`WithRuntime`](crate::WithRuntime) forwards to
    /// [`NodeStore::get_many_async`](crate::NodeStore::get_many_async), and shares reads
    /// between concurrent calls: a key another call is reading is waited for, and a node
    /// read earlier that something still holds is returned as is, unread (its content is
    /// its key's, so only a record damaged since goes unnoticed until it is read again).
    async fn fetch_data_many(&self, keys: &[DataKey]) -> anyhow::Result<Vec<Arc<PagableData>>> {
        let mut nodes = Vec::with_capacity(keys.len());
        for key in keys {
            nodes.push(self.fetch_data(key).await?);
        }
        Ok(nodes)
    }

    /// The live `Arc` cached for `(type_id, key)` if there is one (`Left`), otherwise the node
    /// stored under `key` (`Right`), for the caller to deserialize and then hand to
    /// [`on_arc_deserialized`](Self::on_arc_deserialized).
    ///
    /// Errors as [`fetch_data_blocking`](Self::fetch_data_blocking).
    fn fetch_arc_or_data_blocking(
        &self,
        type_id: &TypeId,
        key: &DataKey,
    ) -> anyhow::Result<Either<Box<dyn ArcEraseDyn>, Arc<PagableData>>>;

    /// Whether a live value stored under `key` is in memory now, so that paging `key` in
    /// will most likely not read its record (nor those below it). A hint: the value may die
    /// right after, or be cached under another type than the one asked for later.
    /// [`page_in_async`](crate::page_in_async) does not prefetch the records below a key
    /// for which it says `true`. The default says `false`.
    fn holds_live(&self, key: &DataKey) -> bool {
        let _ = key;
        false
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
    ) -> Option<Box<dyn ArcEraseDyn>>;

    /// The live value of `(type_id, key)`, or the value `deserialize` makes of the node
    /// stored under `key`, offered to the cache (the winner is returned).
    ///
    /// `prefetched` is the node if the caller already has it (then it is not fetched again).
    /// The default composes [`fetch_arc_or_data_blocking`](Self::fetch_arc_or_data_blocking),
    /// `deserialize` and [`on_arc_deserialized`](Self::on_arc_deserialized); two threads may
    /// then both deserialize a key, and both get the first one's value.
    /// [`WithRuntime`](crate::WithRuntime) overrides it so that concurrent callers for one
    /// `(type_id, key)` deserialize it once.
    ///
    /// `deserialize` may resolve *other* keys through this storage, but never `key` itself.
    fn resolve_arc(
        &self,
        type_id: TypeId,
        key: DataKey,
        prefetched: Option<Arc<PagableData>>,
        deserialize: &mut dyn FnMut(Arc<PagableData>) -> anyhow::Result<Box<dyn ArcEraseDyn>>,
    ) -> anyhow::Result<Box<dyn ArcEraseDyn>> {
        let node = match prefetched {
            Some(node) => node,
            None => match self.fetch_arc_or_data_blocking(&type_id, &key)? {
                Either::Left(live) => return Ok(live),
                Either::Right(node) => node,
            },
        };
        let arc = deserialize(node)?;
        Ok(
            match self.on_arc_deserialized(type_id, key, arc.clone_dyn()) {
                Some(winner) => winner,
                None => arc,
            },
        )
    }

    /// The key under which the live value with view type `type_id` and allocation `identity`
    /// (see [`ArcEraseDyn::identity`]) was paged out or in, if this storage remembers it.
    ///
    /// [`page_out`](crate::page_out) writes such a value by this key without serializing it or
    /// anything below it, which makes re-paging an edited graph cost only its changed part.
    /// The default remembers nothing; [`WithRuntime`](crate::WithRuntime) remembers the
    /// values its arc cache holds (paged in) and those [`remember_key`](Self::remember_key)
    /// was told about (paged out), for as long as they live.
    fn key_of(&self, _type_id: &TypeId, _identity: usize) -> Option<DataKey> {
        None
    }

    /// Tells the storage that the live `arc` (viewed as `type_id`) was just paged out under
    /// `key`, for [`key_of`](Self::key_of). Holds nothing strongly; the default ignores it.
    /// Unlike [`on_arc_deserialized`](Self::on_arc_deserialized) it does not make `arc` the
    /// value a page-in of `key` returns: another allocation with equal content may be that.
    fn remember_key(&self, _type_id: TypeId, _key: DataKey, _arc: &dyn ArcEraseDyn) {}

    /// A number that identifies this storage's state: equal for every handle to one storage,
    /// different for two storages alive at the same time. A [`PagableArc`](crate::PagableArc)
    /// uses it to tell its own storage from another one it is written into. The default is
    /// the address of `self`; a wrapper that forwards to an inner storage should forward this
    /// too.
    fn storage_identity(&self) -> usize {
        self as *const Self as *const u8 as usize
    }

    /// Queues `arc`, which no caller pins any more, for paging out. Never blocks on I/O and
    /// never panics. The queue holds the value weakly and is bounded.
    fn schedule_for_paging(&self, arc: Box<dyn ArcEraseDyn>);

    /// Per-session state shared by the serializers that use this storage.
    fn session_context(&self) -> &SessionContext;

    /// Drops memory that can be rebuilt (dead cache entries, backend caches). Stored data and
    /// live values are unaffected. The default does nothing.
    fn release_memory(&self) {}

    /// Keeps `key`, the root of a graph [`page_out`](crate::page_out) just stored, and what
    /// it reaches, from garbage collection for a grace period
    /// ([`WithRuntime::gc_grace`](crate::WithRuntime::gc_grace)), so that the caller can name
    /// it a root (or hold it otherwise) first. Returns whether `key` is
    /// still stored (`false`: a collection that began before it was stored deleted it, and
    /// `page_out` stores it again). The default keeps nothing and returns `true`.
    fn keep_fresh(&self, key: DataKey) -> bool {
        let _ = key;
        true
    }

    /// Tells the storage that a [`PagableArc`](crate::PagableArc) of it now holds `key`
    /// (it may be paged out, with only the key in memory): garbage collection keeps the key,
    /// and what it reaches, until that handle drops. Returns whether the key is still
    /// stored as far as a garbage collection could have changed that (`true` when none ran;
    /// then nothing is read). The default holds nothing and returns `true`.
    fn hold_key(&self, key: DataKey) -> bool {
        let _ = key;
        true
    }
}
