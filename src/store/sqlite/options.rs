//! [`SqliteOptions`] and [`Durability`]: the settings a SQLite store is opened with.

use std::path::Path;

use super::SqliteNodeStore;

/// What survives a crash, and what it costs. Chosen per open; a database written in one mode
/// opens in any other (the journal mode is switched at open).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Durability {
    /// The reference implementation's speed: no journal on disk, no sync
    /// (`journal_mode=MEMORY`, `synchronous=OFF`). Data is a cache that a crash may lose
    /// *entirely*. A commit that fails while the process runs (a full disk) is rolled back
    /// from the in-memory journal, so what was committed before stays readable.
    ///
    /// Guarantee: an unclean shutdown is detected at the next open (a marker file
    /// `pagable.db.open` exists from open until a clean close), and a possibly damaged
    /// database is never served: it is checked and repaired, or started empty
    /// (see [`SqliteOptions::repair_unclean`] and [`OpenReport`](super::OpenReport)).
    ///
    /// For pure caches, whose content can be rebuilt: measured, a process that stores and
    /// flushes in a loop, SIGKILLed, keeps on average about half of what `flush` had
    /// acknowledged, and now and then nothing.
    Cache,
    /// Every node whose [`flush`](crate::PagableStorage::flush) returned survives a crash of
    /// the process (`journal_mode=WAL`, `synchronous=NORMAL`: a commit is in the WAL file
    /// before `flush` returns, and the OS keeps it when the process dies). A power loss or an
    /// OS crash may lose the last commits, but not the database: at `NORMAL` SQLite syncs the
    /// WAL before every checkpoint, which keeps a WAL database consistent (commits are not
    /// synced one by one; [`Sync`](Self::Sync) does that). Children are always committed
    /// before (or with) their parents, so no committed node ever points to a missing one.
    ///
    /// The default: a storage library should not lose what `flush` acknowledged when the
    /// process dies. It costs little over [`Cache`](Self::Cache) (see `docs/bench-sqlite.md`).
    #[default]
    Durable,
    /// Every node whose [`flush`](crate::PagableStorage::flush) returned survives power loss
    /// (`journal_mode=WAL`, `synchronous=FULL`: each commit is fsynced). Same ordering
    /// guarantee as [`Durable`](Self::Durable).
    Sync,
}

/// How the `pagable_data` table stores its rows. Chosen when a database is created; an
/// existing database keeps the layout it has, whichever is asked for (the reference's
/// databases, `WithoutRowid`, open and work as they are). Every layout stores the reference's
/// record format; `docs/format.md` describes each.
///
/// The trade-off: `IntegerKey` reads by key in one descent of one B-tree with integer
/// comparisons; `Rowid` (the default) needs two descents (its key index, then the table) and
/// `WithoutRowid` one descent comparing 16-byte keys. Writes go the other way: `Rowid`
/// appends rows and only its small key index takes random inserts, while `IntegerKey` places
/// each row by its key, so a commit of a batch of new keys rewrites most of the table's
/// pages (its cost grows with the table, not the batch: measured on a million small records,
/// writes at half `Rowid`'s speed, a write-ahead log of up to 512 MiB in `Durable`, and in
/// `Cache` an in-memory journal that grows with the database). Choose `IntegerKey` for a
/// store written once and read many times (reads about 1.5× faster); `Rowid` otherwise.
/// Only `Rowid` and `WithoutRowid` open in the reference implementation.
/// `docs/bench-sqlite.md` has the measurements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TableLayout {
    /// `pagable_data (key_head INTEGER PRIMARY KEY, key_tail BLOB NOT NULL, value BLOB NOT
    /// NULL)`: the key's first 8 bytes, as an integer that sorts like them, are the rowid;
    /// the other 8 bytes are `key_tail`. A read by key is one descent of the table B-tree.
    /// A key whose first 8 bytes are those of another stored key (rare: about 3% of stores
    /// of a billion keys hold one such pair) is stored whole in a second table,
    /// `pagestore_overflow (key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID`,
    /// which a read consults when the main table has no row for the key.
    ///
    /// The reference implementation cannot use such a database: its table has no `key`
    /// column, so its first read or write fails with SQLite's `no such column: key` (it
    /// neither reads wrong data nor writes a second table beside it).
    IntegerKey,
    /// A rowid table, `pagable_data (key BLOB PRIMARY KEY, value BLOB NOT NULL)`: rows in
    /// a table B-tree keyed by an integer rowid, plus SQLite's automatic unique index on
    /// `key` (key and rowid only). Each batch is inserted in key order and SQLite gives the
    /// rows the next rowids, so rows are appended to the table and keys go into the small
    /// index in order. A read by key descends the index, then the table. The default for
    /// new databases; the reference opens it too (its SQL is the same).
    #[default]
    Rowid,
    /// The reference's table, `pagable_data (key BLOB PRIMARY KEY, value BLOB NOT NULL)
    /// WITHOUT ROWID`: one index B-tree holding whole records in key order. A read by key is
    /// one descent. An insert compares the new key with cells on its path by their whole
    /// record, so next to records that overflow their page (over about 4 KiB with 32 KiB
    /// pages) each comparison copies the neighbour's overflow chain. The layout to choose
    /// for a database the reference must open.
    WithoutRowid,
}

