//! `RedisStore` against real `redis-server` processes (tests/common/redis_server.rs): the
//! node-store contract on one server and on a 3-master cluster, batching, damaged and
//! evicted records, and a server that stops, dies and comes back.

#![cfg(feature = "redis")]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::redis_server::{RedisCluster, RedisServer};
use pagestore::remote::{BatchLimits, RedisOptions, RedisStore, RemoteNodeStore, RemoteStore};
use pagestore::testing::{self, NodeStoreHarness, Runtime};
use pagestore::{DataKey, Error, NodeStore, PagableData, codec};

/// A prefix no other store of this run (or of an earlier run on a reused server) has.
fn unique_prefix() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "t{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn is_remote_error(err: &anyhow::Error) -> bool {
    matches!(err.downcast_ref::<Error>(), Some(Error::Remote { .. }))
}

/// Each store a fresh prefix on one shared server (or cluster): `reopen` connects anew with
/// the same prefix, `corrupt` overwrites the record through redis-cli.
struct Redis<'a> {
    connect: Box<dyn Fn(RedisOptions) -> RedisStore + 'a>,
    server: &'a RedisServer,
}

impl<'a> Redis<'a> {
    fn standalone(server: &'a RedisServer) -> Self {
        let url = server.url();
        Redis {
            connect: Box::new(move |options| options.connect(&url).expect("connect")),
            server,
        }
    }

    fn cluster(cluster: &'a RedisCluster) -> Self {
        let urls = cluster.urls();
        Redis {
            connect: Box::new(move |options| options.connect_cluster(&urls).expect("connect")),
            server: &cluster.nodes()[0],
        }
    }
}

impl NodeStoreHarness for Redis<'_> {
    type Store = RemoteNodeStore<RedisStore>;

    fn open(&self) -> Self::Store {
        RemoteNodeStore::new((self.connect)(RedisOptions::new().prefix(unique_prefix())))
    }

    fn reopen(&self, store: Self::Store) -> Option<Self::Store> {
        let options = store.remote().options().clone();
        drop(store);
        Some(RemoteNodeStore::new((self.connect)(options)))
    }

    fn corrupt(&self, store: &Self::Store, key: DataKey) -> bool {
        let reply = self
            .server
            .cli(&["SET", &store.remote().record_key(&key), "garbage"]);
        assert_eq!(reply.trim(), "OK");
        true
    }
}

#[test]
fn node_store_contract_on_one_server() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    testing::node_store_contract(&Redis::standalone(&server));
    testing::storage_contract(&Runtime(Redis::standalone(&server)));
}

#[test]
fn node_store_contract_on_a_cluster() {
    let Some(cluster) = RedisCluster::start(3) else {
        return;
    };
    testing::node_store_contract(&Redis::cluster(&cluster));
}

/// Records of `n` small distinct nodes, keyed.
fn small_records(n: u64) -> Vec<(DataKey, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let node = testing::node(i, 16, vec![]);
            (node.compute_key(), codec::encode(&node))
        })
        .collect()
}

fn as_refs(records: &[(DataKey, Vec<u8>)]) -> Vec<(DataKey, &[u8])> {
    records.iter().map(|(k, r)| (*k, r.as_slice())).collect()
}

/// `RedisStore::round_trips` counts at the one place each request is written to a
/// connection and its replies read (one pipeline, one MGET, one SCAN page), so it is a count
/// of round trips, not of commands. What the server saw is checked too: `INFO commandstats`
/// says it ran one command per key (10,000 SET, 10,000 EXISTS) and MGET once per batch, so
/// the keys did travel in batches of `max_keys` commands.
#[test]
fn ten_thousand_keys_take_one_round_trip_per_batch() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let limit = 1000;
    let store = RedisOptions::new()
        .prefix(unique_prefix())
        .batch_limits(BatchLimits {
            max_keys: limit,
            max_bytes: 4 << 20,
        })
        .connect(&server.url())
        .unwrap();
    let records = small_records(10_000);
    let keys: Vec<DataKey> = records.iter().map(|(k, _)| *k).collect();
    let batches = 10_000u64.div_ceil(limit as u64);
    server.cli(&["CONFIG", "RESETSTAT"]);

    let before = store.round_trips();
    assert_eq!(store.find_missing(&keys).unwrap(), keys);
    assert_eq!(store.round_trips() - before, batches);

    let before = store.round_trips();
    store.put_many(&as_refs(&records)).unwrap();
    assert_eq!(store.round_trips() - before, batches);

    let before = store.round_trips();
    assert!(store.find_missing(&keys).unwrap().is_empty());
    assert_eq!(store.round_trips() - before, batches);

    let before = store.round_trips();
    let got = store.get_many(&keys).unwrap();
    assert_eq!(store.round_trips() - before, batches);
    assert_eq!(got.len(), records.len(), "one answer per key");
    for ((_, record), got) in records.iter().zip(&got) {
        assert_eq!(got.as_deref(), Some(record.as_slice()));
    }

    let stats = server.cli(&["INFO", "commandstats"]);
    let calls = |command: &str| -> u64 {
        let line = stats
            .lines()
            .find(|line| line.starts_with(&format!("cmdstat_{command}:")))
            .unwrap_or_else(|| panic!("no {command} in {stats}"));
        line.split(['=', ','])
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("calls in {line}"))
    };
    assert_eq!(calls("set"), 10_000);
    assert_eq!(calls("exists"), 20_000);
    assert_eq!(calls("mget"), batches);
}

