//! The write path: a bounded buffer that callers fill, and one background thread that
//! commits it batch by batch.
//!
//! - `store_data` hashes and encodes on the caller's thread, then, under one short lock,
//!   puts the record in the *pending* map (so every thread reads it at once) and in the
//!   batch being filled. Doing both under the same lock is what keeps the ordering invariant
//!   across threads: a caller that finds a child in the pending map and then stores a parent
//!   queues the parent after the child.
//! - A batch is sealed when it holds half the row or byte budget (or at `flush`); the writer
//!   commits sealed batches in order, one transaction each, so a parent is never committed
//!   before its children. While one batch commits the next one fills: hashing and inserting
//!   overlap. When the whole budget is in flight, callers wait (back-pressure). In the
//!   `IntegerKey` layout a batch is the whole budget instead (see [`batches_per_budget`]).
//! - Once a batch is committed, the writer moves its keys from the pending map to the set of
//!   committed keys (16 bytes a key, no record), which makes storing them again cost only a
//!   hash and a lookup, and drops the batch, which frees its records. The set is bounded
//!   (`dedup_keys`): when it is full it is emptied, and repeats of what it held fall back to
//!   the writer's `INSERT OR IGNORE`. (The pending map used to hold records weakly and keep
//!   committed keys as dead entries: each kept its record's `Arc` allocation alive, about
//!   100 bytes a key in all.)
//! - A failed commit latches a sticky error: every later `store_data` and `flush` returns
//!   [`Error::Poisoned`] until the store is reopened. So does a panic on the writer thread
//!   (see [`run`]): no caller is left waiting for a writer that is gone.

use std::any::Any;
use std::collections::{BTreeMap, VecDeque};
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use dashmap::DashMap;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use super::checkpoint::Checkpointer;
use super::conn;
use super::options::TableLayout;
use super::pool::ReaderPool;
use super::table::Table;
use crate::error::Error;
use crate::key::{DataKey, KeyHasherBuilder};

/// An encoded record, owned by the batch that will commit it.
pub(super) type Record = Arc<Vec<u8>>;

/// A key as the maps store it: 8-byte aligned, so a set entry is 16 bytes and a pending entry
/// with its `Arc` 24 (a `DataKey` is 16-byte aligned, which would pad them to 32).
#[derive(Clone, Copy, PartialEq, Eq)]
struct PackedKey([u64; 2]);

impl PackedKey {
    fn key(&self) -> DataKey {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&self.0[0].to_le_bytes());
        bytes[8..].copy_from_slice(&self.0[1].to_le_bytes());
        DataKey::from_bytes(bytes).expect("packed from a key")
    }

    fn new(key: &DataKey) -> Self {
        let bytes = key.as_bytes();
        let (lo, hi) = bytes.split_at(8);
        Self([
            u64::from_le_bytes(lo.try_into().expect("8 bytes")),
            u64::from_le_bytes(hi.try_into().expect("8 bytes")),
        ])
    }
}

impl std::hash::Hash for PackedKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // Uniform bits already (see DataKey's Hash).
        state.write_u64(self.0[0]);
    }
}

/// Records larger than this on average make a batch "large" for [`LARGE_BATCH_CACHE`].
const LARGE_RECORD: usize = 8 * 1024;

/// The writer's page cache while it commits batches of large records into a `WithoutRowid`
/// table (a rowid table never compares records). SQLite compares index-B-tree cells by
/// their whole record, so every comparison on an insert's descent copies a neighbour's
/// overflow chain into memory. Sorted inserts descend along nearly the
/// same path, so a cache that holds the tree's pages and the overflow pages of the records
/// near the top of the tree serves most of those reads from memory (measured on 4,096
/// 64 KiB records: reads from the file 2.4 GB -> 0.65 GB, write_large about 12% faster,
/// peak RSS +14 MiB). Small records do not need it, and a large cache made a million small
/// writes about 5% slower, so the writer switches back for them.
const LARGE_BATCH_CACHE: u64 = 16 << 20;

/// Rows per `INSERT` statement: a few rows per statement saves per-statement overhead.
const ROWS_PER_INSERT: usize = 8;

/// How often an idle writer ends the read transactions idle readers still hold.
const IDLE_SWEEP: Duration = Duration::from_millis(100);

struct Batch {
    seq: u64,
    entries: Vec<(DataKey, Record)>,
    bytes: usize,
    /// Root changes queued after every entry above, applied after them in the same
    /// transaction: `None` removes the root.
    roots: Vec<RootChange>,
}

