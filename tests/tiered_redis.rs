//! `TieredStorage` against real `redis-server` processes (started by the tests on free
//! loopback ports): the contracts, two machines sharing one server (and a 3-master cluster),
//! a stopped and a killed server, garbage written with `redis-cli`, and an evicting server.
//! Without `redis-server` these skip, except under `CI=true`, where they fail.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::redis_server::{RedisCluster, RedisServer};
use common::watched::Watched;
use pagestore::remote::{BreakerState, RedisOptions, RedisStore, RemoteStore};
use pagestore::testing::{self, NodeStoreHarness, Runtime};
use pagestore::{
    DataKey, Error, NodeStore, Shared, TieredNodeStore, TieredOptions, TieredStorage, page_in,
    page_out,
};
use serde::{Deserialize, Serialize};

static PREFIXES: AtomicU64 = AtomicU64::new(0);

/// A namespace of its own for each store of a test, so stores share one server.
fn fresh_prefix() -> String {
    format!(
        "t{}-{}",
        std::process::id(),
        PREFIXES.fetch_add(1, Ordering::Relaxed)
    )
}

fn options(prefix: &str) -> RedisOptions {
    RedisOptions::new()
        .prefix(prefix)
        .io_timeout(Duration::from_millis(300))
        .connect_timeout(Duration::from_millis(300))
}

fn fast_breaker() -> TieredOptions {
    TieredOptions::default()
        .retries(1)
        .retry_backoff(Duration::from_millis(10))
        .breaker_threshold(1)
        .breaker_cooldown(Duration::from_millis(100))
}

/// Each store in a fresh directory with a fresh prefix on one server.
struct Tiered {
    url: String,
    dirs: Mutex<Vec<(tempfile::TempDir, String)>>,
}

impl Tiered {
    fn prefix_of(&self, store: &TieredNodeStore) -> String {
        let dirs = self.dirs.lock().unwrap();
        let dir = store.local().path().parent().unwrap();
        dirs.iter()
            .find(|(d, _)| d.path() == dir)
            .unwrap()
            .1
            .clone()
    }
}

impl NodeStoreHarness for Tiered {
    type Store = TieredNodeStore;

    fn open(&self) -> TieredNodeStore {
        let dir = tempfile::tempdir().unwrap();
        let prefix = fresh_prefix();
        let remote = options(&prefix).connect(&self.url).unwrap();
        let store = TieredNodeStore::open(dir.path(), remote).unwrap();
        self.dirs.lock().unwrap().push((dir, prefix));
        store
    }

    fn reopen(&self, store: TieredNodeStore) -> Option<TieredNodeStore> {
        let prefix = self.prefix_of(&store);
        let dir = store.local().path().parent().unwrap().to_owned();
        drop(store);
        let remote = options(&prefix).connect(&self.url).unwrap();
        Some(TieredNodeStore::open(&dir, remote).unwrap())
    }

    fn corrupt(&self, store: &TieredNodeStore, key: DataKey) -> bool {
        store.wait_for_upload().unwrap();
        common::damage_stored_record(store.local(), key, 16, 0x01);
        true
    }
}

#[test]
fn keeps_the_node_store_and_storage_contracts_on_redis() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let harness = || Tiered {
        url: server.url(),
        dirs: Mutex::new(Vec::new()),
    };
    testing::node_store_contract(&harness());
    testing::storage_contract(&Runtime(harness()));
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Module {
    name: String,
    imports: Vec<Shared<Module>>,
}

/// `layers` of `width` modules, each importing two of the layer below.
fn graph(layers: usize, width: usize, tag: &str) -> Module {
    let mut below: Vec<Shared<Module>> = Vec::new();
    for layer in 0..layers {
        below = (0..width)
            .map(|i| {
                let imports = match below.len() {
                    0 => vec![],
                    n => vec![below[i % n].clone(), below[(i * 7 + 1) % n].clone()],
                };
                Shared::new(Module {
                    name: format!("{tag}{layer}.{i}"),
                    imports,
                })
            })
            .collect();
    }
    Module {
        name: tag.into(),
        imports: below,
    }
}

