//! Garbage collection through the runtime (`WithRuntime::gc`): what the process still needs
//! is kept, collections racing page-outs leave every root complete, random DAGs lose exactly
//! their unreachable nodes, and the SQLite file gives the space back.

use std::any::TypeId;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pagestore::testing::{node, reachable};
use pagestore::{
    DataKey, Durability, Error, GcOptions, InMemoryPagableStorage, MemoryNodeStore, NodeStore,
    PagableArc, PagableData, PagableStorage, Shared, SqliteOptions, WithRuntime, page_in, page_out,
};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
struct Item {
    name: String,
    parts: Vec<Shared<Item>>,
}

fn leaf(name: &str) -> Shared<Item> {
    Shared::new(Item {
        name: name.into(),
        parts: vec![],
    })
}

/// Runs `check` on the in-memory runtime and on SQLite in every durability mode, each with
/// `grace` for the roots `page_out` returns.
fn on_every_store(grace: Duration, check: impl Fn(&str, Arc<dyn Collecting>)) {
    check(
        "memory",
        Arc::new(InMemoryPagableStorage::new().gc_grace(grace)),
    );
    for durability in [Durability::Cache, Durability::Durable, Durability::Sync] {
        let dir = tempfile::tempdir().unwrap();
        let storage = SqliteOptions::default()
            .durability(durability)
            .gc_grace(grace)
            .open(dir.path())
            .unwrap();
        check(&format!("{durability:?}"), Arc::new(storage));
    }
}

/// A storage with a runtime, whatever its node store.
trait Collecting: PagableStorage {
    fn gc(&self) -> anyhow::Result<pagestore::GcReport>;
    fn contains(&self, key: &DataKey) -> bool;
    fn set_root(&self, name: &str, key: DataKey);
    fn root(&self, name: &str) -> Option<DataKey>;
    fn as_dyn(self: Arc<Self>) -> Arc<dyn PagableStorage>;
    fn page_out_unpinned(&self);
    fn stats_records(&self) -> u64;
}

impl<S: NodeStore> Collecting for WithRuntime<S> {
    fn gc(&self) -> anyhow::Result<pagestore::GcReport> {
        WithRuntime::gc(self)
    }
    fn contains(&self, key: &DataKey) -> bool {
        self.node_store().contains(key).unwrap()
    }
    fn set_root(&self, name: &str, key: DataKey) {
        self.node_store().set_root(name, key).unwrap();
    }
    fn root(&self, name: &str) -> Option<DataKey> {
        self.node_store().root(name).unwrap()
    }
    fn as_dyn(self: Arc<Self>) -> Arc<dyn PagableStorage> {
        self
    }
    fn page_out_unpinned(&self) {
        WithRuntime::page_out_unpinned(self).unwrap();
    }
    fn stats_records(&self) -> u64 {
        let stats = self.stats().unwrap().store.unwrap();
        stats.records + stats.pending_records
    }
}

/// The number of nodes stored.
fn count(storage: &dyn Collecting) -> u64 {
    storage.stats_records()
}

#[test]
fn live_values_and_paged_out_handles_are_kept_until_dropped() {
    // No grace: only what the process holds is kept.
    on_every_store(Duration::ZERO, |name, storage| {
        let dyn_storage = storage.clone().as_dyn();
        // A graph nothing roots, held in memory as paged in: its shared parts are live.
        let key = page_out(
            &dyn_storage,
            &Item {
                name: "held".into(),
                parts: vec![leaf("a"), leaf("b")],
            },
        )
        .unwrap();
        let held: Item = page_in(&dyn_storage, key).unwrap();
        // A value paged out through a handle: only its key is in memory.
        let handle = PagableArc::new(
            Item {
                name: "paged".into(),
                parts: vec![leaf("c")],
            },
            &dyn_storage,
        );
        storage.page_out_unpinned();
        assert!(!handle.is_resident(), "{name}");
        // A shared value the process paged out and still holds.
        let remembered = leaf("remembered");
        page_out(&dyn_storage, &remembered).unwrap();
        page_out(&dyn_storage, &leaf("garbage")).unwrap();
        dyn_storage.flush().unwrap();
        let before = count(&*storage);

        let report = storage.gc().unwrap();
        assert!(report.deleted > 0, "{name}: {report:?}");
        assert_eq!(report.kept + report.deleted, before, "{name}: {report:?}");
        // What the process holds still pages: a graph re-paged out names only stored
        // children (the runtime writes `a`, `b` and `remembered` by their keys).
        let again = page_out(
            &dyn_storage,
            &Item {
                name: "again".into(),
                parts: [held.parts.clone(), vec![remembered.clone()]].concat(),
            },
        )
        .unwrap();
        dyn_storage.flush().unwrap();
        let back: Item = page_in(&dyn_storage, again).unwrap();
        assert_eq!(back.parts.len(), 3, "{name}");
        let pinned = handle.pin().unwrap();
        assert_eq!(
            pinned.parts[0].name, "c",
            "{name}: a paged-out handle comes back whole"
        );
        drop((pinned, back));

        drop((held, handle, remembered));
        storage.release_memory();
        storage.gc().unwrap();
        assert_eq!(count(&*storage), 0, "{name}: nothing is held any more");
        assert!(!storage.contains(&key), "{name}");
    });
}