/// A root change: its name, its number (to tell it from a later change of the same name)
/// and the new key (`None`: removed).
struct RootChange {
    name: String,
    id: u64,
    key: Option<DataKey>,
}

#[derive(Default)]
struct State {
    filling: Vec<(DataKey, Record)>,
    filling_bytes: usize,
    filling_roots: Vec<RootChange>,
    /// Root changes not yet committed, the latest per name with its number: reads see them
    /// before the commit (like pending records). An entry goes when the change it holds
    /// commits.
    pending_roots: BTreeMap<String, (u64, Option<DataKey>)>,
    next_root_id: u64,
    sealed: VecDeque<Batch>,
    /// Bytes stored but not yet committed (filling + sealed + committing). The matching row
    /// count is `WriteBuffer::pending_len`, which changes only under this state's lock.
    in_flight_bytes: usize,
    /// Batches sealed so far / committed so far (batches are numbered from 1).
    sealed_seq: u64,
    committed_seq: u64,
    /// The first commit failure, sticky until reopen.
    error: Option<String>,
    release_memory: bool,
    /// Maintenance the writer runs between batches, each with where to send its result.
    maintenance: VecDeque<(Maintenance, std::sync::mpsc::Sender<Result<u64, Error>>)>,
    shutdown: bool,
}

/// Work on the whole file that must not race a commit: the writer thread runs it on its
/// own connection, between two batches.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Maintenance {
    /// `PRAGMA incremental_vacuum`: return the free pages to the file system.
    ReleaseFreePages,
    /// `VACUUM`: rebuild the file.
    Compact,
    /// Delete these (committed, unreachable) records in one transaction, and forget that
    /// they were stored (garbage collection). Returns the rows deleted.
    Delete(Vec<DataKey>),
    /// Copy the write-ahead log into the database and truncate it (at close).
    Checkpoint,
}

/// What callers and the writer thread share.
pub(super) struct WriteBuffer {
    /// The records stored and not yet committed, by key (the batches own them too). A
    /// record leaves it after its batch commits, once its key is in `committed`.
    pending: DashMap<PackedKey, Record, KeyHasherBuilder>,
    /// Keys committed this session (up to `committed_cap`): 16 bytes each, so that storing
    /// them again costs a hash and a lookup. Exact: a key is here only while it is stored
    /// (a garbage collection's deletions take theirs out).
    committed_keys: DashMap<PackedKey, (), KeyHasherBuilder>,
    committed_cap: usize,
    /// Records not yet committed; reads skip the map lookup when it is zero. Changed only under
    /// the `state` lock, so under it this is also the number of rows in flight.
    pending_len: AtomicUsize,
    /// Batches whose commit failed: kept so their records stay readable until reopen.
    failed: Mutex<Vec<Batch>>,
    poisoned: AtomicBool,
    state: Mutex<State>,
    /// Signalled when a commit finished or failed (callers waiting for room or a flush).
    committed: Condvar,
    /// Signalled when the writer has work (a sealed batch, a memory request, shutdown).
    work: Condvar,
    max_rows: usize,
    /// Batches the budget is split into: a batch is sealed at `max_rows / batches` rows or
    /// `max_bytes / batches` bytes.
    batches: usize,
    max_bytes: usize,
}

