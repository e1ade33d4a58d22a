//! Concurrency stress: writers, readers, a flusher and threads that drop `Arc`s hammer one
//! store over 200,000 operations (`PAGESTORE_STRESS_OPS` changes it), asserting throughout
//!
//! - read-your-writes: a node fetches back byte-for-byte the moment `store_data` returns,
//!   from the writer and from every other thread, flushed or not;
//! - arc identity: while any thread holds the `Arc` deserialized for a key, everyone who
//!   resolves that key through the arc cache gets that very `Arc`;
//!
//! and at the end that a reopened store reads every node back and `verify()` is clean. Runs on
//! the in-memory backend and on SQLite in `Cache` (the default) and `Durable` mode.
//! Writers overlap on purpose (a third of their nodes come from a shared pool), so the same
//! content is stored concurrently. The seed is printed (`PAGESTORE_STRESS_SEED` replays the
//! workloads; thread interleavings still vary).

mod common;

use std::any::TypeId;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use common::{Rng, count_from_env, seed_from_env};
use dashmap::DashMap;
use either::Either;
use pagestore::downcast_arc;
use pagestore::{
    DataKey, Durability, InMemoryPagableStorage, PagableData, PagableStorage, SqliteOptions,
};

/// The value the arc cache holds: what a deserializer would build from a node.
#[derive(Debug)]
struct Value {
    key: DataKey,
    data_len: usize,
}

/// Everything the threads share.
struct Shared {
    storage: Arc<dyn PagableStorage>,
    /// The model: every node some `store_data` returned for.
    model: DashMap<DataKey, Arc<PagableData>>,
    /// Keys in the model, for picking one at random.
    published: RwLock<Vec<DataKey>>,
    /// Values some thread holds; droppers remove (and so drop) them.
    pinned: Mutex<HashMap<DataKey, Arc<Value>>>,
    ops: AtomicU64,
    target: u64,
    resolves: AtomicU64,
    identity_checks: AtomicU64,
    flushes: AtomicU64,
}

impl Shared {
    /// Whether the budget has operations left. Only real operations count (`done`), so
    /// threads that find nothing to do cannot use the budget up by spinning.
    fn more(&self) -> bool {
        self.ops.load(Ordering::Relaxed) < self.target
    }

    /// Counts one operation performed.
    fn done(&self) {
        self.ops.fetch_add(1, Ordering::Relaxed);
    }

    fn random_published(&self, rng: &mut Rng) -> Option<DataKey> {
        let published = self.published.read().expect("published lock");
        (!published.is_empty()).then(|| published[rng.below(published.len() as u64) as usize])
    }

    /// Resolves `key` to its shared `Arc<Value>` the way a graph deserializer does.
    fn resolve(&self, key: DataKey) -> Arc<Value> {
        let type_id = TypeId::of::<Value>();
        let resolved = match self
            .storage
            .fetch_arc_or_data_blocking(&type_id, &key)
            .unwrap_or_else(|e| panic!("resolve {key}: {e:#}"))
        {
            Either::Left(cached) => downcast_arc::<Value>(&*cached).expect("cached type"),
            Either::Right(data) => {
                self.check_node(key, &data);
                let fresh = Arc::new(Value {
                    key,
                    data_len: data.data.len(),
                });
                match self
                    .storage
                    .on_arc_deserialized(type_id, key, Box::new(fresh.clone()))
                {
                    None => fresh,
                    Some(winner) => downcast_arc::<Value>(&*winner).expect("winner type"),
                }
            }
        };
        assert_eq!(
            resolved.key, key,
            "the arc cache returned another key's value"
        );
        assert_eq!(
            resolved.data_len,
            self.model.get(&key).expect("model").data.len()
        );
        self.resolves.fetch_add(1, Ordering::Relaxed);
        resolved
    }

    fn check_node(&self, key: DataKey, got: &PagableData) {
        let want = self.model.get(&key).expect("key in model");
        assert!(
            *got == **want,
            "fetch of {key} returned other bytes than stored"
        );
    }
}

