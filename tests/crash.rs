//! Process-kill crash test: what each durability mode guarantees when the process dies at a
//! random moment, proven by killing a writer with SIGKILL and checking what it left behind.
//!
//! A `harness = false` test. The binary runs as the parent unless `PAGESTORE_CRASH_CHILD`
//! is set, in which case it is the child: it opens a store in the given mode, stores a
//! reproducible stream of blobs (0 B – 256 KiB, content derived from a seed, some pointing to
//! earlier ones) and after every few stores calls `flush`, printing `ACK <n>` once `flush`
//! returns (the first `n` nodes are then acknowledged); now and then it also closes and
//! reopens the store, so some kills land in a clean close or a second open. The parent kills it with SIGKILL at a
//! random moment — about one kill in six while it is opening the store — then reopens the
//! store and checks:
//!
//! - the store opens, and the open reports whether the last session ended cleanly;
//! - `Durable`, `Sync`: every acknowledged node (of this kill and the earlier kills on the same
//!   store) reads back byte-for-byte;
//! - every mode: every record present (listed straight from SQLite) fetches as bytes that hash
//!   to its key — never wrong bytes, never a panic; an unacknowledged node regenerated from
//!   the seed reads back exactly or is `NotFound`; `verify()` finds no corrupt record and no
//!   dangling child; every surviving root (the child names each node a root right after
//!   storing it, with no flush between) reaches only stored nodes;
//! - `Cache`: the unclean shutdown was detected and the store was reset or repaired (counted);
//! - a new store / flush / fetch works, and after a clean close `PRAGMA integrity_check` is ok.
//!
//! On every other store the child also collects garbage (`gc`) after some flushes, so
//! kills land in the middle of collections too. There an acknowledged node may be gone
//! (collected: no root reaches it any more), but every surviving root's graph is whole, and
//! a dangling child may only hang from a node no root reaches (garbage whose children a
//! killed sweep deleted first).
//!
//! Every tenth kill starts a fresh store, so a store survives up to ten crashes in a row. After
//! about one kill in five the parent does not check the store but leaves it crashed for the
//! next child, whose open must then recover it (Cache mode checks and repairs) — and half of
//! those children are killed during that open, so recovery itself is crashed too.
//!
//! Environment: `PAGESTORE_CRASH_KILLS` kills per mode (default 100; 2,000 for an extended
//! run), `PAGESTORE_CRASH_SEED` to replay a run (timings still vary, the workloads do not).

#[path = "crash/child.rs"]
mod child;
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use child::{KillAt, run_child};
use common::{Rng, Workload, count_from_env, seed_from_env};
use pagestore::NodeStore as _;
use pagestore::{
    DataKey, Durability, Error, OpenReport, PagableData, PagableStorage,
    SqliteBackedPagableStorage, SqliteOptions,
};

/// Set in the child's environment: `<mode> <store dir> <seed>`.
const CHILD_ENV: &str = "PAGESTORE_CRASH_CHILD";
/// The largest blob the child stores.
const MAX_BLOB: usize = 256 * 1024;
/// The child stops storing after this many nodes and waits to be killed.
const CHILD_CAP: u64 = 400;
/// Consecutive kills on one store before a fresh one is started.
const KILLS_PER_STORE: u64 = 10;

const MODES: [(&str, Durability); 3] = [
    ("cache", Durability::Cache),
    ("durable", Durability::Durable),
    ("sync", Durability::Sync),
];

fn mode_named(name: &str) -> Durability {
    MODES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, d)| *d)
        .unwrap_or_else(|| panic!("unknown durability {name:?}"))
}

fn open(dir: &Path, durability: Durability) -> anyhow::Result<SqliteBackedPagableStorage> {
    SqliteOptions::default().durability(durability).open(dir)
}

fn main() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        child::run_as_child(&spec);
        return;
    }
    if selected_by_libtest_args(std::env::args().skip(1)) {
        parent();
    }
}

