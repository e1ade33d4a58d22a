//! [`SqliteNodeStore`]: nodes in one SQLite file, with the reference implementation's keys
//! and records, with a background writer and a pool of readers.
//!
//! The on-disk format (table, record encoding, page size, journal modes, marker file) is
//! written down in `docs/format.md`. In short: keys and records are what `pagable` 0.3.3
//! writes, in a table `pagable_data` of one of three [`TableLayout`]s. New databases get
//! `Rowid` (rows appended, a key index beside them), which the reference reads and writes
//! too; `IntegerKey` (the key's first 8 bytes are the rowid, so a read is one B-tree
//! descent; a key whose head another key holds goes to a second table,
//! `pagestore_overflow`) and the reference's own `WithoutRowid` can be chosen for new
//! databases, and every layout is kept when found. `table` has the
//! SQL of each layout.
//! Named roots are in a table of pagestore's own, `pagestore_roots (name TEXT PRIMARY KEY,
//! key BLOB NOT NULL)`, which the reference never reads; root changes go through the
//! writer's batches, after the nodes stored before them.
//!
//! How it is built: `store_data` hashes and encodes on the caller's thread and queues the
//! record in a bounded buffer that reads see at once (`writer`); a background thread commits
//! it in sorted batches, children never after parents; reads go to a pool of read-only
//! connections that keep a read transaction open between reads (`pool`). See
//! [`Durability`] for what survives a crash.

mod checkpoint;
mod conn;
mod options;
mod pool;
mod recovery;
mod table;
mod verify;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

pub use options::{Durability, SqliteOptions, TableLayout};
pub use recovery::OpenReport;
pub use verify::VerifyReport;

use rusqlite::types::ValueRef;

use self::pool::ReaderPool;
use self::table::Table;
use self::writer::{Maintenance, WriteBuffer};
use crate::codec;
use crate::data::PagableData;
use crate::error::Error;
use crate::key::DataKey;
use crate::store::gc::{self, Collectable, GcGate, StoredKey};
use crate::store::{GcOptions, GcReport, NodeStore, StoreStats};

/// Failure points in the open sequence, for the unit tests of what a failed open leaves
/// behind; without `cfg(test)`, nothing.
mod failpoint {
    use crate::error::Error;

    #[cfg(test)]
    thread_local! {
        /// The step of an open on this thread that fails, if any.
        pub(super) static FAIL: std::cell::Cell<Option<&'static str>> =
            const { std::cell::Cell::new(None) };
    }

    /// Fails if a test asked `step` to fail.
    #[cfg_attr(not(test), inline(always))]
    pub(super) fn check(step: &'static str) -> Result<(), Error> {
        #[cfg(test)]
        if FAIL.get() == Some(step) {
            return Err(Error::io(step, "(test failure point)")(
                std::io::Error::other("failed on purpose"),
            ));
        }
        let _ = step;
        Ok(())
    }
}

/// The error of creating a file in `dir`, if it shows that this process cannot write in it
/// (permission denied, read-only file system); the probe file is removed at once. Only
/// called after a read-write open failed.
fn dir_not_writable(dir: &Path) -> Option<std::io::Error> {
    let probe = dir.join(format!("{DATABASE_FILE}.probe-{}", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            None
        }
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
        )
        .then_some(e),
    }
}

/// The file name of the database inside the store's directory (the reference's name).
const DATABASE_FILE: &str = "pagable.db";

/// A [`NodeStore`] that keeps nodes in a SQLite database, `dir/pagable.db`, in the format of
/// `pagable` 0.3.3 (see the module docs of the crate root and `docs/format.md`).
///
/// Most users want [`SqliteBackedPagableStorage`](crate::SqliteBackedPagableStorage), which
/// attaches the runtime; open either
/// with [`SqliteOptions`]. Dropping it flushes what is pending and closes the database.
pub struct SqliteNodeStore {
    inner: Arc<Inner>,
    writer: Option<JoinHandle<()>>,
    /// In WAL mode, the checkpointer and its thread (stopped before the writer).
    checkpointer: Option<(Arc<checkpoint::Checkpointer>, JoinHandle<()>)>,
    open_report: OpenReport,
    options: SqliteOptions,
    table: Table,
    /// The unclean-shutdown marker, in Cache mode.
    marker: Option<PathBuf>,
    /// Held until after `close` (fields drop after `Drop::drop`), released last; none when
    /// read-only.
    _dir_lock: Option<recovery::DirLock>,
}

/// What a read needs; shared with reads running on tokio's blocking pool.
struct Inner {
    path: PathBuf,
    pool: ReaderPool,
    buffer: WriteBuffer,
    verify_on_read: bool,
    /// Taken by root changes, so that `remove_root` reads whether a root exists and queues
    /// its removal with no other change of roots in between.
    roots_lock: std::sync::Mutex<()>,
    gc: GcGate,
    /// Permits for the batched reads on tokio's blocking pool: one per reader connection.
    #[cfg(feature = "tokio")]
    batches: tokio::sync::Semaphore,
}

impl Inner {
    /// The root `name`: its pending change if one is queued, else the committed one.
    fn root(&self, name: &str) -> anyhow::Result<Option<DataKey>> {
        if let Some(pending) = self.buffer.pending_root(name) {
            return Ok(pending);
        }
        // Read after the pending map: a change committed meanwhile is in the database.
        let found = self
            .pool
            .query(|conn| conn::read_roots(conn, Some(name), &self.path))?;
        Ok(found.into_iter().next().map(|(_, key)| key))
    }