#[test]
fn a_cluster_batch_spanning_shards_reads_back_in_order() {
    let Some(cluster) = RedisCluster::start(3) else {
        return;
    };
    let store = RedisOptions::new()
        .prefix(unique_prefix())
        .connect_cluster(&cluster.urls())
        .unwrap();
    let records = small_records(3000);
    let keys: Vec<DataKey> = records.iter().map(|(k, _)| *k).collect();
    store.put_many(&as_refs(&records)).unwrap();
    let got = store.get_many(&keys).unwrap();
    assert_eq!(got.len(), records.len(), "one answer per key");
    for ((_, record), got) in records.iter().zip(&got) {
        assert_eq!(got.as_deref(), Some(record.as_slice()));
    }
    // Every master holds some: the batch really was spread.
    for node in cluster.nodes() {
        let size: u64 = node.cli(&["DBSIZE"]).trim().parse().unwrap();
        assert!(size > 0, "node {} holds none", node.port());
    }
    let mut listed = HashSet::new();
    store
        .for_each_key(&mut |key| {
            assert!(listed.insert(key), "{key} listed twice");
            Ok(())
        })
        .unwrap();
    assert_eq!(listed, keys.into_iter().collect());
}

#[test]
fn garbage_written_with_redis_cli_is_corrupt_naming_the_key() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = RemoteNodeStore::new(
        RedisOptions::new()
            .prefix(unique_prefix())
            .connect(&server.url())
            .unwrap(),
    );
    let key = store.put(testing::node(7, 100, vec![])).unwrap();
    let reply = server.cli(&["SET", &store.remote().record_key(&key), "garbage"]);
    assert_eq!(reply.trim(), "OK");
    let err = store.get(&key).unwrap_err();
    match err.downcast_ref::<Error>() {
        Some(Error::Corrupt { key: bad, reason }) => {
            assert_eq!(*bad, key);
            assert!(reason.contains(&server.url()), "names the remote: {reason}");
        }
        other => panic!("expected Corrupt, got {other:?}: {err:#}"),
    }
    assert!(err.to_string().contains(&key.to_string()), "{err}");
}