impl WriteBuffer {
    pub(super) fn new(
        max_rows: usize,
        max_bytes: usize,
        committed_cap: usize,
        batches: usize,
    ) -> Self {
        Self {
            pending: DashMap::default(),
            committed_keys: DashMap::default(),
            committed_cap,
            pending_len: AtomicUsize::new(0),
            failed: Mutex::new(Vec::new()),
            poisoned: AtomicBool::new(false),
            state: Mutex::new(State::default()),
            committed: Condvar::new(),
            work: Condvar::new(),
            max_rows,
            batches: batches.max(1),
            max_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent before it can panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn poisoned_error(state: &State) -> Option<Error> {
        state.error.as_ref().map(|cause| Error::Poisoned {
            cause: cause.clone(),
        })
    }

    /// The uncommitted record of `key`, if it is pending.
    pub(super) fn pending(&self, key: &DataKey) -> Option<Record> {
        if self.pending_len.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.pending
            .get(&PackedKey::new(key))
            .map(|record| Arc::clone(&record))
    }

    /// Whether `key` is known to be stored: pending, or committed (and remembered).
    pub(super) fn contains(&self, key: &DataKey) -> bool {
        let key = PackedKey::new(key);
        // Committed first: a record's key goes there before it leaves `pending`.
        self.committed_keys.contains_key(&key)
            || (self.pending_len.load(Ordering::Acquire) > 0 && self.pending.contains_key(&key))
    }

    /// Fails with the sticky error if a commit failed.
    pub(super) fn check(&self) -> Result<(), Error> {
        if self.poisoned.load(Ordering::Acquire) {
            if let Some(err) = Self::poisoned_error(&self.lock()) {
                return Err(err);
            }
        }
        Ok(())
    }

    /// Queues `record` under `key` unless it is already pending; waits while the buffer is
    /// full.
    pub(super) fn push(&self, key: DataKey, record: Vec<u8>) -> Result<(), Error> {
        let record = Arc::new(record);
        let bytes = record.len();
        let mut state = self.lock();
        loop {
            if let Some(err) = Self::poisoned_error(&state) {
                return Err(err);
            }
            // Rows in flight: `pending_len` changes only under this lock, so it is exact here.
            let rows = self.pending_len.load(Ordering::Relaxed);
            let empty = rows == 0;
            let fits = rows < self.max_rows && state.in_flight_bytes + bytes <= self.max_bytes;
            if empty || fits {
                break;
            }
            // Full: make sure what is buffered is on its way, then wait for room.
            self.seal(&mut state);
            state = self
                .committed
                .wait(state)
                .unwrap_or_else(|p| p.into_inner());
        }
        // Count the record before publishing its key: another thread that finds the key
        // (`contains`) skips its own store and reads at once, and `pending` trusts a zero
        // count to skip the map. Counting first makes that read find the record.
        self.pending_len.fetch_add(1, Ordering::AcqRel);
        match self.pending.entry(PackedKey::new(&key)) {
            dashmap::Entry::Occupied(_) => {
                // Pending: stored by another thread meanwhile.
                self.pending_len.fetch_sub(1, Ordering::AcqRel);
                return Ok(());
            }
            // If another thread's copy was committed between our caller's `contains` and
            // now, queuing it again is redundant but harmless (INSERT OR IGNORE keeps one).
            dashmap::Entry::Vacant(slot) => {
                slot.insert(Arc::clone(&record));
            }
        }
        state.filling.push((key, record));
        state.filling_bytes += bytes;
        state.in_flight_bytes += bytes;
        if state.filling.len() >= self.max_rows / self.batches
            || state.filling_bytes >= self.max_bytes / self.batches
        {
            self.seal(&mut state);
        }
        Ok(())
    }

    /// Queues a root change (`None`: remove) after every record queued before it, in the
    /// batch being filled; reads see it at once.
    pub(super) fn push_root(&self, name: &str, key: Option<DataKey>) -> Result<(), Error> {
        let mut state = self.lock();
        if let Some(err) = Self::poisoned_error(&state) {
            return Err(err);
        }
        state.next_root_id += 1;
        let id = state.next_root_id;
        state.pending_roots.insert(name.to_owned(), (id, key));
        state.filling_roots.push(RootChange {
            name: name.to_owned(),
            id,
            key,
        });
        // Not sealed here: the next seal or flush carries it, after the records before it.
        Ok(())
    }

    /// The pending change of root `name`: `Some(None)` if it is being removed, `None` if no
    /// change is pending.
    pub(super) fn pending_root(&self, name: &str) -> Option<Option<DataKey>> {
        self.lock().pending_roots.get(name).map(|&(_, key)| key)
    }

    /// Every pending root change, by name.
    pub(super) fn pending_roots(&self) -> BTreeMap<String, Option<DataKey>> {
        self.lock()
            .pending_roots
            .iter()
            .map(|(name, &(_, key))| (name.clone(), key))
            .collect()
    }

    /// Hands the batch being filled to the writer.
    fn seal(&self, state: &mut State) {
        if state.filling.is_empty() && state.filling_roots.is_empty() {
            return;
        }
        state.sealed_seq += 1;
        let batch = Batch {
            seq: state.sealed_seq,
            entries: std::mem::take(&mut state.filling),
            bytes: std::mem::take(&mut state.filling_bytes),
            roots: std::mem::take(&mut state.filling_roots),
        };
        state.sealed.push_back(batch);
        self.work.notify_one();
    }

    /// Commits everything pushed before this call; returns the sticky error if any commit
    /// failed.
    pub(super) fn flush(&self) -> Result<(), Error> {
        let mut state = self.lock();
        self.seal(&mut state);
        let target = state.sealed_seq;
        loop {
            if let Some(err) = Self::poisoned_error(&state) {
                return Err(err);
            }
            if state.committed_seq >= target {
                return Ok(());
            }
            state = self
                .committed
                .wait(state)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Asks the writer to stop once every sealed batch is committed.
    pub(super) fn shutdown(&self) {
        self.lock().shutdown = true;
        self.work.notify_all();
    }

    /// Asks the writer to return its connection's cache memory, and forgets remembered keys.
    pub(super) fn release_memory(&self) {
        self.committed_keys.clear();
        self.committed_keys.shrink_to_fit();
        self.pending.shrink_to_fit();
        self.lock().release_memory = true;
        self.work.notify_all();
    }

    /// Runs `op` on the writer thread after every batch sealed before this call is
    /// committed, and returns its result (for [`Maintenance::ReleaseFreePages`], the pages
    /// released). Fails with the sticky error if a commit failed.
    pub(super) fn maintain(&self, op: Maintenance) -> Result<u64, Error> {
        let (send, receive) = std::sync::mpsc::channel();
        {
            let mut state = self.lock();
            if let Some(err) = Self::poisoned_error(&state) {
                return Err(err);
            }
            // Queued after what is filling, so it runs after those records are committed.
            self.seal(&mut state);
            state.maintenance.push_back((op, send));
            self.work.notify_all();
        }
        match receive.recv() {
            Ok(result) => result,
            // The writer dropped the request: it stopped (a panic, already latched).
            Err(_) => {
                self.check()?;
                Err(Error::Poisoned {
                    cause: "the writer thread stopped before running the maintenance".into(),
                })
            }
        }
    }

    /// Whether a commit failed.
    pub(super) fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    /// Number of records waiting for their commit.
    pub(super) fn pending_len(&self) -> usize {
        self.pending_len.load(Ordering::Relaxed)
    }

    /// Bytes of the records waiting for their commit.
    pub(super) fn pending_bytes(&self) -> usize {
        self.lock().in_flight_bytes
    }

    /// The pending records, for a verification scan to count as present.
    pub(super) fn is_pending(&self, key: &DataKey) -> bool {
        self.pending(key).is_some()
    }

    /// Hands every key stored but not yet committed to `keep`.
    pub(super) fn pending_keys(&self, keep: &mut dyn FnMut(DataKey)) {
        if self.pending_len.load(Ordering::Acquire) == 0 {
            return;
        }
        for entry in self.pending.iter() {
            keep(entry.key().key());
        }
    }

    /// Forgets that `keys` were committed (they were just deleted), so that storing one of
    /// them again stores it.
    fn forget_deleted(&self, keys: &[DataKey]) {
        for key in keys {
            self.committed_keys.remove(&PackedKey::new(key));
        }
    }

    /// Moves a committed batch's keys from `pending` to `committed` (up to the cap; past
    /// it, the remembered keys are dropped and repeats fall back to the writer's
    /// `INSERT OR IGNORE`).
    fn settle_committed(&self, batch: &Batch) {
        if self.committed_keys.len() + batch.entries.len() > self.committed_cap {
            self.committed_keys.clear();
        }
        for (key, record) in &batch.entries {
            let key = PackedKey::new(key);
            if batch.entries.len() <= self.committed_cap {
                self.committed_keys.insert(key, ());
            }
            // Only this batch's own copy: a later push of the key would have found it here.
            self.pending
                .remove_if(&key, |_, pending| Arc::ptr_eq(pending, record));
        }
        // A burst leaves the map's table at its peak size: give it back once it is empty
        // (the next burst grows it again, a few times per batch at most).
        if self.pending.is_empty() {
            self.pending.shrink_to_fit();
        }
    }

    fn after_commit(&self, mut batch: Batch, result: Result<(), Error>) {
        let rows = batch.entries.len();
        if result.is_ok() {
            // Before the batch counts as committed (so a `flush` that returns has settled
            // it and freed its records), outside the state lock (stores do not wait for
            // it). Meanwhile a reader finds each key in one of the two places:
            // `committed_keys` first.
            self.settle_committed(&batch);
            drop(std::mem::take(&mut batch.entries));
        }
        let mut state = self.lock();
        let failure = match result {
            Ok(()) => {
                state.committed_seq = batch.seq;
                state.in_flight_bytes -= batch.bytes;
                self.pending_len.fetch_sub(rows, Ordering::Release);
                // Committed root changes are read from the database from now on, unless a
                // later change of the same name is pending.
                for change in &batch.roots {
                    if state.pending_roots.get(&change.name).map(|&(id, _)| id) == Some(change.id) {
                        state.pending_roots.remove(&change.name);
                    }
                }
                None
            }
            Err(err) => {
                state.error.get_or_insert_with(|| err.to_string());
                self.poisoned.store(true, Ordering::Release);
                Some(err)
            }
        };
        drop(state);
        self.committed.notify_all();
        if self.poisoned.load(Ordering::Acquire) {
            // Its records stay in `pending`, readable until reopen.
            self.keep_readable(batch);
        }
        // Logged last: a logger that panics finds everything already settled.
        if let Some(err) = failure {
            log::error!("pagestore: commit failed, the store refuses writes until reopened: {err}");
        }
    }

    /// Keeps a batch that was not committed, so its records stay readable until reopen.
    fn keep_readable(&self, batch: Batch) {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(batch);
    }

    /// Latches the writer's panic as the sticky error and wakes every waiter; `batch`, if
    /// the panic interrupted one, stays readable like a batch whose commit failed.
    fn writer_panicked(&self, batch: Option<Batch>, message: &str) {
        let mut state = self.lock();
        state
            .error
            .get_or_insert_with(|| format!("the writer thread panicked: {message}"));
        self.poisoned.store(true, Ordering::Release);
        drop(state);
        if let Some(batch) = batch {
            self.keep_readable(batch);
        }
        self.committed.notify_all();
    }
}

/// How many batches the write buffer's budget is split into for a table in `layout`: two
/// (one commits while the other fills) where rows are appended, one in the `IntegerKey`
/// layout. There a batch of random keys rewrites most of the table's leaf pages whatever its
/// size, so a commit costs about the table's size, and halving the number of commits saves
/// more than the overlap of hashing and inserting gains (measured side by side, three
/// alternating runs of a million small writes: 1.63× the reference's speed on average
/// against 1.38× with two batches; 64 KiB writes 1.28× against 1.16×).
pub(super) fn batches_per_budget(layout: TableLayout) -> usize {
    match layout {
        TableLayout::IntegerKey => 1,
        _ => 2,
    }
}

/// The name of the writer thread.
pub(super) const THREAD_NAME: &str = "pagestore-sqlite-writer";

/// The writer thread's body: commit sealed batches in order until shut down.
///
/// A panic on this thread (in SQLite's bindings, or in a `log` implementation it calls)
/// poisons the store like a failed commit: callers waiting in `flush` or for room in the
/// buffer get [`Error::Poisoned`] instead of waiting for a writer that is gone. It is caught
/// per batch, so the batch it interrupted stays readable, and around the whole loop.
///
/// `cache_bytes` is the connection's page cache as configured; in a `WithoutRowid` table,
/// batches of large records run with at least [`LARGE_BATCH_CACHE`].
pub(super) fn run(
    buffer: &WriteBuffer,
    pool: &ReaderPool,
    conn: Connection,
    table: Table,
    path: &Path,
    cache_bytes: u64,
    checkpointer: Option<&Checkpointer>,
) {
    let committer = Committer {
        conn,
        table,
        path,
        cache_bytes,
        current_cache: cache_bytes,
        checkpointer,
    };
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| run_loop(buffer, pool, committer)));
    if let Err(payload) = outcome {
        report_panic(buffer, None, &*payload);
    }
}

/// Poisons the store with the panic's message, then tries to log it (a logger that panics
/// again is what may have caused the first panic).
fn report_panic(buffer: &WriteBuffer, batch: Option<Batch>, payload: &(dyn Any + Send)) {
    let message = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message");
    buffer.writer_panicked(batch, message);
    let _ = panic::catch_unwind(|| {
        log::error!(
            "pagestore: the writer thread panicked ({message}); the store refuses writes until \
             reopened"
        );
    });
}

/// The writer's connection and the settings it commits with.
struct Committer<'a> {
    conn: Connection,
    table: Table,
    path: &'a Path,
    /// The page cache as configured, and as currently set.
    cache_bytes: u64,
    current_cache: u64,
    /// In WAL mode, told what each commit wrote.
    checkpointer: Option<&'a Checkpointer>,
}

fn run_loop(buffer: &WriteBuffer, pool: &ReaderPool, mut committer: Committer<'_>) {
    loop {
        let batch = {
            let mut state = buffer.lock();
            loop {
                if std::mem::take(&mut state.release_memory) {
                    let _ = committer.conn.release_memory();
                }
                if state.error.is_none() {
                    if let Some(batch) = state.sealed.pop_front() {
                        break batch;
                    }
                    // Only once no batch is sealed: every batch sealed before the request
                    // is committed by now.
                    if let Some((op, reply)) = state.maintenance.pop_front() {
                        drop(state);
                        let result = committer.maintain(buffer, pool, op);
                        let _ = reply.send(result);
                        state = buffer.lock();
                        continue;
                    }
                } else {
                    // Refused: the store is poisoned (the requester reads the sticky error).
                    state.maintenance.clear();
                }
                if state.shutdown {
                    return;
                }
                let (next, timeout) = buffer
                    .work
                    .wait_timeout(state, IDLE_SWEEP)
                    .unwrap_or_else(|p| p.into_inner());
                state = next;
                if timeout.timed_out() {
                    drop(state);
                    pool.end_idle();
                    committer.truncate_log_if_idle(pool);
                    state = buffer.lock();
                }
            }
        };
        // Owned out here, so that a panic while committing it leaves it to keep readable.
        let mut batch = Some(batch);
        let step = panic::catch_unwind(AssertUnwindSafe(|| {
            committer.commit_and_settle(buffer, pool, &mut batch)
        }));
        if let Err(payload) = step {
            // Readers must not go on treating a commit that ended in a panic as running.
            pool.end_write();
            report_panic(buffer, batch.take(), &*payload);
        }
    }
}

impl Committer<'_> {
    /// Runs `op` on the writer's connection, with the readers released as for a commit.
    fn maintain(
        &mut self,
        buffer: &WriteBuffer,
        pool: &ReaderPool,
        op: Maintenance,
    ) -> Result<u64, Error> {
        pool.begin_write();
        let shrinks_the_file = !matches!(op, Maintenance::Delete(_));
        let result = match op {
            Maintenance::Delete(keys) => {
                let deleted = delete(&mut self.conn, self.table, &keys)
                    .map_err(Error::sqlite("delete unreachable records from", self.path));
                if deleted.is_ok() {
                    buffer.forget_deleted(&keys);
                }
                deleted
            }
            Maintenance::ReleaseFreePages => conn::release_free_pages(&self.conn)
                .map_err(Error::sqlite("release the free pages of", self.path)),
            Maintenance::Compact => self
                .conn
                .execute_batch("VACUUM;")
                .map(|()| 0)
                .map_err(Error::sqlite("compact (VACUUM)", self.path)),
            // The truncation below is the whole of it.
            Maintenance::Checkpoint => Ok(0),
        };
        if shrinks_the_file && result.is_ok() {
            // In WAL mode the file shrinks only when the log is checkpointed: do it now if
            // no other process reads (our readers were released above), without waiting
            // for one that does (then the next checkpoint shrinks it). Nothing in other
            // journal modes. (A chunk of a collection's deletions is not worth one.)
            self.truncate_log();
        }
        pool.end_write();
        result
    }

