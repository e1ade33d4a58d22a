//! `page_in_async` against `page_in` on a SQLite store, one call and 8 concurrent ones, and
//! the process's peak OS thread count while they run.
//!
//! The graph is the 100,000-node DAG of `benches/graph.rs` (each node points to two random
//! earlier nodes and to one of ten shared polymorphic leaves). Each of the 8 tasks pages in
//! its own root: a list of `WINDOW` consecutive nodes, the windows overlapping, whose closures
//! are about half the graph and overlap much more. Every run starts with nothing alive (the
//! previous results dropped, the arc cache pruned) on a warm store, and on a fresh tokio
//! runtime (so the blocking pool starts empty). Prints the median of `RUNS` runs.
//!
//! Run: `cargo bench --bench async_page_in` (`PAGESTORE_BENCH_NODES`, `PAGESTORE_BENCH_RUNS`
//! to change the size and the number of runs).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pagestore::{
    DataKey, PagableStorage, Shared, SqliteBackedPagableStorage, page_in, page_in_async, page_out,
};

const TASKS: usize = 8;

#[path = "common/dag.rs"]
mod dag;

use dag::{Node, build};

type Graph = Vec<Shared<Node>>;

/// The number of records reachable from `root`.
fn closure(storage: &SqliteBackedPagableStorage, root: DataKey) -> usize {
    let mut seen = HashSet::from([root]);
    let mut stack = vec![root];
    while let Some(key) = stack.pop() {
        for child in &storage.fetch_data_blocking(&key).unwrap().arcs {
            if seen.insert(*child) {
                stack.push(*child);
            }
        }
    }
    seen.len()
}

/// The process's OS threads (`/proc/self/status`), 0 if unknown.
fn threads() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("Threads:"))?;
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

/// Runs `f`, sampling the thread count every half millisecond; returns its time and the peak.
fn measured<R>(f: impl FnOnce() -> R) -> (Duration, usize, R) {
    let peak = Arc::new(AtomicUsize::new(threads()));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (Arc::clone(&peak), Arc::clone(&done));
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(threads(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(500));
            }
        })
    };
    let start = Instant::now();
    let result = f();
    let elapsed = start.elapsed();
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    (elapsed, peak.load(Ordering::Relaxed), result)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// One measurement: time and peak thread count, the results dropped and the cache pruned
/// afterwards (outside the timing).
fn run(storage: &Arc<SqliteBackedPagableStorage>, f: impl FnOnce() -> Vec<Graph>) -> (f64, usize) {
    let (elapsed, peak, results) = measured(f);
    drop(results);
    storage.release_memory();
    (elapsed.as_secs_f64(), peak)
}

fn one_sync(storage: &Arc<SqliteBackedPagableStorage>, key: DataKey) -> (f64, usize) {
    run(storage, || vec![page_in::<Graph>(storage, key).unwrap()])
}

fn one_async(storage: &Arc<SqliteBackedPagableStorage>, key: DataKey) -> (f64, usize) {
    let rt = runtime();
    let storage2 = Arc::clone(storage);
    let out = run(storage, || {
        rt.block_on(async move {
            let task =
                tokio::spawn(async move { page_in_async::<Graph>(&storage2, key).await.unwrap() });
            vec![task.await.unwrap()]
        })
    });
    rt.shutdown_timeout(Duration::from_secs(10));
    out
}

/// Page-ins of every key at once, each a task `spawn` starts on a fresh runtime.
fn many(
    storage: &Arc<SqliteBackedPagableStorage>,
    keys: &[DataKey],
    spawn: fn(Arc<SqliteBackedPagableStorage>, DataKey) -> tokio::task::JoinHandle<Graph>,
) -> (f64, usize) {
    let rt = runtime();
    let out = run(storage, || {
        rt.block_on(async {
            let tasks: Vec<_> = keys
                .iter()
                .map(|&key| spawn(Arc::clone(storage), key))
                .collect();
            let mut results = Vec::new();
            for task in tasks {
                results.push(task.await.unwrap());
            }
            results
        })
    });
    rt.shutdown_timeout(Duration::from_secs(10));
    out
}

fn many_sync(storage: &Arc<SqliteBackedPagableStorage>, keys: &[DataKey]) -> (f64, usize) {
    many(storage, keys, |storage, key| {
        tokio::task::spawn_blocking(move || page_in::<Graph>(&storage, key).unwrap())
    })
}

