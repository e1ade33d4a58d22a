//! The contract suites: what every [`NodeStore`] and every [`PagableStorage`] must do, as
//! runnable checks (feature `testing`).
//!
//! A backend written in another crate runs them from its own tests:
//!
//! ```
//! use pagestore::testing::{self, NodeStoreHarness, Runtime};
//! use pagestore::{DataKey, MemoryNodeStore};
//!
//! struct Memory;
//!
//! impl NodeStoreHarness for Memory {
//!     type Store = MemoryNodeStore;
//!     fn open(&self) -> MemoryNodeStore {
//!         MemoryNodeStore::new()
//!     }
//!     fn reopen(&self, _store: MemoryNodeStore) -> Option<MemoryNodeStore> {
//!         None // nothing persists
//!     }
//!     fn corrupt(&self, _store: &MemoryNodeStore, _key: DataKey) -> bool {
//!         false // nodes are values, never bytes that could rot
//!     }
//! }
//!
//! testing::node_store_contract(&Memory);
//! // The same store with the runtime attached keeps the PagableStorage contract.
//! testing::storage_contract(&Runtime(Memory));
//! ```
//!
//! Each check panics with a message naming what failed. The suites use a few hundred to a
//! few thousand small nodes and a handful of threads: seconds, not minutes.

use std::any::TypeId;
use std::collections::HashMap;
use std::sync::{Arc, Barrier, mpsc};

use either::Either;

use crate::{
    DataKey, Error, GcOptions, NodeStore, PagableData, PagableStorage, WithRuntime, downcast_arc,
};

/// How the node-store suite opens, reopens and damages one kind of [`NodeStore`].
pub trait NodeStoreHarness {
    /// The store under test.
    type Store: NodeStore;

    /// A fresh, empty store (a new location each call).
    fn open(&self) -> Self::Store;

    /// Closes `store` and opens a new instance on the same location; `None` for stores that
    /// persist nothing.
    fn reopen(&self, store: Self::Store) -> Option<Self::Store>;

    /// Damages the committed record of `key` so that its content no longer matches its key;
    /// returns false for stores whose records cannot be damaged from outside.
    fn corrupt(&self, store: &Self::Store, key: DataKey) -> bool;
}

/// How the storage suite opens, reopens, counts and damages one kind of [`PagableStorage`].
pub trait StorageHarness {
    /// The storage under test.
    type Storage: PagableStorage;

    /// A fresh, empty storage (a new location each call).
    fn open(&self) -> Self::Storage;

    /// Closes `storage` and opens a new instance on the same location; `None` for storages
    /// that persist nothing.
    fn reopen(&self, storage: Self::Storage) -> Option<Self::Storage>;

    /// The number of distinct nodes stored (called after a flush).
    fn count(&self, storage: &Self::Storage) -> u64;

    /// Damages the committed record of `key` (see [`NodeStoreHarness::corrupt`]).
    fn corrupt(&self, storage: &Self::Storage, key: DataKey) -> bool;
}

/// A [`NodeStoreHarness`]'s stores with the runtime attached ([`WithRuntime`]), as a
/// [`StorageHarness`].
#[derive(Debug, Clone, Copy)]
pub struct Runtime<H>(pub H);

impl<H: NodeStoreHarness> StorageHarness for Runtime<H> {
    type Storage = WithRuntime<H::Store>;

    fn open(&self) -> Self::Storage {
        WithRuntime::attach(self.0.open())
    }

    fn reopen(&self, storage: Self::Storage) -> Option<Self::Storage> {
        self.0
            .reopen(storage.into_node_store())
            .map(WithRuntime::attach)
    }

    fn count(&self, storage: &Self::Storage) -> u64 {
        count_nodes(storage.node_store())
    }

    fn corrupt(&self, storage: &Self::Storage, key: DataKey) -> bool {
        self.0.corrupt(storage.node_store(), key)
    }
}

/// Runs every check of the node-store contract ([`NodeStore`]'s docs) against `harness`.
pub fn node_store_contract<H: NodeStoreHarness>(harness: &H) {
    run_data_checks(&Nodes(harness));
    contains_sees_pending_and_committed_nodes(harness);
    put_refuses_a_node_naming_a_child_not_stored(harness);
    scan_visits_every_node_once_before_and_after_flush(harness);
    paged_values_leave_memory_and_come_back(harness);
    roots_are_set_read_listed_and_removed(harness);
    roots_are_read_your_writes_and_survive_reopen(harness);
    if supports_gc(harness) {
        gc_deletes_exactly_what_nothing_reaches(harness);
        gc_forgets_deleted_keys_so_they_can_be_stored_again(harness);
        gc_racing_writers_leaves_every_root_complete(harness);
        gc_stops_at_a_damaged_reachable_record(harness);
    }
}

/// Runs every check of the [`PagableStorage`] contract against `harness`: the data checks of
/// the node-store suite through `store_data`/`fetch_data*`, then the runtime's (arc cache,
/// load-once, the pager's `schedule_for_paging`, `release_memory`).
pub fn storage_contract<H: StorageHarness>(harness: &H) {
    run_data_checks(&Storages(harness));
    arc_cache_first_wins_preserves_identity_and_is_weak(harness);
    resolve_arc_loads_once_under_concurrent_callers(harness);
    paging_schedule_and_release_memory_keep_data(harness);
}

/// A deterministic node: `size` bytes derived from `seed`, and the given children.
pub fn node(seed: u64, size: usize, arcs: Vec<DataKey>) -> PagableData {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let data = (0..size)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    PagableData { data, arcs }
}

/// Stores a small DAG through `put` (each node points to up to 3 earlier ones, children
/// first) and returns the model of what was stored: key → node. Panics if `put` fails or
/// returns a key other than `compute_key()`.
pub fn store_dag(
    put: &dyn Fn(PagableData) -> anyhow::Result<DataKey>,
    seed: u64,
    nodes: usize,
) -> HashMap<DataKey, PagableData> {
    try_store_dag(put, seed, nodes).unwrap_or_else(|e| panic!("{e:#}"))
}