/// A pages `graph` out and publishes it as `build-42`; B, with an empty directory, pages it
/// in by the root's name: equal, with its sharing, and every upload was in order.
fn share_between_two_machines(connect: impl Fn(&str) -> RedisStore) {
    let prefix = fresh_prefix();
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let original = graph(8, 50, "m");

    let watched = Arc::new(Watched::new(connect(&prefix)));
    let a = Arc::new(TieredStorage::open(a_dir.path(), Arc::clone(&watched)).unwrap());
    let key = page_out(&a, &original).unwrap();
    a.set_root("build-42", key).unwrap();
    a.flush().unwrap();
    a.wait_for_upload().unwrap();
    assert!(
        watched.violations().is_empty(),
        "{:?}",
        watched.violations()
    );
    assert_eq!(watched.records_sent(), 401, "each node once");

    let b = Arc::new(TieredStorage::open(b_dir.path(), connect(&prefix)).unwrap());
    let root = b.root("build-42").unwrap().expect("published");
    let back: Module = page_in(&b, root).unwrap();
    assert_eq!(back, original);
    let first = &back.imports[0].imports[0];
    let shared = back
        .imports
        .iter()
        .flat_map(|m| &m.imports)
        .filter(|m| m.name == first.name)
        .all(|m| Shared::ptr_eq(m, first));
    assert!(shared, "a module imported twice is one Arc");
    assert_eq!(b.tiered_stats().unwrap().filled, 401);
}

#[test]
fn two_stores_share_a_graph_through_one_server() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    share_between_two_machines(|prefix| options(prefix).connect(&server.url()).unwrap());
}

#[test]
fn two_stores_share_a_graph_through_a_cluster() {
    let Some(cluster) = RedisCluster::start(3) else {
        return;
    };
    share_between_two_machines(|prefix| options(prefix).connect_cluster(&cluster.urls()).unwrap());
}