/// Under an evicting policy nodes disappear whole: a walk of the graph meets nodes equal to
/// what was stored, or `NotFound`, never other bytes.
#[test]
fn an_evicting_server_loses_whole_nodes_never_returns_wrong_data() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    server.set_config("maxmemory", "2mb");
    server.set_config("maxmemory-policy", "allkeys-lru");
    let remote = RedisOptions::new()
        .prefix(unique_prefix())
        .connect(&server.url())
        .unwrap();
    // About 6 MB of records: a chain with extra edges back, the last node reaching all.
    let mut model: HashMap<DataKey, PagableData> = HashMap::new();
    let mut keys: Vec<DataKey> = Vec::new();
    for i in 0..6000u64 {
        let mut arcs = Vec::new();
        if let Some(last) = keys.last() {
            arcs.push(*last);
            arcs.push(keys[(i as usize * 7919) % keys.len()]);
        }
        let node = testing::node(i, 1000, arcs);
        let key = node.compute_key();
        // Written straight to the remote: `put` would (rightly) refuse a parent whose
        // child was already evicted.
        remote.put_many(&[(key, &codec::encode(&node))]).unwrap();
        keys.push(key);
        model.insert(key, node);
    }
    let root = *keys.last().unwrap();
    let store = RemoteNodeStore::new(remote);

    let (mut found, mut missing) = (0, 0);
    let mut seen = HashSet::from([root]);
    let mut queue = vec![root];
    while let Some(key) = queue.pop() {
        match store.get(&key) {
            Ok(node) => {
                assert_eq!(&*node, &model[&key], "node {key} is what was stored");
                found += 1;
                for child in &node.arcs {
                    if seen.insert(*child) {
                        queue.push(*child);
                    }
                }
            }
            Err(err) if Error::is_not_found(&err) => missing += 1,
            Err(err) => panic!("reading {key}: {err:#}"),
        }
    }
    eprintln!("evicting server, walk from the root: {found} nodes read, {missing} evicted");
    assert!(found > 0, "the root and some nodes are still there");
    assert!(missing > 0, "a child of a node read was evicted");

    // Every node stored, not only those the walk reached past the evicted ones.
    let (mut found, mut missing) = (0, 0);
    for (key, expected) in &model {
        match store.get(key) {
            Ok(node) => {
                assert_eq!(&*node, expected, "node {key} is what was stored");
                found += 1;
            }
            Err(err) if Error::is_not_found(&err) => missing += 1,
            Err(err) => panic!("reading {key}: {err:#}"),
        }
    }
    eprintln!("evicting server, every node: {found} read, {missing} evicted");
    assert!(
        missing > model.len() / 2,
        "2 MB cannot hold 6 MB of records"
    );
}

/// Under `noeviction` a full server refuses writes: `put` fails with `Error::Remote` and
/// what was stored stays readable.
#[test]
fn a_full_noeviction_server_refuses_writes_and_keeps_what_it_has() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    server.set_config("maxmemory", "2mb");
    server.set_config("maxmemory-policy", "noeviction");
    let store = RemoteNodeStore::new(
        RedisOptions::new()
            .prefix(unique_prefix())
            .connect(&server.url())
            .unwrap(),
    );
    let mut stored = Vec::new();
    let err = loop {
        let node = testing::node(stored.len() as u64, 1000, vec![]);
        match store.put(node.clone()) {
            Ok(key) => stored.push((key, node)),
            Err(err) => break err,
        }
        assert!(stored.len() < 10_000, "2 MB never filled up");
    };
    assert!(is_remote_error(&err), "{err:#}");
    assert!(format!("{err:#}").contains("OOM"), "{err:#}");
    assert!(!stored.is_empty());
    for (key, node) in &stored {
        assert_eq!(&*store.get(key).unwrap(), node);
    }
}

#[test]
fn a_stopped_server_fails_within_the_timeout_and_works_once_resumed() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let timeout = Duration::from_millis(500);
    let store = RedisOptions::new()
        .prefix(unique_prefix())
        .io_timeout(timeout)
        .connect_timeout(timeout)
        .connect(&server.url())
        .unwrap();
    let records = small_records(10);
    let keys: Vec<DataKey> = records.iter().map(|(k, _)| *k).collect();
    store.put_many(&as_refs(&records)).unwrap();

    server.stop();
    // First on the pooled connection, then on a new one (connecting to a stopped server
    // succeeds in the kernel's backlog; the first reply never comes).
    for attempt in ["pooled", "new"] {
        let started = Instant::now();
        let err = store.get_many(&keys).unwrap_err();
        let elapsed = started.elapsed();
        eprintln!("{attempt} connection to a stopped server: failed after {elapsed:?}: {err:#}");
        assert!(is_remote_error(&err), "{attempt}: {err:#}");
        assert!(
            elapsed < 3 * timeout,
            "{attempt} connection: failed after {elapsed:?}, timeout {timeout:?}"
        );
    }
    // A pipeline of 512 commands fails as fast as one command.
    let many = small_records(512);
    let many_keys: Vec<DataKey> = many.iter().map(|(k, _)| *k).collect();
    let started = Instant::now();
    let err = store.find_missing(&many_keys).unwrap_err();
    assert!(is_remote_error(&err), "find_missing: {err:#}");
    assert!(
        started.elapsed() < 3 * timeout,
        "find_missing failed after {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    let err = store.put_many(&as_refs(&many)).unwrap_err();
    assert!(is_remote_error(&err), "put_many: {err:#}");
    assert!(
        started.elapsed() < 3 * timeout,
        "put_many failed after {:?}",
        started.elapsed()
    );

    // Connecting checks that the server answers, within the same bound.
    let started = Instant::now();
    let err = RedisOptions::new()
        .connect_timeout(timeout)
        .io_timeout(timeout)
        .connect(&server.url())
        .unwrap_err();
    let elapsed = started.elapsed();
    eprintln!("connecting to a stopped server: failed after {elapsed:?}: {err:#}");
    assert!(is_remote_error(&err), "connect: {err:#}");
    assert!(elapsed < 3 * timeout, "connect failed after {elapsed:?}");

    server.resume();
    let got = store.get_many(&keys).unwrap();
    assert_eq!(got.len(), records.len(), "one answer per key");
    assert!(got.iter().all(Option::is_some));
}