    /// In WAL mode, once the writer is idle: truncates the log the background checkpoints
    /// copied but could not restart, so that reads go to the database file again. Waits for
    /// no one: if a reader (of another process) holds the log, it tries again at the next
    /// idle sweep.
    fn truncate_log_if_idle(&mut self, pool: &ReaderPool) {
        let Some(checkpointer) = self.checkpointer else {
            return;
        };
        if !checkpointer.take_log_in_use() {
            return;
        }
        pool.begin_write();
        let truncated = self.truncate_log();
        pool.end_write();
        if !truncated {
            checkpointer.log_still_in_use();
        }
    }

    /// Checkpoints the write-ahead log and truncates it, waiting for no reader (this
    /// store's readers must have been released); returns whether it finished. `false` in a
    /// journal mode without a log.
    fn truncate_log(&self) -> bool {
        let _ = self.conn.busy_timeout(Duration::ZERO);
        // The first column is 1 when the checkpoint could not finish (a reader held on).
        let busy = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
                row.get::<_, i64>(0)
            });
        let _ = self.conn.busy_timeout(conn::BUSY_TIMEOUT);
        matches!(busy, Ok(0))
    }

    /// Commits `batch` and hands it to [`WriteBuffer::after_commit`] (taking it out of the
    /// `Option` only then).
    fn commit_and_settle(
        &mut self,
        buffer: &WriteBuffer,
        pool: &ReaderPool,
        batch: &mut Option<Batch>,
    ) {
        let Some(pending) = batch.as_ref() else {
            return;
        };
        let large = pending.bytes / pending.entries.len().max(1) > LARGE_RECORD;
        let want_cache = if large && self.table.layout == TableLayout::WithoutRowid {
            self.cache_bytes.max(LARGE_BATCH_CACHE)
        } else {
            self.cache_bytes
        };
        if want_cache != self.current_cache {
            // Only a speed setting: if it fails, the batch commits with the old size.
            if conn::set_cache_size(&self.conn, want_cache).is_ok() {
                self.current_cache = want_cache;
            }
        }
        let t0 = std::time::Instant::now();
        pool.begin_write();
        let t1 = std::time::Instant::now();
        let result = commit(&mut self.conn, self.table, pending)
            .map_err(Error::sqlite("commit a batch to", self.path));
        let t2 = std::time::Instant::now();
        pool.end_write();
        let (seq, rows, bytes) = (pending.seq, pending.entries.len(), pending.bytes);
        if let (Ok(()), Some(checkpointer)) = (&result, self.checkpointer) {
            checkpointer.committed(bytes as u64);
        }
        if let Some(done) = batch.take() {
            buffer.after_commit(done, result);
        }
        log::debug!(
            "pagestore: batch {seq}: {rows} rows, {bytes} bytes; readers released in {:?}, \
             committed in {:?}, cleaned up in {:?}",
            t1 - t0,
            t2 - t1,
            t2.elapsed()
        );
    }
}