    fn lock_roots(&self) -> std::sync::MutexGuard<'_, ()> {
        self.roots_lock.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn fetch(&self, key: &DataKey) -> anyhow::Result<Arc<PagableData>> {
        self.fetch_as(key, |view| Arc::new(view.to_data()))
    }

    /// `make` of the checked record stored under `key` (pending or committed), borrowed
    /// where it lies: [`fetch`](Self::fetch) builds the node from it, the tiered store's
    /// uploader copies the bytes.
    fn fetch_as<T>(
        &self,
        key: &DataKey,
        make: impl FnOnce(codec::RecordRef<'_>) -> T,
    ) -> anyhow::Result<T> {
        if let Some(record) = self.buffer.pending(key) {
            // Encoded by this process from a node that hashed to `key`: no need to re-hash.
            return Ok(make(checked(key, Ok(&record), false)?));
        }
        let on_row = |value: Result<&[u8], rusqlite::types::Type>| {
            checked(key, value, self.verify_on_read).map(make)
        };
        match self.pool.read(&key.as_bytes(), on_row)? {
            Some(made) => Ok(made?),
            None => Err(Error::NotFound(*key).into()),
        }
    }

    /// [`fetch`](Self::fetch) of every key, the committed ones read on one reader connection.
    /// The first key (in `keys`' order) that fails fails the batch with its error.
    fn fetch_many(&self, keys: &[DataKey]) -> anyhow::Result<Vec<Arc<PagableData>>> {
        // A key read below that has no record stays NotFound.
        let mut found: Vec<Result<Arc<PagableData>, Error>> = Vec::with_capacity(keys.len());
        let mut stored = Vec::new();
        let mut positions = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            match self.buffer.pending(key) {
                // Encoded by this process from a node that hashed to `key`: no re-hash.
                Some(record) => found.push(decode(key, Ok(&record), false)),
                None => {
                    found.push(Err(Error::NotFound(*key)));
                    stored.push(key.as_bytes());
                    positions.push(i);
                }
            }
        }
        if !stored.is_empty() {
            let read = self.pool.read_each(&stored, |j, value| {
                decode(&keys[positions[j]], value, self.verify_on_read)
            })?;
            for (node, &i) in read.into_iter().zip(&positions) {
                if let Some(node) = node {
                    found[i] = node;
                }
            }
        }
        Ok(found.into_iter().collect::<Result<Vec<_>, Error>>()?)
    }
}

/// Checks the value stored under `key`: a BLOB (else the SQL type it has) that parses as a
/// record and, with `verify`, hashes to `key`.
fn checked<'a>(
    key: &DataKey,
    value: Result<&'a [u8], rusqlite::types::Type>,
    verify: bool,
) -> Result<codec::RecordRef<'a>, Error> {
    let corrupt = |reason: String| Error::Corrupt { key: *key, reason };
    let record =
        value.map_err(|sql_type| corrupt(format!("the stored value is {sql_type}, not a BLOB")))?;
    if verify {
        return crate::store::checked_record(key, record);
    }
    codec::parse(record).map_err(|e| corrupt(e.to_string()))
}

/// The node of the value stored under `key`, [`checked`].
fn decode(
    key: &DataKey,
    value: Result<&[u8], rusqlite::types::Type>,
    verify: bool,
) -> Result<Arc<PagableData>, Error> {
    checked(key, value, verify).map(|view| Arc::new(view.to_data()))
}

impl SqliteNodeStore {
    /// [`Error::ReadOnly`] if the store was opened read-only.
    fn check_writable(&self) -> Result<(), Error> {
        if self.options.read_only {
            return Err(Error::ReadOnly {
                path: self.inner.path.clone(),
            });
        }
        Ok(())
    }

    pub(super) fn open_with(dir: &Path, options: SqliteOptions) -> anyhow::Result<Self> {
        if options.read_only {
            return Ok(Self::open_read_only(dir, options)?);
        }
        Self::open_read_write(dir, options).map_err(|err| match dir_not_writable(dir) {
            // Whatever step failed first (the lock file, the marker, the journal), the cause
            // is the directory, and the fix is a read-only open.
            Some(source) => Error::NotWritable {
                path: dir.into(),
                source,
            }
            .into(),
            None => err,
        })
    }

    /// Opens `dir/pagable.db` for reading only: nothing is created, locked or written.
    fn open_read_only(dir: &Path, options: SqliteOptions) -> Result<Self, Error> {
        let path = dir.join(DATABASE_FILE);
        std::fs::metadata(&path).map_err(Error::io("open (read-only) the database", &path))?;
        // The marker of a Cache-mode writer, running now or crashed: reported, not repaired.
        let open_report = if recovery::marker_path(&path).exists() {
            OpenReport::UncleanNotChecked
        } else {
            OpenReport::Clean
        };
        let first = conn::open_reader(&path, &options)?;
        let layout = conn::check_read_only(&first, &path)?;
        let table = Table::new(layout, options.key_head_bytes);
        let mut readers = vec![first];
        for _ in 1..options.readers {
            readers.push(conn::open_reader(&path, &options)?);
        }
        let inner = Arc::new(Inner {
            path: path.clone(),
            pool: ReaderPool::new(&path, table, readers, options.mmap_size_bytes, false),
            buffer: WriteBuffer::new(2, 2, 0, 2),
            verify_on_read: options.verify_on_read,
            roots_lock: std::sync::Mutex::new(()),
            gc: GcGate::default(),
            #[cfg(feature = "tokio")]
            batches: tokio::sync::Semaphore::new(options.readers.max(1)),
        });
        Ok(Self {
            inner,
            writer: None,
            checkpointer: None,
            open_report,
            options,
            table,
            marker: None,
            _dir_lock: None,
        })
    }

