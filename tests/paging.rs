//! `PagableArc`: values that leave memory under a byte budget and come back when pinned, on
//! the in-memory store and on SQLite in every durability mode.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pagestore::{
    Durability, Error, InMemoryPagableStorage, MemoryNodeStore, NodeStore, PagableArc,
    PagableStorage, Shared, SqliteOptions, WithRuntime, page_in, page_out,
};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Blob {
    name: String,
    bytes: Vec<u8>,
}

fn blob(n: u32, size: usize) -> Blob {
    Blob {
        name: format!("blob {n}"),
        bytes: vec![n as u8; size],
    }
}

/// Waits until `done` holds; the deadline only turns "never" into a failure.
fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `check` on the in-memory store and on SQLite in every durability mode, each with
/// `budget`.
fn on_every_store(budget: usize, check: impl Fn(&dyn Fn() -> Box<dyn Store>)) {
    check(&|| {
        Box::new(Arc::new(
            InMemoryPagableStorage::new().memory_budget(budget),
        ))
    });
    for durability in [Durability::Cache, Durability::Durable, Durability::Sync] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        check(&move || {
            let storage = SqliteOptions::default()
                .durability(durability)
                .memory_budget(budget)
                .open(&path)
                .unwrap();
            Box::new(Arc::new(storage))
        });
        drop(dir);
    }
}

/// What the checks need of a storage, whatever its node store.
trait Store {
    fn dyn_storage(&self) -> Arc<dyn PagableStorage>;
    fn page_out_all(&self) -> pagestore::PageOutReport;
    fn stats(&self) -> pagestore::PagingStats;
}

impl<S: NodeStore> Store for Arc<WithRuntime<S>> {
    fn dyn_storage(&self) -> Arc<dyn PagableStorage> {
        self.clone()
    }
    fn page_out_all(&self) -> pagestore::PageOutReport {
        WithRuntime::page_out_unpinned(self).unwrap()
    }
    fn stats(&self) -> pagestore::PagingStats {
        self.paging_stats()
    }
}

#[test]
fn a_value_pages_out_when_unpinned_and_faults_back_in() {
    on_every_store(usize::MAX, |open| {
        let store = open();
        let storage = store.dyn_storage();
        let handle = PagableArc::new(blob(1, 10_000), &storage);
        assert!(handle.is_resident());
        assert_eq!(handle.key(), None, "not stored until paged out");
        let clone = handle.clone();
        assert!(PagableArc::ptr_eq(&handle, &clone));

        let pinned = handle.pin().unwrap();
        let report = store.page_out_all();
        assert_eq!(
            (report.evicted, report.pinned),
            (0, 1),
            "never evicted while pinned"
        );
        assert!(handle.is_resident());
        drop(pinned);

        let report = store.page_out_all();
        assert_eq!((report.evicted, report.serialized), (1, 1));
        assert!(
            !handle.is_resident() && !clone.is_resident(),
            "clones share one slot"
        );
        let key = handle.key().expect("stored when paged out");
        assert_eq!(clone.key(), Some(key));
        assert!(handle.try_pin().is_none(), "try_pin never does I/O");

        let back = clone.pin().unwrap();
        assert_eq!(*back, blob(1, 10_000));
        let again = handle.pin().unwrap();
        assert!(Arc::ptr_eq(&back, &again), "one value, one identity");
        drop((back, again));

        let report = store.page_out_all();
        assert_eq!(
            (report.evicted, report.serialized),
            (1, 0),
            "clean: it has a key"
        );
        assert_eq!(handle.key(), Some(key), "the key never changes");
        let _ = handle.pin().unwrap();

        let stats = store.stats();
        assert_eq!(
            stats.serializations, 1,
            "an unchanged value is serialized once"
        );
        assert_eq!(stats.faults, 2);
        assert_eq!(stats.evictions, 2);
        assert_eq!(stats.clean_evictions, 1);
    });
}

#[test]
fn over_the_budget_the_worker_evicts_unpinned_values_least_recently_pinned_first() {
    const VALUE: usize = 20_000;
    on_every_store(10 * VALUE, |open| {
        let store = open();
        let storage = store.dyn_storage();
        let handles: Vec<PagableArc<Blob>> = (0..40)
            .map(|n| PagableArc::new(blob(n, VALUE), &storage))
            .collect();
        let held = handles[0].pin().unwrap();
        eventually("resident bytes within the budget", || {
            store.stats().resident_bytes <= 10 * VALUE + VALUE
        });
        assert!(handles[0].is_resident(), "never evicted while pinned");
        drop(held);
        // Every value comes back, whatever was evicted.
        for (n, handle) in handles.iter().enumerate() {
            assert_eq!(*handle.pin().unwrap(), blob(n as u32, VALUE));
        }
        eventually("resident bytes within the budget again", || {
            store.stats().resident_bytes <= 10 * VALUE + VALUE
        });
        let stats = store.stats();
        assert_eq!(stats.eviction_failures, 0);
        assert!(
            stats.serializations <= 40,
            "at most once per value: {stats:?}"
        );
    });
}