/// Inserts one batch in one transaction, in key order (which makes the B-tree inserts
/// mostly sequential: the largest single speed-up of the write path). In a rowid table,
/// SQLite gives each row the next rowid, so the rows are appended in that order too.
fn commit(conn: &mut Connection, table: Table, batch: &Batch) -> rusqlite::Result<()> {
    let mut rows: Vec<([u8; 16], &[u8])> = batch
        .entries
        .iter()
        .map(|(key, record)| (key.as_bytes(), record.as_slice()))
        .collect();
    // SQLite orders BLOBs by memcmp, so sort by the stored bytes, not by the key's value.
    rows.sort_unstable_by_key(|row| row.0);
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if table.integer_key() {
        insert_by_head(&tx, table, &rows)?;
    } else {
        insert_rows(&tx, &rows)?;
    }
    // After the batch's nodes, in the order they were set: a root never commits before the
    // nodes stored before it (those are in this batch or an earlier one).
    if !batch.roots.is_empty() {
        let mut set = tx.prepare_cached(conn::SET_ROOT_SQL)?;
        let mut remove = tx.prepare_cached(conn::REMOVE_ROOT_SQL)?;
        for change in &batch.roots {
            match change.key {
                Some(key) => set.execute(rusqlite::params![change.name, &key.as_bytes()[..]])?,
                None => remove.execute([&change.name])?,
            };
        }
    }
    tx.commit()
}