    fn open_read_write(dir: &Path, options: SqliteOptions) -> anyhow::Result<Self> {
        // Fails (AlreadyExists / NotADirectory) when a file is in the way.
        std::fs::create_dir_all(dir).map_err(Error::io("create directory", dir))?;
        let path = dir.join(DATABASE_FILE);
        let dir_lock = recovery::lock_dir(&path)?;
        let marker = recovery::marker_path(&path);
        let unclean = marker.exists();
        let cache_mode = options.durability == Durability::Cache;
        let open_report = if unclean {
            recovery::recover(&path, &options)?
        } else {
            OpenReport::Clean
        };
        let (writer_conn, layout) = conn::open_writer(&path, options.table_layout)?;
        let table = Table::new(layout, options.key_head_bytes);
        conn::tune_writer(&writer_conn, &path, &options, layout)?;
        let buffer = WriteBuffer::new(
            options.write_buffer_rows,
            options.write_buffer_bytes,
            options.dedup_keys,
            writer::batches_per_budget(layout),
        );
        // The marker is written only once the file is known to be a usable database (a
        // refused file, not a database or another program's table, is never "recovered"),
        // and as late as it can be: before the journal-mode switch, which can write (leaving
        // WAL rewrites the header) and must not do so unmarked in Cache mode. The readers
        // open after the switch (an open reader would keep the database in WAL) and the
        // writer thread after them. If one of those fails, the guard removes the marker.
        if cache_mode {
            recovery::write_marker(&marker)?;
        } else if unclean {
            // Recovered, and from now on the WAL protects the file.
            recovery::remove_marker(&marker)?;
        }
        let marker_guard = recovery::MarkerGuard::new(cache_mode.then_some(marker.as_path()));
        failpoint::check("set the durability")?;
        conn::set_durability(&writer_conn, &path, &options)?;
        if options.durability == Durability::Sync {
            // SQLite syncs the data; the database file's own directory entry must be durable
            // too for a new store to survive power loss.
            recovery::sync_parent(&path)?;
        }
        failpoint::check("open the readers")?;
        let readers = (0..options.readers)
            .map(|_| conn::open_reader(&path, &options))
            .collect::<Result<Vec<_>, _>>()?;
        let inner = Arc::new(Inner {
            path: path.clone(),
            pool: ReaderPool::new(&path, table, readers, options.mmap_size_bytes, true),
            buffer,
            verify_on_read: options.verify_on_read,
            roots_lock: std::sync::Mutex::new(()),
            gc: GcGate::default(),
            #[cfg(feature = "tokio")]
            batches: tokio::sync::Semaphore::new(options.readers.max(1)),
        });
        let cache_bytes = options.cache_size_bytes;
        failpoint::check("start the writer")?;
        let checkpointer = if cache_mode {
            None
        } else {
            Some(checkpoint::start(&path, &options)?)
        };
        let writer = {
            let inner = Arc::clone(&inner);
            let told = checkpointer.as_ref().map(|(shared, _)| Arc::clone(shared));
            std::thread::Builder::new()
                .name(writer::THREAD_NAME.into())
                .spawn(move || {
                    writer::run(
                        &inner.buffer,
                        &inner.pool,
                        writer_conn,
                        table,
                        &inner.path,
                        cache_bytes,
                        told.as_deref(),
                    )
                })
                .map_err(Error::io("start the writer thread for", &path))?
        };
        marker_guard.disarm();
        Ok(Self {
            inner,
            writer: Some(writer),
            checkpointer,
            open_report,
            options,
            table,
            marker: cache_mode.then_some(marker),
            _dir_lock: Some(dir_lock),
        })
    }

    /// Scans the whole store: re-hashes every record and checks that every child key it
    /// names is stored (committed or pending). Runs on its own connection in short read
    /// transactions, so reads and writes carry on meanwhile.
    pub fn verify(&self) -> anyhow::Result<VerifyReport> {
        self.verify_with_progress(|_| {})
    }

    /// [`verify`](Self::verify), calling `progress` with the number of records checked so far
    /// after every few thousand (for a progress bar; [`stats`](Self::stats) gives the total).
    pub fn verify_with_progress(
        &self,
        mut progress: impl FnMut(u64),
    ) -> anyhow::Result<VerifyReport> {
        let mut conn = conn::open_reader(&self.inner.path, &self.options)?;
        let buffer = &self.inner.buffer;
        Ok(verify::scan(
            &mut conn,
            self.table,
            &self.inner.path,
            &|key| buffer.is_pending(key),
            &mut progress,
        )?)
    }