#[test]
fn a_stopped_server_times_out_and_local_work_goes_on() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let prefix = fresh_prefix();
    let dir = tempfile::tempdir().unwrap();
    let store = fast_breaker()
        .open_node_store(dir.path(), options(&prefix).connect(&server.url()).unwrap())
        .unwrap();
    let before = testing::store_dag(&|n| store.put(n), 1, 300);
    store.wait_for_upload().unwrap();

    server.stop();
    // Local work never waits for the network.
    let started = Instant::now();
    let during = testing::store_dag(&|n| store.put(n), 2, 300);
    testing::assert_reads_back(&|k| store.get(k), &before);
    testing::assert_reads_back(&|k| store.get(k), &during);
    store.flush().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "local work took {:?}",
        started.elapsed()
    );
    // What needs the remote fails within the deadline: 2 attempts of 300 ms, plus margin.
    let absent = testing::node(777, 5, vec![]).compute_key();
    let started = Instant::now();
    let err = store.get(&absent).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(
        matches!(
            err.downcast_ref::<Error>(),
            Some(Error::Remote { .. } | Error::RemoteUnavailable { .. })
        ),
        "{err:#}"
    );
    let started = Instant::now();
    assert!(store.wait_for_upload().is_err());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    server.resume();
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(e) = store.wait_for_upload() {
        assert!(Instant::now() < deadline, "uploads never resumed: {e:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let remote = options(&prefix).connect(&server.url()).unwrap();
    let keys: Vec<DataKey> = during.keys().copied().collect();
    assert!(remote.find_missing(&keys).unwrap().is_empty());
}

#[test]
fn a_killed_server_trips_the_breaker_then_the_queue_drains_after_restart() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let prefix = fresh_prefix();
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = fast_breaker()
        .open(
            a_dir.path(),
            options(&prefix).connect(&server.url()).unwrap(),
        )
        .unwrap();
    let a = Arc::new(a);

    server.kill();
    let original = graph(5, 30, "k");
    let key = page_out(&a, &original).unwrap();
    a.set_root("after-kill", key).unwrap();
    a.flush().unwrap();
    assert!(a.wait_for_upload().is_err());
    assert_eq!(a.tiered_stats().unwrap().breaker, BreakerState::Open);
    assert!(a.tiered_stats().unwrap().queue_depth > 0);

    server.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = a.wait_for_upload() {
        assert!(Instant::now() < deadline, "the queue never drained: {e:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(a.tiered_stats().unwrap().breaker, BreakerState::Closed);

    let b = Arc::new(
        TieredStorage::open(
            b_dir.path(),
            options(&prefix).connect(&server.url()).unwrap(),
        )
        .unwrap(),
    );
    let root = b
        .root("after-kill")
        .unwrap()
        .expect("published after the restart");
    let back: Module = page_in(&b, root).unwrap();
    assert_eq!(back, original, "nothing lost");
}

#[test]
fn garbage_written_with_redis_cli_is_corrupt_and_not_filled() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let prefix = fresh_prefix();
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = TieredNodeStore::open(
        a_dir.path(),
        options(&prefix).connect(&server.url()).unwrap(),
    )
    .unwrap();
    let leaf = a.put(testing::node(1, 50, vec![])).unwrap();
    let top = a.put(testing::node(2, 50, vec![leaf])).unwrap();
    a.wait_for_upload().unwrap();

    let remote = options(&prefix).connect(&server.url()).unwrap();
    let reply = server.cli(&["SET", &remote.record_key(&leaf), "garbage"]);
    assert_eq!(reply.trim(), "OK");

    let b = TieredNodeStore::open(b_dir.path(), remote).unwrap();
    let err = b.get(&top).unwrap_err();
    match err.downcast_ref::<Error>() {
        Some(Error::Corrupt { key, reason }) => {
            assert_eq!(*key, leaf);
            assert!(reason.contains("127.0.0.1"), "names the remote: {reason}");
        }
        other => panic!("expected Corrupt, got {other:?}: {err:#}"),
    }
    assert!(!b.local().contains(&top).unwrap() && !b.local().contains(&leaf).unwrap());
    let stats = b.tiered_stats().unwrap();
    assert_eq!((stats.filled, stats.verification_failures), (0, 1));
}

#[test]
fn an_evicting_server_gives_not_found_never_wrong_data() {
    let Some(server) =
        RedisServer::start_with(&["--maxmemory", "3mb", "--maxmemory-policy", "allkeys-lru"])
    else {
        return;
    };
    let prefix = fresh_prefix();
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = TieredNodeStore::open(
        a_dir.path(),
        options(&prefix).connect(&server.url()).unwrap(),
    )
    .unwrap();
    // About 8 MB of records: more than the server keeps.
    let mut model = std::collections::HashMap::new();
    let mut keys: Vec<DataKey> = Vec::new();
    for i in 0..4_000u64 {
        let arcs = match keys.len() {
            0 => vec![],
            n => vec![keys[(i as usize * 7) % n]],
        };
        let node = testing::node(i, 2_000, arcs);
        let key = a.put(node.clone()).unwrap();
        keys.push(key);
        model.insert(key, node);
    }
    let _ = a.wait_for_upload(); // an evicting server may also refuse writes (OOM)

    let b = TieredNodeStore::open(
        b_dir.path(),
        options(&prefix).connect(&server.url()).unwrap(),
    )
    .unwrap();
    let (mut found, mut not_found) = (0, 0);
    for (key, node) in &model {
        match b.get(key) {
            Ok(got) => {
                assert_eq!(&*got, node, "never wrong data");
                found += 1;
            }
            Err(e) if Error::is_not_found(&e) => not_found += 1,
            Err(e) => panic!("expected the node or NotFound for {key}: {e:#}"),
        }
    }
    assert!(
        not_found > 0,
        "the server evicted nothing: the test proves nothing"
    );
    eprintln!("evicting server: {found} nodes read, {not_found} not found");
}
