//! The pool of read-only connections, and the protocol that lets them keep a read
//! transaction open across reads without ever blocking (or missing) the writer's commits.
//!
//! A point read in its own implicit transaction spends most of its time starting and ending
//! that transaction (taking the shared lock, checking whether the file changed). So a reader
//! keeps its transaction open between reads. That is only safe with two rules:
//!
//! - **Writer first.** With no journal (or a rollback journal) an open read transaction keeps
//!   the writer from committing. Before a batch, the writer raises `writing` and ends every
//!   held transaction (taking each connection's mutex, so an in-progress read finishes
//!   first). While `writing` is up, reads run in short implicit transactions, which SQLite's
//!   busy handler serializes with the commit.
//! - **Fresh after a commit.** In WAL mode an open read transaction is a snapshot that would
//!   not see the next commit, and a key leaves the pending map once committed. The writer
//!   bumps `epoch` after each commit, and a reader whose transaction began in an older epoch
//!   ends it before reading.
//!
//! The writer thread also ends transactions left open by idle readers (every ~100 ms), so an
//! idle pool never holds a lock that other processes (or a WAL checkpoint) wait for.
//!
//! Each reader memory-maps the file only while the records it reads are small. A small
//! record is read from its B-tree page in place, and the map saves a copy and a system call
//! per page. A large record lives mostly in overflow pages, which SQLite reads with `pread`
//! anyway; mapping would save little and grow the resident set by whole page-cache folios
//! around every page touched (measured: 64 reads of 64 KiB records added 50 MB).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use rusqlite::Connection;
use rusqlite::types::{Type, ValueRef};

use super::table::Table;
use crate::error::Error;

/// Records larger than this count as large for the memory-map decision.
const LARGE_RECORD: usize = 8 * 1024;
/// The map is turned on when the score reaches 0 and off when it reaches `SCORE_MAX`; each
/// small read lowers the score by one, each large read raises it. A new reader starts off,
/// halfway.
const SCORE_MAX: u8 = 16;

/// One read-only connection and the state of its held transaction.
struct Reader {
    conn: Connection,
    /// The epoch in which the held read transaction began, if one is open.
    held: Option<u64>,
    /// Whether it served a read since the last idle sweep.
    used: bool,
    /// Whether the connection currently maps the file, and the evidence for changing that.
    mapped: bool,
    score: u8,
}

impl Reader {
    fn end_transaction(&mut self) {
        if self.held.take().is_some() && !self.conn.is_autocommit() {
            // Ending a read-only transaction cannot lose anything; if it fails, the next
            // read reports the connection's error.
            let _ = self.conn.execute_batch("COMMIT");
        }
    }

    /// Counts a read of `len` bytes towards turning the map on or off.
    fn note_record(&mut self, len: usize, mmap_bytes: u64) {
        self.score = if len > LARGE_RECORD {
            (self.score + 1).min(SCORE_MAX)
        } else {
            self.score.saturating_sub(1)
        };
        let want = match (self.mapped, self.score) {
            (false, 0) if mmap_bytes > 0 => true,
            (true, SCORE_MAX) => false,
            _ => return,
        };
        self.end_transaction();
        let size = if want { mmap_bytes } else { 0 };
        // Only a speed setting: if it fails, reads carry on as they were.
        if self
            .conn
            .execute_batch(&format!("PRAGMA mmap_size = {size}"))
            .is_ok()
        {
            self.mapped = want;
        }
    }
}

/// One reader on its own cache lines, so threads locking neighbouring readers do not
/// contend for the same line.
#[repr(align(128))]
struct Slot(Mutex<Reader>);

impl std::ops::Deref for Slot {
    type Target = Mutex<Reader>;
    fn deref(&self) -> &Mutex<Reader> {
        &self.0
    }
}

/// Read-only connections, lowest free one first (so each reading thread keeps one cache and
/// one mapping warm); a thread waits on one only when all are busy.
pub(super) struct ReaderPool {
    readers: Vec<Slot>,
    next: AtomicUsize,
    writing: AtomicBool,
    epoch: AtomicU64,
    path: PathBuf,
    table: Table,
    mmap_bytes: u64,
    /// Whether a reader keeps its read transaction open between reads. Only when this
    /// store's own writer ends them before it writes: a read-only store's readers would
    /// keep an old snapshot (and hold back another process's checkpoints or commits).
    hold_transactions: bool,
}

impl ReaderPool {
    /// A pool over read-only connections opened without a memory map; each maps up to
    /// `mmap_bytes` of the file while it reads small records. With `hold_transactions`, a
    /// reader keeps its read transaction between reads (the writer ends them); without, each
    /// read is its own transaction.
    pub(super) fn new(
        path: &Path,
        table: Table,
        conns: Vec<Connection>,
        mmap_bytes: u64,
        hold_transactions: bool,
    ) -> Self {
        Self {
            readers: conns
                .into_iter()
                .map(|conn| {
                    Slot(Mutex::new(Reader {
                        conn,
                        held: None,
                        used: false,
                        mapped: false,
                        score: SCORE_MAX / 2,
                    }))
                })
                .collect(),
            next: AtomicUsize::new(0),
            writing: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            path: path.to_path_buf(),
            table,
            mmap_bytes,
            hold_transactions,
        }
    }