/// Deletes the records of `keys` in one transaction; returns how many rows went.
fn delete(conn: &mut Connection, table: Table, keys: &[DataKey]) -> rusqlite::Result<u64> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let keys: Vec<[u8; 16]> = keys.iter().map(DataKey::as_bytes).collect();
    let deleted = table.delete(&tx, &keys)?;
    tx.commit()?;
    Ok(deleted)
}

/// Inserts the sorted `rows` in the open transaction, in the `IntegerKey` layout: by head,
/// a few rows per statement, with `INSERT OR IGNORE`. A row ignored because its head's slot
/// is taken is either a repeat of the stored key (nothing to do) or another key with the
/// same head, which then goes to the overflow table. While the overflow table holds
/// anything, each key is looked up there first, so that a key stored there (its slot was
/// taken then, and may be free now) is not stored twice.
fn insert_by_head(
    tx: &rusqlite::Transaction<'_>,
    table: Table,
    rows: &[([u8; 16], &[u8])],
) -> rusqlite::Result<()> {
    let overflow_used: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM pagestore_overflow)",
        [],
        |row| row.get(0),
    )?;
    // A key already in the overflow table is stored: its row must not go to the main table
    // too (its head's slot may be free again). The rest go in chunks as usual.
    let not_overflowed;
    let rows = if overflow_used {
        let mut in_overflow =
            tx.prepare_cached("SELECT 1 FROM pagestore_overflow WHERE key = ?1")?;
        let mut kept = Vec::with_capacity(rows.len());
        for row in rows {
            if !in_overflow.exists([&row.0[..]])? {
                kept.push(*row);
            }
        }
        not_overflowed = kept;
        &not_overflowed[..]
    } else {
        rows
    };
    let mut many = tx.prepare_cached(&insert_head_sql(ROWS_PER_INSERT))?;
    let mut one = tx.prepare_cached(&insert_head_sql(1))?;
    let mut chunks = rows.chunks_exact(ROWS_PER_INSERT);
    for (n, chunk) in (&mut chunks).enumerate() {
        touch_ahead(rows, n);
        for (i, (key, value)) in chunk.iter().enumerate() {
            many.raw_bind_parameter(3 * i + 1, table.head(key))?;
            many.raw_bind_parameter(3 * i + 2, table.tail(key))?;
            many.raw_bind_parameter(3 * i + 3, *value)?;
        }
        if many.raw_execute()? < chunk.len() {
            for row in chunk {
                settle_collision(tx, table, row)?;
            }
        }
    }
    for row in chunks.remainder() {
        if insert_one_by_head(&mut one, table, row)? == 0 {
            settle_collision(tx, table, row)?;
        }
    }
    Ok(())
}

