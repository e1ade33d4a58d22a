//! The contract every `PagableStorage` backend keeps (DESIGN.md §5), as one generic suite.
//!
//! A backend's test file implements [`Backend`] and calls [`run_all`]. Each check states the
//! sentence of the trait's docs it proves.

#![allow(dead_code)] // each test binary uses a different part of the shared helpers

use std::any::TypeId;
use std::collections::HashMap;
use std::sync::{Arc, Barrier, mpsc};

use either::Either;
use pagestore::erase::downcast_arc;
use pagestore::{DataKey, Error, PagableData, PagableStorage};

/// How the suite opens, reopens and damages one kind of backend.
pub trait Backend {
    /// The storage under test.
    type Storage: PagableStorage;

    /// A fresh, empty store (a new location each call).
    fn open(&self) -> Self::Storage;

    /// Closes `storage` and opens a new instance on the same location; `None` for backends
    /// that persist nothing.
    fn reopen(&self, storage: Self::Storage) -> Option<Self::Storage>;

    /// The number of distinct nodes stored (after a flush).
    fn count(&self, storage: &Self::Storage) -> u64;

    /// Damages the committed record of `key` so that its content no longer matches its key.
    /// Returns false for backends whose records cannot be damaged from outside.
    fn corrupt(&self, storage: &Self::Storage, key: DataKey) -> bool;
}

