//! Garbage collection: keep what the roots and the caller's live keys reach, delete the rest,
//! while other threads go on storing, setting roots and reading.
//!
//! # The algorithm
//!
//! 1. **Begin.** The store's [`GcGate`] turns on: from now on every `put` (a new record or a
//!    repeat of a stored one) *vouches* for its key and its children, and every
//!    [`NodeStore::protect`](crate::NodeStore::protect) for its key, by adding them to the
//!    gate's grey list.
//! 2. **Mark.** Starting from the roots, the records not yet committed, the caller's live keys
//!    and the grey list, read each reached record and mark its children, level by level, in
//!    key order (reads close together in the B-tree). Marks are 8-byte key prefixes in one
//!    hash set: a million reachable nodes take about 16 MiB. A prefix shared by two keys only
//!    keeps a node that could go; nothing is ever deleted by mistake.
//! 3. **Sweep.** Walk the stored keys in chunks. For each chunk with unmarked keys, take the
//!    gate's lock exclusively, mark whatever was vouched for meanwhile, and delete the
//!    chunk's keys that are still unmarked, in one transaction, before letting go. Writes
//!    run under the lock's shared side, so a `put` sees its key and children either before a
//!    chunk's deletion (vouched for: kept) or after it (gone, and forgotten by the store's
//!    dedup memory, so the key is stored again, and a missing child is refused).
//! 4. **End.** The gate turns off; the store gives the freed pages back.
//!
//! Readers never wait for the collection: a chunk's deletion is one short write transaction.
//! A writer waits at most for one chunk's deletion.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering, fence};
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::key::{DataKey, KeyHasherBuilder};

/// What one garbage collection did (or, for a dry run, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GcReport {
    /// Whether this was a dry run: nothing was deleted, `deleted` and `bytes_freed` say what
    /// a collection would have deleted.
    pub dry_run: bool,
    /// Records found stored and kept: reachable from a root, from a live key, or stored
    /// while the collection ran.
    pub kept: u64,
    /// Records deleted: stored, and reachable from none of those.
    pub deleted: u64,
    /// The deleted records' bytes (their encoded length, as `StoreStats::data_bytes` counts).
    pub bytes_freed: u64,
    /// Keys a root or a kept record names that are not stored: damage (or a root named
    /// before its graph was stored). Nothing is deleted because of them.
    pub missing: u64,
    /// Database pages given back to the file system after the sweep (0 for a store without
    /// pages, and for a dry run).
    pub pages_released: u64,
    /// How long the collection took.
    pub duration: Duration,
}

/// The phase a garbage collection is in, for progress reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GcPhase {
    /// Reading the records the roots and live keys reach.
    Mark,
    /// Walking the stored records, deleting the unreached ones.
    Sweep,
}

/// A progress report: the phase and how many records it has handled so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcProgress {
    /// The current phase.
    pub phase: GcPhase,
    /// Records read (mark) or walked (sweep) so far in this phase.
    pub done: u64,
}

/// A function that hands every key the caller still needs to `keep`.
pub type LiveKeys<'a> = dyn Fn(&mut dyn FnMut(DataKey)) + Sync + 'a;

/// How a garbage collection runs: [`NodeStore::collect_garbage`](crate::NodeStore::collect_garbage)
/// takes it. The default deletes, keeps only what the roots reach, and reports no progress.
///
/// ```
/// use pagestore::{GcOptions, MemoryNodeStore, NodeStore, PagableData};
///
/// let store = MemoryNodeStore::new();
/// let kept = store.put(PagableData { data: b"kept".to_vec(), arcs: vec![] })?;
/// store.put(PagableData { data: b"garbage".to_vec(), arcs: vec![] })?;
/// let live = |keep: &mut dyn FnMut(pagestore::DataKey)| keep(kept);
/// let report = store.collect_garbage(&GcOptions::new().live_keys(&live))?;
/// assert_eq!((report.kept, report.deleted), (1, 1));
/// # anyhow::Ok(())
/// ```
#[derive(Clone, Copy, Default)]
pub struct GcOptions<'a> {
    pub(crate) dry_run: bool,
    pub(crate) live: Option<&'a LiveKeys<'a>>,
    pub(crate) progress: Option<&'a (dyn Fn(GcProgress) + Sync + 'a)>,
}

impl<'a> GcOptions<'a> {
    /// Delete what no root reaches; no live keys; no progress reports.
    pub fn new() -> Self {
        Self::default()
    }

