//! `TieredStorage` over a remote held in this process: the contract, sharing a graph between
//! two stores, a remote's garbage and evictions, upload order, restarts and outages. The
//! same behaviour against real Redis servers is in `tiered_redis.rs`.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::watched::Watched;
use pagestore::remote::{BatchLimits, BreakerState, MemoryRemoteStore, RemoteStore};
use pagestore::testing::{self, NodeStoreHarness, Runtime};
use pagestore::{
    DataKey, Error, NodeStore, PagableData, Shared, TieredNodeStore, TieredOptions, TieredStorage,
    page_in, page_out,
};
use serde::{Deserialize, Serialize};

type Remote = Arc<Watched<Arc<MemoryRemoteStore>>>;

fn remote() -> Remote {
    Arc::new(Watched::new(Arc::new(MemoryRemoteStore::with_limits(
        BatchLimits {
            max_keys: 64,
            max_bytes: 64 << 10,
        },
    ))))
}

fn fast_breaker() -> TieredOptions {
    TieredOptions::default()
        .retries(1)
        .retry_backoff(Duration::from_millis(1))
        .breaker_threshold(1)
        .breaker_cooldown(Duration::from_millis(50))
}

/// Each store in a fresh directory with a fresh remote; reopening keeps both.
struct Tiered {
    dirs: Mutex<Vec<tempfile::TempDir>>,
    remotes: Mutex<HashMap<PathBuf, Remote>>,
}

impl NodeStoreHarness for Tiered {
    type Store = TieredNodeStore;

    fn open(&self) -> TieredNodeStore {
        let dir = tempfile::tempdir().unwrap();
        let remote = remote();
        let store = TieredNodeStore::open(dir.path(), Arc::clone(&remote)).unwrap();
        self.remotes
            .lock()
            .unwrap()
            .insert(dir.path().to_owned(), remote);
        self.dirs.lock().unwrap().push(dir);
        store
    }

    fn reopen(&self, store: TieredNodeStore) -> Option<TieredNodeStore> {
        let dir = store.local().path().parent().unwrap().to_owned();
        drop(store);
        let remote = Arc::clone(&self.remotes.lock().unwrap()[&dir]);
        Some(TieredNodeStore::open(&dir, remote).unwrap())
    }

    fn corrupt(&self, store: &TieredNodeStore, key: DataKey) -> bool {
        // Let the uploader finish first: its reads would hold a snapshot from before the damage.
        store.wait_for_upload().unwrap();
        common::damage_stored_record(store.local(), key, 16, 0x01);
        true
    }
}

