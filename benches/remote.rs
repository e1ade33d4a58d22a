//! The remote tier on a real Redis server on loopback (started here): hydrating the
//! 100,000-node DAG of `benches/graph.rs` from Redis into an empty local store, batched
//! (512 keys per round trip, the default) against one `GET` per key, and the upload rate.
//!
//! `cargo bench --features redis --bench remote` (`REMOTE_BENCH_NODES`, default 100,000;
//! `REMOTE_BENCH_RUNS`, default 3). Needs `redis-server` on the PATH. `harness = false`: one
//! Markdown table of medians.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pagestore::remote::{BatchLimits, RedisOptions, RedisStore};
use pagestore::{DataKey, PagableStorage, Shared, TieredStorage, page_in, page_out};

#[path = "common/dag.rs"]
mod dag;
// The test servers' helpers; this benchmark uses only `start`, `url` and `cli`.
#[allow(dead_code)]
#[path = "../tests/common/redis_server.rs"]
mod redis_server;

use dag::{Node, build};

type Graph = Vec<Shared<Node>>;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut runs: Vec<Duration>) -> Duration {
    runs.sort();
    runs[runs.len() / 2]
}

fn connect(url: &str, prefix: &str, limits: BatchLimits) -> RedisStore {
    RedisOptions::new()
        .prefix(prefix)
        .batch_limits(limits)
        .io_timeout(Duration::from_secs(10))
        .connect(url)
        .expect("connect to the benchmark's server")
}

/// Pages `graph` out to a fresh tiered store on `prefix` and times the upload that follows
/// (`wait_for_upload` after the local write); returns it with the root key and node count.
fn upload(url: &str, prefix: &str, graph: &Graph) -> (Duration, DataKey, u64) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        TieredStorage::open(dir.path(), connect(url, prefix, BatchLimits::default())).unwrap(),
    );
    let root = page_out(&store, graph).unwrap();
    store.flush().unwrap();
    let started = Instant::now();
    store.wait_for_upload().unwrap();
    let took = started.elapsed();
    (took, root, store.tiered_stats().unwrap().uploaded)
}

/// Times filling an empty store with the graph under `root` (`prefetch`: fetch, check,
/// store locally), then paging it in from the filled store.
fn hydrate(url: &str, prefix: &str, root: DataKey, limits: BatchLimits) -> (Duration, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(TieredStorage::open(dir.path(), connect(url, prefix, limits)).unwrap());
    let started = Instant::now();
    store.prefetch(&[root]).unwrap();
    let fill = started.elapsed();
    let started = Instant::now();
    let graph: Graph = page_in(&store, root).unwrap();
    let read = started.elapsed();
    drop(graph);
    (fill, read)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` lists benchmarks; this one has no named ones
    }
    let nodes = env("REMOTE_BENCH_NODES", 100_000);
    let runs = env("REMOTE_BENCH_RUNS", 3).max(1);
    let Some(server) = redis_server::RedisServer::start() else {
        eprintln!("redis-server is not installed: nothing to measure");
        return;
    };
    let url = server.url();
    let graph: Graph = build(nodes);

    let mut uploads = Vec::new();
    let mut batched = (Vec::new(), Vec::new());
    let mut per_key = Vec::new();
    let mut uploaded = 0;
    for run in 0..runs {
        let prefix = format!("bench{run}");
        let (took, root, count) = upload(&url, &prefix, &graph);
        uploads.push(took);
        uploaded = count;
        let (fill, read) = hydrate(&url, &prefix, root, BatchLimits::default());
        batched.0.push(fill);
        batched.1.push(read);
        let one_key = BatchLimits {
            max_keys: 1,
            ..BatchLimits::default()
        };
        per_key.push(hydrate(&url, &prefix, root, one_key).0);
        server.cli(&["FLUSHALL"]);
    }
    let rate = |d: Duration| uploaded as f64 / d.as_secs_f64();
    let (up, fill, read, single) = (
        median(uploads),
        median(batched.0),
        median(batched.1),
        median(per_key),
    );
    println!("| {uploaded} nodes, Redis on loopback, median of {runs} | time | nodes/s |");
    println!("|---|---:|---:|");
    println!(
        "| upload (`wait_for_upload` after page-out) | {up:.2?} | {:.0} |",
        rate(up)
    );
    println!(
        "| hydrate, batched (512 keys per round trip) | {fill:.2?} | {:.0} |",
        rate(fill)
    );
    println!(
        "| hydrate, one `GET` per key | {single:.2?} | {:.0} |",
        rate(single)
    );
    println!(
        "| page_in from the hydrated local store | {read:.2?} | {:.0} |",
        rate(read)
    );
    println!(
        "\nbatched hydration is {:.1}x one GET per key",
        single.as_secs_f64() / fill.as_secs_f64()
    );
}