/// How to open a [`SqliteBackedPagableStorage`](crate::SqliteBackedPagableStorage): a consuming builder whose every setter says
/// its default.
///
/// ```
/// use pagestore::{Durability, SqliteOptions};
///
/// let dir = tempfile::tempdir()?;
/// let storage = SqliteOptions::default()
///     .durability(Durability::Durable)
///     .readers(4)
///     .write_buffer_bytes(16 << 20)
///     .open(dir.path())?;
/// # drop(storage);
/// # anyhow::Ok(())
/// ```
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    pub(super) durability: Durability,
    pub(super) readers: usize,
    pub(super) write_buffer_rows: usize,
    pub(super) write_buffer_bytes: usize,
    pub(super) verify_on_read: bool,
    pub(super) cache_size_bytes: u64,
    pub(super) mmap_size_bytes: u64,
    pub(super) dedup_keys: usize,
    pub(super) repair_unclean: bool,
    pub(super) table_layout: TableLayout,
    pub(super) key_head_bytes: u8,
    pub(super) read_only: bool,
    memory_budget: usize,
    /// `None`: the runtime's default.
    gc_grace: Option<std::time::Duration>,
    pub(super) max_record_bytes: usize,
}

/// SQLite's compiled length limit (`SQLITE_MAX_LENGTH` of the bundled build), the most a
/// row record may be: the default of [`SqliteOptions::max_record_bytes`] and its ceiling.
pub(super) const SQLITE_MAX_LENGTH: usize = 1_000_000_000;

/// The lowest [`SqliteOptions::max_record_bytes`]: SQLite applies the same limit to what the
/// writer reads, its own schema included.
pub(super) const MIN_RECORD_LIMIT: usize = 1024;

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            durability: Durability::default(),
            readers: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(4)
                .min(8),
            write_buffer_rows: 128 * 1024,
            write_buffer_bytes: 32 << 20,
            verify_on_read: true,
            cache_size_bytes: 2 << 20,
            mmap_size_bytes: if cfg!(target_pointer_width = "64") {
                1 << 30
            } else {
                0
            },
            dedup_keys: 2 << 20,
            repair_unclean: true,
            table_layout: TableLayout::default(),
            key_head_bytes: 8,
            read_only: false,
            memory_budget: usize::MAX,
            gc_grace: None,
            max_record_bytes: SQLITE_MAX_LENGTH,
        }
    }
}

impl SqliteOptions {
    /// What survives a crash. Default = [`Durability::Durable`].
    #[must_use]
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// The number of read-only connections that serve fetches in parallel.
    /// Default = `min(available_parallelism, 8)`. Clamped: 0 is raised to 1.
    #[must_use]
    pub fn readers(mut self, readers: usize) -> Self {
        self.readers = readers.max(1);
        self
    }

    /// The most nodes held in memory waiting for their commit; `store_data` waits when it is
    /// reached (back-pressure). One transaction commits up to half of it while the other half
    /// fills (in a [`TableLayout::IntegerKey`] table all of it: a commit there costs about
    /// the table's size, however few rows it has, so fewer commits are better). Each waiting
    /// node costs its record and about 120 bytes besides (measured with 1,000,000 small nodes,
    /// `Rowid` layout: 524,288 rows / 64 MiB peaked at 172 MiB RSS, 131,072 / 32 MiB
    /// at 103 MiB, 65,536 / 16 MiB at 81 MiB, at 4.75×, 4.61× and 3.70× the reference's
    /// write speed). Default = 131,072. Clamped: values below 2 are raised to 2.
    #[must_use]
    pub fn write_buffer_rows(mut self, rows: usize) -> Self {
        self.write_buffer_rows = rows.max(2);
        self
    }