/// A key the runtime is told about after a collection deleted it (a page-out that stored it
/// just before a collection started and finished) is not remembered: the value is stored
/// again by its next page-out instead of being written by a key that is gone.
#[test]
fn a_key_collected_between_its_store_and_its_memo_is_forgotten() {
    let storage = Arc::new(InMemoryPagableStorage::new());
    let value: Arc<String> = Arc::new("value".into());
    let data = PagableData {
        data: b"value".to_vec(),
        arcs: vec![],
    };
    let key = storage.store_data(data.clone()).unwrap();
    storage.gc().unwrap();
    assert!(
        !storage.node_store().contains(&key).unwrap(),
        "nothing held it: collected"
    );
    storage.remember_key(TypeId::of::<String>(), key, &value);
    let identity = Arc::as_ptr(&value) as *const u8 as usize;
    assert_eq!(
        storage.key_of(&TypeId::of::<String>(), identity),
        None,
        "a collected key is not remembered"
    );
    // The normal order: stored, remembered, no collection in between.
    let key = storage.store_data(data).unwrap();
    storage.remember_key(TypeId::of::<String>(), key, &value);
    assert_eq!(storage.key_of(&TypeId::of::<String>(), identity), Some(key));
}

/// Threads page out graphs that share values with each other and with earlier rounds (so
/// many children are written by remembered keys), pin paged values under a small budget,
/// and name roots, while collections run back to back. Afterwards every root pages in
/// whole, and so does every graph a thread still holds.
#[test]
fn collections_racing_page_outs_leave_every_root_and_held_value_whole() {
    // The default grace: a root named right after its page-out is never collected first.
    on_every_store(pagestore::DEFAULT_GC_GRACE, |name, storage| {
        let dyn_storage = storage.clone().as_dyn();
        let done = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let collector = scope.spawn(|| {
                let mut runs = 0;
                while !done.load(Ordering::Relaxed) || runs < 3 {
                    storage.gc().unwrap_or_else(|e| panic!("{name}: gc: {e:#}"));
                    runs += 1;
                }
            });
            let workers: Vec<_> = (0..3)
                .map(|t| {
                    let (storage, dyn_storage) = (&storage, &dyn_storage);
                    scope.spawn(move || {
                        let common = leaf(&format!("common {t}"));
                        let mut held = Vec::new();
                        for round in 0..60 {
                            let item = Item {
                                name: format!("t{t} r{round}"),
                                parts: vec![
                                    common.clone(),
                                    leaf(&format!("t{t} r{round} own")),
                                    leaf(&format!("shared r{}", round % 5)),
                                ],
                            };
                            let key = page_out(dyn_storage, &item).unwrap();
                            storage.set_root(&format!("t{t}"), key);
                            let handle = PagableArc::new(item, dyn_storage);
                            if round % 7 == 0 {
                                storage.page_out_unpinned();
                            }
                            held.push(handle);
                            if round % 10 == 0 {
                                // Paged in and out again: written by remembered keys.
                                let back: Item = page_in(dyn_storage, key).unwrap();
                                page_out(dyn_storage, &back).unwrap();
                            }
                        }
                        for handle in &held {
                            let item = handle.pin().unwrap_or_else(|e| {
                                panic!("a held handle pins after collections: {e:#}")
                            });
                            assert_eq!(item.parts.len(), 3);
                        }
                        held
                    })
                })
                .collect();
            // Joined before any is unwrapped: a worker's panic must stop the collector too.
            let joined: Vec<_> = workers.into_iter().map(|w| w.join()).collect();
            done.store(true, Ordering::Relaxed);
            collector.join().unwrap();
            let held: Vec<_> = joined
                .into_iter()
                .map(|w| w.unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
                .collect();
            storage.gc().unwrap();
            storage.page_out_unpinned();
            for handle in held.iter().flatten() {
                let item = handle
                    .pin()
                    .unwrap_or_else(|e| panic!("{name}: pin: {e:#}"));
                assert_eq!(item.parts.len(), 3, "{name}");
            }
        });
        for t in 0..3 {
            let key = storage.root(&format!("t{t}")).expect("a root per thread");
            let item: Item = page_in(&dyn_storage, key)
                .unwrap_or_else(|e| panic!("{name}: root t{t} pages in: {e:#}"));
            assert_eq!(item.parts.len(), 3, "{name}");
        }
    });
}