/// Inserts one row by head (`INSERT OR IGNORE`); returns how many rows it added.
fn insert_one_by_head(
    one: &mut rusqlite::CachedStatement<'_>,
    table: Table,
    (key, value): &([u8; 16], &[u8]),
) -> rusqlite::Result<usize> {
    one.raw_bind_parameter(1, table.head(key))?;
    one.raw_bind_parameter(2, table.tail(key))?;
    one.raw_bind_parameter(3, *value)?;
    one.raw_execute()
}

/// After the main table ignored the row of `key`: if its slot holds another key, stores
/// the row in the overflow table (`INSERT OR IGNORE`: a repeat is dropped there too).
fn settle_collision(
    tx: &rusqlite::Transaction<'_>,
    table: Table,
    (key, value): &([u8; 16], &[u8]),
) -> rusqlite::Result<()> {
    let mut tail = tx.prepare_cached("SELECT key_tail FROM pagable_data WHERE key_head = ?1")?;
    let same = tail
        .query_row([table.head(key)], |row| {
            Ok(row.get_ref(0)?.as_blob().ok() == Some(table.tail(key)))
        })
        .optional()?;
    if same == Some(false) {
        let mut overflow = tx.prepare_cached(
            "INSERT OR IGNORE INTO pagestore_overflow (key, value) VALUES (?1, ?2)",
        )?;
        overflow.execute(rusqlite::params![&key[..], *value])?;
    }
    Ok(())
}