    /// With `true`, mark and count but delete nothing (default `false`).
    #[must_use]
    pub fn dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }

    /// Keys to keep besides the roots (with everything they reach): `live` is called once,
    /// after the collection began, and hands each key to its argument. Default: none.
    #[must_use]
    pub fn live_keys(mut self, live: &'a LiveKeys<'a>) -> Self {
        self.live = Some(live);
        self
    }

    /// Called every few thousand records with the phase and the count so far (for a
    /// progress bar). Default: none.
    #[must_use]
    pub fn progress(mut self, progress: &'a (dyn Fn(GcProgress) + Sync + 'a)) -> Self {
        self.progress = Some(progress);
        self
    }
}

impl std::fmt::Debug for GcOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcOptions")
            .field("dry_run", &self.dry_run)
            .field("live_keys", &self.live.is_some())
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

/// The store's side of a running collection: the epoch, the grey list, and the lock that
/// orders writes against a collection's beginning and its deletions.
///
/// Every `put` and every `protect` runs inside [`enter`](Self::enter) (a shared lock); a
/// collection takes the lock exclusively to begin (so every write in flight has finished
/// and every later one sees it running) and to delete each chunk (so a write inside sees
/// the store either before the chunk's deletion, with what it vouched for kept, or after
/// it, with the deleted keys gone and forgotten). A write under the lock checks that the
/// children it names are stored: nothing can delete them before it is done.
///
/// `epoch` counts collection starts and ends (odd while one runs), for the runtime, which
/// records keys outside the lock: it records first and reads the epoch after, with a
/// `SeqCst` fence between, while a collection moves the epoch (with a fence) before it lists
/// the live keys, so either the collection sees the record or the runtime sees the
/// collection.
#[derive(Default)]
pub(crate) struct GcGate {
    epoch: AtomicU64,
    grey: Mutex<Vec<DataKey>>,
    writes: RwLock<()>,
    /// Held for a whole collection: one at a time.
    running: Mutex<()>,
}

impl GcGate {
    /// The epoch after a fence: 0 if no collection ever began, odd while one runs.
    pub(crate) fn epoch(&self) -> u64 {
        fence(Ordering::SeqCst);
        self.epoch.load(Ordering::SeqCst)
    }

    /// Enters a write (a `put` or a `protect`): a collection neither begins nor deletes
    /// until the returned guard drops.
    pub(crate) fn enter(&self) -> RwLockReadGuard<'_, ()> {
        self.writes.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Inside [`enter`](Self::enter): if a collection runs, vouches for `keys` (it will keep
    /// them and what they reach). Returns whether one runs.
    pub(crate) fn vouch(
        &self,
        _entered: &RwLockReadGuard<'_, ()>,
        keys: impl IntoIterator<Item = DataKey>,
    ) -> bool {
        if self.epoch.load(Ordering::SeqCst) % 2 == 0 {
            return false;
        }
        self.grey().extend(keys);
        true
    }

    /// Vouches for `key` if a collection runs (see [`NodeStore::protect`]).
    ///
    /// [`NodeStore::protect`]: crate::NodeStore::protect
    pub(crate) fn protect(&self, key: &DataKey) {
        let entered = self.enter();
        self.vouch(&entered, [*key]);
    }

    fn grey(&self) -> MutexGuard<'_, Vec<DataKey>> {
        self.grey.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Excludes every write (see the type's docs).
    fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.writes.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Begins a collection (waiting for one already running to end); it ends when the guard
    /// drops.
    fn begin(&self) -> GateGuard<'_> {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let exclusive = self.exclusive();
        self.epoch.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        drop(exclusive);
        GateGuard {
            gate: self,
            _running: running,
        }
    }
}

/// A running collection; dropping it ends the collection (also on an error or a panic).
struct GateGuard<'a> {
    gate: &'a GcGate,
    _running: MutexGuard<'a, ()>,
}

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        let _exclusive = self.gate.exclusive();
        self.gate.epoch.fetch_add(1, Ordering::SeqCst);
        let mut grey = self.gate.grey();
        grey.clear();
        grey.shrink_to_fit();
    }
}

/// What a pass over the records calls with each one: its position, key and bytes.
pub(crate) type VisitRecord<'a> = dyn FnMut(i64, DataKey, &[u8]) -> anyhow::Result<()> + 'a;

/// A stored key and its record's length in bytes.
pub(crate) type StoredKey = (DataKey, u64);

/// What a store provides for [`collect`]: its gate and five primitives.
pub(crate) trait Collectable {
    fn gate(&self) -> &GcGate;