/// [`store_dag`], returning the first error of `put` instead of panicking on it.
fn try_store_dag(
    put: &dyn Fn(PagableData) -> anyhow::Result<DataKey>,
    seed: u64,
    nodes: usize,
) -> anyhow::Result<HashMap<DataKey, PagableData>> {
    let mut model = HashMap::new();
    let mut keys: Vec<DataKey> = Vec::new();
    for i in 0..nodes {
        let n = i as u64 + seed * 1_000_003;
        let arcs = (0..(n % 4) as usize)
            .filter(|_| !keys.is_empty())
            .map(|j| keys[(n as usize * 31 + j * 7) % keys.len()])
            .collect();
        let data = node(n, (n % 300) as usize, arcs);
        let key = put(data.clone()).map_err(|e| e.context(format!("store node {i}")))?;
        assert_eq!(key, data.compute_key(), "a store returns compute_key()");
        keys.push(key);
        model.insert(key, data);
    }
    Ok(model)
}

/// Fetches every key of `model` through `get` and checks the bytes.
pub fn assert_reads_back(
    get: &dyn Fn(&DataKey) -> anyhow::Result<Arc<PagableData>>,
    model: &HashMap<DataKey, PagableData>,
) {
    for (key, expected) in model {
        let got = get(key).unwrap_or_else(|e| panic!("fetch {key}: {e:#}"));
        assert_eq!(&*got, expected, "node {key} reads back exactly");
    }
}

/// The number of nodes `store`'s scan visits.
fn count_nodes<S: NodeStore + ?Sized>(store: &S) -> u64 {
    let mut count = 0;
    store
        .scan(&mut |_, _| {
            count += 1;
            Ok(())
        })
        .unwrap_or_else(|e| panic!("scan: {e:#}"));
    count
}

/// The data path both suites check, over a node store or a storage.
#[async_trait::async_trait]
trait Subject: Send + Sync {
    fn put(&self, node: PagableData) -> anyhow::Result<DataKey>;
    fn get(&self, key: &DataKey) -> anyhow::Result<Arc<PagableData>>;
    async fn get_async(&self, key: &DataKey) -> anyhow::Result<Arc<PagableData>>;
    async fn get_many_async(&self, keys: &[DataKey]) -> anyhow::Result<Vec<Arc<PagableData>>>;
    fn flush(&self) -> anyhow::Result<()>;
}

/// One kind of subject: how to open, reopen, count and damage it.
trait Suite {
    type Subject: Subject + 'static;
    fn open(&self) -> Self::Subject;
    fn reopen(&self, subject: Self::Subject) -> Option<Self::Subject>;
    fn count(&self, subject: &Self::Subject) -> u64;
    fn corrupt(&self, subject: &Self::Subject, key: DataKey) -> bool;
}

struct AsNodeStore<S>(S);

#[async_trait::async_trait]
impl<S: NodeStore> Subject for AsNodeStore<S> {
    fn put(&self, node: PagableData) -> anyhow::Result<DataKey> {
        self.0.put(node)
    }
    fn get(&self, key: &DataKey) -> anyhow::Result<Arc<PagableData>> {
        self.0.get(key)
    }
    async fn get_async(&self, key: &DataKey) -> anyhow::Result<Arc<PagableData>> {
        self.0.get_async(key).await
    }
    async fn get_many_async(&self, keys: &[DataKey]) -> anyhow::Result<Vec<Arc<PagableData>>> {
        self.0.get_many_async(keys).await
    }
    fn flush(&self) -> anyhow::Result<()> {
        self.0.flush()
    }
}

struct AsStorage<S>(S);

#[async_trait::async_trait]
impl<S: PagableStorage> Subject for AsStorage<S> {
    fn put(&self, node: PagableData) -> anyhow::Result<DataKey> {
        self.0.store_data(node)
    }
    fn get(&self, key: &DataKey) -> anyhow::Result<Arc<PagableData>> {
        self.0.fetch_data_blocking(key)
    }
    async fn get_async(&self, key: &DataKey) -> anyhow::Result<Arc<PagableData>> {
        self.0.fetch_data(key).await
    }
    async fn get_many_async(&self, keys: &[DataKey]) -> anyhow::Result<Vec<Arc<PagableData>>> {
        self.0.fetch_data_many(keys).await
    }
    fn flush(&self) -> anyhow::Result<()> {
        self.0.flush()
    }
}

struct Nodes<'a, H>(&'a H);

impl<H: NodeStoreHarness> Suite for Nodes<'_, H> {
    type Subject = AsNodeStore<H::Store>;
    fn open(&self) -> Self::Subject {
        AsNodeStore(self.0.open())
    }
    fn reopen(&self, subject: Self::Subject) -> Option<Self::Subject> {
        self.0.reopen(subject.0).map(AsNodeStore)
    }
    fn count(&self, subject: &Self::Subject) -> u64 {
        count_nodes(&subject.0)
    }
    fn corrupt(&self, subject: &Self::Subject, key: DataKey) -> bool {
        self.0.corrupt(&subject.0, key)
    }
}

struct Storages<'a, H>(&'a H);

impl<H: StorageHarness> Suite for Storages<'_, H> {
    type Subject = AsStorage<H::Storage>;
    fn open(&self) -> Self::Subject {
        AsStorage(self.0.open())
    }
    fn reopen(&self, subject: Self::Subject) -> Option<Self::Subject> {
        self.0.reopen(subject.0).map(AsStorage)
    }
    fn count(&self, subject: &Self::Subject) -> u64 {
        self.0.count(&subject.0)
    }
    fn corrupt(&self, subject: &Self::Subject, key: DataKey) -> bool {
        self.0.corrupt(&subject.0, key)
    }
}

fn run_data_checks<T: Suite>(suite: &T) {
    key_is_compute_key_and_duplicates_are_stored_once(suite);
    read_your_writes_from_every_thread_before_flush(suite);
    reopen_after_flush_reads_everything(suite);
    missing_key_is_not_found_naming_the_key(suite);
    corrupt_record_is_an_error_naming_the_key(suite);
    concurrent_overlapping_stores_and_fetches_lose_nothing(suite);
    racing_stores_of_one_content_are_each_readable_at_once(suite);
    async_get_matches_blocking_get(suite);
    batched_get_matches_per_key_get(suite);
}

