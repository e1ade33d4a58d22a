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
//!   overlap. When the whole budget is in flight, callers wait (back-pressure).
//! - After a commit the keys are remembered (bounded) so storing them again costs a hash and
//!   a lookup, and they leave the pending map.
//! - A failed commit latches a sticky error: every later `store_data` and `flush` returns
//!   [`Error::Poisoned`] until the store is reopened.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use dashmap::{DashMap, DashSet};
use rusqlite::{Connection, TransactionBehavior};

use super::pool::ReaderPool;
use crate::error::Error;
use crate::key::{DataKey, KeyHasherBuilder};

/// An encoded record shared by the pending map and the batch that will commit it.
pub(super) type Record = Arc<Vec<u8>>;

/// Rows per `INSERT` statement: a few rows per statement saves per-statement overhead.
const ROWS_PER_INSERT: usize = 8;

/// How often an idle writer ends the read transactions idle readers still hold.
const IDLE_SWEEP: Duration = Duration::from_millis(100);

struct Batch {
    seq: u64,
    entries: Vec<(DataKey, Record)>,
    bytes: usize,
}

#[derive(Default)]
struct State {
    filling: Vec<(DataKey, Record)>,
    filling_bytes: usize,
    sealed: VecDeque<Batch>,
    /// Rows and bytes stored but not yet committed (filling + sealed + committing).
    in_flight_rows: usize,
    in_flight_bytes: usize,
    /// Batches sealed so far / committed so far (batches are numbered from 1).
    sealed_seq: u64,
    committed_seq: u64,
    /// The first commit failure, sticky until reopen.
    error: Option<String>,
    release_memory: bool,
    shutdown: bool,
}

/// What callers and the writer thread share.
pub(super) struct WriteBuffer {
    pending: DashMap<DataKey, Record, KeyHasherBuilder>,
    pending_len: AtomicUsize,
    stored: DashSet<DataKey, KeyHasherBuilder>,
    stored_len: AtomicUsize,
    stored_cap: usize,
    poisoned: AtomicBool,
    state: Mutex<State>,
    /// Signalled when a commit finished or failed (callers waiting for room or a flush).
    committed: Condvar,
    /// Signalled when the writer has work (a sealed batch, a memory request, shutdown).
    work: Condvar,
    max_rows: usize,
    max_bytes: usize,
}