#[derive(Serialize, Deserialize)]
struct Module {
    name: String,
    /// Eager: paged in with its parent.
    header: Shared<String>,
    /// Lazy: a key until pinned.
    body: PagableArc<Blob>,
}

#[test]
fn inside_a_graph_a_pagable_arc_is_a_lazy_child_written_by_key() {
    on_every_store(usize::MAX, |open| {
        let store = open();
        let storage = store.dyn_storage();
        let body = PagableArc::new(blob(7, 5000), &storage);
        let modules: Vec<Module> = (0..3)
            .map(|n| Module {
                name: format!("m{n}"),
                header: Shared::new(format!("header {n}")),
                body: body.clone(),
            })
            .collect();
        let key = page_out(&storage, &modules).unwrap();
        assert!(
            body.key().is_some(),
            "paged out with its parent: it now has a key"
        );
        assert_eq!(store.stats().serializations, 1);
        // Written by key the second time: the value is not serialized again.
        assert_eq!(page_out(&storage, &modules).unwrap(), key);
        assert_eq!(store.stats().serializations, 1);
        drop(modules);
        drop(body);

        let back: Vec<Module> = page_in(&storage, key).unwrap();
        assert_eq!(
            *back[2].header, "header 2",
            "Shared children come in eagerly"
        );
        assert!(
            !back[0].body.is_resident(),
            "PagableArc children stay out until pinned"
        );
        assert_eq!(*back[1].body.pin().unwrap(), blob(7, 5000));
        // A PagableArc whose value is not resident is written by key: no fault-in.
        assert_eq!(page_out(&storage, &back).unwrap(), key);
        assert!(!back[0].body.is_resident());
    });
}

#[test]
fn pinning_after_the_store_is_dropped_is_a_typed_error() {
    let storage = Arc::new(InMemoryPagableStorage::new());
    let handle = PagableArc::new(blob(3, 100), &storage);
    storage.page_out_unpinned().unwrap();
    drop(storage);
    let err = handle.pin().unwrap_err();
    assert!(
        matches!(
            err.downcast_ref::<Error>(),
            Some(Error::StoreClosed { key: Some(_), .. })
        ),
        "{err:#}"
    );
}

#[test]
fn dropping_every_handle_frees_the_value_and_its_count() {
    let storage = Arc::new(InMemoryPagableStorage::new());
    let value = Arc::new(blob(4, 1000));
    let handle = PagableArc::from_arc(Arc::clone(&value), &storage);
    let weak = Arc::downgrade(&value);
    drop(value);
    assert_eq!(storage.paging_stats().resident_values, 1);
    drop(handle);
    assert!(weak.upgrade().is_none(), "the value is freed");
    assert_eq!(storage.paging_stats().resident_values, 0);
    assert_eq!(storage.paging_stats().resident_bytes, 0);
}

#[test]
fn a_store_drop_stops_its_worker_and_frees_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..3 {
        let storage = Arc::new(
            SqliteOptions::default()
                .memory_budget(1000)
                .open(dir.path())
                .unwrap(),
        );
        let handles: Vec<_> = (0..20)
            .map(|n| PagableArc::new(blob(n, 2000), &storage))
            .collect();
        eventually("the worker evicted", || {
            storage.paging_stats().evictions > 0
        });
        drop(storage);
        // Reopens at once: nothing kept the store (or its directory lock) alive.
        let reopened = SqliteOptions::default().open(dir.path()).unwrap();
        drop(reopened);
        drop(handles);
        let _ = round;
    }
}

#[test]
fn nothing_leaks_across_stores() {
    let a = Arc::new(InMemoryPagableStorage::new());
    let b = Arc::new(InMemoryPagableStorage::new());
    let in_a = PagableArc::new(blob(5, 100), &a);
    let _in_b = PagableArc::new(blob(6, 100), &b);
    assert_eq!(a.paging_stats().resident_values, 1);
    assert_eq!(b.paging_stats().resident_values, 1);
    a.page_out_unpinned().unwrap();
    assert!(!in_a.is_resident());
    assert!(
        _in_b.is_resident(),
        "another store's page-out leaves it alone"
    );
    assert!(
        b.fetch_data_blocking(&in_a.key().unwrap()).is_err(),
        "stored in its own store only"
    );
}