fn dag<S: Subject>(subject: &S, seed: u64, nodes: usize) -> HashMap<DataKey, PagableData> {
    store_dag(&|node| subject.put(node), seed, nodes)
}

fn reads_back<S: Subject>(subject: &S, model: &HashMap<DataKey, PagableData>) {
    assert_reads_back(&|key| subject.get(key), model);
}

/// Contract 1: the key is `compute_key`; storing the same content twice keeps one entry.
fn key_is_compute_key_and_duplicates_are_stored_once<T: Suite>(suite: &T) {
    let subject = suite.open();
    let model = dag(&subject, 1, 200);
    for data in model.values() {
        assert_eq!(subject.put(data.clone()).unwrap(), data.compute_key());
    }
    subject.flush().unwrap();
    assert_eq!(
        suite.count(&subject),
        model.len() as u64,
        "duplicates are stored once"
    );
    reads_back(&subject, &model);
}

/// Contract 2: once a store returned, every thread finds the key, before any flush.
fn read_your_writes_from_every_thread_before_flush<T: Suite>(suite: &T) {
    let subject = suite.open();
    let (tx, rx) = mpsc::channel::<(DataKey, PagableData)>();
    std::thread::scope(|s| {
        let subject = &subject;
        s.spawn(move || {
            for i in 0..500 {
                let data = node(i, (i as usize * 37) % 2000, vec![]);
                let key = subject.put(data.clone()).unwrap();
                tx.send((key, data)).unwrap();
            }
        });
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (fwd_tx, fwd_rx) = mpsc::channel::<(DataKey, PagableData)>();
                let handle = s.spawn(move || {
                    for (key, data) in fwd_rx {
                        let got = subject.get(&key).unwrap_or_else(|e| {
                            panic!("read-your-writes: {key} not visible before flush: {e:#}")
                        });
                        assert_eq!(*got, data);
                    }
                });
                (fwd_tx, handle)
            })
            .collect();
        for (i, item) in rx.into_iter().enumerate() {
            readers[i % readers.len()].0.send(item).unwrap();
        }
        drop(readers);
    });
}

/// Contract 3: after `flush`, a fresh instance on the same location reads everything.
fn reopen_after_flush_reads_everything<T: Suite>(suite: &T) {
    let subject = suite.open();
    let model = dag(&subject, 3, 1000);
    subject.flush().unwrap();
    let Some(reopened) = suite.reopen(subject) else {
        return;
    };
    reads_back(&reopened, &model);
    assert_eq!(suite.count(&reopened), model.len() as u64);
    // And it keeps working.
    let more = dag(&reopened, 4, 50);
    reopened.flush().unwrap();
    reads_back(&reopened, &more);
}

/// Contract 5: a missing key is `NotFound` naming the key, before and after a flush.
fn missing_key_is_not_found_naming_the_key<T: Suite>(suite: &T) {
    let subject = suite.open();
    dag(&subject, 5, 10);
    let missing = node(u64::MAX, 10, vec![]).compute_key();
    let err = subject.get(&missing).unwrap_err();
    assert!(
        matches!(err.downcast_ref::<Error>(), Some(Error::NotFound(k)) if *k == missing),
        "{err:#}"
    );
    assert!(format!("{err:#}").contains(&missing.to_string()), "{err:#}");
    subject.flush().unwrap();
    let err = subject.get(&missing).unwrap_err();
    assert!(Error::is_not_found(&err), "after flush too: {err:#}");
}

/// Contract 5: a damaged record is an error naming the key, never the damaged bytes.
fn corrupt_record_is_an_error_naming_the_key<T: Suite>(suite: &T) {
    let subject = suite.open();
    let model = dag(&subject, 6, 20);
    subject.flush().unwrap();
    let (&victim, _) = model
        .iter()
        .find(|(_, data)| !data.data.is_empty())
        .unwrap();
    if !suite.corrupt(&subject, victim) {
        return;
    }
    let err = subject.get(&victim).unwrap_err();
    assert!(Error::is_corrupt(&err), "expected Corrupt, got {err:#}");
    assert!(format!("{err:#}").contains(&victim.to_string()), "{err:#}");
    for (key, data) in model.iter().filter(|(k, _)| **k != victim) {
        assert_eq!(&*subject.get(key).unwrap(), data, "others are unaffected");
    }
}

/// Contract 6: many threads storing and fetching overlapping keys lose nothing.
fn concurrent_overlapping_stores_and_fetches_lose_nothing<T: Suite>(suite: &T) {
    let subject = suite.open();
    const THREADS: u64 = 6;
    const PER_THREAD: u64 = 600;
    let barrier = Barrier::new(THREADS as usize);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (subject, barrier) = (&subject, &barrier);
            s.spawn(move || {
                barrier.wait();
                for i in 0..PER_THREAD {
                    // Half the content is shared by all threads, half is the thread's own.
                    let seed = if i % 2 == 0 {
                        i
                    } else {
                        1_000_000 * (t + 1) + i
                    };
                    let data = node(seed, 1 + (seed % 500) as usize, vec![]);
                    let key = subject.put(data.clone()).unwrap();
                    assert_eq!(*subject.get(&key).unwrap(), data);
                    if i % 100 == 99 && t == 0 {
                        subject.flush().unwrap();
                    }
                    let other = node(i - i % 2, 1 + ((i - i % 2) % 500) as usize, vec![]);
                    if let Ok(got) = subject.get(&other.compute_key()) {
                        assert_eq!(*got, other);
                    }
                }
            });
        }
    });
    subject.flush().unwrap();
    let expected = PER_THREAD / 2 + THREADS * PER_THREAD / 2;
    assert_eq!(suite.count(&subject), expected);
}