/// A slot that moves to another master after the store learned the slot map: the old
/// owner answers MOVED, and the store follows it and learns the new map.
#[test]
fn a_cluster_store_follows_a_moved_slot() {
    let Some(cluster) = RedisCluster::start(3) else {
        return;
    };
    let store = RedisOptions::new()
        .prefix(unique_prefix())
        .connect_cluster(&cluster.urls())
        .unwrap(); // its pooled connection holds the slot map from now on
    let records = small_records(1);
    let (key, _) = records[0];
    let name = store.record_key(&key);
    let slot = cluster.nodes()[0].cli(&["CLUSTER", "KEYSLOT", &name]);
    let slot = slot.trim();

    // `CLUSTER NODES`: "<id> <ip:port@bus> <flags> <master> … <slot ranges>".
    let nodes = cluster.nodes()[0].cli(&["CLUSTER", "NODES"]);
    let slot_number: u16 = slot.parse().unwrap();
    let owns = |line: &str| {
        line.split_whitespace().skip(8).any(|range| {
            let (lo, hi) = range.split_once('-').unwrap_or((range, range));
            let (lo, hi): (u16, u16) = (lo.parse().unwrap(), hi.parse().unwrap());
            (lo..=hi).contains(&slot_number)
        })
    };
    let new_owner = nodes
        .lines()
        .find(|line| !owns(line))
        .and_then(|line| line.split_whitespace().next())
        .unwrap()
        .to_owned();
    for node in cluster.nodes() {
        let reply = node.cli(&["CLUSTER", "SETSLOT", slot, "NODE", &new_owner]);
        assert_eq!(reply.trim(), "OK", "SETSLOT on {}", node.port());
    }

    let before = store.round_trips();
    store.put_many(&as_refs(&records)).unwrap();
    assert_eq!(
        store.round_trips() - before,
        2,
        "the old owner's MOVED, then the new owner"
    );
    let counts: Vec<u64> = cluster
        .nodes()
        .iter()
        .map(|node| {
            node.cli(&["CLUSTER", "COUNTKEYSINSLOT", slot])
                .trim()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(counts.iter().sum::<u64>(), 1, "one copy: {counts:?}");
    let holder = counts.iter().position(|&n| n == 1).unwrap();
    assert!(
        nodes.lines().any(|line| line.starts_with(&new_owner)
            && line.contains(&format!(":{}@", cluster.nodes()[holder].port()))),
        "the record is on the new owner"
    );
    let before = store.round_trips();
    assert_eq!(
        store.get_many(&[key]).unwrap()[0].as_deref(),
        Some(&records[0].1[..])
    );
    assert_eq!(
        store.round_trips() - before,
        1,
        "the new map was learned: no redirect"
    );
}

#[test]
fn a_stopped_cluster_master_fails_a_batch_within_the_timeout() {
    let Some(cluster) = RedisCluster::start(3) else {
        return;
    };
    let timeout = Duration::from_millis(500);
    let store = RedisOptions::new()
        .prefix(unique_prefix())
        .io_timeout(timeout)
        .connect_timeout(timeout)
        .connect_cluster(&cluster.urls())
        .unwrap();
    // 512 keys, about a third on each master: a reader that waited out every reply of
    // the stopped one would take minutes.
    let records = small_records(512);
    let keys: Vec<DataKey> = records.iter().map(|(k, _)| *k).collect();
    store.put_many(&as_refs(&records)).unwrap();

    cluster.nodes()[1].stop();
    let started = Instant::now();
    let err = store.get_many(&keys).unwrap_err();
    let elapsed = started.elapsed();
    eprintln!("a batch with a stopped master: failed after {elapsed:?}: {err:#}");
    assert!(is_remote_error(&err), "{err:#}");
    assert!(elapsed < 3 * timeout, "failed after {elapsed:?}");
    let started = Instant::now();
    let err = store.find_missing(&keys).unwrap_err();
    assert!(is_remote_error(&err), "{err:#}");
    assert!(
        started.elapsed() < 3 * timeout,
        "failed after {:?}",
        started.elapsed()
    );

    cluster.nodes()[1].resume();
    let got = store.get_many(&keys).unwrap();
    assert_eq!(got.len(), records.len(), "one answer per key");
    assert!(got.iter().all(Option::is_some));
}

#[test]
fn a_killed_and_restarted_server_is_reconnected_to_after_at_most_one_failed_call() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let store = RedisOptions::new()
        .prefix(unique_prefix())
        .connect(&server.url())
        .unwrap();
    let records = small_records(10);
    let keys: Vec<DataKey> = records.iter().map(|(k, _)| *k).collect();
    store.put_many(&as_refs(&records)).unwrap();
    assert_eq!(store.find_missing(&keys).unwrap(), vec![]);

    server.restart(); // SIGKILL, then a new empty server on the same port
    if let Err(err) = store.find_missing(&keys) {
        assert!(is_remote_error(&err), "{err:#}");
    }
    // The restarted server has no persistence: everything is missing, and storing works.
    assert_eq!(store.find_missing(&keys).unwrap(), keys);
    store.put_many(&as_refs(&records)).unwrap();
    assert_eq!(store.find_missing(&keys).unwrap(), vec![]);
}

#[test]
fn connecting_to_nothing_is_a_remote_error_and_describe_hides_the_password() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://:hunter2@127.0.0.1:{port}");
    let err = RedisStore::connect(&url).unwrap_err();
    assert!(is_remote_error(&err), "{err:#}");
    let message = format!("{err:#}");
    assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
    assert!(!message.contains("hunter2"), "{message}");
}

