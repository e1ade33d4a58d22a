//! The upload queue survives SIGKILL: a child process stores nodes through `TieredNodeStore`
//! on a real `redis-server` and prints each key once a `flush` covering it returned; the
//! parent kills it at a random moment (half the rounds with the server stopped, so that
//! nothing can be uploaded before the kill), reopens the directory, waits for the upload,
//! and checks that every acknowledged node is on the remote, whole.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Rng;
use common::redis_server::RedisServer;
use pagestore::remote::{RedisOptions, RemoteStore};
use pagestore::testing;
use pagestore::{DataKey, NodeStore, TieredNodeStore, TieredOptions};

const CHILD_DIR: &str = "TIERED_CRASH_DIR";
const CHILD_URL: &str = "TIERED_CRASH_URL";
const CHILD_PREFIX: &str = "TIERED_CRASH_PREFIX";
const CHILD_SEED: &str = "TIERED_CRASH_SEED";

fn connect(url: &str, prefix: &str) -> pagestore::remote::RedisStore {
    RedisOptions::new()
        .prefix(prefix)
        .io_timeout(Duration::from_millis(200))
        .connect_timeout(Duration::from_millis(200))
        .connect(url)
        .unwrap()
}

/// The child's side: runs only when the parent starts this test binary with the variables
/// set; stores until it is killed.
#[test]
fn child_entry() {
    let (Ok(dir), Ok(url), Ok(prefix), Ok(seed)) = (
        std::env::var(CHILD_DIR),
        std::env::var(CHILD_URL),
        std::env::var(CHILD_PREFIX),
        std::env::var(CHILD_SEED),
    ) else {
        return;
    };
    let store = TieredOptions::default()
        .retries(0)
        .breaker_threshold(1)
        .open_node_store(&dir, connect(&url, &prefix))
        .unwrap();
    let mut out = std::io::stdout().lock();
    writeln!(out, "READY").unwrap();
    out.flush().unwrap();
    let mut rng = Rng::new(seed.parse().unwrap());
    let mut stored: Vec<DataKey> = Vec::new();
    let mut unacknowledged = Vec::new();
    for i in 0u64.. {
        let arcs = (0..rng.below(3))
            .filter(|_| !stored.is_empty())
            .map(|_| stored[rng.below(stored.len() as u64) as usize])
            .collect();
        let node = testing::node(rng.next_u64() ^ i, rng.below(2_000) as usize, arcs);
        let key = store.put(node).unwrap();
        stored.push(key);
        unacknowledged.push(key);
        if rng.below(8) == 0 {
            store.flush().unwrap();
            for key in unacknowledged.drain(..) {
                writeln!(out, "ACK {key}").unwrap();
            }
            out.flush().unwrap();
        }
    }
}

#[test]
fn acknowledged_nodes_reach_the_remote_after_a_kill() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let seed = std::env::var("PAGESTORE_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::process::id() as u64);
    eprintln!("seed {seed} (PAGESTORE_CRASH_SEED replays it)");
    let mut rng = Rng::new(seed);
    for round in 0..6u64 {
        let dir = tempfile::tempdir().unwrap();
        let prefix = format!("crash{}-{round}", std::process::id());
        let stop_server = round % 2 == 1;
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["child_entry", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_DIR, dir.path())
            .env(CHILD_URL, server.url())
            .env(CHILD_PREFIX, &prefix)
            .env(CHILD_SEED, rng.next_u64().to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut acknowledged: Vec<DataKey> = Vec::new();
        let wanted = rng.range(20, 400) as usize;
        let deadline = Instant::now() + Duration::from_secs(60);
        for line in lines.by_ref() {
            let line = line.unwrap();
            if line == "READY" && stop_server {
                server.stop();
            } else if let Some(key) = line.strip_prefix("ACK ") {
                acknowledged.push(key.parse().unwrap());
                if acknowledged.len() >= wanted {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "the child is too slow");
        }
        child.kill().unwrap();
        child.wait().unwrap();
        // What it printed before it died was acknowledged too.
        for line in lines {
            if let Some(key) = line.unwrap().strip_prefix("ACK ") {
                acknowledged.push(key.parse().unwrap());
            }
        }
        if stop_server {
            server.resume();
        }

        let store = TieredNodeStore::open(dir.path(), connect(&server.url(), &prefix)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Err(e) = store.wait_for_upload() {
            assert!(
                Instant::now() < deadline,
                "round {round}: never uploaded: {e:#}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let remote = connect(&server.url(), &prefix);
        let missing = remote.find_missing(&acknowledged).unwrap();
        assert!(
            missing.is_empty(),
            "round {round}: {} of {} acknowledged nodes never reached the remote",
            missing.len(),
            acknowledged.len()
        );
        // Whole and intact: an empty store fetches (and checks) each one's graph.
        let other = tempfile::tempdir().unwrap();
        let reader = TieredNodeStore::open(other.path(), connect(&server.url(), &prefix)).unwrap();
        reader.prefetch(&acknowledged).unwrap();
        for key in &acknowledged {
            assert_eq!(reader.get(key).unwrap().compute_key(), *key);
        }
        eprintln!(
            "round {round} (server {}): {} acknowledged nodes, all remote",
            if stop_server { "stopped" } else { "running" },
            acknowledged.len()
        );
    }
}