/// Contract 2 under a race: threads storing the *same* content at the same instant each read
/// it back at once.
fn racing_stores_of_one_content_are_each_readable_at_once<T: Suite>(suite: &T) {
    let subject = suite.open();
    const THREADS: usize = 4;
    const ROUNDS: u64 = 3000;
    let barrier = Barrier::new(THREADS);
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            let (subject, barrier) = (&subject, &barrier);
            s.spawn(move || {
                for round in 0..ROUNDS {
                    let data = node(round, 8 + (round % 64) as usize, vec![]);
                    barrier.wait();
                    let key = subject.put(data.clone()).unwrap();
                    let got = subject.get(&key).unwrap_or_else(|e| {
                        panic!("round {round}: {key} not readable right after its store: {e:#}")
                    });
                    assert_eq!(*got, data);
                }
            });
        }
    });
}

/// The async read returns what the blocking read returns, also under many concurrent tasks.
fn async_get_matches_blocking_get<T: Suite>(suite: &T) {
    let subject = Arc::new(suite.open());
    let model = dag(&*subject, 8, 50);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        for (key, data) in &model {
            assert_eq!(&*subject.get_async(key).await.unwrap(), data);
        }
        subject.flush().unwrap();
        let missing = node(u64::MAX - 1, 3, vec![]).compute_key();
        assert!(Error::is_not_found(
            &subject.get_async(&missing).await.unwrap_err()
        ));
        let tasks: Vec<_> = model
            .keys()
            .map(|key| {
                let (subject, key) = (Arc::clone(&subject), *key);
                tokio::spawn(async move { subject.get_async(&key).await.map(|d| (key, d)) })
            })
            .collect();
        for task in tasks {
            let (key, data) = task.await.unwrap().unwrap();
            assert_eq!(&*data, &model[&key]);
        }
    });
}

/// The batched read returns what per-key reads return, in the order asked (repeats, pending
/// and committed nodes included), also from concurrent tasks over overlapping batches; a
/// missing or damaged key fails the batch with the error naming that key.
fn batched_get_matches_per_key_get<T: Suite>(suite: &T) {
    let subject = Arc::new(suite.open());
    let model = dag(&*subject, 9, 120);
    let mut keys: Vec<DataKey> = model.keys().copied().collect();
    keys.sort();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        let check = |got: Vec<Arc<PagableData>>, asked: &[DataKey]| {
            assert_eq!(got.len(), asked.len());
            for (node, key) in got.iter().zip(asked) {
                assert_eq!(&**node, &model[key], "{key}");
                assert_eq!(*node, subject.get(key).unwrap(), "{key}");
            }
        };
        // Pending (before the flush), then committed.
        check(subject.get_many_async(&keys).await.unwrap(), &keys);
        subject.flush().unwrap();
        let mut asked = keys.clone();
        asked.extend(keys.iter().rev().take(7).copied());
        check(subject.get_many_async(&asked).await.unwrap(), &asked);
        assert!(subject.get_many_async(&[]).await.unwrap().is_empty());
        // Half pending, half committed.
        let fresh = dag(&*subject, 10, 20);
        let mut mixed: Vec<DataKey> = fresh.keys().copied().collect();
        mixed.extend(keys.iter().take(20));
        let got = subject.get_many_async(&mixed).await.unwrap();
        for (node, key) in got.iter().zip(&mixed) {
            assert_eq!(&**node, fresh.get(key).unwrap_or_else(|| &model[key]));
        }
        // Nothing read is held below: a storage may hand out a node still alive unread.
        drop(got);
        // Concurrent overlapping batches.
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let subject = Arc::clone(&subject);
                let batch: Vec<DataKey> = keys.iter().skip(t * 10).take(60).copied().collect();
                tokio::spawn(async move { (subject.get_many_async(&batch).await, batch) })
            })
            .collect();
        for task in tasks {
            let (got, batch) = task.await.unwrap();
            check(got.unwrap(), &batch);
        }
        // A missing key fails the batch, naming it.
        let missing = node(u64::MAX - 2, 3, vec![]).compute_key();
        let asked = [keys[0], missing, keys[1]];
        let err = subject.get_many_async(&asked).await.unwrap_err();
        assert!(
            matches!(err.downcast_ref::<Error>(), Some(Error::NotFound(k)) if *k == missing),
            "{err:#}"
        );
        assert!(format!("{err:#}").contains(&missing.to_string()), "{err:#}");
        // A damaged record (none of whose nodes is alive) fails it as Corrupt, naming it.
        let (&victim, _) = model.iter().find(|(_, d)| !d.data.is_empty()).unwrap();
        if suite.corrupt(&subject, victim) {
            let err = subject
                .get_many_async(&[keys[0], victim])
                .await
                .unwrap_err();
            assert!(Error::is_corrupt(&err), "expected Corrupt, got {err:#}");
            assert!(format!("{err:#}").contains(&victim.to_string()), "{err:#}");
        }
    });
}

/// `contains` sees a node as soon as `put` returned, and after a flush; not a missing key.
fn contains_sees_pending_and_committed_nodes<H: NodeStoreHarness>(harness: &H) {
    let store = harness.open();
    let key = store.put(node(11, 40, vec![])).unwrap();
    assert!(store.contains(&key).unwrap(), "before flush");
    store.flush().unwrap();
    assert!(store.contains(&key).unwrap(), "after flush");
    let missing = node(u64::MAX - 2, 3, vec![]).compute_key();
    assert!(!store.contains(&missing).unwrap());
    if let Some(reopened) = harness.reopen(store) {
        assert!(reopened.contains(&key).unwrap(), "after reopening");
    }
}

/// Root names the checks use: plain, empty, spaces, non-ASCII, SQL quoting, a NUL, and
/// names that differ only in case (sorted by their bytes).
const ODD_ROOT_NAMES: &[&str] = &[
    "main",
    "",
    "with space",
    "ünïcødé/名前",
    "'; DROP TABLE pagable_data; --",
    "nul\0inside",
    "Main",
    "main.2",
];