    /// The keys of the named roots, pending changes included.
    fn root_keys(&self) -> anyhow::Result<Vec<DataKey>>;

    /// Hands every key stored but not yet committed to `keep`.
    fn pending_keys(&self, keep: &mut dyn FnMut(DataKey));

    /// For each of `keys` (sorted by their bytes), calls `found` with its children, or
    /// `None` if it is not stored. A damaged record is an error (the collection stops: it
    /// cannot know what the record reaches).
    fn children(
        &self,
        keys: &[DataKey],
        found: &mut dyn FnMut(Option<&mut dyn Iterator<Item = DataKey>>),
    ) -> anyhow::Result<()>;

    /// Whether `key` is stored but not yet committed (its record is in memory).
    fn is_pending(&self, key: &DataKey) -> bool;

    /// Calls `visit` with every committed record (its position, key and encoded bytes),
    /// parents before the children they name as far as the store's order goes, and returns
    /// `true`; or returns `false` at once if the store has no such order (then marking
    /// reads record by record). Records committed while this runs need not be visited.
    fn records_parents_first(&self, visit: &mut VisitRecord<'_>) -> anyhow::Result<bool> {
        let _ = visit;
        Ok(false)
    }

    /// How many positions apart a child may come *before* its parent in
    /// [`records_parents_first`](Self::records_parents_first)'s order (a batch committed
    /// in key order). The pass remembers that many passed records to go back to.
    fn disorder_window(&self) -> usize {
        0
    }

    /// Calls `found` with the key and record at `position` (from
    /// [`records_parents_first`](Self::records_parents_first)), if one is there; may be
    /// called from inside that pass's `visit`.
    fn record_at(
        &self,
        position: i64,
        found: &mut dyn FnMut(DataKey, &[u8]) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let _ = (position, found);
        Ok(())
    }

    /// Calls `visit` with every committed key, in chunks. Keys committed while this runs
    /// may or may not be visited.
    fn stored_keys(
        &self,
        visit: &mut dyn FnMut(&[StoredKey]) -> anyhow::Result<()>,
    ) -> anyhow::Result<()>;

    /// Deletes `keys` (committed, unreached) in one transaction and forgets that they were
    /// stored. Called with the gate's lock held.
    fn delete(&self, keys: &[DataKey]) -> anyhow::Result<()>;

    /// Gives free space back after a sweep that deleted something; returns the pages given
    /// back.
    fn release_space(&self) -> anyhow::Result<u64>;
}

/// Records read per [`Collectable::children`] call while marking.
const MARK_CHUNK: usize = 1024;
/// Progress is reported every this many records.
const PROGRESS_EVERY: u64 = 8192;
/// How many times a sweep step traces what was vouched for without the gate's lock before
/// it traces under it (so that a steady stream of writers cannot starve the sweep).
const UNLOCKED_TRACES: usize = 3;

/// The mark set: 8-byte key prefixes (keys are uniform hashes).
#[derive(Default)]
struct Marks(HashSet<u64, KeyHasherBuilder>);

impl Marks {
    fn prefix(key: &DataKey) -> u64 {
        u64::from_le_bytes(key.as_bytes()[..8].try_into().expect("8 bytes"))
    }

    fn insert(&mut self, key: &DataKey) -> bool {
        self.0.insert(Self::prefix(key))
    }

    fn contains(&self, key: &DataKey) -> bool {
        self.0.contains(&Self::prefix(key))
    }
}

/// One collection's state while it marks.
struct Marker<'a> {
    target: &'a dyn Collectable,
    marks: Marks,
    missing: u64,
    read: u64,
    progress: Option<&'a (dyn Fn(GcProgress) + Sync + 'a)>,
}