/// Whether the arguments `cargo test` passes to every test binary (filters, `--skip`,
/// `--exact`, `--ignored`, `--list`, ...) select this binary's one test, named `crash`.
fn selected_by_libtest_args(args: impl Iterator<Item = String>) -> bool {
    const NAME: &str = "crash";
    let (mut filters, mut skips) = (Vec::new(), Vec::new());
    let (mut exact, mut list) = (false, false);
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--list" => list = true,
            "--exact" => exact = true,
            // This test is not #[ignore]d: `--ignored` runs only ignored tests.
            "--ignored" => return false,
            "--skip" => skips.extend(args.next()),
            // Options that take a value in the next argument.
            "--test-threads" | "--format" | "--color" | "--logfile" | "--shuffle-seed" | "-Z" => {
                args.next();
            }
            flag if flag.starts_with('-') => {}
            filter => filters.push(filter.to_string()),
        }
    }
    let matches = |pattern: &String| {
        if exact {
            pattern == NAME
        } else {
            NAME.contains(pattern.as_str())
        }
    };
    let selected =
        (filters.is_empty() || filters.iter().any(matches)) && !skips.iter().any(matches);
    if list {
        if selected {
            println!("{NAME}: test");
        }
        return false;
    }
    selected
}

// --------------------------------------------------------------------------------- parent

/// How an open after a kill classified the previous session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Outcome {
    Clean,
    Reset,
    Repaired,
}

fn outcome(storage: &SqliteBackedPagableStorage) -> Outcome {
    match storage.open_report() {
        OpenReport::Clean => Outcome::Clean,
        OpenReport::Reset { .. } => Outcome::Reset,
        OpenReport::Repaired { .. } => Outcome::Repaired,
        other => panic!("unknown open report {other:?}"),
    }
}

/// Counts for one durability mode, printed at the end and quoted in RELIABILITY.md.
#[derive(Debug, Default)]
struct Stats {
    kills: u64,
    kills_during_open: u64,
    /// Kills during an open that was recovering the store from the previous kill.
    kills_during_recovery: u64,
    /// Kills after which the store was left crashed for the next child instead of checked.
    chained: u64,
    acked_checked: u64,
    present_checked: u64,
    /// Surviving roots whose graph was walked and found complete.
    roots_checked: u64,
    /// Kills that landed while the child was collecting garbage.
    kills_during_gc: u64,
    /// Acknowledged nodes a collection deleted (no root reached them).
    acked_collected: u64,
    outcomes: HashMap<&'static str, u64>,
    /// Cache mode: acknowledged nodes that a reset or repair dropped.
    acked_lost: u64,
}

/// Every key in the database, straight from SQLite (not through pagestore).
fn raw_keys(db: &Path) -> Vec<DataKey> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap_or_else(|e| panic!("open {} read-only: {e}", db.display()));
    common::stored_keys(&conn)
        .into_iter()
        .map(|k| DataKey::from_slice(&k).unwrap_or_else(|| panic!("row with invalid key {k:02x?}")))
        .collect()
}

fn integrity_check(db: &Path) -> String {
    let conn = rusqlite::Connection::open(db)
        .unwrap_or_else(|e| panic!("open {} for integrity_check: {e}", db.display()));
    conn.query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .expect("run integrity_check")
}