/// Contract item 7: `set_root`, `root`, `roots` (sorted by name), `remove_root` (whether it
/// existed), overwriting, and names with odd characters.
fn roots_are_set_read_listed_and_removed<H: NodeStoreHarness>(harness: &H) {
    let store = harness.open();
    assert_eq!(store.roots().unwrap(), vec![], "a new store has no roots");
    assert_eq!(store.root("main").unwrap(), None);
    assert!(
        !store.remove_root("main").unwrap(),
        "removing a missing root"
    );
    let keys: Vec<DataKey> = (0..ODD_ROOT_NAMES.len() as u64)
        .map(|i| store.put(node(900 + i, 20, vec![])).unwrap())
        .collect();
    for (name, key) in ODD_ROOT_NAMES.iter().zip(&keys) {
        store.set_root(name, *key).unwrap();
    }
    for (name, key) in ODD_ROOT_NAMES.iter().zip(&keys) {
        assert_eq!(store.root(name).unwrap(), Some(*key), "root {name:?}");
    }
    let mut expected: Vec<(String, DataKey)> = ODD_ROOT_NAMES
        .iter()
        .map(|name| name.to_string())
        .zip(keys.iter().copied())
        .collect();
    expected.sort();
    assert_eq!(store.roots().unwrap(), expected, "roots, sorted by name");
    // Overwrite, then set the same key again.
    store.set_root("main", keys[1]).unwrap();
    store.set_root("main", keys[1]).unwrap();
    assert_eq!(store.root("main").unwrap(), Some(keys[1]), "overwritten");
    assert!(store.remove_root("with space").unwrap());
    assert!(!store.remove_root("with space").unwrap(), "removed twice");
    assert_eq!(store.root("with space").unwrap(), None);
    store.flush().unwrap();
    // The same after the changes are committed, and changes on top of committed roots.
    assert_eq!(store.root("main").unwrap(), Some(keys[1]), "after flush");
    assert_eq!(store.root("with space").unwrap(), None, "after flush");
    assert!(store.remove_root("").unwrap(), "a committed root");
    store.set_root("with space", keys[2]).unwrap();
    expected.retain(|(name, _)| !name.is_empty());
    for (name, key) in &mut expected {
        match name.as_str() {
            "main" => *key = keys[1],
            "with space" => *key = keys[2],
            _ => {}
        }
    }
    assert_eq!(store.roots().unwrap(), expected, "pending over committed");
    store.flush().unwrap();
    assert_eq!(store.roots().unwrap(), expected, "after the second flush");
    // A root never names a key that is not stored.
    let missing = node(u64::MAX - 7, 3, vec![]).compute_key();
    let err = store
        .set_root("dangling", missing)
        .expect_err("a root naming a key not stored");
    assert!(
        matches!(err.downcast_ref(), Some(Error::NotFound(key)) if *key == missing),
        "{err:#}"
    );
    assert_eq!(store.root("dangling").unwrap(), None);
}

/// Contract items 7 and 8: a root set right after its graph is seen at once from another
/// thread, before any flush, with the graph readable; and what was set before a flush
/// survives a reopen.
fn roots_are_read_your_writes_and_survive_reopen<H: NodeStoreHarness>(harness: &H) {
    let store = harness.open();
    let graph = store_dag(&|node| store.put(node), 14, 200);
    let top = store
        .put(node(14_000, 30, graph.keys().copied().collect()))
        .unwrap();
    store.set_root("graph", top).unwrap();
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                assert_eq!(
                    store.root("graph").unwrap(),
                    Some(top),
                    "from another thread"
                );
                assert_eq!(store.roots().unwrap(), vec![("graph".to_string(), top)]);
                let parent = store.get(&top).unwrap();
                for child in &parent.arcs {
                    store.get(child).unwrap();
                }
            })
            .join()
            .unwrap();
    });
    // Changes made from many threads at once are all kept.
    std::thread::scope(|scope| {
        for t in 0..4u64 {
            let store = &store;
            scope.spawn(move || {
                for i in 0..25u64 {
                    let key = store.put(node(15_000 + t * 100 + i, 10, vec![])).unwrap();
                    store.set_root(&format!("thread{t}/{i:02}"), key).unwrap();
                    assert_eq!(store.root(&format!("thread{t}/{i:02}")).unwrap(), Some(key));
                }
            });
        }
    });
    assert_eq!(store.roots().unwrap().len(), 101, "every thread's roots");
    assert!(store.remove_root("thread0/00").unwrap());
    store.flush().unwrap();
    let before = store.roots().unwrap();
    assert_eq!(before.len(), 100);
    if let Some(reopened) = harness.reopen(store) {
        assert_eq!(reopened.roots().unwrap(), before, "after reopening");
        assert_eq!(reopened.root("graph").unwrap(), Some(top));
        assert_eq!(
            reopened.root("thread0/00").unwrap(),
            None,
            "removed before flush"
        );
        reopened.get(&top).unwrap();
    }
}

/// `scan` visits every stored node exactly once with its content, pending ones included.
fn scan_visits_every_node_once_before_and_after_flush<H: NodeStoreHarness>(harness: &H) {
    let store = harness.open();
    let first = store_dag(&|node| store.put(node), 12, 300);
    let check = |store: &H::Store, model: &HashMap<DataKey, PagableData>| {
        let mut seen = HashMap::new();
        store
            .scan(&mut |key, node| {
                let node = node.unwrap_or_else(|e| panic!("scan of {key}: {e:#}"));
                assert!(seen.insert(key, node).is_none(), "{key} visited twice");
                Ok(())
            })
            .unwrap();
        assert_eq!(&seen, model, "scan visits exactly what was stored");
    };
    check(&store, &first);
    store.flush().unwrap();
    let mut all = first;
    all.extend(store_dag(&|node| store.put(node), 13, 100));
    check(&store, &all);
    // An error from the visitor stops the scan and is returned.
    let mut visited = 0;
    let err = store
        .scan(&mut |_, _| {
            visited += 1;
            anyhow::bail!("stop here")
        })
        .unwrap_err();
    assert_eq!(visited, 1);
    assert!(err.to_string().contains("stop here"), "{err:#}");
}