fn arb_dag() -> impl Strategy<Value = (Vec<Vec<usize>>, Vec<usize>, Vec<usize>)> {
    (2usize..60).prop_flat_map(|n| {
        let children = (0..n)
            .map(|i| proptest::collection::vec(0..i.max(1), if i == 0 { 0..1 } else { 0..4 }))
            .collect::<Vec<_>>();
        (
            children,
            proptest::collection::vec(0..n, 0..4),
            proptest::collection::vec(0..n, 0..3),
        )
    })
}

/// Stores the DAG (node `i` names the given earlier nodes), names `roots`, and checks that
/// a collection keeping `live` leaves exactly what those reach.
fn collects_exactly_the_unreachable(
    store: &dyn NodeStore,
    children: &[Vec<usize>],
    roots: &[usize],
    live: &[usize],
) {
    let mut keys = Vec::new();
    let mut model = HashMap::new();
    for (i, kids) in children.iter().enumerate() {
        let data = node(
            i as u64,
            8 + i % 40,
            kids.iter().map(|&k| keys[k]).collect(),
        );
        let key = store.put(data.clone()).unwrap();
        keys.push(key);
        model.insert(key, data);
    }
    for (n, &root) in roots.iter().enumerate() {
        store.set_root(&format!("root {n}"), keys[root]).unwrap();
    }
    // Records not committed yet are kept as writes in flight (a store may keep them).
    store.flush().unwrap();
    let live_keys: Vec<DataKey> = live.iter().map(|&i| keys[i]).collect();
    let hand_over = |keep: &mut dyn FnMut(DataKey)| live_keys.iter().for_each(|k| keep(*k));
    let report = store
        .collect_garbage(&GcOptions::new().live_keys(&hand_over))
        .unwrap();
    let starts = roots.iter().chain(live).map(|&i| keys[i]);
    let expected = reachable(&model, starts);
    let mut left = HashSet::new();
    store
        .scan(&mut |key, node| {
            node?;
            left.insert(key);
            Ok(())
        })
        .unwrap();
    assert_eq!(left, expected);
    assert_eq!(report.deleted as usize, model.len() - expected.len());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn random_dags_lose_exactly_their_unreachable_nodes((children, roots, live) in arb_dag()) {
        collects_exactly_the_unreachable(&MemoryNodeStore::new(), &children, &roots, &live);
        let dir = tempfile::tempdir().unwrap();
        // Small batches: parents and children spread over several, some pending.
        let store = SqliteOptions::default()
            .write_buffer_rows(16)
            .open_node_store(dir.path())
            .unwrap();
        collects_exactly_the_unreachable(&store, &children, &roots, &live);
    }
}

/// The space of what a collection deleted comes back: the file shrinks after `gc` (free
/// pages given back), and `compact` packs what is left.
#[test]
fn the_file_shrinks_after_gc_and_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteOptions::default()
        .open_node_store(dir.path())
        .unwrap();
    let kept = store.put(node(1, 1000, vec![])).unwrap();
    store.set_root("kept", kept).unwrap();
    for i in 0..4000 {
        store.put(node(100 + i, 4000, vec![])).unwrap();
    }
    store.flush().unwrap();
    let size = |store: &pagestore::SqliteNodeStore| store.stats().unwrap().file_bytes.unwrap();
    let before = size(&store);
    assert!(before > 12 << 20, "{before}");
    let report = store.gc().unwrap();
    assert_eq!((report.kept, report.deleted), (1, 4000), "{report:?}");
    assert!(report.pages_released > 0, "{report:?}");
    let after_gc = size(&store);
    assert!(after_gc < before / 4, "{before} -> {after_gc}");
    store.compact().unwrap();
    let after_compact = size(&store);
    assert!(after_compact <= after_gc, "{after_gc} -> {after_compact}");
    assert_eq!(store.get(&kept).unwrap().data.len(), 1000);
}