impl Marker<'_> {
    /// Marks `start` and everything it reaches that is not marked yet.
    ///
    /// Where the store can list its records parents first (a rowid table, newest first:
    /// a node is always committed after its children), one pass over the file marks nearly
    /// everything: a record is expanded when the pass reaches it if it was marked by then.
    /// What the pass could not expand (a child committed after its parent, a pending record's
    /// pending child, a missing key) is then read key by key.
    fn mark(&mut self, start: Vec<DataKey>) -> anyhow::Result<()> {
        let start: Vec<DataKey> = start
            .into_iter()
            .filter(|key| self.marks.insert(key))
            .collect();
        let mut to_expand: HashSet<DataKey, KeyHasherBuilder> = start.iter().copied().collect();
        // Records not committed yet are in memory, and the pass will not see them.
        loop {
            let pending: Vec<DataKey> = to_expand
                .iter()
                .filter(|key| self.target.is_pending(key))
                .copied()
                .collect();
            if pending.is_empty() {
                break;
            }
            for key in &pending {
                to_expand.remove(key);
            }
            let marks = &mut self.marks;
            self.target.children(&pending, &mut |children| {
                for child in children.into_iter().flatten() {
                    if marks.insert(&child) {
                        to_expand.insert(child);
                    }
                }
            })?;
        }
        let target = self.target;
        let mut pass = Pass {
            marks: &mut self.marks,
            to_expand,
            passed: HashMap::default(),
            prune_at: target.disorder_window().max(1024),
            window: target.disorder_window() as i64,
            read: &mut self.read,
            progress: self.progress,
        };
        let scanned = !pass.to_expand.is_empty()
            && target.records_parents_first(&mut |position, key, record| {
                pass.visit(target, position, key, record)
            })?;
        let to_expand = pass.to_expand;
        if scanned {
            self.expand(to_expand.into_iter().collect())
        } else {
            self.expand(start)
        }
    }

    /// Reads the records of `keys` (marked already) and marks what they reach, record by
    /// record: a stack of keys taken a chunk at a time (sorted, so that one chunk's reads
    /// fall close together in the B-tree), depth-first, so the stack stays as small as the
    /// graph is wide.
    fn expand(&mut self, keys: Vec<DataKey>) -> anyhow::Result<()> {
        let mut stack = keys;
        let mut chunk = Vec::with_capacity(MARK_CHUNK);
        while !stack.is_empty() {
            chunk.clear();
            let split = stack.len().saturating_sub(MARK_CHUNK);
            chunk.extend(stack.drain(split..));
            chunk.sort_unstable_by_key(|key| key.as_bytes());
            let (marks, missing) = (&mut self.marks, &mut self.missing);
            self.target
                .children(&chunk, &mut |children| match children {
                    Some(children) => stack.extend(children.filter(|child| marks.insert(child))),
                    None => *missing += 1,
                })?;
            count_marked(&mut self.read, chunk.len() as u64, self.progress);
        }
        Ok(())
    }

    /// Marks keys vouched for while the collection runs, and what they reach.
    fn trace(&mut self, keys: Vec<DataKey>) -> anyhow::Result<()> {
        let fresh = keys
            .into_iter()
            .filter(|key| self.marks.insert(key))
            .collect();
        self.expand(fresh)
    }
}

/// One pass over the records, parents first (see [`Marker::mark`]).
struct Pass<'m> {
    marks: &'m mut Marks,
    /// Marked keys whose records the pass has not reached yet.
    to_expand: HashSet<DataKey, KeyHasherBuilder>,
    /// Records passed unmarked within the last `window` positions, by key prefix: a child
    /// committed in the same batch as its parent may come just before it, and is then read
    /// again at its position.
    passed: HashMap<u64, i64, KeyHasherBuilder>,
    prune_at: usize,
    window: i64,
    read: &'m mut u64,
    progress: Option<&'m (dyn Fn(GcProgress) + Sync + 'm)>,
}

impl Pass<'_> {
    fn visit(
        &mut self,
        target: &dyn Collectable,
        position: i64,
        key: DataKey,
        record: &[u8],
    ) -> anyhow::Result<()> {
        if self.to_expand.remove(&key) {
            let mut again = Vec::new();
            self.expand(&key, record, &mut again)?;
            // Children passed already, and theirs: read again where they are.
            while let Some((position, child)) = again.pop() {
                let mut found = false;
                target.record_at(position, &mut |key, record| {
                    if key == child {
                        found = true;
                        self.expand(&key, record, &mut again)?;
                    }
                    Ok(())
                })?;
                if !found {
                    // A prefix shared with another key, or deleted meanwhile: read later.
                    self.to_expand.insert(child);
                }
            }
        } else if self.window > 0 && !self.marks.contains(&key) {
            self.passed.insert(Marks::prefix(&key), position);
            if self.passed.len() >= self.prune_at {
                let oldest = position.saturating_add(self.window);
                self.passed.retain(|_, passed| *passed <= oldest);
                self.prune_at = (2 * self.passed.len()).max(self.prune_at);
            }
        }
        Ok(())
    }

    /// Marks the children of `key`'s record: each one is expanded when the pass reaches it,
    /// or at once (through `again`) if the pass went by it.
    fn expand(
        &mut self,
        key: &DataKey,
        record: &[u8],
        again: &mut Vec<(i64, DataKey)>,
    ) -> anyhow::Result<()> {
        // Checked: a damaged record could name the wrong children, and its real ones would
        // then be swept.
        let view = super::checked_record(key, record)?;
        for child in view.arcs() {
            if self.marks.insert(&child) {
                match self.passed.remove(&Marks::prefix(&child)) {
                    Some(position) => again.push((position, child)),
                    None => {
                        self.to_expand.insert(child);
                    }
                }
            }
        }
        count_marked(self.read, 1, self.progress);
        Ok(())
    }
}