fn many_async(storage: &Arc<SqliteBackedPagableStorage>, keys: &[DataKey]) -> (f64, usize) {
    many(storage, keys, |storage, key| {
        tokio::spawn(async move { page_in_async::<Graph>(&storage, key).await.unwrap() })
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    eprintln!(
        "  runs (ms, sorted): {:?}",
        values
            .iter()
            .map(|v| (v * 1e4).round() / 10.0)
            .collect::<Vec<_>>()
    );
    values[values.len() / 2]
}

/// Runs `a` and `b` alternately `runs` times; their median times and highest peaks.
fn compare(
    runs: usize,
    mut a: impl FnMut() -> (f64, usize),
    mut b: impl FnMut() -> (f64, usize),
) -> ((f64, usize), (f64, usize)) {
    let (mut ta, mut tb, mut pa, mut pb) = (Vec::new(), Vec::new(), 0, 0);
    for _ in 0..runs {
        let (t, p) = a();
        ta.push(t);
        pa = pa.max(p);
        let (t, p) = b();
        tb.push(t);
        pb = pb.max(p);
    }
    ((median(ta), pa), (median(tb), pb))
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken.
    let n: usize = std::env::var("PAGESTORE_BENCH_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let runs: usize = std::env::var("PAGESTORE_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(SqliteBackedPagableStorage::try_new(dir.path()).unwrap());
    let graph = build(n);
    let whole = page_out(&storage, &graph).unwrap();
    // Windows of 15% of the nodes from 40% on, each shifted by a hundredth of the graph: their
    // closures are about 47,000 records each (the size), mostly shared.
    let window = std::env::var("PAGESTORE_BENCH_WINDOW")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3 * n / 20);
    let keys: Vec<DataKey> = (0..TASKS)
        .map(|t| {
            let start = 2 * n / 5 + t * n / 100;
            page_out(&storage, &graph[start..start + window].to_vec()).unwrap()
        })
        .collect();
    storage.flush().unwrap();
    drop(graph);
    storage.release_memory();
    let sizes: Vec<usize> = keys.iter().map(|&k| closure(&storage, k)).collect();
    let union: usize = {
        let mut all = HashSet::new();
        for &key in &keys {
            let mut stack = vec![key];
            while let Some(k) = stack.pop() {
                if all.insert(k) {
                    stack.extend(storage.fetch_data_blocking(&k).unwrap().arcs.iter());
                }
            }
        }
        all.len()
    };
    eprintln!(
        "graph: {n} nodes; {TASKS} roots of {window} nodes each, closures of {:?} records \
         ({union} distinct together); {runs} runs, medians; threads before: {}",
        sizes,
        threads()
    );

    // Warm the store's page cache once.
    one_sync(&storage, whole);

    let ((sync1, _), (async1, peak1)) = compare(
        runs,
        || one_sync(&storage, keys[0]),
        || one_async(&storage, keys[0]),
    );
    eprintln!(
        "one page-in of {} records: page_in {:.1} ms, page_in_async {:.1} ms: ratio {:.2} \
         (target <= 1.3); peak threads {peak1}",
        sizes[0],
        sync1 * 1e3,
        async1 * 1e3,
        async1 / sync1
    );
    let ((sync8, speak8), (async8, apeak8)) = compare(
        runs,
        || many_sync(&storage, &keys),
        || many_async(&storage, &keys),
    );
    eprintln!(
        "{TASKS} concurrent page-ins: spawn_blocking(page_in) {:.1} ms (peak threads {speak8}), \
         page_in_async {:.1} ms (peak threads {apeak8}): ratio {:.2} (target <= 1.5)",
        sync8 * 1e3,
        async8 * 1e3,
        async8 / sync8
    );
    let ((whole_sync, _), (whole_async, _)) = compare(
        runs.min(3),
        || one_sync(&storage, whole),
        || one_async(&storage, whole),
    );
    eprintln!(
        "the whole graph ({n} nodes): page_in {:.1} ms, page_in_async {:.1} ms: ratio {:.2}",
        whole_sync * 1e3,
        whole_async * 1e3,
        whole_async / whole_sync
    );
}