/// The arc cache keeps the first value, hands back the same `Arc`, and holds it weakly.
fn arc_cache_first_wins_preserves_identity_and_is_weak<H: StorageHarness>(harness: &H) {
    let storage = harness.open();
    let key = storage.store_data(node(7, 32, vec![])).unwrap();
    let type_id = TypeId::of::<String>();

    match storage.fetch_arc_or_data_blocking(&type_id, &key).unwrap() {
        Either::Right(data) => assert_eq!(data.compute_key(), key),
        Either::Left(_) => panic!("nothing was deserialized yet"),
    }
    let first = Arc::new(String::from("first"));
    assert!(
        storage
            .on_arc_deserialized(type_id, key, Box::new(first.clone()))
            .is_none()
    );
    let winner = storage
        .on_arc_deserialized(type_id, key, Box::new(Arc::new(String::from("second"))))
        .expect("the first value is alive and wins");
    assert!(Arc::ptr_eq(
        &downcast_arc::<String>(&*winner).unwrap(),
        &first
    ));
    match storage.fetch_arc_or_data_blocking(&type_id, &key).unwrap() {
        Either::Left(arc) => assert!(Arc::ptr_eq(&downcast_arc::<String>(&*arc).unwrap(), &first)),
        Either::Right(_) => panic!("a live value must be returned from the cache"),
    }
    assert!(
        matches!(
            storage
                .fetch_arc_or_data_blocking(&TypeId::of::<Vec<u8>>(), &key)
                .unwrap(),
            Either::Right(_)
        ),
        "another view of the same key is a separate entry"
    );
    let weak = Arc::downgrade(&first);
    drop((first, winner));
    assert!(
        weak.upgrade().is_none(),
        "the cache must not keep the value alive"
    );
    assert!(matches!(
        storage.fetch_arc_or_data_blocking(&type_id, &key).unwrap(),
        Either::Right(_)
    ));
    let missing = node(u64::MAX, 10, vec![]).compute_key();
    let err = storage
        .fetch_arc_or_data_blocking(&type_id, &missing)
        .unwrap_err();
    assert!(Error::is_not_found(&err), "{err:#}");
}

/// `resolve_arc`: threads resolving one `(TypeId, key)` at once all get one `Arc`, a value
/// alive elsewhere is returned as is, and a failed deserialization is returned to its caller.
fn resolve_arc_loads_once_under_concurrent_callers<H: StorageHarness>(harness: &H) {
    let storage = harness.open();
    let key = storage.store_data(node(21, 16, vec![])).unwrap();
    let type_id = TypeId::of::<Vec<u8>>();
    const THREADS: usize = 4;
    let barrier = Barrier::new(THREADS);
    let values: Vec<Arc<Vec<u8>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                let (storage, barrier) = (&storage, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    let arc = storage
                        .resolve_arc(type_id, key, None, &mut |node| {
                            std::thread::sleep(std::time::Duration::from_millis(10));
                            Ok(Box::new(Arc::new(node.data.clone())))
                        })
                        .unwrap();
                    downcast_arc::<Vec<u8>>(&*arc).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        values.iter().all(|v| Arc::ptr_eq(v, &values[0])),
        "every caller shares the winner"
    );
    assert_eq!(*values[0], node(21, 16, vec![]).data);
    let again = storage
        .resolve_arc(type_id, key, None, &mut |_| {
            panic!("a live value is not deserialized again")
        })
        .unwrap();
    assert!(Arc::ptr_eq(
        &downcast_arc::<Vec<u8>>(&*again).unwrap(),
        &values[0]
    ));
    drop((values, again));
    let err = storage
        .resolve_arc(type_id, key, None, &mut |_| anyhow::bail!("cannot decode"))
        .unwrap_err();
    assert!(err.to_string().contains("cannot decode"), "{err:#}");
}

/// `schedule_for_paging` never panics; `release_memory` drops caches, not data or live values.
fn paging_schedule_and_release_memory_keep_data<H: StorageHarness>(harness: &H) {
    let storage = harness.open();
    let model = store_dag(&|node| storage.store_data(node), 9, 100);
    let live = Arc::new(String::from("live"));
    let key = *model.keys().next().unwrap();
    storage.on_arc_deserialized(TypeId::of::<String>(), key, Box::new(live.clone()));
    for _ in 0..10 {
        storage.schedule_for_paging(Box::new(Arc::new(5u32)));
        storage.schedule_for_paging(Box::new(live.clone()));
    }
    storage.release_memory();
    assert_reads_back(&|key| storage.fetch_data_blocking(key), &model);
    match storage
        .fetch_arc_or_data_blocking(&TypeId::of::<String>(), &key)
        .unwrap()
    {
        Either::Left(cached) => assert!(Arc::ptr_eq(
            &downcast_arc::<String>(&*cached).unwrap(),
            &live
        )),
        Either::Right(_) => panic!("live values stay cached"),
    }
}

/// With the runtime attached, [`PagableArc`](crate::PagableArc) values page out into the
/// store, fault back in, and (for persistent stores) come back from their keys after a reopen.
fn paged_values_leave_memory_and_come_back<H: NodeStoreHarness>(harness: &H) {
    use crate::PagableArc;
    let storage = Arc::new(WithRuntime::attach(harness.open()));
    let values: Vec<Vec<u8>> = (0..20).map(|n| node(n, 500, vec![]).data).collect();
    let handles: Vec<PagableArc<Vec<u8>>> = values
        .iter()
        .map(|value| PagableArc::new(value.clone(), &storage))
        .collect();
    let report = storage.page_out_unpinned().unwrap();
    assert_eq!(report.evicted, 20, "{report:?}");
    assert!(handles.iter().all(|handle| !handle.is_resident()));
    for (handle, value) in handles.iter().zip(&values) {
        assert_eq!(*handle.pin().unwrap(), *value, "faulted back in");
    }
    storage.flush().unwrap();
    let keys: Vec<DataKey> = handles.iter().map(|h| h.key().unwrap()).collect();
    drop(handles);
    let Ok(storage) = Arc::try_unwrap(storage) else {
        panic!("nothing else holds the storage");
    };
    let Some(reopened) = harness.reopen(storage.into_node_store()) else {
        return;
    };
    let reopened = Arc::new(WithRuntime::attach(reopened));
    for (key, value) in keys.iter().zip(&values) {
        let handle = PagableArc::<Vec<u8>>::from_key(*key, &reopened);
        assert_eq!(*handle.pin().unwrap(), *value, "read back after a reopen");
    }
}