#[typetag::serde]
trait Shape: Send + Sync {
    fn area(&self) -> f64;
}

#[derive(Serialize, Deserialize)]
struct Square(f64);

#[typetag::serde(name = "square")]
impl Shape for Square {
    fn area(&self) -> f64 {
        self.0 * self.0
    }
}

#[test]
fn a_trait_object_pages_out_and_back_through_typetag() {
    let storage = Arc::new(InMemoryPagableStorage::new());
    let shape: PagableArc<dyn Shape> =
        PagableArc::from_arc(Arc::new(Square(3.0)) as Arc<dyn Shape>, &storage);
    storage.page_out_unpinned().unwrap();
    assert!(!shape.is_resident());
    assert_eq!(shape.pin().unwrap().area(), 9.0);
}

#[test]
fn pin_async_faults_in_on_a_runtime() {
    let storage = Arc::new(InMemoryPagableStorage::new());
    let handle = PagableArc::new(blob(8, 3000), &storage);
    storage.page_out_unpinned().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let value = runtime.block_on(handle.pin_async()).unwrap();
    assert_eq!(*value, blob(8, 3000));
}

#[test]
fn a_failed_eviction_keeps_the_value_and_reports_it() {
    #[derive(Serialize, Deserialize)]
    struct Refuses(#[serde(serialize_with = "refuse")] u8);
    fn refuse<S: serde::Serializer>(_: &u8, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("this value cannot be serialized"))
    }
    let storage = Arc::new(InMemoryPagableStorage::new());
    let handle = PagableArc::new(Refuses(1), &storage);
    let report = storage.page_out_unpinned().unwrap();
    assert_eq!((report.evicted, report.failed), (0, 1));
    assert!(handle.is_resident());
    assert_eq!(handle.pin().unwrap().0, 1);
    assert_eq!(storage.paging_stats().eviction_failures, 1);
}

#[test]
fn a_memory_store_without_a_budget_keeps_everything_resident() {
    let storage = Arc::new(WithRuntime::attach(MemoryNodeStore::new()));
    let handles: Vec<_> = (0..50)
        .map(|n| PagableArc::new(blob(n, 10_000), &storage))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    assert!(handles.iter().all(PagableArc::is_resident));
    assert_eq!(storage.paging_stats().evictions, 0);
}

#[test]
fn a_key_gives_a_shared_or_a_pagable_arc_not_only_a_value() {
    let storage = Arc::new(InMemoryPagableStorage::new());
    let handle = PagableArc::new(blob(9, 500), &storage);
    storage.page_out_unpinned().unwrap();
    let key = handle.key().unwrap();
    let pinned = handle.pin().unwrap();
    // Through the arc cache: the value alive in memory, not a copy.
    let shared: Shared<Blob> = pagestore::page_in_shared(&storage, key).unwrap();
    assert!(Arc::ptr_eq(shared.as_arc(), &pinned));
    let lazy: PagableArc<Blob> = PagableArc::from_key(key, &storage);
    assert!(!lazy.is_resident());
    assert!(Arc::ptr_eq(&lazy.pin().unwrap(), &pinned));
    let missing = pagestore::PagableData {
        data: b"?".to_vec(),
        arcs: vec![],
    }
    .compute_key();
    let err = pagestore::page_in_shared::<Blob>(&storage, missing).unwrap_err();
    assert!(Error::is_not_found(&err), "{err:#}");
}

/// Was a defect: two handles with one key (here: one child referenced twice in a graph, paged
/// in as two handles) fault in one shared `Arc` through the arc cache, and eviction counted
/// each slot's own reference as a pin of the other, so neither was ever evicted (and both
/// were counted as resident forever).
#[test]
fn two_handles_with_one_key_do_not_pin_each_other() {
    on_every_store(usize::MAX, |open| {
        let store = open();
        let storage = store.dyn_storage();
        let body = PagableArc::new(blob(9, 5000), &storage);
        let key = page_out(&storage, &vec![body.clone(), body]).unwrap();
        let back: Vec<PagableArc<Blob>> = page_in(&storage, key).unwrap();
        let separate = PagableArc::<Blob>::from_key(back[0].key().unwrap(), &storage);
        let handles = [&back[0], &back[1], &separate];
        assert!(!PagableArc::ptr_eq(&back[0], &back[1]), "two slots");

        let pins: Vec<Arc<Blob>> = handles.iter().map(|h| h.pin().unwrap()).collect();
        assert!(
            pins.iter().all(|p| Arc::ptr_eq(p, &pins[0])),
            "one shared value"
        );
        let held = pins[1].clone();
        drop(pins);
        let report = store.page_out_all();
        assert_eq!(
            (report.evicted, report.pinned),
            (0, 3),
            "a pin through one handle pins the value for all"
        );
        drop(held);

        let report = store.page_out_all();
        assert_eq!((report.evicted, report.pinned), (3, 0), "{report:?}");
        assert!(handles.iter().all(|h| !h.is_resident()));
        let stats = store.stats();
        assert_eq!((stats.resident_values, stats.resident_bytes), (0, 0));
        assert_eq!(*separate.pin().unwrap(), blob(9, 5000));
    });
}