    /// The store's figures (see [`StoreStats`]). Reads the database in one read
    /// transaction on its own connection: `count(*)` and `sum(length(value))` over the
    /// table, which is O(records) reads of the table's pages but decodes and hashes nothing
    /// (SQLite takes a blob's length from the row header, without reading overflow pages),
    /// plus the page size and `freelist_count`; the file sizes come from the file system
    /// and the pending figures from the write buffer. Works on a read-only store.
    ///
    /// (SQLite's `dbstat` table could give page counts, but not the records' lengths any
    /// cheaper: it also visits every page.)
    pub fn stats(&self) -> anyhow::Result<StoreStats> {
        let path = &self.inner.path;
        // Pending first: a batch committed after this is then counted in the table.
        let pending_records = self.inner.buffer.pending_len() as u64;
        let pending_bytes = self.inner.buffer.pending_bytes() as u64;
        let roots = self.roots()?.len() as u64;
        let mut conn = conn::open_reader(path, &self.options)?;
        let sql = || Error::sqlite("read the figures of", path);
        let tx = conn.transaction().map_err(sql())?;
        let (records, data_bytes) = self.table.count(&tx).map_err(sql())?;
        let page_size: u64 = tx
            .query_row("PRAGMA page_size", [], |row| row.get(0))
            .map_err(sql())?;
        let free_pages: u64 = tx
            .query_row("PRAGMA freelist_count", [], |row| row.get(0))
            .map_err(sql())?;
        drop(tx);
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        let file_bytes = size(path) + size(Path::new(&wal));
        Ok(StoreStats {
            records,
            data_bytes,
            pending_records,
            pending_bytes,
            roots,
            file_bytes: Some(file_bytes),
            page_size: Some(page_size),
            free_pages: Some(free_pages),
            free_bytes: Some(free_pages * page_size),
        })
    }

    /// Gives the database's free pages (left by deleted records) back to the file system,
    /// so the file shrinks, and returns how many pages it gave back. Runs
    /// `PRAGMA incremental_vacuum`, which needs `auto_vacuum = INCREMENTAL`: every database
    /// pagestore creates has it; a database created without it (the reference's, or one
    /// made by pagestore before it set the mode) keeps its mode, and this returns 0 there
    /// (use [`compact`](Self::compact)). Cheap: it moves only pages at the end of the file.
    ///
    /// Runs on the writer thread between two batches, after every record stored before
    /// the call is committed, so it never races a commit. [`Error::ReadOnly`] on a
    /// read-only store.
    pub fn release_free_pages(&self) -> anyhow::Result<u64> {
        self.check_writable()?;
        Ok(self.inner.buffer.maintain(Maintenance::ReleaseFreePages)?)
    }

    /// Rebuilds the database file with SQLite's `VACUUM`: no free pages and records packed
    /// together, in any auto-vacuum mode. The database keeps its auto-vacuum mode and page
    /// size. Every record stays stored under its key.
    ///
    /// It needs temporary disk space up to the database's size (SQLite builds the copy in
    /// a temporary file, and in WAL mode the log grows by as much), and the database to
    /// itself while it runs: it runs on the writer thread after every record stored before
    /// the call is committed, so stores wait behind it (reads of this store wait for the
    /// writer like during a commit), and it fails with `database is locked` if another
    /// process reads the database meanwhile and does not let go within the busy timeout.
    /// [`Error::ReadOnly`] on a read-only store.
    pub fn compact(&self) -> anyhow::Result<()> {
        self.check_writable()?;
        self.inner.buffer.maintain(Maintenance::Compact)?;
        Ok(())
    }

    /// [`put`](NodeStore::put) of a record already encoded and checked: `record` is
    /// `codec::encode` of a node whose key is `key` and whose children are `arcs` (the caller
    /// parsed and hashed it, as the tiered store does with what it fetches), so it is
    /// neither hashed nor encoded again. Children first, like `put`.
    pub(crate) fn put_record(
        &self,
        key: DataKey,
        arcs: &[DataKey],
        record: Vec<u8>,
    ) -> anyhow::Result<()> {
        self.store_record(key, arcs, record.len(), || record)
    }

    /// The record stored under `key` as it is stored (checked like [`get`](NodeStore::get)),
    /// with the keys it names: for sending it on without decoding and encoding it again.
    pub(crate) fn get_record(&self, key: &DataKey) -> anyhow::Result<(Vec<u8>, Vec<DataKey>)> {
        self.inner
            .fetch_as(key, |view| (view.record().to_vec(), view.arcs().collect()))
    }

    /// The keys among `keys` that are not stored (committed or pending), in their order:
    /// [`contains`](NodeStore::contains) of each, on one reader for the whole batch.
    pub(crate) fn missing_of(&self, keys: &[DataKey]) -> anyhow::Result<Vec<DataKey>> {
        let unbuffered: Vec<DataKey> = keys
            .iter()
            .copied()
            .filter(|key| !self.inner.buffer.contains(key))
            .collect();
        let bytes: Vec<[u8; 16]> = unbuffered.iter().map(DataKey::as_bytes).collect();
        let found = self.inner.pool.contains_each(&bytes)?;
        Ok(unbuffered
            .into_iter()
            .zip(found)
            .filter_map(|(key, found)| (!found).then_some(key))
            .collect())
    }

    /// What `put` and `put_record` share: the checks, then `record()` queued unless the key
    /// is stored already.
    fn store_record(
        &self,
        key: DataKey,
        arcs: &[DataKey],
        record_len: usize,
        record: impl FnOnce() -> Vec<u8>,
    ) -> anyhow::Result<()> {
        self.check_writable()?;
        // Refused here, not at commit: a row over SQLite's limit would fail its whole batch
        // and poison the store for every caller.
        let bytes = conn::record_bytes(record_len);
        let limit = self.options.max_record_bytes as u64;
        if bytes > limit {
            return Err(Error::TooLarge { key, bytes, limit }.into());
        }
        let buffer = &self.inner.buffer;
        buffer.check()?;
        // Under the collection gate's shared lock: no collection deletes anything until the
        // record is queued, so the children checked here stay stored (and, if a collection
        // runs, vouched for), and a key remembered as stored is stored.
        let gate = &self.inner.gc;
        let entered = gate.enter();
        gate.vouch(&entered, std::iter::once(key).chain(arcs.iter().copied()));
        for child in arcs {
            if !self.contains(child)? {
                return Err(Error::MissingChild { key, child: *child }.into());
            }
        }
        if !buffer.contains(&key) {
            buffer.push(key, record())?;
        }
        Ok(())
    }