impl WriteBuffer {
    pub(super) fn new(max_rows: usize, max_bytes: usize, stored_cap: usize) -> Self {
        Self {
            pending: DashMap::default(),
            pending_len: AtomicUsize::new(0),
            stored: DashSet::default(),
            stored_len: AtomicUsize::new(0),
            stored_cap,
            poisoned: AtomicBool::new(false),
            state: Mutex::new(State::default()),
            committed: Condvar::new(),
            work: Condvar::new(),
            max_rows,
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
        self.pending.get(key).map(|r| Arc::clone(&r))
    }

    /// Whether `key` is known to be stored: committed (and remembered) or pending.
    pub(super) fn contains(&self, key: &DataKey) -> bool {
        self.stored.contains(key) || self.pending(key).is_some()
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
            let empty = state.in_flight_rows == 0;
            let fits = state.in_flight_rows < self.max_rows
                && state.in_flight_bytes + bytes <= self.max_bytes;
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
        match self.pending.entry(key) {
            dashmap::Entry::Occupied(_) => return Ok(()),
            dashmap::Entry::Vacant(slot) => {
                slot.insert(Arc::clone(&record));
            }
        }
        self.pending_len.fetch_add(1, Ordering::Release);
        state.filling.push((key, record));
        state.filling_bytes += bytes;
        state.in_flight_rows += 1;
        state.in_flight_bytes += bytes;
        if state.filling.len() >= self.max_rows / 2 || state.filling_bytes >= self.max_bytes / 2 {
            self.seal(&mut state);
        }
        Ok(())
    }

    /// Hands the batch being filled to the writer.
    fn seal(&self, state: &mut State) {
        if state.filling.is_empty() {
            return;
        }
        state.sealed_seq += 1;
        let batch = Batch {
            seq: state.sealed_seq,
            entries: std::mem::take(&mut state.filling),
            bytes: std::mem::take(&mut state.filling_bytes),
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
        self.stored.clear();
        self.stored.shrink_to_fit();
        self.stored_len.store(0, Ordering::Relaxed);
        self.lock().release_memory = true;
        self.work.notify_all();
    }

    /// Whether a commit failed.
    pub(super) fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    /// Number of records waiting for their commit.
    pub(super) fn pending_len(&self) -> usize {
        self.pending_len.load(Ordering::Relaxed)
    }

    /// The pending records, for a verification scan to count as present.
    pub(super) fn is_pending(&self, key: &DataKey) -> bool {
        self.pending(key).is_some()
    }

    fn after_commit(&self, batch: &Batch, result: Result<(), Error>) {
        if result.is_ok() {
            // Remember the keys before they leave the pending map, so a concurrent store of
            // the same content always finds one or the other.
            for (key, _) in &batch.entries {
                if self.stored_len.load(Ordering::Relaxed) >= self.stored_cap {
                    break;
                }
                if self.stored.insert(*key) {
                    self.stored_len.fetch_add(1, Ordering::Relaxed);
                }
            }
            for (key, _) in &batch.entries {
                if self.pending.remove(key).is_some() {
                    self.pending_len.fetch_sub(1, Ordering::Release);
                }
            }
        }
        let mut state = self.lock();
        match result {
            Ok(()) => {
                state.committed_seq = batch.seq;
                state.in_flight_rows -= batch.entries.len();
                state.in_flight_bytes -= batch.bytes;
            }
            Err(err) => {
                // What failed stays pending (readable) until the store is reopened.
                log::error!(
                    "pagestore: commit failed, the store refuses writes until reopened: {err}"
                );
                state.error.get_or_insert_with(|| err.to_string());
                self.poisoned.store(true, Ordering::Release);
            }
        }
        drop(state);
        self.committed.notify_all();
    }
}

/// The writer thread's loop: commit sealed batches in order until shut down.
pub(super) fn run(buffer: &WriteBuffer, pool: &ReaderPool, mut conn: Connection, path: &Path) {
    loop {
        let batch = {
            let mut state = buffer.lock();
            loop {
                if std::mem::take(&mut state.release_memory) {
                    let _ = conn.release_memory();
                }
                if state.error.is_none() {
                    if let Some(batch) = state.sealed.pop_front() {
                        break batch;
                    }
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
                    state = buffer.lock();
                }
            }
        };
        pool.begin_write();
        let result = commit(&mut conn, &batch).map_err(Error::sqlite("commit a batch to", path));
        pool.end_write();
        buffer.after_commit(&batch, result);
    }
}

/// Inserts one batch in one transaction, in key order (which makes the B-tree inserts
/// mostly sequential: the largest single speed-up of the write path).
fn commit(conn: &mut Connection, batch: &Batch) -> rusqlite::Result<()> {
    let mut rows: Vec<([u8; 16], &[u8])> = batch
        .entries
        .iter()
        .map(|(key, record)| (key.as_bytes(), record.as_slice()))
        .collect();
    // SQLite orders BLOBs by memcmp, so sort by the stored bytes, not by the key's value.
    rows.sort_unstable_by_key(|row| row.0);
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        let mut many = tx.prepare_cached(&insert_sql(ROWS_PER_INSERT))?;
        let mut one = tx.prepare_cached(&insert_sql(1))?;
        let mut chunks = rows.chunks_exact(ROWS_PER_INSERT);
        for chunk in &mut chunks {
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
    tx.commit()
}

fn insert_sql(rows: usize) -> String {
    let values = vec!["(?,?)"; rows].join(",");
    format!("INSERT OR IGNORE INTO pagable_data (key, value) VALUES {values}")
}
