//! [`StoreStats`]: a node store's figures, for monitoring and maintenance.

/// A snapshot of a node store's figures, from
/// [`SqliteNodeStore::stats`](crate::SqliteNodeStore::stats),
/// [`MemoryNodeStore::stats`](crate::MemoryNodeStore::stats) or, for any store,
/// [`NodeStore::store_stats`](crate::NodeStore::store_stats).
///
/// The figures are read one after the other while other threads may store and flush, so
/// they are consistent with each other only when the store is quiet (a batch committed
/// between two reads can be counted in `pending_records` and in `records`, or in neither).
/// Figures a store does not have are `None`; new fields may be added.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreStats {
    /// Records committed (for a store that commits nothing separately, every record
    /// stored). Records waiting for their commit are in
    /// [`pending_records`](Self::pending_records), not here.
    pub records: u64,
    /// The sum of the committed records' lengths in bytes, as stored (the encoded
    /// [`codec`](crate::codec) record, without keys or the database's own overhead).
    pub data_bytes: u64,
    /// Records stored but not yet committed (a [`flush`](crate::NodeStore::flush) commits
    /// them); 0 for a store without a write buffer.
    pub pending_records: u64,
    /// The encoded bytes of the pending records.
    pub pending_bytes: u64,
    /// Named roots, pending changes included.
    pub roots: u64,
    /// Bytes the store's files take on disk now: the database file plus its write-ahead log,
    /// if there is one. `None` for a store without files.
    pub file_bytes: Option<u64>,
    /// The database's page size in bytes. `None` for a store without pages.
    pub page_size: Option<u64>,
    /// Pages of the database file that are free (`PRAGMA freelist_count`): left by deleted
    /// records, reused by later writes, and given back to the file system by
    /// [`SqliteNodeStore::release_free_pages`](crate::SqliteNodeStore::release_free_pages)
    /// or [`compact`](crate::SqliteNodeStore::compact).
    pub free_pages: Option<u64>,
    /// `free_pages` × `page_size`: the bytes those calls can give back.
    pub free_bytes: Option<u64>,
}