    /// Deletes every record no root reaches, then gives the freed pages back (see
    /// [`NodeStore::collect_garbage`] for what is kept and why it is safe while other threads
    /// store and read). With a runtime attached, call
    /// [`WithRuntime::gc`](crate::WithRuntime::gc) instead: it also keeps what the runtime's
    /// live values need. [`Error::ReadOnly`] on a read-only store.
    pub fn gc(&self) -> anyhow::Result<GcReport> {
        self.collect_garbage(&GcOptions::new())
    }

    /// What [`gc`](Self::gc) would delete, deleting nothing (works on a read-only store).
    pub fn gc_dry_run(&self) -> anyhow::Result<GcReport> {
        self.collect_garbage(&GcOptions::new().dry_run(true))
    }

    /// What opening found: a clean previous close, or an unclean one and what was done.
    pub fn open_report(&self) -> &OpenReport {
        &self.open_report
    }

    /// The database file (`dir/pagable.db`).
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The layout of the database's table: the one [`SqliteOptions::table_layout`] asked
    /// for if this open created the database, else the one the database already had.
    pub fn table_layout(&self) -> TableLayout {
        self.table.layout
    }

    /// Whether this store was opened with [`SqliteOptions::read_only`].
    pub fn is_read_only(&self) -> bool {
        self.options.read_only
    }

    /// The durability this store was opened with (for a read-only store, the option as
    /// given: it sets nothing).
    pub fn durability(&self) -> Durability {
        self.options.durability
    }

    /// Commits what is pending, stops the writer, and (in Cache mode, if everything was
    /// committed) syncs the file and removes the unclean-shutdown marker.
    fn close(&mut self) {
        if self.options.read_only {
            return;
        }
        let flushed = self.inner.buffer.flush();
        if let Some((checkpointer, thread)) = self.checkpointer.take() {
            checkpointer.stop();
            let _ = thread.join();
            if flushed.is_ok() {
                // The log may be as large as the last burst of writes: copied and truncated
                // now (unless another process reads the store), so a closed store keeps none.
                let _ = self.inner.buffer.maintain(Maintenance::Checkpoint);
            }
        }
        self.inner.buffer.shutdown();
        if let Some(writer) = self.writer.take() {
            if writer.join().is_err() {
                log::error!(
                    "pagestore: the writer thread of {} panicked",
                    self.path().display()
                );
                return;
            }
        }
        if let Err(err) = flushed {
            log::error!(
                "pagestore: the final flush of {} failed ({err}); the next open will check it",
                self.path().display()
            );
            return;
        }
        if let Some(marker) = &self.marker {
            // Cache mode never syncs while running; one sync at close makes a clean close
            // safe against a later power loss too.
            let synced = std::fs::File::open(self.path()).and_then(|f| f.sync_all());
            let removed = synced
                .map_err(Error::io("sync", self.path()))
                .and_then(|()| recovery::remove_marker(marker));
            if let Err(err) = removed {
                log::warn!("pagestore: {err}; the next open will check the database");
            }
        }
    }
}

impl Drop for SqliteNodeStore {
    /// Flushes and closes cleanly; errors are logged (call `flush` first to see them).
    fn drop(&mut self) {
        self.close();
    }
}

#[async_trait::async_trait]
impl NodeStore for SqliteNodeStore {
    fn put(&self, node: PagableData) -> anyhow::Result<DataKey> {
        let key = node.compute_key();
        self.store_record(key, &node.arcs, codec::encoded_len(&node), || {
            codec::encode(&node)
        })?;
        Ok(key)
    }

    fn get(&self, key: &DataKey) -> anyhow::Result<Arc<PagableData>> {
        self.inner.fetch(key)
    }