/// A read-only store refuses a collection with `ReadOnly` but runs a dry run, also while
/// another handle has the store open for writing.
#[test]
fn a_read_only_store_runs_only_a_dry_run() {
    let dir = tempfile::tempdir().unwrap();
    let writer = SqliteOptions::default()
        .durability(Durability::Durable)
        .open_node_store(dir.path())
        .unwrap();
    writer.put(node(1, 10, vec![])).unwrap();
    writer.flush().unwrap();
    let reader = SqliteOptions::default()
        .read_only()
        .open_node_store(dir.path())
        .unwrap();
    let err = reader.gc().unwrap_err();
    assert!(
        matches!(err.downcast_ref(), Some(Error::ReadOnly { .. })),
        "{err:#}"
    );
    let dry = reader.gc_dry_run().unwrap();
    assert_eq!((dry.kept, dry.deleted), (0, 1), "{dry:?}");
    assert_eq!(writer.stats().unwrap().records, 1, "nothing deleted");
}

/// A store that does not collect garbage says so with a typed error.
#[test]
fn a_store_without_gc_says_unsupported() {
    struct Plain(MemoryNodeStore);
    #[async_trait::async_trait]
    impl NodeStore for Plain {
        fn put(&self, node: PagableData) -> anyhow::Result<DataKey> {
            self.0.put(node)
        }
        fn get(&self, key: &DataKey) -> anyhow::Result<Arc<PagableData>> {
            self.0.get(key)
        }
        fn contains(&self, key: &DataKey) -> anyhow::Result<bool> {
            self.0.contains(key)
        }
        fn flush(&self) -> anyhow::Result<()> {
            Ok(())
        }
        fn scan(
            &self,
            visit: &mut dyn FnMut(DataKey, anyhow::Result<PagableData>) -> anyhow::Result<()>,
        ) -> anyhow::Result<()> {
            self.0.scan(visit)
        }
        fn set_root(&self, name: &str, key: DataKey) -> anyhow::Result<()> {
            self.0.set_root(name, key)
        }
        fn root(&self, name: &str) -> anyhow::Result<Option<DataKey>> {
            self.0.root(name)
        }
        fn roots(&self) -> anyhow::Result<Vec<(String, DataKey)>> {
            self.0.roots()
        }
        fn remove_root(&self, name: &str) -> anyhow::Result<bool> {
            self.0.remove_root(name)
        }
    }
    let storage = WithRuntime::attach(Plain(MemoryNodeStore::new()));
    let err = storage.gc().unwrap_err();
    assert!(
        matches!(err.downcast_ref(), Some(Error::Unsupported { .. })),
        "{err:#}"
    );
}

/// Stores nodes naming random earlier ones, names each a root right after it (cycling
/// through a few names, so older graphs become garbage), collects now and then, closes and
/// reopens now and then: every root's graph stays whole, and a node naming a collected one
/// is refused rather than stored dangling.
#[test]
fn roots_cycled_while_collecting_and_reopening_stay_whole() {
    for durability in [Durability::Cache, Durability::Durable] {
        let dir = tempfile::tempdir().unwrap();
        let open = || {
            SqliteOptions::default()
                .durability(durability)
                .open(dir.path())
                .unwrap()
        };
        let mut storage = open();
        let mut keys: Vec<DataKey> = Vec::new();
        let mut state = 0x1234_5678_9abc_def1u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for i in 0..600u64 {
            let arcs = if !keys.is_empty() && next() % 3 == 0 {
                (0..1 + next() % 2)
                    .map(|_| keys[(next() % keys.len() as u64) as usize])
                    .collect()
            } else {
                vec![]
            };
            let data = node(i, (next() % 3000) as usize, arcs);
            let key = match storage.store_data(data) {
                Ok(key) => key,
                // It names a node a collection deleted: refused, nothing stored.
                Err(e) => match e.downcast_ref() {
                    Some(Error::MissingChild { child, .. }) => {
                        assert!(!storage.node_store().contains(child).unwrap());
                        continue;
                    }
                    _ => panic!("{durability:?} node {i}: {e:#}"),
                },
            };
            keys.push(key);
            storage
                .node_store()
                .set_root(&format!("r{}", i % 5), key)
                .unwrap();
            if next() % 4 == 0 {
                storage.flush().unwrap();
                if next() % 3 == 0 {
                    storage.gc().unwrap();
                    for (name, root) in storage.node_store().roots().unwrap() {
                        let mut todo = vec![root];
                        while let Some(key) = todo.pop() {
                            let node = storage.fetch_data_blocking(&key).unwrap_or_else(|e| {
                                panic!("{durability:?} node {i}: root {name} reaches {key}: {e:#}")
                            });
                            todo.extend(node.arcs.iter().copied());
                        }
                    }
                }
                if next() % 7 == 0 {
                    drop(storage);
                    storage = open();
                }
            }
        }
    }
}