    /// The first free connection (`try_lock` in order), else waits for one, taking turns.
    ///
    /// Lowest-first rather than the reference's round robin: each connection has its own page
    /// cache and its own mapping of the file, so a single reading thread that always gets the
    /// same connection keeps one cache warm and one mapping resident, and `k` concurrent
    /// readers use `k` connections. When all are busy, waiters spread round robin.
    fn acquire(&self) -> MutexGuard<'_, Reader> {
        for reader in &self.readers {
            if let Ok(guard) = reader.try_lock() {
                return guard;
            }
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.readers[start % self.readers.len()])
    }

    /// Runs `on_row` on the stored record of `key` (borrowed from SQLite, no copy), or on
    /// the SQL type of the stored value when it is not a BLOB; returns `Ok(None)` when no
    /// record is stored under it.
    pub(super) fn read<R>(
        &self,
        key: &[u8; 16],
        on_row: impl FnOnce(Result<&[u8], Type>) -> R,
    ) -> Result<Option<R>, Error> {
        let mut reader = self.ready_reader()?;
        self.read_on(&mut reader, key, on_row)
    }

    /// [`read`](Self::read) on a reader already acquired.
    fn read_on<R>(
        &self,
        reader: &mut Reader,
        key: &[u8; 16],
        on_row: impl FnOnce(Result<&[u8], Type>) -> R,
    ) -> Result<Option<R>, Error> {
        let mut len = None;
        let result = self.select(&reader.conn, key, |value| {
            len = Some(value.map_or(0, <[u8]>::len));
            on_row(value)
        });
        match (&result, len) {
            // Leave the connection clean for the next read.
            (Err(_), _) => reader.end_transaction(),
            (Ok(_), Some(len)) => reader.note_record(len, self.mmap_bytes),
            (Ok(_), None) => {}
        }
        result.map_err(Error::sqlite("read a record from", &self.path))
    }

    /// [`read`](Self::read) of each of `keys` in turn on one reader, held for the whole batch
    /// (one acquisition, one transaction check): `on_row(i, value)` runs on the record of
    /// `keys[i]`, and the result holds `None` for each key with no record. A writer that
    /// begins meanwhile waits for the batch to end, as for one read.
    pub(super) fn read_each<R>(
        &self,
        keys: &[[u8; 16]],
        mut on_row: impl FnMut(usize, Result<&[u8], Type>) -> R,
    ) -> Result<Vec<Option<R>>, Error> {
        let mut reader = self.ready_reader()?;
        keys.iter()
            .enumerate()
            .map(|(i, key)| self.read_on(&mut reader, key, |value| on_row(i, value)))
            .collect()
    }

    /// Runs `query` on a reader connection, under the same protocol as [`read`](Self::read)
    /// (it sees every commit that finished before the call).
    pub(super) fn query<R>(
        &self,
        query: impl FnOnce(&Connection) -> Result<R, Error>,
    ) -> Result<R, Error> {
        let mut reader = self.ready_reader()?;
        let result = query(&reader.conn);
        if result.is_err() {
            // Leave the connection clean for the next read.
            reader.end_transaction();
        }
        result
    }

    /// A free reader whose held transaction (if any) sees every finished commit.
    fn ready_reader(&self) -> Result<MutexGuard<'_, Reader>, Error> {
        let mut reader = self.acquire();
        reader.used = true;
        let writing = self.writing.load(Ordering::Acquire);
        let epoch = self.epoch.load(Ordering::Acquire);
        if reader.held.is_some_and(|began| writing || began != epoch) {
            reader.end_transaction();
        }
        if self.hold_transactions && !writing && reader.held.is_none() {
            reader
                .conn
                .execute_batch("BEGIN")
                .map_err(Error::sqlite("begin a read transaction on", &self.path))?;
            reader.held = Some(epoch);
        }
        Ok(reader)
    }

    /// Whether a record is stored under each of `keys` (committed; the caller checks what
    /// is pending), on one reader, without reading the records.
    pub(super) fn contains_each(&self, keys: &[[u8; 16]]) -> Result<Vec<bool>, Error> {
        self.query(|conn| {
            keys.iter()
                .map(|key| self.table.exists(conn, key))
                .collect::<rusqlite::Result<_>>()
                .map_err(Error::sqlite("look a record up in", &self.path))
        })
    }

    fn select<R>(
        &self,
        conn: &Connection,
        key: &[u8; 16],
        on_row: impl FnOnce(Result<&[u8], Type>) -> R,
    ) -> rusqlite::Result<Option<R>> {
        self.table.read(conn, key, |value| match value {
            ValueRef::Blob(bytes) => on_row(Ok(bytes)),
            // Damaged, or written by someone else: the caller reports it as corrupt.
            other => on_row(Err(other.data_type())),
        })
    }

    /// Called by the writer before it writes: no reader keeps a transaction open until
    /// [`end_write`](Self::end_write).
    pub(super) fn begin_write(&self) {
        self.writing.store(true, Ordering::SeqCst);
        for reader in &self.readers {
            lock(reader).end_transaction();
        }
    }

    /// Called by the writer after a commit (or a failed one): readers start fresh
    /// transactions that see it.
    pub(super) fn end_write(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.writing.store(false, Ordering::SeqCst);
    }

    /// Ends the transactions of readers that served nothing since the last sweep.
    pub(super) fn end_idle(&self) {
        for reader in &self.readers {
            if let Ok(mut reader) = reader.try_lock() {
                if !reader.used {
                    reader.end_transaction();
                }
                reader.used = false;
            }
        }
    }

    /// Ends every held transaction and returns each connection's cache memory to the heap.
    pub(super) fn release_memory(&self) {
        for reader in &self.readers {
            let mut reader = lock(reader);
            reader.end_transaction();
            let _ = reader.conn.release_memory();
        }
    }
}

/// A reader's mutex guards no invariant a panic could break (the connection stays valid),
/// so a poisoned lock is used as is.
fn lock(reader: &Mutex<Reader>) -> MutexGuard<'_, Reader> {
    reader
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