fn writer(shared: &Shared, seed: u64, start: &std::sync::Barrier) {
    let mut rng = Rng::new(seed);
    start.wait();
    let mut own: Vec<DataKey> = Vec::new();
    let mut i = 0u64;
    while shared.more() {
        i += 1;
        // A third from a pool every writer draws from: concurrent stores of equal content.
        let content_seed = if rng.percent(33) {
            rng.below(2_000)
        } else {
            seed ^ i.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        let mut content = Rng::new(content_seed);
        let mut data = vec![0u8; content.below(600) as usize];
        content.fill(&mut data);
        let arcs = if !own.is_empty() && rng.percent(30) {
            (0..rng.range(1, 3))
                .map(|_| own[rng.below(own.len() as u64) as usize])
                .collect()
        } else {
            Vec::new()
        };
        let node = PagableData { data, arcs };
        let key = shared.storage.store_data(node.clone()).expect("store_data");
        assert_eq!(key, node.compute_key());
        let node = Arc::new(node);
        shared.model.entry(key).or_insert_with(|| node.clone());
        // Read-your-writes, before any flush.
        let got = shared
            .storage
            .fetch_data_blocking(&key)
            .unwrap_or_else(|e| panic!("read-your-writes of {key}: {e:#}"));
        assert!(
            *got == *node,
            "read-your-writes of {key} returned other bytes"
        );
        shared.published.write().expect("published lock").push(key);
        own.push(key);
        shared.done(); // the store
        shared.done(); // the fetch
    }
}

fn reader(shared: &Shared, seed: u64, start: &std::sync::Barrier) {
    let mut rng = Rng::new(seed);
    start.wait();
    while shared.more() {
        let Some(key) = shared.random_published(&mut rng) else {
            std::thread::yield_now();
            continue;
        };
        if rng.percent(50) {
            let got = shared
                .storage
                .fetch_data_blocking(&key)
                .unwrap_or_else(|e| panic!("fetch {key} from another thread: {e:#}"));
            shared.check_node(key, &got);
            shared.done();
            continue;
        }
        // Hold what someone pinned (keeping it alive), then resolve: must be the same Arc.
        let held = shared
            .pinned
            .lock()
            .expect("pinned lock")
            .get(&key)
            .cloned();
        let resolved = shared.resolve(key);
        shared.done();
        if rng.percent(25) {
            // Holding `resolved` keeps it alive, so resolving again must give it back.
            let again = shared.resolve(key);
            shared.done();
            assert!(
                Arc::ptr_eq(&resolved, &again),
                "arc identity broken for {key}: resolved twice while alive, got two values"
            );
            shared.identity_checks.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(held) = held {
            assert!(
                Arc::ptr_eq(&held, &resolved),
                "arc identity broken for {key}: a live value exists but another was returned"
            );
            shared.identity_checks.fetch_add(1, Ordering::Relaxed);
        } else if rng.percent(50) {
            let mut pinned = shared.pinned.lock().expect("pinned lock");
            let entry = pinned.entry(key).or_insert_with(|| resolved.clone());
            // Whoever pinned first, the cache must have handed out the same value.
            assert!(Arc::ptr_eq(entry, &resolved), "two live values for {key}");
        }
    }
}

fn dropper(shared: &Shared, seed: u64, start: &std::sync::Barrier) {
    let mut rng = Rng::new(seed);
    start.wait();
    while shared.more() {
        let victim = {
            let mut pinned = shared.pinned.lock().expect("pinned lock");
            let key = pinned
                .keys()
                .nth(rng.below(pinned.len() as u64 + 1) as usize)
                .copied();
            key.and_then(|k| pinned.remove(&k))
        };
        match victim {
            Some(value) if rng.percent(20) => shared.storage.schedule_for_paging(Box::new(value)),
            Some(value) => drop(value),
            None => {
                std::thread::yield_now();
                continue;
            }
        }
        shared.done();
        if rng.percent(2) {
            shared.storage.release_memory();
            shared.done();
        }
    }
}

fn flusher(shared: &Shared, start: &std::sync::Barrier) {
    start.wait();
    while shared.more() {
        shared.storage.flush().expect("flush");
        shared.flushes.fetch_add(1, Ordering::Relaxed);
        shared.done();
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// Runs the stress on `storage` and returns the model of what was stored.
fn stress(storage: Arc<dyn PagableStorage>, label: &str) -> DashMap<DataKey, Arc<PagableData>> {
    let ops = count_from_env("PAGESTORE_STRESS_OPS", 200_000);
    let seed = seed_from_env("PAGESTORE_STRESS_SEED");
    eprintln!("stress {label}: {ops} operations, seed {seed:#x} (PAGESTORE_STRESS_SEED)");
    let shared = Shared {
        storage,
        model: DashMap::new(),
        published: RwLock::new(Vec::new()),
        pinned: Mutex::new(HashMap::new()),
        ops: AtomicU64::new(0),
        target: ops,
        resolves: AtomicU64::new(0),
        identity_checks: AtomicU64::new(0),
        flushes: AtomicU64::new(0),
    };
    let started = std::time::Instant::now();
    // Every thread starts at once, so no role runs alone while the others are being spawned.
    let start = std::sync::Barrier::new(9);
    std::thread::scope(|scope| {
        let (shared, start) = (&shared, &start);
        for t in 0..3u64 {
            scope.spawn(move || writer(shared, seed ^ (0x100 + t), start));
        }
        for t in 0..3u64 {
            scope.spawn(move || reader(shared, seed ^ (0x200 + t), start));
        }
        for t in 0..2u64 {
            scope.spawn(move || dropper(shared, seed ^ (0x300 + t), start));
        }
        scope.spawn(move || flusher(shared, start));
    });
    shared.storage.flush().expect("final flush");
    let stats = (
        shared.model.len(),
        shared.resolves.load(Ordering::Relaxed),
        shared.identity_checks.load(Ordering::Relaxed),
        shared.flushes.load(Ordering::Relaxed),
    );
    eprintln!(
        "stress {label}: {} distinct nodes, {} arc resolves, {} identity checks, {} flushes in {:.1} s",
        stats.0,
        stats.1,
        stats.2,
        stats.3,
        started.elapsed().as_secs_f64()
    );
    // Loose floors, far below what a full run does, so a scheduling quirk never fails them but
    // a thread that silently stopped working does. (Tiny runs are all start-up: no floors.)
    if ops >= 50_000 {
        assert!(
            stats.0 as u64 > ops / 100,
            "the writers barely ran: {}",
            stats.0
        );
        assert!(stats.1 > ops / 50, "too few arc resolves: {}", stats.1);
        assert!(stats.2 > ops / 1000, "too few identity checks: {}", stats.2);
    }
    shared.model
}

#[test]
fn stress_in_memory() {
    let storage = Arc::new(InMemoryPagableStorage::new());
    let model = stress(storage.clone(), "memory");
    assert_eq!(storage.len(), model.len(), "duplicates or losses");
}

/// Runs the stress on a SQLite store opened in `durability`, then closes it, reopens it and
/// checks that every node reads back and `verify()` is clean.
fn stress_sqlite_then_reopen_and_verify(durability: Durability) {
    let dir = tempfile::tempdir().expect("tempdir");
    let open = || {
        SqliteOptions::default()
            .durability(durability)
            .open(dir.path())
            .expect("open the store")
    };
    let storage = Arc::new(open());
    let model = stress(storage.clone(), &format!("sqlite {durability:?}"));
    drop(storage);
    let storage = open();
    assert!(
        storage.open_report().is_clean(),
        "{:?}",
        storage.open_report()
    );
    for entry in model.iter() {
        let got = storage
            .fetch_data_blocking(entry.key())
            .unwrap_or_else(|e| panic!("after reopen, {}: {e:#}", entry.key()));
        assert!(
            *got == **entry.value(),
            "after reopen, {} differs",
            entry.key()
        );
    }
    let report = storage.verify().expect("verify");
    assert!(report.is_ok(), "verify after the stress: {report:?}");
    assert_eq!(report.records, model.len() as u64, "duplicates or losses");
}

#[test]
fn stress_sqlite_default_cache_mode() {
    stress_sqlite_then_reopen_and_verify(Durability::Cache);
}

#[test]
fn stress_sqlite_durable() {
    stress_sqlite_then_reopen_and_verify(Durability::Durable);
}