#[test]
fn keeps_the_node_store_and_storage_contracts() {
    let harness = Tiered {
        dirs: Mutex::new(Vec::new()),
        remotes: Mutex::new(HashMap::new()),
    };
    testing::node_store_contract(&harness);
    testing::storage_contract(&Runtime(harness));
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Module {
    name: String,
    imports: Vec<Shared<Module>>,
}

/// A layered graph: `width` modules per layer, each importing two of the layer below, so
/// every module below the top is shared.
fn graph(layers: usize, width: usize) -> Module {
    let mut below: Vec<Shared<Module>> = Vec::new();
    for layer in 0..layers {
        below = (0..width)
            .map(|i| {
                let imports = if below.is_empty() {
                    vec![]
                } else {
                    vec![
                        below[i % below.len()].clone(),
                        below[(i * 7 + 1) % below.len()].clone(),
                    ]
                };
                Shared::new(Module {
                    name: format!("m{layer}.{i}"),
                    imports,
                })
            })
            .collect();
    }
    Module {
        name: "top".into(),
        imports: below,
    }
}

#[test]
fn a_graph_paged_out_on_one_store_pages_in_on_another_by_its_root_name() {
    let remote = remote();
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let original = graph(6, 40);

    let a = Arc::new(TieredStorage::open(a_dir.path(), Arc::clone(&remote)).unwrap());
    let key = page_out(&a, &original).unwrap();
    a.set_root("build-42", key).unwrap();
    a.flush().unwrap();
    a.wait_for_upload().unwrap();
    let sent = a.tiered_stats().unwrap();
    assert_eq!(sent.queue_depth, 0);
    assert_eq!(sent.roots_published, 1);
    assert!(remote.violations().is_empty(), "{:?}", remote.violations());

    let trips_before = remote.inner.round_trips();
    let b = Arc::new(TieredStorage::open(b_dir.path(), Arc::clone(&remote)).unwrap());
    let root = b.root("build-42").unwrap().expect("published");
    assert_eq!(root, key);
    let back: Module = page_in(&b, root).unwrap();
    assert_eq!(back, original);
    // Sharing survives: the same module below is one Arc wherever it is imported.
    let first = &back.imports[0].imports[0];
    let again = back
        .imports
        .iter()
        .flat_map(|m| m.imports.iter())
        .filter(|m| m.name == first.name)
        .collect::<Vec<_>>();
    assert!(again.len() > 1 && again.iter().all(|m| Shared::ptr_eq(m, first)));

    let got = b.tiered_stats().unwrap();
    assert_eq!(got.filled, sent.uploaded, "every node came over once");
    assert_eq!(got.verification_failures, 0);
    let trips = remote.inner.round_trips() - trips_before;
    // 241 nodes in 7 levels: a few round trips per level (64 keys each), never one per node.
    assert!(trips <= 20, "{trips} round trips for {} nodes", got.filled);
}

#[test]
fn garbage_from_the_remote_is_corrupt_and_never_stored_locally() {
    let remote = remote();
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = TieredNodeStore::open(a_dir.path(), Arc::clone(&remote)).unwrap();
    let leaf = a.put(testing::node(1, 100, vec![])).unwrap();
    let top = a.put(testing::node(2, 100, vec![leaf])).unwrap();
    a.wait_for_upload().unwrap();

    let mut garbage = pagestore::codec::encode(&testing::node(3, 100, vec![]));
    remote.inner.overwrite(leaf, garbage.clone());
    let b = TieredNodeStore::open(b_dir.path(), Arc::clone(&remote)).unwrap();
    let err = b.get(&top).unwrap_err();
    match err.downcast_ref::<Error>() {
        Some(Error::Corrupt { key, reason }) => {
            assert_eq!(*key, leaf);
            assert!(reason.contains("memory"), "names the remote: {reason}");
        }
        other => panic!("expected Corrupt, got {other:?} ({err:#})"),
    }
    garbage.truncate(5);
    remote.inner.overwrite(leaf, garbage);
    assert!(Error::is_corrupt(&b.get(&leaf).unwrap_err()));
    assert!(!b.local().contains(&top).unwrap() && !b.local().contains(&leaf).unwrap());
    let stats = b.tiered_stats().unwrap();
    assert_eq!((stats.filled, stats.verification_failures), (0, 2));
}

#[test]
fn a_child_the_remote_lost_is_not_found_and_nothing_is_stored() {
    let remote = remote();
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = TieredNodeStore::open(a_dir.path(), Arc::clone(&remote)).unwrap();
    let leaf = a.put(testing::node(1, 10, vec![])).unwrap();
    let top = a.put(testing::node(2, 10, vec![leaf])).unwrap();
    a.wait_for_upload().unwrap();
    assert!(remote.inner.evict(&leaf));

    let b = TieredNodeStore::open(b_dir.path(), Arc::clone(&remote)).unwrap();
    let err = b.get(&top).unwrap_err();
    assert!(
        matches!(err.downcast_ref::<Error>(), Some(Error::NotFound(k)) if *k == leaf),
        "{err:#}"
    );
    assert!(!b.local().contains(&top).unwrap());
    assert_eq!(b.tiered_stats().unwrap().remote_misses, 1);
}

#[test]
fn uploads_send_children_first_and_skip_what_the_remote_has() {
    let remote = remote();
    let dir = tempfile::tempdir().unwrap();
    let store = TieredNodeStore::open(dir.path(), Arc::clone(&remote)).unwrap();
    let model = testing::store_dag(&|n| store.put(n), 7, 3_000);
    let top = *model.keys().next().unwrap();
    store.set_root("dag", top).unwrap();
    store.wait_for_upload().unwrap();
    assert!(remote.violations().is_empty(), "{:?}", remote.violations());
    assert_eq!(remote.inner.len(), model.len());
    assert_eq!(
        remote.records_sent(),
        model.len() as u64,
        "each node sent once"
    );
    assert_eq!(remote.inner.root("dag").unwrap(), Some(top));

    // Storing the same nodes again sends nothing: the remote says it has them.
    let again = testing::store_dag(&|n| store.put(n), 7, 3_000);
    assert_eq!(again.len(), model.len());
    store.wait_for_upload().unwrap();
    assert_eq!(remote.records_sent(), model.len() as u64);
}

#[test]
fn a_node_may_name_a_child_only_the_remote_holds() {
    let remote = remote();
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = TieredNodeStore::open(a_dir.path(), Arc::clone(&remote)).unwrap();
    let leaf = a.put(testing::node(1, 10, vec![])).unwrap();
    a.wait_for_upload().unwrap();

    let b = TieredNodeStore::open(b_dir.path(), Arc::clone(&remote)).unwrap();
    assert!(b.contains(&leaf).unwrap(), "stored: on the remote");
    let top = b.put(testing::node(2, 10, vec![leaf])).unwrap();
    assert!(
        b.local().contains(&leaf).unwrap(),
        "fetched before the parent went in"
    );
    assert_eq!(b.get(&top).unwrap().arcs, [leaf]);

    let unknown = testing::node(3, 10, vec![]).compute_key();
    let err = b.put(testing::node(4, 10, vec![unknown])).unwrap_err();
    assert!(
        matches!(err.downcast_ref::<Error>(), Some(Error::MissingChild { child, .. }) if *child == unknown)
    );
}

#[test]
fn a_root_removed_here_is_gone_here_before_the_remote_hears_of_it() {
    let remote = remote();
    let dir = tempfile::tempdir().unwrap();
    let store = TieredNodeStore::open(dir.path(), Arc::clone(&remote)).unwrap();
    let key = store.put(testing::node(1, 10, vec![])).unwrap();
    store.set_root("r", key).unwrap();
    store.wait_for_upload().unwrap();
    assert_eq!(remote.inner.root("r").unwrap(), Some(key));

    remote.set_down(true);
    // A root set here is removed here, without the network.
    assert!(store.remove_root("r").unwrap());
    assert_eq!(store.root("r").unwrap(), None);
    assert!(!store.remove_root("r").unwrap());
    remote.set_down(false);
    assert_eq!(remote.inner.root("r").unwrap(), Some(key), "not told yet");
    assert!(store.roots().unwrap().is_empty());
    store.wait_for_upload().unwrap();
    assert_eq!(remote.inner.root("r").unwrap(), None);

    // A root only the remote has is removed there too.
    remote.inner.set_root("theirs", key).unwrap();
    assert_eq!(store.root("theirs").unwrap(), Some(key));
    assert!(store.remove_root("theirs").unwrap());
    assert_eq!(store.root("theirs").unwrap(), None);
    store.wait_for_upload().unwrap();
    assert_eq!(remote.inner.root("theirs").unwrap(), None);
}

#[test]
fn with_the_remote_down_local_work_goes_on_and_uploads_wait() {
    let remote = remote();
    let dir = tempfile::tempdir().unwrap();
    let store = fast_breaker()
        .open_node_store(dir.path(), Arc::clone(&remote))
        .unwrap();
    remote.set_down(true);

    let model = testing::store_dag(&|n| store.put(n), 3, 500);
    testing::assert_reads_back(&|k| store.get(k), &model);
    let top = *model.keys().next().unwrap();
    store.set_root("r", top).unwrap();
    store.flush().unwrap();

    let started = Instant::now();
    let err = store.wait_for_upload().unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "fails, does not hang"
    );
    assert!(
        matches!(
            err.downcast_ref::<Error>(),
            Some(Error::RemoteUnavailable { .. }) | None
        ),
        "{err:#}"
    );
    let stats = store.tiered_stats().unwrap();
    assert_eq!(stats.breaker, BreakerState::Open);
    assert!(stats.queue_depth >= model.len() as u64);
    // A key the local store lacks needs the remote: a clear error, at once.
    let absent = testing::node(99, 1, vec![]).compute_key();
    let err = store.get(&absent).unwrap_err();
    assert!(
        matches!(
            err.downcast_ref::<Error>(),
            Some(Error::RemoteUnavailable { .. })
        ),
        "{err:#}"
    );

    remote.set_down(false);
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = store.wait_for_upload() {
        assert!(Instant::now() < deadline, "uploads never resumed: {e:#}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(remote.inner.len(), model.len());
    assert_eq!(remote.inner.root("r").unwrap(), Some(top));
    assert_eq!(store.tiered_stats().unwrap().breaker, BreakerState::Closed);
    assert!(remote.violations().is_empty(), "{:?}", remote.violations());
}

#[test]
fn pending_uploads_survive_a_restart() {
    let remote = remote();
    let dir = tempfile::tempdir().unwrap();
    let model = {
        let store = fast_breaker()
            .open_node_store(dir.path(), Arc::clone(&remote))
            .unwrap();
        remote.set_down(true);
        let model = testing::store_dag(&|n| store.put(n), 5, 800);
        store.set_root("r", *model.keys().next().unwrap()).unwrap();
        store.flush().unwrap();
        model
    };
    assert!(remote.inner.is_empty());
    remote.set_down(false);

    let store = TieredNodeStore::open(dir.path(), Arc::clone(&remote)).unwrap();
    assert!(store.tiered_stats().unwrap().queue_depth > 0);
    store.wait_for_upload().unwrap();
    assert_eq!(remote.inner.len(), model.len());
    assert!(remote.inner.root("r").unwrap().is_some());
    assert!(remote.violations().is_empty(), "{:?}", remote.violations());
}

#[test]
fn an_empty_store_hydrates_a_deep_chain() {
    let remote = remote();
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = TieredNodeStore::open(a_dir.path(), Arc::clone(&remote)).unwrap();
    let mut key = a.put(testing::node(0, 8, vec![])).unwrap();
    for i in 1..2_000 {
        key = a.put(testing::node(i, 8, vec![key])).unwrap();
    }
    a.wait_for_upload().unwrap();
    let b = TieredNodeStore::open(b_dir.path(), Arc::clone(&remote)).unwrap();
    b.prefetch(&[key]).unwrap();
    assert_eq!(b.tiered_stats().unwrap().filled, 2_000);
    let mut node: Arc<PagableData> = b.get(&key).unwrap();
    while let Some(child) = node.arcs.first() {
        node = b.local().get(child).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_in_async_fetches_from_the_remote_a_level_at_a_time() {
    let remote = remote();
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let original = graph(5, 30);
    let a = Arc::new(TieredStorage::open(a_dir.path(), Arc::clone(&remote)).unwrap());
    let key = page_out(&a, &original).unwrap();
    let a = Arc::clone(&a);
    tokio::task::spawn_blocking(move || a.wait_for_upload())
        .await
        .unwrap()
        .unwrap();

    let b = Arc::new(TieredStorage::open(b_dir.path(), Arc::clone(&remote)).unwrap());
    let back: Module = pagestore::page_in_async(&b, key).await.unwrap();
    assert_eq!(back, original);
    assert_eq!(b.tiered_stats().unwrap().filled, 151);
}