    async fn get_async(&self, key: &DataKey) -> anyhow::Result<Arc<PagableData>> {
        if let Some(record) = self.inner.buffer.pending(key) {
            // In memory, encoded here from a node that hashed to `key`: no I/O, no re-hash.
            return Ok(decode(key, Ok(&record), false)?);
        }
        #[cfg(feature = "tokio")]
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (inner, key) = (Arc::clone(&self.inner), *key);
            return runtime
                .spawn_blocking(move || inner.fetch(&key))
                .await
                .map_err(|e| anyhow::anyhow!("the read of {key} did not complete: {e}"))?;
        }
        // Without tokio there is no pool to move to.
        self.inner.fetch(key)
    }

    /// One call on tokio's blocking pool per batch, which reads every key on one reader
    /// connection; at most as many batches run at once as the store has readers (more would
    /// only wait for a connection, each on a thread of its own). Keys written and not yet
    /// committed are decoded from memory; a batch of only those does no I/O.
    async fn get_many_async(&self, keys: &[DataKey]) -> anyhow::Result<Vec<Arc<PagableData>>> {
        #[cfg(feature = "tokio")]
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            if keys.iter().all(|key| self.inner.buffer.is_pending(key)) {
                return self.inner.fetch_many(keys);
            }
            let _permit = self
                .inner
                .batches
                .acquire()
                .await
                .map_err(|e| anyhow::anyhow!("the batched read did not start: {e}"))?;
            let (inner, batch) = (Arc::clone(&self.inner), keys.to_vec());
            return runtime
                .spawn_blocking(move || inner.fetch_many(&batch))
                .await
                .map_err(|e| anyhow::anyhow!("a batched read did not complete: {e}"))?;
        }
        self.inner.fetch_many(keys)
    }

    fn contains(&self, key: &DataKey) -> anyhow::Result<bool> {
        if self.inner.buffer.contains(key) {
            return Ok(true);
        }
        Ok(self.inner.pool.contains_each(&[key.as_bytes()])?[0])
    }

    /// Read-only: nothing to commit, `Ok`.
    fn flush(&self) -> anyhow::Result<()> {
        if self.options.read_only {
            return Ok(());
        }
        Ok(self.inner.buffer.flush()?)
    }

    /// Queued behind every record stored before it and committed in the same transaction
    /// as the last of them or later; reads see it at once. A key that is not stored is
    /// refused with [`Error::NotFound`].
    fn set_root(&self, name: &str, key: DataKey) -> anyhow::Result<()> {
        self.check_writable()?;
        // Under the collection gate, like `put`: the key checked here stays stored.
        let gate = &self.inner.gc;
        let entered = gate.enter();
        gate.vouch(&entered, [key]);
        if !self.contains(&key)? {
            return Err(Error::NotFound(key).into());
        }
        let _roots = self.inner.lock_roots();
        Ok(self.inner.buffer.push_root(name, Some(key))?)
    }

    fn root(&self, name: &str) -> anyhow::Result<Option<DataKey>> {
        self.inner.root(name)
    }

    fn roots(&self) -> anyhow::Result<Vec<(String, DataKey)>> {
        // The pending changes first: one committed after this snapshot is in the database
        // read below.
        let pending = self.inner.buffer.pending_roots();
        let committed = self
            .inner
            .pool
            .query(|conn| conn::read_roots(conn, None, &self.inner.path))?;
        let mut roots: std::collections::BTreeMap<String, DataKey> =
            committed.into_iter().collect();
        for (name, key) in pending {
            match key {
                Some(key) => roots.insert(name, key),
                None => roots.remove(&name),
            };
        }
        Ok(roots.into_iter().collect())
    }

    fn remove_root(&self, name: &str) -> anyhow::Result<bool> {
        self.check_writable()?;
        let _roots = self.inner.lock_roots();
        let existed = self.inner.root(name)?.is_some();
        if existed {
            self.inner.buffer.push_root(name, None)?;
        }
        Ok(existed)
    }

    fn scan(
        &self,
        visit: &mut dyn FnMut(DataKey, anyhow::Result<PagableData>) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        // What is pending is committed first, so the scan sees every node once, from one place.
        self.flush()?;
        let mut conn = conn::open_reader(&self.inner.path, &self.options)?;
        verify::for_each_record(
            &mut conn,
            self.table,
            &self.inner.path,
            &mut |key, record| {
                let node = match record {
                    Ok(bytes) => checked(&key, Ok(bytes), true).map(|view| view.to_data()),
                    Err(err) => Err(err),
                };
                visit(key, node.map_err(anyhow::Error::from))
            },
        )
    }

    fn store_stats(&self) -> anyhow::Result<Option<StoreStats>> {
        Ok(Some(self.stats()?))
    }

    /// Marks on a connection of its own, in short read transactions; deletes on the writer
    /// thread, one transaction per chunk of keys, between batches; then
    /// [`release_free_pages`](SqliteNodeStore::release_free_pages). A dry run works on a
    /// read-only store; a collection there is [`Error::ReadOnly`].
    fn collect_garbage(&self, options: &GcOptions<'_>) -> anyhow::Result<GcReport> {
        if !options.dry_run {
            self.check_writable()?;
            self.inner.buffer.check()?;
        }
        let conn = conn::open_reader(&self.inner.path, &self.options)?;
        // The pass over the file goes back to rows it passed (children committed just
        // before their parent in one batch): mapped, such a read costs no system call.
        let _ = conn.execute_batch(&format!(
            "PRAGMA mmap_size = {}",
            self.options.mmap_size_bytes
        ));
        let collector = Collector {
            store: self,
            conn: std::cell::RefCell::new(conn),
            reads: std::cell::Cell::new(0),
        };
        gc::collect(&collector, options)
    }

    fn gc_epoch(&self) -> u64 {
        self.inner.gc.epoch()
    }

    fn protect(&self, key: &DataKey) {
        self.inner.gc.protect(key);
    }

    /// Ends the readers' held transactions and returns their SQLite page caches, asks the
    /// writer to do the same, and forgets the remembered committed keys (later repeats are
    /// then deduplicated by SQLite).
    fn release_memory(&self) {
        self.inner.pool.release_memory();
        self.inner.buffer.release_memory();
    }
}

/// Keys walked (and at most deleted) per sweep step: one short write transaction each, during
/// which a `put` of this store waits.
const SWEEP_CHUNK: u32 = 2048;

/// Records read in one read transaction while marking, at most.
const READS_PER_SNAPSHOT: usize = 16_384;

/// A garbage collection's view of the store: its own read connection.
struct Collector<'a> {
    store: &'a SqliteNodeStore,
    conn: std::cell::RefCell<rusqlite::Connection>,
    /// Reads in the current read transaction.
    reads: std::cell::Cell<usize>,
}

impl Collector<'_> {
    /// Ends the marking's read transaction, if one is open.
    fn end_snapshot(&self) -> Result<(), Error> {
        let conn = self.conn.borrow();
        if !conn.is_autocommit() {
            conn.execute_batch("COMMIT")
                .map_err(Error::sqlite("read records of", &self.store.inner.path))?;
        }
        Ok(())
    }
}