#[test]
fn under_a_budget_handles_with_one_key_are_evicted_too() {
    let storage = Arc::new(InMemoryPagableStorage::new().memory_budget(10_000));
    let keys: Vec<_> = (0..20)
        .map(|n| page_out(&storage, &blob(n, 5000)).unwrap())
        .collect();
    // Two handles per key, both pinned once: every value is shared by two slots.
    let handles: Vec<PagableArc<Blob>> = keys
        .iter()
        .flat_map(|&key| {
            [
                PagableArc::from_key(key, &storage),
                PagableArc::from_key(key, &storage),
            ]
        })
        .collect();
    for handle in &handles {
        drop(handle.pin().unwrap());
    }
    eventually("resident bytes within the budget", || {
        storage.paging_stats().resident_bytes <= 10_000 + 5100
    });
    for (n, pair) in handles.chunks(2).enumerate() {
        assert_eq!(*pair[1].pin().unwrap(), blob(n as u32, 5000));
    }
}

#[test]
fn handles_are_send_and_sync_when_the_value_is() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<PagableArc<Blob>>();
    send_sync::<PagableArc<dyn Shape>>();
    send_sync::<PagableArc<[u8]>>();
}

/// Was a defect: a handle of storage A written into storage B took B's key as its own, and A
/// then dropped its value without storing it; a handle with A's key wrote that key into B.
#[test]
fn a_handle_written_into_another_storage_keeps_its_own_key_and_value() {
    let a = Arc::new(InMemoryPagableStorage::new());
    let b = Arc::new(InMemoryPagableStorage::new());
    let fresh = PagableArc::new(blob(21, 300), &a);
    let in_b = page_out(&b, &vec![fresh.clone()]).unwrap();
    assert_eq!(fresh.key(), None, "B's key is not the handle's");
    let report = a.page_out_unpinned().unwrap();
    assert_eq!(
        (report.evicted, report.serialized),
        (1, 1),
        "stored in A before dropped"
    );
    assert_eq!(*fresh.pin().unwrap(), blob(21, 300));

    let keyed = PagableArc::new(blob(22, 300), &a);
    a.page_out_unpinned().unwrap();
    assert!(!keyed.is_resident());
    let in_b2 = page_out(&b, &vec![keyed.clone()]).unwrap();
    for key in [in_b, in_b2] {
        let back: Vec<PagableArc<Blob>> = page_in(&b, key).unwrap();
        let value = back[0].pin().expect("B holds the value, not a key of A's");
        assert!(*value == blob(21, 300) || *value == blob(22, 300));
    }
}

/// Handles that live only while a `Serialize` impl runs: each is written under its own key,
/// even when a later one reuses a freed one's address.
#[test]
fn temporary_handles_in_one_page_out_keep_their_own_keys() {
    struct Temporaries {
        keys: Vec<pagestore::DataKey>,
        storage: Arc<dyn PagableStorage>,
    }
    impl Serialize for Temporaries {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeSeq;
            let mut seq = serializer.serialize_seq(Some(self.keys.len()))?;
            for key in &self.keys {
                // Created and dropped at once: the next one may get the same address.
                seq.serialize_element(&PagableArc::<Blob>::from_key(*key, &self.storage))?;
            }
            seq.end()
        }
    }
    let storage: Arc<dyn PagableStorage> = Arc::new(InMemoryPagableStorage::new());
    let keys: Vec<_> = (0..8)
        .map(|n| page_out(&storage, &blob(30 + n, 50)).unwrap())
        .collect();
    let root = page_out(
        &storage,
        &Temporaries {
            keys: keys.clone(),
            storage: storage.clone(),
        },
    )
    .unwrap();
    let back: Vec<PagableArc<Blob>> = page_in(&storage, root).unwrap();
    let got: Vec<_> = back.iter().map(|handle| handle.key().unwrap()).collect();
    assert_eq!(got, keys);
}