    /// The most encoded bytes held in memory waiting for their commit; `store_data` waits
    /// when it is reached (back-pressure; a single node larger than this is still accepted,
    /// alone). One transaction commits up to half of it (all of it in a
    /// [`TableLayout::IntegerKey`] table). Default = 32 MiB. Clamped: values
    /// below 2 are raised to 2.
    #[must_use]
    pub fn write_buffer_bytes(mut self, bytes: usize) -> Self {
        self.write_buffer_bytes = bytes.max(2);
        self
    }

    /// Whether every record read from the database is re-hashed and compared with its key.
    /// SQLite does not checksum its pages, so this is the only thing that catches a flipped
    /// byte: a mismatch is an [`Error::Corrupt`](crate::Error::Corrupt) and the bytes never
    /// reach the caller. Costs one blake3 hash of the record per read. Default = `true`.
    #[must_use]
    pub fn verify_on_read(mut self, verify: bool) -> Self {
        self.verify_on_read = verify;
        self
    }

    /// SQLite's page cache per connection (`PRAGMA cache_size`), in bytes. Batches are
    /// inserted in key order and reads go through the memory map, so neither needs a big
    /// cache; a bigger one mostly holds copies of large records. In a
    /// [`TableLayout::WithoutRowid`] table the writer uses at least 16 MiB while it commits
    /// batches of large records (over 8 KiB on average), whose inserts re-read their
    /// neighbours' overflow pages. Default = 2 MiB.
    #[must_use]
    pub fn cache_size_bytes(mut self, bytes: u64) -> Self {
        self.cache_size_bytes = bytes;
        self
    }

    /// How much of the database file each reader memory-maps (`PRAGMA mmap_size`); reads
    /// of mapped pages skip a copy and a system call. A reader maps the file only while the
    /// records it reads are small (up to 8 KiB): large records are read from overflow pages
    /// with `pread` anyway, and mapping would only grow the resident set. The writer never
    /// maps. 0 turns it off. Default = 1 GiB on 64-bit targets, 0 elsewhere.
    #[must_use]
    pub fn mmap_size_bytes(mut self, bytes: u64) -> Self {
        self.mmap_size_bytes = bytes;
        self
    }

    /// How many keys committed this session are remembered, so that storing the same
    /// content again costs only a hash and a lookup: the 16-byte key in a hash set, 18 to 37
    /// bytes per key depending on how full the table is (22 measured at 200,000 keys). When
    /// the cap is passed, the remembered keys are forgotten; a repeat of one is still
    /// correct, just slower (the writer's `INSERT OR IGNORE` drops it). Keys not yet
    /// committed are always known (their records are in memory until their commit).
    /// Default = 2,097,152 (at most about 75 MB, typically 45).
    #[must_use]
    pub fn dedup_keys(mut self, keys: usize) -> Self {
        self.dedup_keys = keys;
        self
    }

    /// What to do when open finds that the last session did not close cleanly (only possible
    /// after [`Durability::Cache`]): `true` checks the database (`PRAGMA integrity_check`, then
    /// every record) and deletes what is damaged or points to something missing, falling back
    /// to starting empty if the file is beyond repair; `false` always starts empty.
    /// Default = `true`.
    #[must_use]
    pub fn repair_unclean(mut self, repair: bool) -> Self {
        self.repair_unclean = repair;
        self
    }

    /// The table layout of a database this open *creates*; an existing database keeps its
    /// own ([`SqliteNodeStore::table_layout`] says which it has). Default =
    /// [`TableLayout::Rowid`].
    #[must_use]
    pub fn table_layout(mut self, layout: TableLayout) -> Self {
        self.table_layout = layout;
        self
    }

    /// For tests of keys that share their head only: how many leading key bytes a
    /// [`TableLayout::IntegerKey`] row's integer head holds (the tail holds the rest). With
    /// 1, at most 256 keys fit in the main table and every further key takes the overflow
    /// path. A database must be opened with the value it was created with every time (with
    /// another, its rows hold no key and nothing is found). Clamped to 1..=8. Default = 8.
    #[doc(hidden)]
    #[must_use]
    pub fn key_head_bytes_for_tests(mut self, bytes: u8) -> Self {
        self.key_head_bytes = bytes.clamp(1, 8);
        self
    }

