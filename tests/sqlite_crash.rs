//! Process crashes: a child process stores a DAG (children first) and flushes in a loop,
//! reporting each completed flush on stdout; the parent kills it with SIGKILL mid-write and
//! reopens the store.
//!
//! - `Durable`/`Sync`: every node acknowledged by a flush is there, and `verify()` finds no
//!   dangling child (children are never committed after their parents).
//! - `Cache`: the unclean shutdown is detected (`OpenReport` is not `Clean`) and what is
//!   served verifies.
//!
//! The child is this test binary re-run with `PAGESTORE_CRASH_CHILD` set.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pagestore::{DataKey, Durability, PagableData, PagableStorage, SqliteOptions};

const CHILD_ENV: &str = "PAGESTORE_CRASH_CHILD";

fn durability(name: &str) -> Durability {
    match name {
        "cache" => Durability::Cache,
        "durable" => Durability::Durable,
        "sync" => Durability::Sync,
        other => panic!("unknown durability {other}"),
    }
}

/// Node `i` points to up to three earlier nodes.
fn node(i: u64, keys: &[DataKey]) -> PagableData {
    let arcs = (0..(i % 4))
        .filter(|_| !keys.is_empty())
        .map(|j| keys[((i * 31 + j * 7) % keys.len() as u64) as usize])
        .collect();
    let data = (0..(64 + i % 200)).map(|b| (b as u8) ^ (i as u8)).collect();
    PagableData { data, arcs }
}

/// The child: store forever, print "flushed N" after each flush of the first N nodes.
fn child(dir: &Path, mode: &str) {
    let storage = SqliteOptions::default()
        .durability(durability(mode))
        .write_buffer_rows(2048)
        .open(dir)
        .unwrap();
    let mut keys = Vec::new();
    for i in 0u64.. {
        keys.push(storage.store_data(node(i, &keys)).unwrap());
        if i % 1000 == 999 {
            storage.flush().unwrap();
            println!("flushed {}", i + 1);
        }
    }
}

#[test]
fn crash_child_entry_point() {
    // Does nothing in a normal test run; it is the child's body when re-executed.
    if let (Ok(dir), Ok(mode)) = (
        std::env::var(CHILD_ENV),
        std::env::var("PAGESTORE_CRASH_MODE"),
    ) {
        child(Path::new(&dir), &mode);
    }
}

/// Runs the child until it has acknowledged at least `min_flushed` nodes (and a little
/// more), kills it, and returns how many nodes it acknowledged.
fn run_and_kill(dir: &Path, mode: &str, min_flushed: u64) -> u64 {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_child_entry_point",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir)
        .env("PAGESTORE_CRASH_MODE", mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut flushed = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while flushed < min_flushed && Instant::now() < deadline {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(n) = line.strip_prefix("flushed ") {
                    flushed = n.trim().parse().unwrap();
                }
            }
            _ => break,
        }
    }
    // Let it get into the middle of the next batches, then kill it without warning.
    std::thread::sleep(Duration::from_millis(30));
    child.kill().unwrap();
    child.wait().unwrap();
    // Lines printed before the kill may still be buffered in the pipe.
    for line in lines.map_while(Result::ok) {
        if let Some(n) = line.strip_prefix("flushed ") {
            flushed = flushed.max(n.trim().parse().unwrap());
        }
    }
    assert!(
        flushed >= min_flushed,
        "the child acknowledged only {flushed} nodes"
    );
    flushed
}

fn crash_and_check(mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let flushed = run_and_kill(dir.path(), mode, 5000);
    let storage = SqliteOptions::default()
        .durability(durability(mode))
        .open(dir.path())
        .unwrap();
    let report = storage.verify().unwrap();
    assert!(report.is_ok(), "{mode}: {report:?}");
    if mode == "cache" {
        assert!(
            !storage.open_report().is_clean(),
            "an unclean shutdown must be detected"
        );
        return;
    }
    assert!(storage.open_report().is_clean());
    let mut keys = Vec::new();
    for i in 0..flushed {
        let expected = node(i, &keys);
        let key = expected.compute_key();
        let got = storage
            .fetch_data_blocking(&key)
            .unwrap_or_else(|e| panic!("{mode}: node {i} of {flushed} acknowledged nodes: {e:#}"));
        assert_eq!(*got, expected);
        keys.push(key);
    }
}

#[test]
fn a_killed_durable_store_keeps_every_flushed_node_and_no_dangling_child() {
    crash_and_check("durable");
}

#[test]
fn a_killed_sync_store_keeps_every_flushed_node_and_no_dangling_child() {
    crash_and_check("sync");
}

#[test]
fn a_killed_cache_store_is_detected_and_never_served_unverified() {
    crash_and_check("cache");
}