/// Contract 4: a node naming a child that is not stored is refused with `MissingChild`
/// naming both keys, and nothing is stored; once the child is stored, the node is.
fn put_refuses_a_node_naming_a_child_not_stored<H: NodeStoreHarness>(harness: &H) {
    let store = harness.open();
    let child = node(71, 10, vec![]);
    let parent = node(72, 10, vec![child.compute_key()]);
    let err = store
        .put(parent.clone())
        .expect_err("a parent before its child");
    match err.downcast_ref::<Error>() {
        Some(Error::MissingChild {
            key,
            child: missing,
        }) => {
            assert_eq!(
                (*key, *missing),
                (parent.compute_key(), child.compute_key())
            );
        }
        _ => panic!("expected MissingChild, got {err:#}"),
    }
    assert!(
        !store.contains(&parent.compute_key()).unwrap(),
        "nothing stored"
    );
    store.put(child).unwrap();
    assert_eq!(store.put(parent.clone()).unwrap(), parent.compute_key());
    store.flush().unwrap();
    assert_eq!(*store.get(&parent.compute_key()).unwrap(), parent);
}

/// Whether the harness's store collects garbage (contract item 9 applies only then).
fn supports_gc<H: NodeStoreHarness>(harness: &H) -> bool {
    match harness
        .open()
        .collect_garbage(&GcOptions::new().dry_run(true))
    {
        Ok(_) => true,
        Err(err) if matches!(err.downcast_ref(), Some(Error::Unsupported { .. })) => false,
        Err(err) => panic!("a dry run on an empty store: {err:#}"),
    }
}

/// The keys `starts` reach in `model` (a key not in the model reaches nothing).
pub fn reachable(
    model: &HashMap<DataKey, PagableData>,
    starts: impl IntoIterator<Item = DataKey>,
) -> std::collections::HashSet<DataKey> {
    let mut seen = std::collections::HashSet::new();
    let mut stack: Vec<DataKey> = starts.into_iter().collect();
    while let Some(key) = stack.pop() {
        if seen.insert(key) {
            if let Some(node) = model.get(&key) {
                stack.extend(node.arcs.iter().copied());
            }
        }
    }
    seen
}