fn run_mode(name: &'static str, kills: u64, seed: u64, scratch: &Path) -> Stats {
    let durability = mode_named(name);
    let strict = durability != Durability::Cache;
    let mut rng = Rng::new(seed);
    let mut stats = Stats::default();
    // What must be readable (Durable/Sync) or may be (Cache), by key.
    let mut expected: HashMap<DataKey, PagableData> = HashMap::new();
    let mut dir = PathBuf::new();
    // Whether the store was left crashed, so that the next child's open must recover it.
    let mut recovering = false;
    for kill in 0..kills {
        let mut context = format!("mode {name}, kill #{kill}, mode seed {seed:#x}");
        if kill % KILLS_PER_STORE == 0 {
            dir = scratch.join(format!("{name}-{kill}"));
            expected.clear();
        }
        let child_seed = rng.next_u64();
        let plan = if rng.percent(if recovering { 50 } else { 17 }) {
            KillAt::DuringOpen(Duration::from_micros(rng.below(4_000)))
        } else {
            KillAt::AfterAcks {
                acks: rng.below(7),
                delay: Duration::from_micros(rng.below(3_000)),
            }
        };
        let log = scratch.join(format!("{name}-child.log"));
        // Every other store is collected by its children.
        let collects = (kill / KILLS_PER_STORE) % 2 == 1;
        let killed = run_child(name, &dir, child_seed, collects, plan, &log);
        stats.kills += 1;
        stats.kills_during_gc += u64::from(killed.in_gc);
        context += &format!(
            ", plan {plan:?}; the child's last lines:\n{}",
            killed.transcript
        );
        if !killed.opened {
            stats.kills_during_open += 1;
            if recovering && !killed.opened_once {
                stats.kills_during_recovery += 1;
            }
        }

        // Regenerate what the child stored: acknowledged nodes and a few beyond.
        let mut workload = Workload::new(child_seed, MAX_BLOB);
        let mut unacked = Vec::new();
        for i in 0..killed.acked + 16 {
            let node = workload.next_node();
            if i < killed.acked {
                expected.insert(node.compute_key(), node);
            } else {
                unacked.push(node);
            }
        }

        // Sometimes leave the crashed store for the next child: its open then recovers it
        // (Cache mode checks and repairs), and it may be killed in the middle of that.
        recovering = rng.percent(20) && (kill + 1) % KILLS_PER_STORE != 0;
        if recovering {
            stats.chained += 1;
            continue;
        }

        let storage = open(&dir, durability)
            .unwrap_or_else(|e| panic!("{context}: the store does not open after SIGKILL: {e:#}"));
        let outcome = outcome(&storage);
        *stats
            .outcomes
            .entry(match outcome {
                Outcome::Clean => "clean",
                Outcome::Reset => "reset",
                Outcome::Repaired => "repaired",
            })
            .or_default() += 1;
        if killed.wrote_since_open && durability == Durability::Cache {
            // The killed session had written (a flush returned): it must not pass as clean.
            assert!(
                outcome != Outcome::Clean,
                "{context}: a kill after a flush was not detected as an unclean shutdown"
            );
        }
        if outcome == Outcome::Reset {
            assert!(!strict, "{context}: {name} reset the store after a crash");
            stats.acked_lost += expected.len() as u64;
            expected.clear();
        }

        let (mut lost, mut collected) = (Vec::new(), Vec::new());
        for (key, node) in &expected {
            match storage.fetch_data_blocking(key) {
                Ok(got) => assert!(
                    *got == *node,
                    "{context}: acknowledged node {key} read back different bytes"
                ),
                // Collected: checked below that no surviving root reaches it.
                Err(e) if Error::is_not_found(&e) && collects => collected.push(*key),
                Err(e) if Error::is_not_found(&e) && !strict => lost.push(*key),
                Err(e) => panic!("{context}: acknowledged node {key} is unreadable: {e:#}"),
            }
            stats.acked_checked += 1;
        }
        stats.acked_lost += lost.len() as u64;
        stats.acked_collected += collected.len() as u64;
        for key in lost.iter().chain(&collected) {
            expected.remove(key);
        }
        for node in &unacked {
            let key = node.compute_key();
            match storage.fetch_data_blocking(&key) {
                Ok(got) => assert!(*got == *node, "{context}: node {key} read back wrong"),
                Err(e) => assert!(
                    Error::is_not_found(&e),
                    "{context}: unacknowledged node {key}: {e:#}"
                ),
            }
        }
        // Any record present at all must read back as bytes that hash to its key.
        for key in raw_keys(storage.path()) {
            let got = storage
                .fetch_data_blocking(&key)
                .unwrap_or_else(|e| panic!("{context}: stored record {key} is unreadable: {e:#}"));
            assert_eq!(got.compute_key(), key, "{context}: wrong bytes for {key}");
            stats.present_checked += 1;
        }
        // Roots are committed after the nodes stored before them (the child names each node
        // a root right after storing it, without a flush): every surviving root names a
        // stored node whose whole graph is stored.
        let mut reachable = std::collections::HashSet::new();
        for (name, root) in storage.roots().expect("roots after crash") {
            let mut todo = vec![root];
            while let Some(key) = todo.pop() {
                if !reachable.insert(key) {
                    continue;
                }
                let node = storage.fetch_data_blocking(&key).unwrap_or_else(|e| {
                    panic!("{context}: root {name:?} reaches {key}, which is unreadable: {e:#}")
                });
                todo.extend(node.arcs.iter().copied());
            }
            stats.roots_checked += 1;
        }
        for key in &collected {
            assert!(
                !reachable.contains(key),
                "{context}: acknowledged node {key} is gone although a root reaches it"
            );
        }

        let report = storage
            .verify()
            .unwrap_or_else(|e| panic!("{context}: verify failed to run: {e:#}"));
        assert!(
            report.corrupt.is_empty(),
            "{context}: corrupt records {:?}",
            report.corrupt
        );
        // Children are committed before their parents, and a Cache-mode repair deletes what
        // dangles: in no mode may a stored node point to a missing one; except, where a
        // collection ran, garbage (no root reaches it) whose children went first.
        let dangling: Vec<_> = report
            .missing_children
            .iter()
            .filter(|(parent, _)| !collects || reachable.contains(parent))
            .collect();
        assert!(
            dangling.is_empty(),
            "{context}: dangling children {dangling:?}"
        );

        // The store still works. (Its children are read back above, so they are stored.)
        let fresh = PagableData {
            data: format!("after kill {kill} of {name}").into_bytes(),
            arcs: expected.keys().take(2).copied().collect(),
        };
        let key = storage
            .store_data(fresh.clone())
            .expect("store after crash");
        storage.flush().expect("flush after crash");
        assert!(
            *storage
                .fetch_data_blocking(&key)
                .expect("fetch after crash")
                == fresh
        );
        expected.insert(key, fresh);
        let db = storage.path().to_path_buf();
        drop(storage);
        let integrity = integrity_check(&db);
        assert_eq!(
            integrity, "ok",
            "{context}: integrity_check after a clean close"
        );
    }
    stats
}