/// The measurement behind `RedisOptions::hash_tags`' default (docs/remote.md): 100,000
/// small records stored, read and checked on a 3-master cluster, keys with and without a
/// hash tag, alternating. Run by hand:
/// `cargo test --release --features redis --test remote_redis -- --ignored --nocapture hash_tags`.
#[test]
#[ignore = "a measurement, printed; run by hand"]
fn hash_tags_measurement() {
    let Some(cluster) = RedisCluster::start(3) else {
        return;
    };
    let records = small_records(100_000);
    let refs = as_refs(&records);
    let keys: Vec<DataKey> = records.iter().map(|(k, _)| *k).collect();
    let rounds: u32 = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    println!("| hash tags | put_many | get_many | find_missing | keys per master |");
    println!("|---|---|---|---|---|");
    // TAGS_FIRST=1 swaps the order, to tell an effect of the layout from one of the order.
    let tags_first = std::env::var("TAGS_FIRST").is_ok_and(|v| v == "1");
    for round in 0..rounds * 2 {
        let tags = (round % 2 == 1) != tags_first;
        for node in cluster.nodes() {
            node.cli(&["FLUSHALL"]);
        }
        let store = RedisOptions::new()
            .prefix(unique_prefix())
            .hash_tags(tags)
            .connect_cluster(&cluster.urls())
            .unwrap();
        let started = Instant::now();
        store.put_many(&refs).unwrap();
        let put = started.elapsed();
        let started = Instant::now();
        let got = store.get_many(&keys).unwrap();
        let get = started.elapsed();
        assert_eq!(got.len(), records.len(), "one answer per key");
        assert!(got.iter().all(Option::is_some));
        let started = Instant::now();
        assert!(store.find_missing(&keys).unwrap().is_empty());
        let exists = started.elapsed();
        let spread: Vec<String> = cluster
            .nodes()
            .iter()
            .map(|node| node.cli(&["DBSIZE"]).trim().to_owned())
            .collect();
        println!(
            "| {tags} | {:.0} ms | {:.0} ms | {:.0} ms | {} |",
            put.as_secs_f64() * 1e3,
            get.as_secs_f64() * 1e3,
            exists.as_secs_f64() * 1e3,
            spread.join(" / ")
        );
    }
}