/// The keys a scan of `store` visits.
fn stored_keys<S: NodeStore + ?Sized>(store: &S) -> std::collections::HashSet<DataKey> {
    let mut keys = std::collections::HashSet::new();
    store
        .scan(&mut |key, _| {
            keys.insert(key);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("scan: {e:#}"));
    keys
}

/// Contract item 9: a collection deletes exactly the nodes that no root and no live key
/// reaches (checked against a model), counts them, and a dry run before it reports the same
/// and deletes nothing. Some nodes are pending (not flushed) when it runs.
fn gc_deletes_exactly_what_nothing_reaches<H: NodeStoreHarness>(harness: &H) {
    let store = harness.open();
    let mut model = store_dag(&|node| store.put(node), 21, 400);
    let keys: Vec<DataKey> = {
        let mut keys: Vec<DataKey> = model.keys().copied().collect();
        keys.sort();
        keys
    };
    store.set_root("a", keys[10]).unwrap();
    store.set_root("b", keys[200]).unwrap();
    store.set_root("gone", keys[300]).unwrap();
    assert!(store.remove_root("gone").unwrap());
    store.flush().unwrap();
    // Not committed when the collection runs, nor is the root that names it.
    let unflushed = node(21_000, 50, vec![keys[5]]);
    let unflushed_key = store.put(unflushed.clone()).unwrap();
    model.insert(unflushed_key, unflushed);
    store.set_root("late", unflushed_key).unwrap();
    let live = [keys[7]];
    let live_keys = |keep: &mut dyn FnMut(DataKey)| live.iter().for_each(|key| keep(*key));

    let stored_before = stored_keys(&store);
    let dry = store
        .collect_garbage(&GcOptions::new().dry_run(true).live_keys(&live_keys))
        .unwrap_or_else(|e| panic!("dry run: {e:#}"));
    assert!(dry.dry_run);
    assert_eq!(
        stored_keys(&store),
        stored_before,
        "a dry run deletes nothing"
    );

    let report = store
        .collect_garbage(&GcOptions::new().live_keys(&live_keys))
        .unwrap_or_else(|e| panic!("gc: {e:#}"));
    let expected = reachable(&model, [keys[10], keys[200], keys[7], unflushed_key]);
    let after = stored_keys(&store);
    assert_eq!(after, expected, "exactly the reachable nodes are left");
    assert_eq!(report.kept, expected.len() as u64, "{report:?}");
    assert_eq!(
        report.deleted,
        (model.len() - expected.len()) as u64,
        "{report:?}"
    );
    assert_eq!(report.missing, 0, "{report:?}");
    let freed: u64 = model
        .iter()
        .filter(|(key, _)| !expected.contains(key))
        .map(|(_, node)| crate::codec::encoded_len(node) as u64)
        .sum();
    assert_eq!(report.bytes_freed, freed, "{report:?}");
    assert_eq!(
        (dry.kept, dry.deleted, dry.bytes_freed),
        (report.kept, report.deleted, report.bytes_freed),
        "the dry run predicted the collection"
    );
    for key in &expected {
        assert_eq!(&*store.get(key).unwrap(), &model[key], "{key} kept intact");
    }
    let again = store
        .collect_garbage(&GcOptions::new().live_keys(&live_keys))
        .unwrap();
    assert_eq!(
        again.deleted, 0,
        "a second collection finds nothing: {again:?}"
    );
    if let Some(store) = harness.reopen(store) {
        assert_eq!(stored_keys(&store), expected, "the deletions are durable");
    }
}

/// Contract item 9: a node deleted by a collection and stored again is stored (the store
/// must not remember it as stored), readable, and survives a reopen.
fn gc_forgets_deleted_keys_so_they_can_be_stored_again<H: NodeStoreHarness>(harness: &H) {
    let store = harness.open();
    let data = node(31, 40, vec![]);
    let key = store.put(data.clone()).unwrap();
    store.flush().unwrap();
    let report = store.collect_garbage(&GcOptions::new()).unwrap();
    assert_eq!(report.deleted, 1, "{report:?}");
    assert!(!store.contains(&key).unwrap(), "deleted");
    assert_eq!(store.put(data.clone()).unwrap(), key);
    assert!(store.contains(&key).unwrap(), "stored again");
    assert_eq!(*store.get(&key).unwrap(), data);
    store.flush().unwrap();
    if let Some(store) = harness.reopen(store) {
        assert_eq!(*store.get(&key).unwrap(), data, "stored again, durably");
    }
}

/// Contract item 9: threads store graphs and name them as roots while collections run;
/// afterwards (and after a reopen) every root's graph is complete, and a node a thread
/// stored and then found deleted was only ever garbage.
fn gc_racing_writers_leaves_every_root_complete<H: NodeStoreHarness>(harness: &H) {
    const WRITERS: u64 = 3;
    const GRAPHS: u64 = 40;
    let store = harness.open();
    // Garbage to sweep, so the sweep has work while the writers run.
    store_dag(&|node| store.put(node), 41, 600);
    store.flush().unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    let collections = std::thread::scope(|scope| {
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let store = &store;
                scope.spawn(move || {
                    for g in 0..GRAPHS {
                        // Shares nodes with the garbage above (same seeds), so some of its
                        // nodes are stored again while being swept. A node stored before a
                        // collection began and reached by nothing may be deleted before its
                        // parent is stored: the parent is refused (`MissingChild`), and the
                        // writer stores the graph again, as the contract asks of it.
                        while !store_graph_and_root(store, w, g) {}
                        if g % 8 == 0 {
                            store.flush().unwrap();
                        }
                    }
                })
            })
            .collect();
        let collector = scope.spawn(|| {
            let mut runs = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) || runs < 2 {
                store
                    .collect_garbage(&GcOptions::new())
                    .unwrap_or_else(|e| panic!("gc while writers run: {e:#}"));
                runs += 1;
            }
            runs
        });
        // Joined before any is unwrapped: a writer's panic must stop the collector too.
        let joined: Vec<_> = writers.into_iter().map(|w| w.join()).collect();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let runs = collector.join().unwrap();
        for writer in joined {
            if let Err(panic) = writer {
                std::panic::resume_unwind(panic);
            }
        }
        runs
    });
    assert!(collections >= 2);
    store.collect_garbage(&GcOptions::new()).unwrap();
    let check = |store: &H::Store, when: &str| {
        let roots = store.roots().unwrap();
        assert_eq!(roots.len(), WRITERS as usize, "{when}: {roots:?}");
        for (name, key) in roots {
            let mut stack = vec![key];
            while let Some(key) = stack.pop() {
                let node = store
                    .get(&key)
                    .unwrap_or_else(|e| panic!("{when}: root {name} reaches {key}: {e:#}"));
                stack.extend(node.arcs.iter().copied());
            }
        }
    };
    check(&store, "after the collections");
    store.flush().unwrap();
    if let Some(store) = harness.reopen(store) {
        check(&store, "after a reopen");
    }
}

/// Stores writer `w`'s graph `g` (`store_dag` with seed `41 + (w + g) % 2`) under a top
/// node and names that root `w{w}`; false if a collection deleted one of its nodes
/// that was stored before the collection began, before its parent was stored (the parent,
/// or the root, is then refused: the caller stores the graph again).
fn store_graph_and_root<S: NodeStore>(store: &S, w: u64, g: u64) -> bool {
    let refused = |e: &anyhow::Error| {
        matches!(
            e.downcast_ref(),
            Some(Error::MissingChild { .. } | Error::NotFound(_))
        )
    };
    let stored = try_store_dag(&|node| store.put(node), 41 + (w + g) % 2, 30).and_then(|graph| {
        let top = store.put(node(
            50_000 + w * 1000 + g,
            20,
            graph.keys().copied().collect(),
        ))?;
        store.set_root(&format!("w{w}"), top)
    });
    match stored {
        Ok(()) => true,
        Err(e) if refused(&e) => false,
        Err(e) => panic!("store graph {g} of writer {w}: {e:#}"),
    }
}

/// Contract item 9: a collection that meets a damaged record among the reachable ones
/// stops with [`Error::Corrupt`] naming it (it cannot know what the record reaches), and
/// deletes nothing that the record's children could be.
fn gc_stops_at_a_damaged_reachable_record<H: NodeStoreHarness>(harness: &H) {
    let store = harness.open();
    let child = store.put(node(61, 30, vec![])).unwrap();
    let parent = store.put(node(62, 30, vec![child])).unwrap();
    store.set_root("damaged", parent).unwrap();
    store.flush().unwrap();
    if !harness.corrupt(&store, parent) {
        return;
    }
    let err = store
        .collect_garbage(&GcOptions::new())
        .expect_err("a collection through a damaged record");
    match err.downcast_ref::<Error>() {
        Some(Error::Corrupt { key, .. }) => assert_eq!(*key, parent),
        _ => panic!("expected Corrupt, got {err:#}"),
    }
    assert!(store.contains(&child).unwrap(), "the child was not swept");
}

/// [`NodeStore::put`] without the check that the children are stored (which `put` refuses
/// with [`Error::MissingChild`]): for tests that need a damaged graph, a child that dangles
/// as a damaged file could leave. Never fails; a `Result` like `put`'s.
pub fn store_unchecked(
    store: &crate::MemoryNodeStore,
    node: PagableData,
) -> anyhow::Result<DataKey> {
    Ok(store.put_unchecked(node))
}