fn parent() {
    let kills = count_from_env("PAGESTORE_CRASH_KILLS", 100);
    let seed = seed_from_env("PAGESTORE_CRASH_SEED");
    println!(
        "crash: {kills} SIGKILLs per durability mode, seed {seed:#x} \
         (replay with PAGESTORE_CRASH_SEED={seed:#x})"
    );
    let scratch = tempfile::tempdir().expect("scratch directory");
    let started = Instant::now();
    let results: Vec<(&str, Stats)> = std::thread::scope(|scope| {
        let handles: Vec<_> = MODES
            .iter()
            .enumerate()
            .map(|(i, (name, _))| {
                let mode_seed = seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                let scratch = scratch.path();
                (
                    *name,
                    scope.spawn(move || run_mode(name, kills, mode_seed, scratch)),
                )
            })
            .collect();
        handles
            .into_iter()
            .map(|(name, h)| match h.join() {
                Ok(stats) => (name, stats),
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    });
    for (name, s) in &results {
        println!(
            "crash: {name:>7}: {} kills ({} during open, {} of them during recovery; {} left \
             for the next child to recover), {} acknowledged reads checked, {} present records \
             checked, {} roots walked, {} kills during gc, {} acknowledged nodes collected, \
             opens {:?}, acknowledged nodes lost {}, failures 0",
            s.kills,
            s.kills_during_open,
            s.kills_during_recovery,
            s.chained,
            s.acked_checked,
            s.present_checked,
            s.roots_checked,
            s.kills_during_gc,
            s.acked_collected,
            s.outcomes,
            s.acked_lost
        );
    }
    println!("crash: ok in {:.1} s", started.elapsed().as_secs_f64());
}