    /// Opens an existing store for reading only, beside a store that has it open for
    /// writing (in another process, or in this one) or on read-only media.
    ///
    /// A read-only open writes nothing: it takes no directory lock, creates no directory,
    /// table, marker or journal, switches no journal mode and starts no writer thread, and
    /// ignores the write-side settings (durability, buffers, table layout, repair). Every
    /// read is its own short read transaction, so each sees everything the writer had
    /// committed when it began (a node a writer stored is visible once the writer's `flush`
    /// returned). [`put`](crate::NodeStore::put) (`store_data`, a page-out) fails with
    /// [`Error::ReadOnly`](crate::Error::ReadOnly); `flush` has nothing to do and returns `Ok`.
    /// Reads, [`verify`](SqliteNodeStore::verify) and [`scan`](crate::NodeStore::scan) work.
    ///
    /// With the writer's durability:
    /// - [`Durability::Durable`] and [`Durability::Sync`] (WAL): reads run concurrently with
    ///   the writer's commits and never wait.
    /// - [`Durability::Cache`] (rollback journal in the writer's memory): the open works, but
    ///   a read waits while the writer commits a batch (up to SQLite's busy timeout of 30 s,
    ///   then fails with [`Error::Sqlite`](crate::Error::Sqlite) "database is locked"), and
    ///   the writer's commit waits for the read in progress. The Cache-mode marker exists
    ///   while such a writer runs, so the open reports
    ///   [`OpenReport::UncleanNotChecked`](super::OpenReport::UncleanNotChecked); it
    ///   repairs nothing either way (see there).
    ///
    /// In WAL mode (a database last written in Durable or Sync mode) the readers, like any
    /// SQLite reader, record their read marks in the WAL index `pagable.db-shm` (SQLite's
    /// shared memory, no data) that a Durable or Sync store leaves beside the database; on a
    /// directory this process cannot write in they read with a private index instead. While a read-only
    /// store has a WAL database open, a writer cannot open it in Cache mode (leaving WAL
    /// needs the database to itself).
    ///
    /// Errors at open: [`Error::Io`](crate::Error::Io) (`NotFound`) when `dir/pagable.db`
    /// does not exist; [`Error::Sqlite`](crate::Error::Sqlite) when it is not a pagestore
    /// database. Default: read-write (a store without this call takes the directory lock).
    #[must_use]
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// The largest row SQLite is asked to store, in bytes: a node's record (a 16-byte header,
    /// the data, and 16 bytes per child), its 16-byte key, and a few bytes of SQLite's row
    /// header.
    /// [`put`](crate::NodeStore::put) (and so `store_data`) refuses a larger node with
    /// [`Error::TooLarge`](crate::Error::TooLarge) before queuing it, and the store carries
    /// on; the writer's connection gets the same `SQLITE_LIMIT_LENGTH`, so SQLite enforces
    /// exactly the check `put` makes. Records already stored are read whatever their size.
    /// Clamped to SQLite's own limit, 1,000,000,000 bytes (no row can be larger), and to at
    /// least 1 KiB (SQLite applies the limit to the schema it reads too).
    /// Default = 1,000,000,000.
    #[must_use]
    pub fn max_record_bytes(mut self, bytes: usize) -> Self {
        self.max_record_bytes = bytes.clamp(MIN_RECORD_LIMIT, SQLITE_MAX_LENGTH);
        self
    }

    /// The byte budget for resident [`PagableArc`](crate::PagableArc) values of the opened
    /// storage (see [`WithRuntime::memory_budget`](crate::WithRuntime::memory_budget)); only
    /// [`open`](Self::open) uses it. Default = no budget (`usize::MAX`).
    #[must_use]
    pub fn memory_budget(mut self, bytes: usize) -> Self {
        self.memory_budget = bytes;
        self
    }

    /// The budget [`memory_budget`](Self::memory_budget) set.
    pub(crate) fn memory_budget_bytes(&self) -> usize {
        self.memory_budget
    }

    /// How long garbage collection keeps the root a `page_out` just returned, on the opened
    /// storage (see [`WithRuntime::gc_grace`](crate::WithRuntime::gc_grace)); only
    /// [`open`](Self::open) uses it. Default = [`DEFAULT_GC_GRACE`](crate::DEFAULT_GC_GRACE)
    /// (60 s).
    #[must_use]
    pub fn gc_grace(mut self, grace: std::time::Duration) -> Self {
        self.gc_grace = Some(grace);
        self
    }

    /// The grace [`gc_grace`](Self::gc_grace) set, if one was.
    pub(crate) fn gc_grace_period(&self) -> Option<std::time::Duration> {
        self.gc_grace
    }

    /// Opens the store in `dir` as [`open`](Self::open) does, without attaching the runtime:
    /// the bare [`SqliteNodeStore`], for composing with other node stores.
    pub fn open_node_store(self, dir: impl AsRef<Path>) -> anyhow::Result<SqliteNodeStore> {
        SqliteNodeStore::open_with(dir.as_ref(), self)
    }
}