/// Runs every check of the suite against `backend`.
pub fn run_all<B: Backend>(backend: &B) {
    key_is_compute_key_and_duplicates_are_stored_once(backend);
    read_your_writes_from_every_thread_before_flush(backend);
    reopen_after_flush_reads_everything(backend);
    missing_key_is_not_found_naming_the_key(backend);
    corrupt_record_is_an_error_naming_the_key(backend);
    arc_cache_first_wins_preserves_identity_and_is_weak(backend);
    concurrent_overlapping_stores_and_fetches_lose_nothing(backend);
    racing_stores_of_one_content_are_each_readable_at_once(backend);
    async_fetch_matches_blocking_fetch(backend);
    paging_schedule_and_release_memory_keep_data(backend);
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

/// Stores a small DAG (each node points to up to 3 earlier ones) and returns the model of
/// what was stored: key → node.
pub fn store_dag<S: PagableStorage + ?Sized>(
    storage: &S,
    seed: u64,
    nodes: usize,
) -> HashMap<DataKey, PagableData> {
    let mut model = HashMap::new();
    let mut keys: Vec<DataKey> = Vec::new();
    for i in 0..nodes {
        let n = i as u64 + seed * 1_000_003;
        let arcs = (0..(n % 4) as usize)
            .filter(|_| !keys.is_empty())
            .map(|j| keys[(n as usize * 31 + j * 7) % keys.len()])
            .collect();
        let data = node(n, (n % 300) as usize, arcs);
        let key = storage.store_data(data.clone()).expect("store_data");
        assert_eq!(key, data.compute_key(), "store_data returns compute_key()");
        keys.push(key);
        model.insert(key, data);
    }
    model
}

/// Fetches every key of `model` and checks the bytes.
pub fn assert_reads_back<S: PagableStorage + ?Sized>(
    storage: &S,
    model: &HashMap<DataKey, PagableData>,
) {
    for (key, expected) in model {
        let got = storage
            .fetch_data_blocking(key)
            .unwrap_or_else(|e| panic!("fetch {key}: {e:#}"));
        assert_eq!(&*got, expected, "node {key} reads back exactly");
    }
}

/// §5.1: the key is `compute_key`; storing the same content twice gives one entry.
pub fn key_is_compute_key_and_duplicates_are_stored_once<B: Backend>(backend: &B) {
    let storage = backend.open();
    let model = store_dag(&storage, 1, 200);
    for data in model.values() {
        assert_eq!(
            storage.store_data(data.clone()).unwrap(),
            data.compute_key()
        );
    }
    storage.flush().unwrap();
    assert_eq!(
        backend.count(&storage),
        model.len() as u64,
        "duplicates are stored once"
    );
    assert_reads_back(&storage, &model);
}

/// §5.2: once `store_data` returned, every thread finds the key, before any flush.
pub fn read_your_writes_from_every_thread_before_flush<B: Backend>(backend: &B) {
    let storage = backend.open();
    let (tx, rx) = mpsc::channel::<(DataKey, PagableData)>();
    std::thread::scope(|s| {
        let storage = &storage;
        s.spawn(move || {
            for i in 0..500 {
                let data = node(i, (i as usize * 37) % 2000, vec![]);
                let key = storage.store_data(data.clone()).unwrap();
                tx.send((key, data)).unwrap();
            }
        });
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (fwd_tx, fwd_rx) = mpsc::channel::<(DataKey, PagableData)>();
                let handle = s.spawn(move || {
                    for (key, data) in fwd_rx {
                        let got = storage.fetch_data_blocking(&key).unwrap_or_else(|e| {
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

/// §5.3: after `flush`, a fresh instance on the same location reads everything.
pub fn reopen_after_flush_reads_everything<B: Backend>(backend: &B) {
    let storage = backend.open();
    let model = store_dag(&storage, 3, 1000);
    storage.flush().unwrap();
    let Some(reopened) = backend.reopen(storage) else {
        return;
    };
    assert_reads_back(&reopened, &model);
    assert_eq!(backend.count(&reopened), model.len() as u64);
    // And it keeps working.
    let more = store_dag(&reopened, 4, 50);
    reopened.flush().unwrap();
    assert_reads_back(&reopened, &more);
}

/// §5.4: a missing key is `NotFound` naming the key, through every fetch path.
pub fn missing_key_is_not_found_naming_the_key<B: Backend>(backend: &B) {
    let storage = backend.open();
    store_dag(&storage, 5, 10);
    let missing = node(u64::MAX, 10, vec![]).compute_key();
    let hex = missing.to_string();

    let err = storage.fetch_data_blocking(&missing).unwrap_err();
    assert!(
        matches!(err.downcast_ref::<Error>(), Some(Error::NotFound(k)) if *k == missing),
        "{err:#}"
    );
    assert!(format!("{err:#}").contains(&hex), "{err:#}");

    let err = storage
        .fetch_arc_or_data_blocking(&TypeId::of::<u8>(), &missing)
        .unwrap_err();
    assert!(Error::is_not_found(&err), "{err:#}");

    storage.flush().unwrap();
    let err = storage.fetch_data_blocking(&missing).unwrap_err();
    assert!(Error::is_not_found(&err), "after flush too: {err:#}");
}

/// §5.4: a damaged record is an error naming the key, never the damaged bytes.
pub fn corrupt_record_is_an_error_naming_the_key<B: Backend>(backend: &B) {
    let storage = backend.open();
    let model = store_dag(&storage, 6, 20);
    storage.flush().unwrap();
    let (&victim, _) = model
        .iter()
        .find(|(_, data)| !data.data.is_empty())
        .unwrap();
    if !backend.corrupt(&storage, victim) {
        return;
    }
    let err = storage.fetch_data_blocking(&victim).unwrap_err();
    assert!(Error::is_corrupt(&err), "expected Corrupt, got {err:#}");
    assert!(format!("{err:#}").contains(&victim.to_string()), "{err:#}");
    // Other records are unaffected.
    for (key, data) in model.iter().filter(|(k, _)| **k != victim) {
        assert_eq!(&*storage.fetch_data_blocking(key).unwrap(), data);
    }
}

/// §5.5: the arc cache keeps the first value, hands back the same `Arc`, and holds it weakly.
pub fn arc_cache_first_wins_preserves_identity_and_is_weak<B: Backend>(backend: &B) {
    let storage = backend.open();
    let key = storage.store_data(node(7, 32, vec![])).unwrap();
    let type_id = TypeId::of::<String>();

    // Nothing cached yet: the data comes back.
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
    // Another view of the same key is a separate entry.
    assert!(matches!(
        storage
            .fetch_arc_or_data_blocking(&TypeId::of::<Vec<u8>>(), &key)
            .unwrap(),
        Either::Right(_)
    ));

    // Weak: dropping every strong handle frees the value.
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
}

/// §5.6: many threads storing and fetching overlapping keys: nothing lost, no deadlock.
pub fn concurrent_overlapping_stores_and_fetches_lose_nothing<B: Backend>(backend: &B) {
    let storage = backend.open();
    const THREADS: u64 = 6;
    const PER_THREAD: u64 = 600;
    let barrier = Barrier::new(THREADS as usize);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (storage, barrier) = (&storage, &barrier);
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
                    let key = storage.store_data(data.clone()).unwrap();
                    assert_eq!(*storage.fetch_data_blocking(&key).unwrap(), data);
                    if i % 100 == 99 && t == 0 {
                        storage.flush().unwrap();
                    }
                    // Peek at what another thread stored.
                    let other = node(i - i % 2, 1 + ((i - i % 2) % 500) as usize, vec![]);
                    if let Ok(got) = storage.fetch_data_blocking(&other.compute_key()) {
                        assert_eq!(*got, other);
                    }
                }
            });
        }
    });
    storage.flush().unwrap();
    let expected = PER_THREAD / 2 + THREADS * PER_THREAD / 2;
    assert_eq!(backend.count(&storage), expected);
}

/// §5.2 under a race: threads storing the *same* content at the same instant each read it
/// back at once (a store that returns because another thread is storing that content must
/// not return before the content is readable).
pub fn racing_stores_of_one_content_are_each_readable_at_once<B: Backend>(backend: &B) {
    let storage = backend.open();
    const THREADS: usize = 4;
    const ROUNDS: u64 = 3000;
    let barrier = Barrier::new(THREADS);
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            let (storage, barrier) = (&storage, &barrier);
            s.spawn(move || {
                for round in 0..ROUNDS {
                    let data = node(round, 8 + (round % 64) as usize, vec![]);
                    barrier.wait();
                    let key = storage.store_data(data.clone()).unwrap();
                    let got = storage.fetch_data_blocking(&key).unwrap_or_else(|e| {
                        panic!("round {round}: {key} not readable right after store_data: {e:#}")
                    });
                    assert_eq!(*got, data);
                }
            });
        }
    });
}