impl Collector<'_> {
    fn sql(&self, what: &'static str) -> impl FnOnce(rusqlite::Error) -> Error + '_ {
        Error::sqlite(what, &self.store.inner.path)
    }

    /// Hands the children of the record of `key` to `found`; `found(None)` if none is stored.
    fn visit_record(
        key: &DataKey,
        record: Option<&[u8]>,
        found: &mut dyn FnMut(Option<&mut dyn Iterator<Item = DataKey>>),
    ) -> Result<(), Error> {
        let Some(record) = record else {
            found(None);
            return Ok(());
        };
        let view = super::checked_record(key, record)?;
        found(Some(&mut view.arcs()));
        Ok(())
    }
}

impl Collectable for Collector<'_> {
    fn gate(&self) -> &GcGate {
        &self.store.inner.gc
    }

    fn root_keys(&self) -> anyhow::Result<Vec<DataKey>> {
        Ok(self
            .store
            .roots()?
            .into_iter()
            .map(|(_, key)| key)
            .collect())
    }

    fn pending_keys(&self, keep: &mut dyn FnMut(DataKey)) {
        self.store.inner.buffer.pending_keys(keep);
    }

    fn is_pending(&self, key: &DataKey) -> bool {
        self.store.inner.buffer.is_pending(key)
    }

    /// A `Rowid` table, newest row first: a node is committed after the children it names
    /// (and in a later or the same batch, whose rows get higher rowids), so its row comes
    /// before theirs. In the other layouts the rows are in key order, which says nothing
    /// about who names whom: `false` (marking then reads record by record, by key).
    fn records_parents_first(&self, visit: &mut gc::VisitRecord<'_>) -> anyhow::Result<bool> {
        if self.store.table.layout != TableLayout::Rowid {
            return Ok(false);
        }
        self.end_snapshot()?;
        let sql = || self.sql("read the records of");
        let conn = self.conn.borrow();
        let mut stmt = conn
            .prepare_cached(
                "SELECT rowid, key, value FROM pagable_data WHERE rowid < ?1 \
                 ORDER BY rowid DESC LIMIT ?2",
            )
            .map_err(sql())?;
        let mut before = i64::MAX;
        loop {
            // One short read transaction per chunk: writers and checkpoints carry on.
            let mut rows = stmt
                .query(rusqlite::params![before, SWEEP_CHUNK])
                .map_err(sql())?;
            let mut read = 0;
            while let Some(row) = rows.next().map_err(sql())? {
                read += 1;
                before = row.get(0).map_err(sql())?;
                let key = row.get_ref(1).map_err(sql())?;
                let value = row.get_ref(2).map_err(sql())?;
                if let (ValueRef::Blob(key), ValueRef::Blob(value)) = (key, value) {
                    if let Some(key) = DataKey::from_slice(key) {
                        visit(before, key, value)?;
                    }
                }
            }
            if read < SWEEP_CHUNK {
                return Ok(true);
            }
        }
    }

    fn children(
        &self,
        keys: &[DataKey],
        found: &mut dyn FnMut(Option<&mut dyn Iterator<Item = DataKey>>),
    ) -> anyhow::Result<()> {
        let buffer = &self.store.inner.buffer;
        let conn = self.conn.borrow();
        let sql = || self.sql("read records of");
        // One read transaction spans many calls (a chain of nodes is one call per node);
        // it is ended every `READS_PER_SNAPSHOT` reads and on a miss.
        if conn.is_autocommit() {
            conn.execute_batch("BEGIN").map_err(sql())?;
            self.reads.set(0);
        }
        let mut misses = Vec::new();
        {
            let table = self.store.table;
            for key in keys {
                if let Some(record) = buffer.pending(key) {
                    Self::visit_record(key, Some(&record), found)?;
                    continue;
                }
                let read = table
                    .read(&conn, &key.as_bytes(), |record| match record {
                        ValueRef::Blob(bytes) => Self::visit_record(key, Some(bytes), found),
                        other => Err(Error::Corrupt {
                            key: *key,
                            reason: format!(
                                "the stored value is {}, not a BLOB",
                                other.data_type()
                            ),
                        }),
                    })
                    .map_err(sql())?;
                match read {
                    Some(visited) => visited?,
                    None => misses.push(*key),
                }
            }
        }
        self.reads.set(self.reads.get() + keys.len());
        if self.reads.get() >= READS_PER_SNAPSHOT || !misses.is_empty() {
            conn.execute_batch("COMMIT").map_err(sql())?;
        }
        // Not in the snapshot: pending, committed since it began, or missing. Looked up
        // outside any transaction, after the pending map (a record leaves it only once it
        // is committed).
        for key in misses {
            if let Some(record) = buffer.pending(&key) {
                Self::visit_record(&key, Some(&record), found)?;
                continue;
            }
            let record: Option<Vec<u8>> = self
                .store
                .table
                .read(&conn, &key.as_bytes(), |record| {
                    record.as_blob().map(<[u8]>::to_vec)
                })
                .map_err(sql())?
                .transpose()
                .map_err(|_| Error::Corrupt {
                    key,
                    reason: "the stored value is not a BLOB".into(),
                })?;
            Self::visit_record(&key, record.as_deref(), found)?;
        }
        Ok(())
    }

    /// A batch is committed in key order, so within one a child may come just before its
    /// parent; a batch holds at most half the write buffer's rows.
    fn disorder_window(&self) -> usize {
        self.store.options.write_buffer_rows / 2 + SWEEP_CHUNK as usize
    }

    fn record_at(
        &self,
        position: i64,
        found: &mut dyn FnMut(DataKey, &[u8]) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let sql = || self.sql("read the records of");
        let conn = self.conn.borrow();
        let mut stmt = conn
            .prepare_cached("SELECT key, value FROM pagable_data WHERE rowid = ?1")
            .map_err(sql())?;
        let mut rows = stmt.query([position]).map_err(sql())?;
        if let Some(row) = rows.next().map_err(sql())? {
            let key = row.get_ref(0).map_err(sql())?;
            let value = row.get_ref(1).map_err(sql())?;
            if let (ValueRef::Blob(key), ValueRef::Blob(value)) = (key, value) {
                if let Some(key) = DataKey::from_slice(key) {
                    found(key, value)?;
                }
            }
        }
        Ok(())
    }

    fn stored_keys(
        &self,
        visit: &mut dyn FnMut(&[StoredKey]) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        // In the table's own order, one short query per chunk: by rowid (the rows in file
        // order, not the key index's) or, in the other layouts, by key.
        self.end_snapshot()?;
        if self.store.table.layout != TableLayout::Rowid {
            let mut rows = table::Scan::new(self.store.table);
            while !rows.is_done() {
                let mut chunk: Vec<StoredKey> = Vec::with_capacity(SWEEP_CHUNK as usize);
                {
                    let conn = self.conn.borrow();
                    rows.step(
                        &conn,
                        SWEEP_CHUNK as usize,
                        table::Column::Length,
                        |key, len| {
                            // A key column that is not a key is not ours to judge: left alone.
                            if let (Some(key), ValueRef::Integer(len)) = (key, len) {
                                chunk.push((key, len.max(0) as u64));
                            }
                            Ok::<(), rusqlite::Error>(())
                        },
                    )
                    .map_err(self.sql("list the records of"))?;
                }
                if !chunk.is_empty() {
                    visit(&chunk)?;
                }
            }
            return Ok(());
        }
        // Newest first: a parent is then mostly deleted before its children, so a
        // collection killed midway leaves few garbage parents without their children.
        let sql = "SELECT rowid, key, length(value) FROM pagable_data WHERE rowid < ?1 \
                   ORDER BY rowid DESC LIMIT ?2";
        let mut after_rowid: i64 = i64::MAX;
        loop {
            let mut chunk: Vec<StoredKey> = Vec::with_capacity(SWEEP_CHUNK as usize);
            let mut rows_read = 0;
            {
                let conn = self.conn.borrow();
                let mut stmt = conn
                    .prepare_cached(sql)
                    .map_err(self.sql("list the records of"))?;
                let mut rows = stmt
                    .query(rusqlite::params![after_rowid, SWEEP_CHUNK])
                    .map_err(self.sql("list the records of"))?;
                while let Some(row) = rows.next().map_err(self.sql("list the records of"))? {
                    rows_read += 1;
                    after_rowid = row.get(0).map_err(self.sql("list the records of"))?;
                    let key_ref = row.get_ref(1).map_err(self.sql("list the records of"))?;
                    if let rusqlite::types::ValueRef::Blob(bytes) = key_ref {
                        // A key column that is not a key is not ours to judge: left alone.
                        if let Some(key) = DataKey::from_slice(bytes) {
                            let len: i64 = row.get(2).map_err(self.sql("list the records of"))?;
                            chunk.push((key, len.max(0) as u64));
                        }
                    }
                }
            }
            if !chunk.is_empty() {
                visit(&chunk)?;
            }
            if rows_read < SWEEP_CHUNK {
                return Ok(());
            }
        }
    }

    fn delete(&self, keys: &[DataKey]) -> anyhow::Result<()> {
        // Without a write-ahead log, a read transaction would keep the writer from
        // committing the deletion.
        self.end_snapshot()?;
        self.store
            .inner
            .buffer
            .maintain(Maintenance::Delete(keys.to_vec()))?;
        Ok(())
    }

    fn release_space(&self) -> anyhow::Result<u64> {
        self.store.release_free_pages()
    }
}