fn insert_head_sql(rows: usize) -> String {
    let values = vec!["(?,?,?)"; rows].join(",");
    format!("INSERT OR IGNORE INTO pagable_data (key_head, key_tail, value) VALUES {values}")
}

/// Inserts the sorted `rows` in the open transaction.
fn insert_rows(tx: &rusqlite::Transaction<'_>, rows: &[([u8; 16], &[u8])]) -> rusqlite::Result<()> {
    {
        let mut many = tx.prepare_cached(&insert_sql(ROWS_PER_INSERT))?;
        let mut one = tx.prepare_cached(&insert_sql(1))?;
        let mut chunks = rows.chunks_exact(ROWS_PER_INSERT);
        for (n, chunk) in (&mut chunks).enumerate() {
            touch_ahead(rows, n);
            for (i, (key, value)) in chunk.iter().enumerate() {
                many.raw_bind_parameter(2 * i + 1, &key[..])?;
                many.raw_bind_parameter(2 * i + 2, *value)?;
            }
            many.raw_execute()?;
        }
        for (key, value) in chunks.remainder() {
            one.raw_bind_parameter(1, &key[..])?;
            one.raw_bind_parameter(2, *value)?;
            one.raw_execute()?;
        }
    }
    Ok(())
}

/// Rows whose records are pulled into the CPU cache together before they are inserted.
const TOUCH_AHEAD: usize = 64;

/// Reads one byte per cache line of each small record. Sorting the batch by key makes the
/// insert loop visit records in random memory order, one cache miss after another (profiled:
/// SQLite's copy of the bound value was 13% of all CPU time). These loads are independent,
/// so the CPU overlaps their misses; the insert loop then finds the records cached
/// (measured: about 6% less CPU for a million small writes).
fn touch(rows: &[([u8; 16], &[u8])]) {
    let mut acc = 0u8;
    for (_, record) in rows {
        if record.len() <= 4096 {
            for byte in record.iter().step_by(64) {
                acc ^= byte;
            }
        }
    }
    std::hint::black_box(acc);
}

/// Before the `n`th chunk of [`ROWS_PER_INSERT`] rows: every [`TOUCH_AHEAD`] rows,
/// [`touch`]es the next ones.
fn touch_ahead(rows: &[([u8; 16], &[u8])], n: usize) {
    if n % (TOUCH_AHEAD / ROWS_PER_INSERT) == 0 {
        let start = n * ROWS_PER_INSERT;
        touch(&rows[start..(start + TOUCH_AHEAD).min(rows.len())]);
    }
}

fn insert_sql(rows: usize) -> String {
    let values = vec!["(?,?)"; rows].join(",");
    format!("INSERT OR IGNORE INTO pagable_data (key, value) VALUES {values}")
}