/// `fetch_data` (async) returns what `fetch_data_blocking` returns.
pub fn async_fetch_matches_blocking_fetch<B: Backend>(backend: &B) {
    let storage = Arc::new(backend.open());
    let model = store_dag(&*storage, 8, 50);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        for (key, data) in &model {
            assert_eq!(&*storage.fetch_data(key).await.unwrap(), data);
        }
        storage.flush().unwrap();
        let missing = node(u64::MAX - 1, 3, vec![]).compute_key();
        assert!(Error::is_not_found(
            &storage.fetch_data(&missing).await.unwrap_err()
        ));
        // Many concurrent fetches on the runtime.
        let tasks: Vec<_> = model
            .keys()
            .map(|key| {
                let (storage, key) = (Arc::clone(&storage), *key);
                tokio::spawn(async move { storage.fetch_data(&key).await.map(|d| (key, d)) })
            })
            .collect();
        for task in tasks {
            let (key, data) = task.await.unwrap().unwrap();
            assert_eq!(&*data, &model[&key]);
        }
    });
}

/// `schedule_for_paging` never panics; `release_memory` drops caches, not data or live values.
pub fn paging_schedule_and_release_memory_keep_data<B: Backend>(backend: &B) {
    let storage = backend.open();
    let model = store_dag(&storage, 9, 100);
    let live = Arc::new(String::from("live"));
    let key = *model.keys().next().unwrap();
    storage.on_arc_deserialized(TypeId::of::<String>(), key, Box::new(live.clone()));
    for _ in 0..10 {
        storage.schedule_for_paging(Box::new(Arc::new(5u32)));
        storage.schedule_for_paging(Box::new(live.clone()));
    }
    storage.release_memory();
    assert_reads_back(&storage, &model);
    let cached = storage
        .arc_cache()
        .get_typed::<String>(key)
        .expect("live values stay cached");
    assert!(Arc::ptr_eq(&cached, &live));
}

/// The lines of `tests/fixtures/pagable-0.3.3/manifest.jsonl` (a copy of `shared/fixtures/`): what the reference stored.
pub fn reference_fixture() -> (std::path::PathBuf, Vec<(DataKey, PagableData)>) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pagable-0.3.3");
    let manifest = std::fs::read_to_string(dir.join("manifest.jsonl"))
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.join("manifest.jsonl").display()));
    let entries = manifest
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            let key: DataKey = value["key"].as_str().unwrap().parse().unwrap();
            let data = hex_bytes(value["data"].as_str().unwrap());
            let arcs = value["arcs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k.as_str().unwrap().parse().unwrap())
                .collect();
            (key, PagableData { data, arcs })
        })
        .collect();
    (dir, entries)
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}