impl std::fmt::Debug for SqliteNodeStore {
    /// Settings and counts only: payloads are never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteNodeStore")
            .field("path", &self.inner.path)
            .field("durability", &self.options.durability)
            .field("pending", &self.inner.buffer.pending_len())
            .field("poisoned", &self.inner.buffer.is_poisoned())
            .field("open_report", &self.open_report)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An open that fails after writing the Cache-mode marker removes it again, so the next
    /// open finds a clean database instead of "repairing" a healthy one.
    #[test]
    fn a_failed_open_leaves_no_unclean_shutdown_marker() {
        for step in ["set the durability", "open the readers", "start the writer"] {
            let dir = tempfile::tempdir().unwrap();
            let node = PagableData {
                data: b"kept".to_vec(),
                arcs: vec![],
            };
            let store = SqliteOptions::default()
                .open_node_store(dir.path())
                .unwrap();
            let key = store.put(node.clone()).unwrap();
            drop(store);

            failpoint::FAIL.set(Some(step));
            let failed = SqliteOptions::default().open_node_store(dir.path());
            failpoint::FAIL.set(None);
            let err = failed.err().unwrap_or_else(|| panic!("{step}: opened"));
            assert!(format!("{err:#}").contains(step), "{step}: {err:#}");
            let marker = recovery::marker_path(&dir.path().join(DATABASE_FILE));
            assert!(!marker.exists(), "{step}: the marker was left behind");

            let store = SqliteOptions::default()
                .open_node_store(dir.path())
                .unwrap();
            assert_eq!(store.open_report(), &OpenReport::Clean, "{step}");
            assert_eq!(*store.get(&key).unwrap(), node, "{step}");
        }
    }
}