/// Adds `n` to the records read while marking, reporting progress every
/// [`PROGRESS_EVERY`].
fn count_marked(read: &mut u64, n: u64, progress: Option<&(dyn Fn(GcProgress) + Sync + '_)>) {
    let before = *read;
    *read += n;
    if let Some(progress) = progress {
        if before / PROGRESS_EVERY != *read / PROGRESS_EVERY {
            progress(GcProgress {
                phase: GcPhase::Mark,
                done: *read,
            });
        }
    }
}

/// The stored keys of `keys` that are not marked.
fn unmarked(marks: &Marks, keys: &[StoredKey]) -> Vec<StoredKey> {
    keys.iter()
        .filter(|(key, _)| !marks.contains(key))
        .copied()
        .collect()
}

/// Runs one garbage collection on `target` (see the module docs).
pub(crate) fn collect(
    target: &dyn Collectable,
    options: &GcOptions<'_>,
) -> anyhow::Result<GcReport> {
    let started = Instant::now();
    let gate = target.gate();
    let _running = gate.begin();

    // Mark: everything that must stay, and what it reaches.
    let mut start = target.root_keys()?;
    target.pending_keys(&mut |key| start.push(key));
    if let Some(live) = options.live {
        live(&mut |key| start.push(key));
    }
    start.append(&mut gate.grey());
    let mut marker = Marker {
        target,
        marks: Marks::default(),
        missing: 0,
        read: 0,
        progress: options.progress,
    };
    marker.mark(start)?;
    let marked_at = started.elapsed();

    // Sweep: chunk by chunk, deleting under the gate's lock what is still unmarked.
    let mut report = GcReport {
        dry_run: options.dry_run,
        ..GcReport::default()
    };
    let mut walked = 0u64;
    target.stored_keys(&mut |chunk| {
        walked += chunk.len() as u64;
        if let Some(progress) = options.progress {
            progress(GcProgress {
                phase: GcPhase::Sweep,
                done: walked,
            });
        }
        let candidates = unmarked(&marker.marks, chunk);
        report.kept += (chunk.len() - candidates.len()) as u64;
        if candidates.is_empty() {
            return Ok(());
        }
        if options.dry_run {
            report.deleted += candidates.len() as u64;
            report.bytes_freed += candidates.iter().map(|(_, len)| len).sum::<u64>();
            return Ok(());
        }
        // What was vouched for meanwhile is traced first without the lock (a few times, so
        // a steady stream of writes cannot starve the sweep), then the rest under it.
        for _ in 0..UNLOCKED_TRACES {
            let vouched = std::mem::take(&mut *gate.grey());
            if vouched.is_empty() {
                break;
            }
            marker.trace(vouched)?;
        }
        let exclusive = gate.exclusive();
        let vouched = std::mem::take(&mut *gate.grey());
        marker.trace(vouched)?;
        let doomed = unmarked(&marker.marks, &candidates);
        let mut keys: Vec<DataKey> = doomed.iter().map(|(key, _)| *key).collect();
        // In key order: the deletions then walk the key index in one direction.
        keys.sort_unstable_by_key(|key| key.as_bytes());
        if !keys.is_empty() {
            target.delete(&keys)?;
        }
        drop(exclusive);
        report.kept += (candidates.len() - doomed.len()) as u64;
        report.deleted += doomed.len() as u64;
        report.bytes_freed += doomed.iter().map(|(_, len)| len).sum::<u64>();
        Ok(())
    })?;
    report.missing = marker.missing;
    drop(marker);
    drop(_running);
    if report.deleted > 0 && !options.dry_run {
        report.pages_released = target.release_space()?;
    }
    report.duration = started.elapsed();
    log::debug!(
        "pagestore: garbage collection marked {} records in {marked_at:?}, then swept in {:?}",
        report.kept,
        report.duration - marked_at
    );
    Ok(report)
}

/// The error of a store that does not collect garbage.
pub(crate) fn unsupported() -> anyhow::Error {
    Error::Unsupported {
        operation: "garbage collection",
    }
    .into()
}
